"""Node-addressed calls (core NATS request/reply) and node heartbeats.

    requester -> compute   shoal.compute.<node>.ask_bid       AskBid        -> BidAnswer
    requester -> compute   shoal.compute.<node>.bid_accepted  BidDecision   -> Ack
    requester -> compute   shoal.compute.<node>.bid_rejected  BidDecision   -> Ack
    requester -> compute   shoal.compute.<node>.cancel        CancelExecution -> Ack
    requester -> compute   shoal.compute.<node>.logs          LogsQuery     -> LogsAnswer
    requester -> compute   shoal.compute.<node>.approve       ApproveBid    -> Ack
    compute   -> *         shoal.node.heartbeat.<node>        Heartbeat (every second)
    compute   -> *         shoal.logs.<execution>             LogChunk (live output)

The durable outcomes (result proposed, failed, cancelled) travel as events (events.py), not as
replies, so a requester that restarts still learns them.
"""

from __future__ import annotations

from typing import Any, Self

import orjson
from pydantic import BaseModel, ConfigDict, Field

from shoal_common.spec import (
    Engine,
    Job,
    PublisherType,
    Spec,
    StorageSourceType,
    VerifierType,
    parse_bytes,
    parse_cpu,
    parse_gpu,
)

# Defaults for jobs that do not say what they need (behaviour 27).
DEFAULT_CPU = 0.1
DEFAULT_MEMORY = 100 * 1024**2
DEFAULT_DISK = 0
HEARTBEAT_INTERVAL_S = 1.0
# A node is lost after this long without a heartbeat (the issue asks for detection within 5 s).
NODE_LOST_AFTER_S = 3.5


class Message(BaseModel):
    """Base of request/reply payloads: JSON bytes, unknown fields ignored."""

    model_config = ConfigDict(extra="ignore")

    def to_bytes(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="json", by_alias=True))

    @classmethod
    def from_bytes(cls, raw: bytes) -> Self:
        return cls.model_validate(orjson.loads(raw))


class Capacity(BaseModel):
    """An amount of node resources (cores, bytes, bytes, devices)."""

    cpu: float = 0.0
    memory: int = 0
    disk: int = 0
    gpu: int = 0

    def fits_in(self, other: Capacity) -> bool:
        eps = 1e-9
        return (
            self.cpu <= other.cpu + eps
            and self.memory <= other.memory
            and self.disk <= other.disk
            and self.gpu <= other.gpu
        )

    def __add__(self, other: Capacity) -> Capacity:
        return Capacity(
            cpu=self.cpu + other.cpu,
            memory=self.memory + other.memory,
            disk=self.disk + other.disk,
            gpu=self.gpu + other.gpu,
        )

    def __sub__(self, other: Capacity) -> Capacity:
        return Capacity(
            cpu=self.cpu - other.cpu,
            memory=self.memory - other.memory,
            disk=self.disk - other.disk,
            gpu=self.gpu - other.gpu,
        )

    def free_fraction(self, total: Capacity) -> float:
        """How much of ``total`` this is, by its scarcest dimension (for ranking)."""
        parts = [self.cpu / total.cpu if total.cpu else 1.0]
        if total.memory:
            parts.append(self.memory / total.memory)
        return max(0.0, min(parts))


def job_resources(spec: Spec) -> Capacity:
    """What a job asks for, with defaults (0.1 CPU, 100 MiB); raises ValueError on bad strings."""
    res = spec.resources
    return Capacity(
        cpu=(parse_cpu(res.cpu) if res else None) or DEFAULT_CPU,
        memory=(parse_bytes(res.memory) if res else None) or DEFAULT_MEMORY,
        disk=(parse_bytes(res.disk) if res else None) or DEFAULT_DISK,
        gpu=(parse_gpu(res.gpu) if res else None) or 0,
    )


class NodeInfo(Message):
    """What a compute node can do and has free; sent in every heartbeat."""

    node_id: str
    engines: list[Engine] = Field(default_factory=list)
    storage_sources: list[StorageSourceType] = Field(default_factory=list)
    publishers: list[PublisherType] = Field(default_factory=list)
    verifiers: list[VerifierType] = Field(default_factory=list)
    arch: str = "amd64"
    labels: dict[str, str] = Field(default_factory=dict)
    total: Capacity = Field(default_factory=Capacity)
    available: Capacity = Field(default_factory=Capacity)
    max_per_job: Capacity = Field(default_factory=Capacity)
    timeout_min: float | None = None
    timeout_max: float | None = None
    bypass_clients: list[str] = Field(default_factory=list)
    running: int = 0
    queued: int = 0
    allow_networking: bool = False
    # CIDs this node holds locally (bounded sample), for data-locality preferences.
    local_cids: list[str] = Field(default_factory=list)
    content_url: str | None = None
    version: str = ""


class Heartbeat(Message):
    info: NodeInfo
    seq: int
    sent_at: float  # unix seconds
    stopping: bool = False  # a clean shutdown: stop scheduling here at once


class AskBid(Message):
    """Would you run this execution? The node reserves capacity if it says yes."""

    execution_id: str
    job: dict[str, Any]  # the job in wire form (to_wire(Job)); parse with job_model()
    requester_id: str = ""
    # The requester takes a yes at once (ADR 0029): the node treats its bid as accepted and
    # answers ``taken`` once the execution is stored, so no ``bid_accepted`` follows. Nodes of
    # an earlier build ignore it and answer a plain bid, which the requester then accepts.
    take: bool = False

    def job_model(self) -> Job:
        return Job.model_validate(self.job)


# A bid refused only because the node's capacity is committed right now: the requester may ask
# that node again for the same job once it reports room (other refusals are final for the job).
AT_CAPACITY = "node is at capacity"


class BidAnswer(Message):
    execution_id: str
    accepted: bool
    reason: str = ""
    # The node's approval policy is holding the execution; its answer comes later.
    waiting: bool = False
    # The ask said ``take`` and the node accepted its own bid: the execution is stored there and
    # queued to run.
    taken: bool = False


class BidDecision(Message):
    execution_id: str
    job_id: str
    reason: str = ""


class ApproveBid(Message):
    """An operator's decision on an execution a node holds under its "wait" approval policy.

    The node acks the call and sends its bid answer as a ``BidAnswered`` event (exactly one).
    """

    execution_id: str
    job_id: str = ""
    approved: bool = True
    reason: str = ""


class CancelExecution(Message):
    execution_id: str
    job_id: str
    reason: str = ""


class Ack(Message):
    ok: bool = True
    error: str = ""
    code: str = ""


class LogsQuery(Message):
    execution_id: str
    job_id: str
    # Start from this byte offset of each stream (0 = from the beginning).
    stdout_offset: int = 0
    stderr_offset: int = 0
    max_bytes: int = 1 << 20


class LogsAnswer(Message):
    execution_id: str
    stdout: str = ""
    stderr: str = ""
    stdout_offset: int = 0  # where the next query should start
    stderr_offset: int = 0
    finished: bool = False
    error: str = ""


class LogChunk(Message):
    execution_id: str
    stream: str  # "stdout" | "stderr"
    data: str
    offset: int  # byte offset of ``data`` in its stream
