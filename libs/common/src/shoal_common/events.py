"""Lifecycle events and the envelope they travel in.

Events are facts in the past tense. Each is published to JetStream inside an :class:`Envelope`
whose ``id`` doubles as the ``Nats-Msg-Id`` (JetStream drops duplicates within its window), and
consumers also de-duplicate on it, so a relay that re-sends after a crash is harmless.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any, ClassVar

import orjson
from pydantic import BaseModel, ConfigDict, Field

from shoal_common import tracing
from shoal_common.spec import (
    Deal,
    PublisherSpec,
    PublisherType,
    RunOutput,
    StorageSourceType,
    StorageSpec,
    VerifierType,
    utcnow,
)
from shoal_common.subjects import Producer, event


class _IdRandomness(threading.local):
    """Random bytes for ids, drawn from the OS a batch at a time.

    ``os.urandom`` per id was a system call that let go of the GIL: on the requester's event
    loop, getting it back could wait for another thread's switch interval (ADR 0018). One draw
    per 256 ids keeps the same source. Per thread, and drawn anew in a forked child, so no two
    processes or threads ever share bytes.
    """

    BATCH = 256

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.pool = b""
        self.at = 0

    def take(self, size: int) -> bytes:
        if self.at + size > len(self.pool):
            self.pool = os.urandom(size * self.BATCH)
            self.at = 0
        chunk = self.pool[self.at : self.at + size]
        self.at += size
        return chunk


_ID_RANDOMNESS = _IdRandomness()
# A forked child has only the forking thread: drop the batch it inherited from the parent.
os.register_at_fork(after_in_child=_ID_RANDOMNESS.reset)


def new_id() -> str:
    """Time-ordered unique id (UUIDv7 layout), so ids sort by creation."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(_ID_RANDOMNESS.take(10), "big")
    value = (ms << 80) | (0x7 << 76) | ((rand >> 68) & 0xFFF) << 64 | (0b10 << 62)
    value |= rand & ((1 << 62) - 1)
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


# --- which service settles a result (ADR 0017) -------------------------------------------------
# Noop verification and noop publishing decide nothing. The requester applies them itself, in the
# transaction that records the result, and a noop-verified result goes from the node straight to
# its publisher: no round trip through the verifier (and none through the publisher for the noop
# publisher). The verifier and the publisher pick their events by the same rules, applied to
# what the event says; the requester applies them to the job's own spec.


def requester_verifies(verifier: VerifierType | None) -> bool:
    """A noop-verified proposal is accepted by the requester, not the verifier."""
    return (verifier or VerifierType.NOOP) is VerifierType.NOOP


def requester_publishes(publisher: PublisherType | None) -> bool:
    """An accepted result of a noop-published job needs no publisher (``None`` means Local)."""
    return publisher is PublisherType.NOOP


def publisher_takes_proposal(
    verifier: VerifierType | None, publisher: PublisherType | None
) -> bool:
    """A noop-verified result with a real publisher is published straight from its proposal."""
    return requester_verifies(verifier) and not requester_publishes(publisher)


def published_name(job_id: str, node_id: str) -> str:
    """The reference system's name for a published result."""
    return f"job-{job_id}-host-{node_id}"


def noop_publication(job_id: str, node_id: str, result_cid: str) -> StorageSpec:
    """What publishing with the noop publisher gives: the result's CID, stored nowhere new."""
    return StorageSpec(
        StorageSource=StorageSourceType.IPFS, Name=published_name(job_id, node_id), CID=result_cid
    )


class Event(BaseModel):
    """Base of every lifecycle event. Consumers ignore fields they do not know."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    type: ClassVar[str]
    producer: ClassVar[Producer]
    version: ClassVar[int] = 1
    # Whether its subject carries a route (``route``): consumers then read the routes they need.
    routed: ClassVar[bool] = False

    job_id: str

    @classmethod
    def route(cls, data: Mapping[str, Any]) -> str | None:
        """Subject tokens after the type that say who must read the event (its JSON form)."""
        return None


class Envelope(BaseModel):
    """Wire wrapper: id, type, version, time, producer, trace context, payload."""

    model_config = ConfigDict(extra="ignore")

    id: str = Field(default_factory=new_id)
    type: str
    version: int = 1
    time: datetime = Field(default_factory=utcnow)
    producer: str
    trace: dict[str, str] = Field(default_factory=dict)
    data: dict[str, Any]

    @classmethod
    def wrap(cls, evt: Event, *, trace: dict[str, str] | None = None) -> Envelope:
        return cls(
            type=evt.type,
            version=evt.version,
            producer=evt.producer.value,
            trace=trace if trace is not None else tracing.inject({}),
            data=evt.model_dump(mode="json"),
        )

    @property
    def subject(self) -> str:
        kind = EVENT_TYPES.get(self.type)
        route = kind.route(self.data) if kind is not None and kind.routed else None
        return event(Producer(self.producer), self.type, route)

    def to_bytes(self) -> bytes:
        # Straight to orjson: the bytes model_dump(mode="json") then orjson would give (UTC
        # written "Z"; the fields, in declaration order, are the model's __dict__), in a
        # quarter of the time. Every event is written twice (outbox row, then the publish),
        # on every service's event loop.
        try:
            return orjson.dumps(self.__dict__, option=orjson.OPT_UTC_Z)
        except TypeError:  # a value orjson does not write (a model put in ``data``)
            return orjson.dumps(self.model_dump(mode="json"))

    @classmethod
    def from_bytes(cls, raw: bytes) -> Envelope:
        return cls.model_validate(orjson.loads(raw))

    def parse(self) -> Event:
        """The typed event; raises KeyError for a type this build does not know."""
        return EVENT_TYPES[self.type].model_validate(self.data)


# --- compute -> verifier, requester --------------------------------------------------------------


class ResultProposed(Event):
    """A compute node finished a run and proposes its result for verification."""

    type: ClassVar[str] = "result_proposed"
    producer: ClassVar[Producer] = Producer.COMPUTE
    routed: ClassVar[bool] = True
    # What the verifier and the publisher read (subjects.event_filter); the requester reads all.
    FOR_VERIFIER: ClassVar[str] = "result_proposed.verify.*"
    FOR_PUBLISHER: ClassVar[str] = "result_proposed.noop.publish"

    execution_id: str
    node_id: str
    result_cid: str
    run_output: RunOutput
    verifier: VerifierType = VerifierType.NOOP
    deal: Deal = Field(default_factory=Deal)
    publisher: PublisherSpec = Field(default_factory=PublisherSpec)
    # Where the publisher can fetch the results folder from (the node's content endpoint).
    result_url: str | None = None
    # Deterministic jobs: the result sealed to the verifier (shoal_common.commitments, ADR 0004);
    # result_cid, run_output, result_url and size are then blank until the verifier decides.
    commitment: str | None = None
    size: int = 0

    @classmethod
    def route(cls, data: Mapping[str, Any]) -> str:
        """``<verify|noop>.<publish|noop>``, from what the proposal claims (ADR 0027).

        ``noop.*`` only for an open proposal claiming noop verification: the verifier ignores
        those unless the requester planned the job, and then a node claiming noop for it has
        lied, which the requester does not believe either (ADR 0017); ``*.publish`` for a real
        publisher. So a noop/noop proposal (``noop.noop``) reaches only the requester. Anything
        unexpected routes to the verifier, which decides as before.
        """
        claimed = data.get("verifier", VerifierType.NOOP.value)
        open_noop = claimed == VerifierType.NOOP.value and not data.get("commitment")
        publisher = data.get("publisher")
        kind = publisher.get("type") if isinstance(publisher, Mapping) else None
        noop_publisher = kind == PublisherType.NOOP.value
        return f"{'noop' if open_noop else 'verify'}.{'noop' if noop_publisher else 'publish'}"


class ExecutionFailed(Event):
    """A compute node could not produce a result (bad input, sandbox error, timeout)."""

    type: ClassVar[str] = "execution_failed"
    producer: ClassVar[Producer] = Producer.COMPUTE

    execution_id: str
    node_id: str
    error: str
    run_output: RunOutput | None = None
    retryable: bool = True
    timed_out: bool = False
    # What the run wrote before it failed (a timeout kills a run part-way), content-addressed
    # and served by the node like a proposed result, so it can still be published/downloaded.
    result_cid: str | None = None
    result_url: str | None = None
    size: int = 0
    # Where the job's results go, so the publisher can publish such a partial result too.
    publisher: PublisherSpec = Field(default_factory=PublisherSpec)


class BidAnswered(Event):
    """A late bid answer: the node held the ask (approval policy "wait") and now decides."""

    type: ClassVar[str] = "bid_answered"
    producer: ClassVar[Producer] = Producer.COMPUTE

    execution_id: str
    node_id: str
    accepted: bool
    reason: str = ""


class ExecutionCancelled(Event):
    type: ClassVar[str] = "execution_cancelled"
    producer: ClassVar[Producer] = Producer.COMPUTE

    execution_id: str
    node_id: str
    reason: str = ""


# --- verifier -> publisher, requester, compute ---------------------------------------------------


class ResultAccepted(Event):
    type: ClassVar[str] = "result_accepted"
    producer: ClassVar[Producer] = Producer.VERIFIER

    execution_id: str
    node_id: str
    result_cid: str
    publisher: PublisherSpec = Field(default_factory=PublisherSpec)
    result_url: str | None = None
    # The run output of a sealed proposal, revealed once the verifier has decided.
    run_output: RunOutput | None = None


class ResultRejected(Event):
    type: ClassVar[str] = "result_rejected"
    producer: ClassVar[Producer] = Producer.VERIFIER

    execution_id: str
    node_id: str
    result_cid: str
    reason: str
    run_output: RunOutput | None = None


class VerificationEscalated(Event):
    """Proposals disagreed without a winner: the requester should run ``additional`` more."""

    type: ClassVar[str] = "verification_escalated"
    producer: ClassVar[Producer] = Producer.VERIFIER

    additional: int
    reason: str


class VerificationFailed(Event):
    """No result reached the confidence needed, and escalation is exhausted."""

    type: ClassVar[str] = "verification_failed"
    producer: ClassVar[Producer] = Producer.VERIFIER

    reason: str


# --- publisher -> requester ----------------------------------------------------------------------


class ResultPublished(Event):
    type: ClassVar[str] = "result_published"
    producer: ClassVar[Producer] = Producer.PUBLISHER

    execution_id: str
    node_id: str
    result: StorageSpec
    # The result of a failed run (what it wrote before it failed, ``ExecutionFailed``): it
    # makes the results downloadable, never the execution completed.
    partial: bool = False
    # Published straight from a proposal that claimed noop verification (ADR 0017), with no
    # verifier's decision: it counts only for a job whose own verifier is noop.
    unverified: bool = False


class PublishFailed(Event):
    type: ClassVar[str] = "publish_failed"
    producer: ClassVar[Producer] = Producer.PUBLISHER

    execution_id: str
    node_id: str
    error: str
    # A failed run's partial result could not be published (the execution stays failed).
    partial: bool = False
    unverified: bool = False  # as in ResultPublished


# --- requester -> verifier -----------------------------------------------------------------------


class ExecutionsPlanned(Event):
    """The requester placed (more) executions of a job; the verifier learns how many to expect."""

    type: ClassVar[str] = "executions_planned"
    producer: ClassVar[Producer] = Producer.REQUESTER

    expected: int
    verifier: VerifierType
    deal: Deal
    # execution id -> node id of every execution placed for verification so far (latest wins).
    # When set, the verifier counts only proposals of these executions from these nodes.
    executions: dict[str, str] = Field(default_factory=dict)


EVENT_TYPES: dict[str, type[Event]] = {
    cls.type: cls
    for cls in (
        ResultProposed,
        ExecutionFailed,
        ExecutionCancelled,
        BidAnswered,
        ResultAccepted,
        ResultRejected,
        VerificationEscalated,
        VerificationFailed,
        ResultPublished,
        PublishFailed,
        ExecutionsPlanned,
    )
}
