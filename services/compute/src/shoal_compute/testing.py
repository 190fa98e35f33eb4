"""Test helpers for the compute node (and for tests elsewhere that drive one).

:class:`NodeHarness` plays the requester's side of the protocol against a running
:class:`ComputeService`: ask for a bid, accept, reject, cancel, approve, read logs, and wait
for the events the node emits.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from shoal_common.bus import MemoryBus
from shoal_common.events import Envelope, Event, new_id
from shoal_common.protocol import (
    Ack,
    ApproveBid,
    AskBid,
    BidAnswer,
    BidDecision,
    CancelExecution,
    LogsAnswer,
    LogsQuery,
)
from shoal_common.spec import (
    Deal,
    DockerSpec,
    Engine,
    Job,
    Metadata,
    PublisherType,
    ResourcesSpec,
    Spec,
    StorageSpec,
    to_wire,
)
from shoal_common.subjects import ComputeOp, compute_rpc
from shoal_compute.service import ComputeService

# The ``make_node`` fixture of the compute tests: ``await make_node(node_id, **settings)``.
MakeNode = Callable[..., Awaitable["NodeHarness"]]


def noop_job(
    *words: str,
    job_id: str | None = None,
    cpu: str | None = None,
    memory: str | None = None,
    disk: str | None = None,
    gpu: str | None = None,
    timeout: float | None = None,
    engine: Engine = Engine.NOOP,
    inputs: list[StorageSpec] | None = None,
    outputs: list[StorageSpec] | None = None,
    client_id: str = "client",
    **spec: Any,
) -> Job:
    """A small job (``echo`` of ``words`` by default) with optional resources."""
    resources = None
    if cpu or memory or disk or gpu:
        resources = ResourcesSpec(CPU=cpu, Memory=memory, Disk=disk, GPU=gpu)
    return Job(
        Metadata=Metadata(ID=job_id or new_id(), ClientID=client_id),
        Spec=Spec(
            Engine=engine,
            Publisher=PublisherType.NOOP,
            Docker=DockerSpec(Image="busybox", Entrypoint=list(words or ("echo", "hello"))),
            Resources=resources,
            Timeout=timeout,
            inputs=inputs,
            outputs=outputs,
            Deal=Deal(Concurrency=1),
            **spec,
        ),
    )


class NodeHarness:
    """The requester's half of the conversation with one node, over a :class:`MemoryBus`."""

    def __init__(self, service: ComputeService, bus: MemoryBus) -> None:
        self.service = service
        self.bus = bus

    @property
    def node_id(self) -> str:
        return self.service.node_id

    async def _call(self, op: ComputeOp, payload: bytes) -> bytes:
        return await self.bus.request(compute_rpc(self.node_id, op), payload, timeout=10)

    async def ask(
        self, job: Job, execution_id: str | None = None, *, take: bool = False
    ) -> BidAnswer:
        ask = AskBid(execution_id=execution_id or new_id(), job=to_wire(job), take=take)
        return BidAnswer.from_bytes(await self._call(ComputeOp.ASK_BID, ask.to_bytes()))

    async def accept(self, execution_id: str, job_id: str = "") -> Ack:
        decision = BidDecision(execution_id=execution_id, job_id=job_id)
        return Ack.from_bytes(await self._call(ComputeOp.BID_ACCEPTED, decision.to_bytes()))

    async def reject(self, execution_id: str, job_id: str = "") -> Ack:
        decision = BidDecision(execution_id=execution_id, job_id=job_id)
        return Ack.from_bytes(await self._call(ComputeOp.BID_REJECTED, decision.to_bytes()))

    async def cancel(self, execution_id: str, job_id: str = "", reason: str = "") -> Ack:
        request = CancelExecution(execution_id=execution_id, job_id=job_id, reason=reason)
        return Ack.from_bytes(await self._call(ComputeOp.CANCEL, request.to_bytes()))

    async def approve(self, execution_id: str, *, approved: bool = True) -> Ack:
        request = ApproveBid(execution_id=execution_id, approved=approved)
        return Ack.from_bytes(await self._call(ComputeOp.APPROVE, request.to_bytes()))

    async def logs(self, execution_id: str, **offsets: int) -> LogsAnswer:
        query = LogsQuery(execution_id=execution_id, job_id="", **offsets)
        return LogsAnswer.from_bytes(await self._call(ComputeOp.LOGS, query.to_bytes()))

    async def run(self, job: Job, execution_id: str | None = None) -> str:
        """Ask, accept, and return the execution id (the run continues in the background)."""
        eid = execution_id or new_id()
        answer = await self.ask(job, eid)
        if not answer.accepted:
            raise AssertionError(f"node {self.node_id} refused: {answer.reason}")
        ack = await self.accept(eid, job.metadata.id)
        if not ack.ok:
            raise AssertionError(f"accept failed: {ack.error}")
        return eid

    def events(self, execution_id: str | None = None) -> list[Event]:
        """Events this bus has carried (optionally of one execution), oldest first."""
        found = [env.parse() for env in self.bus.published]
        if execution_id is None:
            return found
        return [e for e in found if getattr(e, "execution_id", None) == execution_id]

    async def outcome(self, execution_id: str, *, timeout: float = 10.0) -> Event:
        """Wait for the execution's final event (proposed, failed or cancelled)."""
        final = {"result_proposed", "execution_failed", "execution_cancelled"}
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            for env in self.bus.published:
                if env.type in final and env.data.get("execution_id") == execution_id:
                    return env.parse()
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"no outcome for {execution_id} within {timeout}s")
            await asyncio.sleep(0.005)

    async def wait_event(self, type_: str, execution_id: str, *, timeout: float = 10.0) -> Envelope:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            for env in self.bus.published:
                if env.type == type_ and env.data.get("execution_id") == execution_id:
                    return env
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"no {type_} for {execution_id} within {timeout}s")
            await asyncio.sleep(0.005)
