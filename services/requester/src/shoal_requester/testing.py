"""Test helpers for the requester (and for tests elsewhere that drive one).

Factories for records, and :class:`FakeComputeNode`: a compute node reduced to what the
requester sees of it (heartbeats, bid answers, lifecycle events), scripted per test.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from sqlalchemy import exc as sa_exc

from shoal_common.bus import Bus, MemoryBus
from shoal_common.events import (
    BidAnswered,
    Envelope,
    Event,
    ExecutionCancelled,
    ExecutionFailed,
    ResultAccepted,
    ResultProposed,
    ResultPublished,
    new_id,
)
from shoal_common.protocol import (
    Ack,
    ApproveBid,
    AskBid,
    BidAnswer,
    BidDecision,
    CancelExecution,
    Capacity,
    Heartbeat,
    LogsAnswer,
    LogsQuery,
    NodeInfo,
)
from shoal_common.spec import (
    Engine,
    ExecutionStateType,
    Job,
    JobStateType,
    Metadata,
    PublisherType,
    RunOutput,
    Spec,
    StorageSourceType,
    StorageSpec,
    VerifierType,
    to_wire,
    utcnow,
)
from shoal_common.subjects import ComputeOp, Producer, compute_rpc, heartbeat
from shoal_common.testing import wait_for
from shoal_requester.domain.model import ExecutionRecord, HistoryRecord, JobRecord
from shoal_requester.store.memory import MemoryRequesterStore
from shoal_requester.store.sql import SqlRequesterStore

if TYPE_CHECKING:
    from shoal_requester.service import RequesterService

GiB = 1024**3


def make_spec(**overrides: Any) -> Spec:
    """A small noop job spec; keyword arguments use the wire names (``Deal={...}``)."""
    data: dict[str, Any] = {
        "Engine": "Noop",
        "Verifier": "Noop",
        "PublisherSpec": {"Type": "Noop"},
        "Timeout": 60,
        "Deal": {"Concurrency": 1},
    }
    data.update(overrides)
    return Spec.model_validate(data)


def make_job(
    *,
    job_id: str | None = None,
    client_id: str = "client-1",
    state: JobStateType = JobStateType.NEW,
    created: datetime | None = None,
    spec: Spec | None = None,
    annotations: Sequence[str] = (),
    submit_key: str | None = None,
    **fields: Any,
) -> JobRecord:
    job_id = job_id or new_id()
    created = created or utcnow()
    spec = spec or make_spec()
    if annotations:
        spec = spec.model_copy(update={"annotations": list(annotations)})
    job = Job(metadata=Metadata(ID=job_id, ClientID=client_id, CreatedAt=created), spec=spec)
    return JobRecord.of(
        job,
        id=job_id,
        client_id=client_id,
        state=state,
        version=1,
        created=created,
        updated=created,
        submit_key=submit_key,
        **fields,
    )


def make_execution(
    job: JobRecord,
    node_id: str = "node-1",
    *,
    state: ExecutionStateType = ExecutionStateType.BID_ACCEPTED,
    **fields: Any,
) -> ExecutionRecord:
    now = utcnow()
    return ExecutionRecord(
        id=new_id(),
        job_id=job.id,
        node_id=node_id,
        state=state,
        version=1,
        created=now,
        updated=now,
        **fields,
    )


def node_info(
    node_id: str,
    *,
    labels: dict[str, str] | None = None,
    cpu: float = 4.0,
    memory: int = 8 * GiB,
    available: Capacity | None = None,
    engines: Sequence[Engine] = tuple(Engine),
    **fields: Any,
) -> NodeInfo:
    total = Capacity(cpu=cpu, memory=memory, disk=100 * GiB, gpu=0)
    return NodeInfo(
        node_id=node_id,
        engines=list(engines),
        storage_sources=list(StorageSourceType),
        publishers=list(PublisherType),
        verifiers=list(VerifierType),
        labels=labels or {},
        total=total,
        available=available or total,
        max_per_job=total,
        **fields,
    )


# --- a scripted compute node --------------------------------------------------------------------


@dataclass
class FakeComputeNode:
    """Answers the requester's node-addressed calls and emits lifecycle events on a bus.

    ``bid``: "yes", "no", "error" (the bid strategy raises: the reply is an error) or "wait"
    (held for approval; ``approve`` later answers with a ``BidAnswered`` event).
    ``run``: "succeed", "fail", "hang" (never finishes) or "cancelled".
    ``takes``: a yes to an ask that says ``take`` is accepted at once, as nodes of this build
    do (ADR 0029); False answers a plain bid, as a node of an earlier build would.
    """

    bus: Bus
    node_id: str
    info: NodeInfo | None = None
    bid: str = "yes"
    bid_reason: str = "node configured to reject bids"
    run: str = "succeed"
    run_delay: float = 0.0
    takes: bool = True
    stdout: str = "hello\n"
    fail_error: str = "executor failed: exit status 1"
    fail_retryable: bool = True
    result_cid: str = "QmResult"
    logs: list[str] = field(default_factory=list)
    asked: list[str] = field(default_factory=list)
    accepted: list[str] = field(default_factory=list)  # taken or accepted by a message
    taken: list[str] = field(default_factory=list)  # accepted in the ask (AskBid.take)
    rejected: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    _seq: int = 0
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _jobs: dict[str, str] = field(default_factory=dict)
    _beat: asyncio.Task[None] | None = None

    def __post_init__(self) -> None:
        if self.info is None:
            self.info = node_info(self.node_id)

    async def start(self, *, send_heartbeat: bool = True) -> FakeComputeNode:
        ops = {
            ComputeOp.ASK_BID: self._ask_bid,
            ComputeOp.BID_ACCEPTED: self._bid_accepted,
            ComputeOp.BID_REJECTED: self._bid_rejected,
            ComputeOp.CANCEL: self._cancel,
            ComputeOp.LOGS: self._logs,
            ComputeOp.APPROVE: self._approve,
        }
        for op, handler in ops.items():
            await self.bus.serve(compute_rpc(self.node_id, op), handler)
        if send_heartbeat:
            await self.heartbeat()
        return self

    async def heartbeat(self, *, stopping: bool = False, **info: Any) -> None:
        assert self.info is not None
        if info:
            self.info = self.info.model_copy(update=info)
        self._seq += 1
        beat = Heartbeat(
            info=self.info, seq=self._seq, sent_at=utcnow().timestamp(), stopping=stopping
        )
        await self.bus.publish(heartbeat(self.node_id), beat.to_bytes())

    def start_heartbeats(self, interval: float = 0.1) -> None:
        """Keep sending heartbeats until :meth:`stop_heartbeats` (loss-detection tests)."""

        async def beat() -> None:
            while True:
                await self.heartbeat()
                await asyncio.sleep(interval)

        self._beat = asyncio.create_task(beat())
        self._tasks.add(self._beat)
        self._beat.add_done_callback(self._tasks.discard)

    def stop_heartbeats(self) -> None:
        if self._beat is not None:
            self._beat.cancel()
            self._beat = None

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _ask_bid(self, data: bytes) -> bytes:
        ask = AskBid.from_bytes(data)
        self.asked.append(ask.execution_id)
        self._jobs[ask.execution_id] = ask.job_model().metadata.id
        if self.bid == "error":
            return b'{"error": "bid strategy error (node configured with bad_bids)"}'
        if self.bid == "wait":
            return BidAnswer(
                execution_id=ask.execution_id,
                accepted=False,
                waiting=True,
                reason="waiting for approval",
            ).to_bytes()
        if self.bid == "no":
            return BidAnswer(
                execution_id=ask.execution_id, accepted=False, reason=self.bid_reason
            ).to_bytes()
        if ask.take and self.takes:
            self.taken.append(ask.execution_id)
            self._accept(ask.execution_id, self._jobs[ask.execution_id])
            return BidAnswer(execution_id=ask.execution_id, accepted=True, taken=True).to_bytes()
        return BidAnswer(execution_id=ask.execution_id, accepted=True).to_bytes()

    async def _approve(self, data: bytes) -> bytes:
        decision = ApproveBid.from_bytes(data)
        await self.emit(
            BidAnswered(
                job_id=self._jobs.get(decision.execution_id, decision.job_id),
                execution_id=decision.execution_id,
                node_id=self.node_id,
                accepted=decision.approved,
                reason=decision.reason,
            )
        )
        return Ack().to_bytes()

    async def _bid_accepted(self, data: bytes) -> bytes:
        decision = BidDecision.from_bytes(data)
        if decision.execution_id in self.accepted:
            return Ack().to_bytes()  # a repeated acceptance: already running it
        if decision.execution_id not in self.asked:
            return Ack(ok=False, code="not_found", error="no bid for this execution").to_bytes()
        self._accept(decision.execution_id, decision.job_id)
        return Ack().to_bytes()

    def _accept(self, execution_id: str, job_id: str) -> None:
        self.accepted.append(execution_id)
        task = asyncio.create_task(self._execute(job_id, execution_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _bid_rejected(self, data: bytes) -> bytes:
        self.rejected.append(BidDecision.from_bytes(data).execution_id)
        return Ack().to_bytes()

    async def _cancel(self, data: bytes) -> bytes:
        cancel = CancelExecution.from_bytes(data)
        self.cancelled.append(cancel.execution_id)
        await self.emit(
            ExecutionCancelled(
                job_id=cancel.job_id,
                execution_id=cancel.execution_id,
                node_id=self.node_id,
                reason=cancel.reason,
            )
        )
        return Ack().to_bytes()

    async def _logs(self, data: bytes) -> bytes:
        query = LogsQuery.from_bytes(data)
        text = "".join(self.logs)
        chunk = text[query.stdout_offset :]
        finished = self.run != "hang"
        return LogsAnswer(
            execution_id=query.execution_id,
            stdout=chunk,
            stdout_offset=query.stdout_offset + len(chunk),
            finished=finished,
        ).to_bytes()

    async def _execute(self, job_id: str, execution_id: str) -> None:
        if self.run == "hang":
            return
        if self.run_delay:
            await asyncio.sleep(self.run_delay)
        if self.run == "fail":
            await self.emit(
                ExecutionFailed(
                    job_id=job_id,
                    execution_id=execution_id,
                    node_id=self.node_id,
                    error=self.fail_error,
                    retryable=self.fail_retryable,
                )
            )
        elif self.run == "cancelled":
            await self.emit(
                ExecutionCancelled(
                    job_id=job_id, execution_id=execution_id, node_id=self.node_id, reason="bye"
                )
            )
        else:
            await self.emit(
                ResultProposed(
                    job_id=job_id,
                    execution_id=execution_id,
                    node_id=self.node_id,
                    result_cid=self.result_cid,
                    run_output=RunOutput(stdout=self.stdout),
                )
            )

    async def emit(self, event: Event) -> None:
        await self.bus.publish_event(Envelope.wrap(event))


class NoopVerifierAndPublisher:
    """Accepts every proposal and publishes it at once (the noop verifier + noop publisher)."""

    def __init__(self, bus: Bus, *, publish: bool = True) -> None:
        self.bus = bus
        self.publish = publish

    async def start(self) -> None:
        await self.bus.consume_events(
            producer=Producer.COMPUTE,
            durable="fake-verifier",
            handler=self._on_compute,
            event_types=[ResultProposed.type],
        )
        if self.publish:
            await self.bus.consume_events(
                producer=Producer.VERIFIER,
                durable="fake-publisher",
                handler=self._on_verifier,
                event_types=[ResultAccepted.type],
            )

    async def _on_compute(self, env: Envelope) -> None:
        evt = env.parse()
        assert isinstance(evt, ResultProposed)
        await self.bus.publish_event(
            Envelope.wrap(
                ResultAccepted(
                    job_id=evt.job_id,
                    execution_id=evt.execution_id,
                    node_id=evt.node_id,
                    result_cid=evt.result_cid,
                )
            )
        )

    async def _on_verifier(self, env: Envelope) -> None:
        evt = env.parse()
        assert isinstance(evt, ResultAccepted)
        await self.bus.publish_event(
            Envelope.wrap(
                ResultPublished(
                    job_id=evt.job_id,
                    execution_id=evt.execution_id,
                    node_id=evt.node_id,
                    result=StorageSpec(
                        StorageSource=StorageSourceType.IPFS,
                        Name=f"job-{evt.job_id}-host-{evt.node_id}",
                        CID=evt.result_cid,
                    ),
                )
            )
        )


async def stop_all(*nodes: FakeComputeNode) -> None:
    for node in nodes:
        with contextlib.suppress(Exception):
            await node.stop()


# --- a requester on an in-memory bus and store ---------------------------------------------------


def submit_payload(spec: Spec, client_id: str, *, nonce: str | None = None) -> dict[str, Any]:
    """A JobCreatePayload; ``nonce`` makes otherwise identical submits distinct."""
    payload: dict[str, Any] = {"APIVersion": "V1beta1", "ClientID": client_id}
    payload["Spec"] = to_wire(spec)
    payload["Nonce"] = nonce or new_id()
    return payload


@dataclass
class Harness:
    """A started requester on a MemoryBus with a memory store, plus fake nodes."""

    service: RequesterService
    bus: MemoryBus
    nodes: dict[str, FakeComputeNode] = field(default_factory=dict)

    @property
    def store(self) -> MemoryRequesterStore:
        store = self.service.store
        assert isinstance(store, MemoryRequesterStore)
        return store

    async def node(self, node_id: str, **kwargs: Any) -> FakeComputeNode:
        labels = kwargs.pop("labels", None)
        info_fields = {
            k: kwargs.pop(k)
            for k in list(kwargs)
            if k in ("cpu", "memory", "available", "engines", "timeout_max", "timeout_min")
            or k == "bypass_clients"
        }
        node = FakeComputeNode(
            self.bus, node_id, info=node_info(node_id, labels=labels, **info_fields), **kwargs
        )
        await node.start()
        self.nodes[node_id] = node
        return node

    async def submit(self, spec: Spec | None = None, *, client_id: str = "client-1") -> str:
        payload = submit_payload(spec or make_spec(), client_id)
        job, _ = await self.service.jobs.submit(payload, orjson.dumps(payload), client_id=client_id)
        return job.id

    async def wait_state(
        self, job_id: str, *states: JobStateType, timeout: float = 5.0
    ) -> JobRecord:
        wanted = states or tuple(s for s in JobStateType if s.terminal)

        async def probe() -> JobRecord | None:
            job = await self.service.store.find_job(job_id)
            return job if job is not None and job.state in wanted else None

        return await wait_for(probe, timeout=timeout)

    async def executions(self, job_id: str) -> list[ExecutionRecord]:
        return (await self.service.store.list_executions([job_id]))[job_id]

    async def history(self, job_id: str) -> list[HistoryRecord]:
        return await self.service.store.list_history(job_id)


@contextlib.asynccontextmanager
async def harness(
    *,
    verifier: bool = True,
    publish: bool = True,
    store: MemoryRequesterStore | None = None,
    **settings: Any,
) -> AsyncIterator[Harness]:
    """A requester wired to a MemoryBus, with the noop verifier and publisher faked.

    Pass the ``store`` of an earlier harness to restart a requester on the same records.
    """
    from shoal_requester.service import RequesterService
    from shoal_requester.settings import RequesterSettings

    bus = MemoryBus()
    defaults: dict[str, Any] = {
        "housekeeping_interval": 0.05,
        "reconcile_interval": 0.5,
        "bid_timeout": 1.0,
        "rpc_timeout": 1.0,
        "job_timeout_grace": 0.0,
    }
    defaults.update(settings)
    service = RequesterService(
        RequesterSettings(**defaults), bus=bus, store=store or MemoryRequesterStore()
    )
    if verifier:
        await NoopVerifierAndPublisher(bus, publish=publish).start()
    await service.start()
    h = Harness(service=service, bus=bus)
    try:
        yield h
    finally:
        await stop_all(*h.nodes.values())
        await service.stop()
        await bus.close()


# --- stores with a slow or failing disk (placement-while-written tests) ----------------------


class HeldCommits(SqlRequesterStore):
    """A SQLite store whose commits wait while ``hold`` is clear (the disk is slow); ``held``
    is set once a commit is waiting."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.hold = asyncio.Event()
        self.hold.set()
        self.held = asyncio.Event()

    async def _commit_group(self, ops: list[Any]) -> Any:
        if not self.hold.is_set():
            self.held.set()
        await self.hold.wait()
        return await super()._commit_group(ops)


class FailingCreates(MemoryRequesterStore):
    """A memory store whose job inserts fail as a dropped database connection does."""

    async def create_job(self, job: JobRecord, **kwargs: Any) -> tuple[JobRecord, bool]:
        raise sa_exc.OperationalError("INSERT INTO jobs ...", {}, ConnectionRefusedError(111))


@contextlib.asynccontextmanager
async def held_commits_harness(
    folder: Path, **settings: Any
) -> AsyncIterator[tuple[Harness, HeldCommits]]:
    """A harness on a :class:`HeldCommits` SQLite store in ``folder`` (no verifier)."""
    store = HeldCommits(f"sqlite+aiosqlite:///{folder / 'requester.sqlite'}")
    async with harness(store=store, verifier=False, **settings) as h:  # type: ignore[arg-type]
        try:
            yield h, store
        finally:
            store.hold.set()  # a failed test must not leave the requester's writer stuck
