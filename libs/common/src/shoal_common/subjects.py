"""Every NATS subject and stream name, built here and nowhere else.

Layout:
  shoal.node.heartbeat.<node>         core NATS, compute -> requester, node info + capacity
  shoal.compute.<node>.<op>           core request/reply, requester -> one compute node
  shoal.evt.<producer>.<event>[.<route>...]
                                      JetStream, durable lifecycle events (one stream per producer);
                                      a routed event (``ResultProposed``) adds tokens that say
                                      which services must read it, so the others are never sent it
  shoal.verifier.key                  core request/reply, compute -> verifier, sealing key
"""

from __future__ import annotations

import re
from enum import StrEnum

_TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")


def check_token(value: str) -> str:
    """Node ids and other subject tokens: letters, digits, '-' and '_' only."""
    if not _TOKEN.match(value):
        raise ValueError(f"{value!r} cannot be used in a subject: use letters, digits, '-' or '_'")
    return value


class Producer(StrEnum):
    REQUESTER = "requester"
    COMPUTE = "compute"
    VERIFIER = "verifier"
    PUBLISHER = "publisher"


class ComputeOp(StrEnum):
    ASK_BID = "ask_bid"
    BID_ACCEPTED = "bid_accepted"
    BID_REJECTED = "bid_rejected"
    CANCEL = "cancel"
    LOGS = "logs"
    APPROVE = "approve"


HEARTBEAT_ALL = "shoal.node.heartbeat.*"
# Every node-addressed call, for one subscriber serving many nodes (simulated fleets).
COMPUTE_RPC_ANY = "shoal.compute.*.*"

# Core request/reply: compute -> verifier, the public key proposals are sealed to (ADR 0004).
VERIFIER_KEY = "shoal.verifier.key"


def heartbeat(node_id: str) -> str:
    return f"shoal.node.heartbeat.{check_token(node_id)}"


def compute_rpc(node_id: str, op: ComputeOp) -> str:
    return f"shoal.compute.{check_token(node_id)}.{op.value}"


def compute_rpc_all(node_id: str) -> str:
    return f"shoal.compute.{check_token(node_id)}.*"


def parse_compute_rpc(subject: str) -> tuple[str, ComputeOp] | None:
    """``shoal.compute.<node>.<op>`` -> (node, op); None for any other subject."""
    parts = subject.split(".")
    if len(parts) != 4 or parts[:2] != ["shoal", "compute"]:
        return None
    try:
        return parts[2], ComputeOp(parts[3])
    except ValueError:
        return None


def log_stream(execution_id: str) -> str:
    """Live log chunks of one execution (core NATS; subscribers come and go)."""
    return f"shoal.logs.{check_token(execution_id)}"


def event(producer: Producer, event_type: str, route: str | None = None) -> str:
    subject = f"shoal.evt.{producer.value}.{check_token(event_type)}"
    return f"{subject}.{route}" if route else subject


def event_filter(producer: Producer, selector: str, *, routed: bool) -> list[str]:
    """The subjects a consumer of ``selector`` reads: an event type, or ``<type>.<route>``.

    A bare type reads the event on every route (``routed``: the type has routes). A route
    pattern (NATS wildcards allowed) reads that route, and also the bare subject: events
    written before the type had routes carry no route, and each consumer still decides those
    for itself.
    """
    event_type, _, route = selector.partition(".")
    bare = event(producer, event_type)
    if route:
        return [bare, f"{bare}.{route}"]
    return [bare, f"{bare}.>"] if routed else [bare]


def stream_name(producer: Producer) -> str:
    return f"SHOAL_{producer.value.upper()}"


def stream_subjects(producer: Producer) -> list[str]:
    return [f"shoal.evt.{producer.value}.>"]
