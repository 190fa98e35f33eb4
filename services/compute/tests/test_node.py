"""The node's request/reply operations: reservations, decisions, approval, cancel, logs."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from shoal_common.bus import MemoryBus
from shoal_common.events import (
    BidAnswered,
    ExecutionCancelled,
    ExecutionFailed,
    ResultProposed,
    new_id,
)
from shoal_common.protocol import Capacity, LogChunk
from shoal_common.subjects import log_stream
from shoal_common.testing import wait_for
from shoal_compute.domain.execution import ExecutionRecord
from shoal_compute.executors.base import ExecutionRequest
from shoal_compute.executors.noop import NoopOutput
from shoal_compute.service import ComputeService
from shoal_compute.settings import ComputeSettings
from shoal_compute.store.memory import MemoryExecutionStore
from shoal_compute.testing import MakeNode, NodeHarness, noop_job


async def test_reservation_expires_without_a_decision(make_node: MakeNode) -> None:
    node = await make_node(cpu=1, queue_factor=0, bid_reservation_timeout_s=0.1)
    eid = new_id()
    assert (await node.ask(noop_job(cpu="1"), eid)).accepted
    assert not (await node.ask(noop_job(cpu="1"))).accepted  # full while reserved

    async def released() -> bool:
        return node.service.node.ledger.committed == Capacity()

    await wait_for(released, timeout=5)
    ack = await node.accept(eid)
    assert not ack.ok
    assert ack.code == "not_found"


async def test_bid_rejected_releases_capacity(make_node: MakeNode) -> None:
    node = await make_node(cpu=1, queue_factor=0)
    eid = new_id()
    assert (await node.ask(noop_job(cpu="1"), eid)).accepted
    assert (await node.reject(eid)).ok
    assert node.service.node.ledger.committed == Capacity()
    assert (await node.ask(noop_job(cpu="1"))).accepted


async def test_behaviour_28_decisions_for_unknown_or_finished_executions(
    make_node: MakeNode,
) -> None:
    node = await make_node()
    unknown = new_id()
    for ack in (await node.accept(unknown), await node.reject(unknown)):
        assert not ack.ok
        assert ack.code == "not_found"
    eid = await node.run(noop_job())
    await node.outcome(eid)
    again = await node.reject(eid)
    assert not again.ok
    assert again.code == "invalid_transition"
    late = await node.accept(eid)
    assert not late.ok
    assert late.code == "invalid_transition"


async def _held_node(make_node: MakeNode) -> tuple[NodeHarness, asyncio.Event]:
    """A node of one CPU whose runs wait until the returned gate is set."""
    gate = asyncio.Event()

    async def hold(request: ExecutionRequest) -> NoopOutput | None:
        await gate.wait()
        return None

    return await make_node(cpu=1, queue_factor=0, hook=hold), gate


async def test_repeated_ask_and_accept_are_idempotent(make_node: MakeNode) -> None:
    node, gate = await _held_node(make_node)
    job = noop_job(cpu="1")
    eid = new_id()
    assert (await node.ask(job, eid)).accepted
    assert (await node.ask(job, eid)).accepted  # same execution: still one reservation
    assert (await node.accept(eid, job.metadata.id)).ok
    assert (await node.accept(eid, job.metadata.id)).ok
    gate.set()
    assert isinstance(await node.outcome(eid), ResultProposed)
    assert len([e for e in node.events(eid) if isinstance(e, ResultProposed)]) == 1


async def test_behaviour_29_approval_wait_then_exactly_one_answer(make_node: MakeNode) -> None:
    node = await make_node(approval="wait")
    job = noop_job()
    eid = new_id()
    answer = await node.ask(job, eid)
    assert answer.waiting
    assert not answer.accepted
    assert node.service.node.ledger.committed == Capacity()  # nothing promised yet
    assert (await node.approve(eid)).ok
    second = await node.approve(eid)
    assert not second.ok
    assert second.code == "not_found"
    envelope = await node.wait_event("bid_answered", eid)
    event = envelope.parse()
    assert isinstance(event, BidAnswered)
    assert event.accepted
    assert event.node_id == node.node_id
    assert len([e for e in node.events(eid) if isinstance(e, BidAnswered)]) == 1
    assert (await node.accept(eid, job.metadata.id)).ok
    assert isinstance(await node.outcome(eid), ResultProposed)


async def test_approval_denied(make_node: MakeNode) -> None:
    node = await make_node(approval="wait")
    eid = new_id()
    assert (await node.ask(noop_job(), eid)).waiting
    assert (await node.approve(eid, approved=False)).ok
    event = (await node.wait_event("bid_answered", eid)).parse()
    assert isinstance(event, BidAnswered)
    assert not event.accepted


async def test_cancel_reserved_queued_and_running(make_node: MakeNode) -> None:
    gate = asyncio.Event()
    started = asyncio.Event()

    async def hold(request: ExecutionRequest) -> NoopOutput | None:
        started.set()
        await gate.wait()
        return None

    node = await make_node(cpu=1, queue_factor=2, hook=hold, noop_delay_s=30)
    reserved = new_id()
    assert (await node.ask(noop_job(cpu="1"), reserved)).accepted
    assert (await node.cancel(reserved)).ok
    assert node.service.node.ledger.committed == Capacity()

    running = await node.run(noop_job(cpu="1"))
    queued = await node.run(noop_job(cpu="1"))
    await started.wait()
    assert node.service.node.queued_count == 1
    assert (await node.cancel(queued, reason="user asked")).ok
    event = await node.outcome(queued)
    assert isinstance(event, ExecutionCancelled)
    assert event.reason == "user asked"

    gate.set()  # the hook returns; the noop delay (30 s) is what the cancel interrupts
    await asyncio.sleep(0.05)
    assert (await node.cancel(running)).ok
    assert isinstance(await node.outcome(running, timeout=5), ExecutionCancelled)
    assert node.service.node.ledger.committed == Capacity()
    again = await node.cancel(running)
    assert again.ok  # cancelling a cancelled execution is harmless
    unknown = await node.cancel(new_id())
    assert not unknown.ok
    assert unknown.code == "not_found"


async def test_cancel_finished_execution_is_an_error(make_node: MakeNode) -> None:
    node = await make_node()
    eid = await node.run(noop_job())
    await node.outcome(eid)
    ack = await node.cancel(eid)
    assert not ack.ok
    assert ack.code == "already_terminal"


async def test_noop_echo_bad_results_and_failures(make_node: MakeNode) -> None:
    good = await make_node("good")
    bad = await make_node("bad", bad_results=True)
    failing = await make_node("failing", fail_executions=True)
    job = noop_job("echo", "-n", "apples")
    proposed = await good.outcome(await good.run(job))
    assert isinstance(proposed, ResultProposed)
    assert proposed.run_output.stdout == "apples"
    other = await bad.outcome(await bad.run(job))
    assert isinstance(other, ResultProposed)
    assert other.result_cid != proposed.result_cid
    failed = await failing.outcome(await failing.run(job))
    assert isinstance(failed, ExecutionFailed)
    assert failed.retryable
    assert "fail_executions" in failed.error


async def test_behaviour_23_timeout_fails_with_timed_out(make_node: MakeNode) -> None:
    node = await make_node(noop_delay_s=5)
    event = await node.outcome(await node.run(noop_job(timeout=0.1)))
    assert isinstance(event, ExecutionFailed)
    assert event.timed_out
    assert "timed out" in event.error
    assert not event.retryable


async def test_non_zero_exit_is_a_result(make_node: MakeNode) -> None:
    node = await make_node(noop_exit_code=19, noop_stdout="apples", noop_stderr="oranges")
    event = await node.outcome(await node.run(noop_job()))
    assert isinstance(event, ResultProposed)
    out = event.run_output
    assert (out.stdout, out.stderr, out.exit_code) == ("apples", "oranges", 19)


async def test_logs_and_live_chunks(make_node: MakeNode) -> None:
    text = "line one\nline two ✓\n"

    async def script(request: ExecutionRequest) -> NoopOutput:
        return NoopOutput(stdout=text, stderr="warn\n")

    node = await make_node(hook=script, live_log_chunks=True)
    eid = new_id()
    chunks: list[LogChunk] = []

    async def collect(subject: str, data: bytes) -> None:
        chunks.append(LogChunk.from_bytes(data))

    await node.bus.subscribe(log_stream(eid), collect)
    await node.run(noop_job(), eid)
    await node.outcome(eid)
    assert "".join(c.data for c in chunks if c.stream == "stdout") == text
    full = await node.logs(eid)
    assert (full.stdout, full.stderr, full.finished) == (text, "warn\n", True)
    # Resume from an offset in the middle of the multi-byte character: never split.
    part = await node.logs(eid, stdout_offset=0, max_bytes=len(text.encode()) - 2)
    assert "✓" not in part.stdout
    rest = await node.logs(eid, stdout_offset=part.stdout_offset, stderr_offset=999)
    assert part.stdout + rest.stdout == text
    missing = await node.logs(new_id())
    assert missing.error


async def test_hook_scripts_one_run(make_node: MakeNode) -> None:
    async def script(request: ExecutionRequest) -> NoopOutput:
        return NoopOutput(runner_error="sandbox exploded")

    node = await make_node(hook=script)
    event = await node.outcome(await node.run(noop_job()))
    assert isinstance(event, ExecutionFailed)
    assert event.error == "sandbox exploded"


@pytest.mark.parametrize("policy", ["auto"])
async def test_heartbeat_carries_node_info(make_node: MakeNode, policy: str) -> None:
    beats: list[bytes] = []

    node = await make_node(labels="env=prod", approval=policy)

    async def collect(subject: str, data: bytes) -> None:
        beats.append(data)

    await node.bus.subscribe(f"shoal.node.heartbeat.{node.node_id}", collect)
    await node.service._send_heartbeat()
    from shoal_common.protocol import Heartbeat

    beat = Heartbeat.from_bytes(beats[-1])
    assert beat.info.labels == {"env": "prod"}
    assert beat.info.total.cpu == 4.0
    assert beat.info.engines
    assert beat.info.arch


class GatedStore(MemoryExecutionStore):
    """A store whose ``create`` waits for a gate (a slow disk) or fails."""

    def __init__(self, *, fail: bool = False) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.entered = asyncio.Event()  # a create is waiting at the gate
        self.fail = fail

    async def create(
        self,
        record: ExecutionRecord,
        *,
        events: Any = (),
        on_ordered: Callable[[], None] | None = None,
    ) -> None:
        self.entered.set()
        await self.gate.wait()
        if self.fail:
            raise OSError("disk full")
        await super().create(record, events=events, on_ordered=on_ordered)


@contextlib.asynccontextmanager
async def _node_on(
    store: GatedStore, tmp_path: Path, **services: Any
) -> AsyncIterator[tuple[ComputeService, NodeHarness]]:
    """A started node ("g") on ``store``, over a MemoryBus."""
    bus = MemoryBus()
    service = ComputeService(
        ComputeSettings(node_id="g", state_dir=tmp_path, engines=["Noop"], serve_http=False),
        bus=bus,
        store=store,
        **services,
    )
    await service.start()
    try:
        yield service, NodeHarness(service, bus)
    finally:
        await service.stop()
        await bus.close()


def _nothing_left(service: ComputeService) -> Callable[[], Awaitable[bool]]:
    """Nothing queued or running: a run that was going has ended (its events, if any, sent)."""

    async def probe() -> bool:
        return service.node.queued_count == 0 and service.node.running_count == 0

    return probe


async def test_run_overlaps_the_accept_write_but_waits_for_it(tmp_path: Path) -> None:
    store = GatedStore()
    ran = asyncio.Event()

    async def hook(request: ExecutionRequest) -> NoopOutput | None:
        ran.set()
        return None

    async with _node_on(store, tmp_path, noop_hook=hook) as (_service, node):
        eid = new_id()
        assert (await node.ask(noop_job(), eid)).accepted
        accepting = asyncio.create_task(node.accept(eid))
        await asyncio.wait_for(ran.wait(), 5)  # the run started before the row was written
        await asyncio.sleep(0.05)
        assert node.events(eid) == []  # but its outcome waits for the row
        store.gate.set()
        assert (await accepting).ok
        assert isinstance(await node.outcome(eid), ResultProposed)


async def test_accept_that_cannot_be_stored_records_nothing(tmp_path: Path) -> None:
    store = GatedStore(fail=True)
    store.gate.set()
    async with _node_on(store, tmp_path) as (service, node):
        eid = new_id()
        assert (await node.ask(noop_job(), eid)).accepted
        with pytest.raises(OSError, match="disk full"):
            await node.accept(eid)
        await wait_for(_nothing_left(service))
        assert node.events(eid) == []
        assert service.node.ledger.committed == Capacity()


# --- asks that take their yes (ADR 0029) ---------------------------------------------------


async def test_an_ask_that_takes_is_answered_once_the_execution_is_stored(tmp_path: Path) -> None:
    store = GatedStore()
    async with _node_on(store, tmp_path) as (service, node):
        eid = new_id()
        asking = asyncio.create_task(node.ask(noop_job(), eid, take=True))
        await asyncio.wait_for(store.entered.wait(), 5)
        assert not asking.done()  # the row is not written yet: no answer
        store.gate.set()
        answer = await asking
        assert (answer.accepted, answer.taken) == (True, True)
        assert service.node.reservations == {}  # accepted, not merely reserved
        assert isinstance(await node.outcome(eid), ResultProposed)  # no bid_accepted was sent


async def test_a_take_repeated_or_after_a_plain_ask_is_the_same_execution(
    make_node: MakeNode,
) -> None:
    node, gate = await _held_node(make_node)
    job = noop_job(cpu="1")
    eid = new_id()
    plain = await node.ask(job, eid)
    assert (plain.accepted, plain.taken) == (True, False)
    for _ in range(2):  # takes the reservation, then answers the same again
        answer = await node.ask(job, eid, take=True)
        assert (answer.accepted, answer.taken) == (True, True)
    assert (await node.accept(eid, job.metadata.id)).ok  # an acceptance as well: still one
    gate.set()
    assert isinstance(await node.outcome(eid), ResultProposed)
    assert len([e for e in node.events(eid) if isinstance(e, ResultProposed)]) == 1


async def test_a_take_the_node_refuses_or_holds_takes_nothing(make_node: MakeNode) -> None:
    node = await make_node(cpu=1, queue_factor=0)
    busy = await node.ask(noop_job(cpu="2"), take=True)
    assert (busy.accepted, busy.taken) == (False, False)
    held = await make_node(approval="wait")
    waiting = await held.ask(noop_job(), take=True)
    assert (waiting.accepted, waiting.waiting, waiting.taken) == (False, True, False)


async def test_a_take_that_cannot_be_stored_records_nothing(tmp_path: Path) -> None:
    store = GatedStore(fail=True)
    store.gate.set()
    async with _node_on(store, tmp_path) as (service, node):
        eid = new_id()
        # An error, as for an acceptance that cannot be stored: not a verdict on the job.
        with pytest.raises(OSError, match="disk full"):
            await node.ask(noop_job(), eid, take=True)
        await wait_for(_nothing_left(service))
        assert node.events(eid) == []
        assert service.node.ledger.committed == Capacity()
