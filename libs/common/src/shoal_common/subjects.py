"""Every NATS subject and stream name, built here and nowhere else.

Layout:
  shoal.node.heartbeat.<node>         core NATS, compute -> requester, node info + capacity
  shoal.compute.<node>.<op>           core request/reply, requester -> one compute node
  shoal.evt.<producer>.<event>        JetStream, durable lifecycle events (one stream per producer)
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


def event(producer: Producer, event_type: str) -> str:
    return f"shoal.evt.{producer.value}.{check_token(event_type)}"


def stream_name(producer: Producer) -> str:
    return f"SHOAL_{producer.value.upper()}"


def stream_subjects(producer: Producer) -> list[str]:
    return [f"shoal.evt.{producer.value}.>"]
