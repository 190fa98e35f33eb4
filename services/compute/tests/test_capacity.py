"""Capacity accounting and the executor queue (behaviours 25, 26, 27)."""

from __future__ import annotations

import asyncio

import pytest

from shoal_common.events import ExecutionFailed, ResultProposed, new_id
from shoal_common.protocol import Capacity
from shoal_common.testing import wait_for
from shoal_compute.domain.capacity import Allocation, CapacityLedger
from shoal_compute.domain.queue import ExecutorQueue
from shoal_compute.executors.base import ExecutionRequest
from shoal_compute.executors.noop import NoopOutput
from shoal_compute.testing import MakeNode, noop_job

GB = 1000**3
MB = 1000**2


def test_commit_limit_includes_the_queue_allowance() -> None:
    ledger = CapacityLedger(Capacity(cpu=2, memory=GB), queue_factor=1.0)
    job = Capacity(cpu=1, memory=500 * MB)
    assert all(ledger.try_commit(f"e{i}", job) for i in range(4))
    assert not ledger.try_commit("e4", job)  # 2 running + 2 queued is all it promises
    assert ledger.available() == Capacity(cpu=0, memory=0)
    ledger.release("e0")
    assert ledger.try_commit("e4", job)


def test_job_bigger_than_the_node_is_never_committed() -> None:
    ledger = CapacityLedger(Capacity(cpu=2, memory=GB), queue_factor=10)
    assert not ledger.try_commit("big", Capacity(cpu=3, memory=1))


def test_queue_never_overcommits_and_backfills() -> None:
    ledger = CapacityLedger(Capacity(cpu=2.5, memory=4 * GB, disk=GB), queue_factor=2)
    started: list[str] = []
    queue = ExecutorQueue(ledger, lambda eid, alloc: started.append(eid))
    jobs = {f"e{i}": Capacity(cpu=1, memory=500 * MB) for i in range(4)}
    jobs["disk"] = Capacity(cpu=0.1, memory=1, disk=600 * MB)
    for eid, need in jobs.items():
        assert ledger.try_commit(eid, need)
        queue.push(eid)
    # e2 and e3 need a whole CPU and only half is left; the small job backfills past them.
    assert started == ["e0", "e1", "disk"]
    assert ledger.in_use.cpu <= 2.5
    queue.done("e0")
    assert started[-1] == "e2"
    assert queue.waiting_count == 1
    assert queue.running_count == 3


def test_gpus_are_assigned_per_execution() -> None:
    """Each run gets its own GPU ids; GPUs are never queued for (the job waits elsewhere)."""
    ledger = CapacityLedger(Capacity(cpu=8, memory=GB, gpu=2), ("g0", "g1"), queue_factor=1)
    allocations: dict[str, Allocation] = {}
    queue = ExecutorQueue(ledger, lambda eid, alloc: allocations.__setitem__(eid, alloc))
    one_gpu = Capacity(cpu=1, memory=1, gpu=1)
    for eid in ("a", "b"):
        assert ledger.try_commit(eid, one_gpu)
        queue.push(eid)
    assert {allocations["a"].gpu_ids, allocations["b"].gpu_ids} == {("g0",), ("g1",)}
    assert not ledger.try_commit("c", one_gpu)  # CPU and memory would queue; GPUs do not
    assert ledger.try_commit("d", Capacity(cpu=1, memory=1))
    freed = allocations["a"].gpu_ids
    queue.done("a")
    assert ledger.try_commit("c", one_gpu)
    queue.push("c")
    assert allocations["c"].gpu_ids == freed


def test_declared_gpu_ids_must_match_the_count() -> None:
    with pytest.raises(ValueError, match="GPU"):
        CapacityLedger(Capacity(gpu=2), ("only-one",))


class Concurrency:
    """A noop hook that records how many runs overlap, holding each until released."""

    def __init__(self) -> None:
        self.running = 0
        self.peak = 0
        self.gpus: list[tuple[str, ...]] = []
        self.gate = asyncio.Event()

    async def __call__(self, request: ExecutionRequest) -> NoopOutput | None:
        self.running += 1
        self.peak = max(self.peak, self.running)
        self.gpus.append(request.limits.gpu_ids)
        try:
            await self.gate.wait()
        finally:
            self.running -= 1
        return None


async def test_behaviour_25_two_cpu_node_runs_two_jobs_at_once(make_node: MakeNode) -> None:
    """2 CPU / 1 GB: at most 2 jobs of (1 CPU, 500 MB) at once; the rest wait, then run."""
    hook = Concurrency()
    node = await make_node(cpu=2, memory="1GB", disk="1GB", hook=hook, queue_factor=2.0)
    eids = [await node.run(noop_job(cpu="1", memory="500MB")) for _ in range(5)]
    await asyncio.sleep(0.05)
    assert hook.running == 2
    assert node.service.node.queued_count == 3
    hook.gate.set()
    outcomes = [await node.outcome(e) for e in eids]
    assert all(isinstance(o, ResultProposed) for o in outcomes)
    assert hook.peak == 2


async def test_behaviour_25_disk(make_node: MakeNode) -> None:
    """Never more than one job of 600 MB disk at once on a 1 GB disk."""
    hook = Concurrency()
    node = await make_node(cpu=8, memory="8GB", disk="1GB", hook=hook, queue_factor=2.0)
    eids = [await node.run(noop_job(disk="600MB")) for _ in range(3)]
    await asyncio.sleep(0.05)
    assert hook.running == 1
    hook.gate.set()
    for eid in eids:
        assert isinstance(await node.outcome(eid), ResultProposed)
    assert hook.peak == 1


async def test_behaviour_26_gpu_jobs_get_distinct_declared_gpus(make_node: MakeNode) -> None:
    hook = Concurrency()
    node = await make_node(gpu_ids=["fake-0", "fake-1"], hook=hook, queue_factor=1.0)
    first = [await node.run(noop_job(gpu="1")) for _ in range(2)]
    # Both GPUs taken: a third GPU job is refused (it waits at the requester, which places it
    # on whichever node frees a GPU first) rather than queued behind them here.
    refused = await node.ask(noop_job(gpu="1"))
    assert not refused.accepted
    assert "capacity" in refused.reason

    async def both_running() -> bool:
        return hook.running == 2

    await wait_for(both_running)
    assert sorted(hook.gpus) == [("fake-0",), ("fake-1",)]
    hook.gate.set()
    for eid in first:
        assert isinstance(await node.outcome(eid), ResultProposed)
    second = [await node.run(noop_job(gpu="1")) for _ in range(2)]
    for eid in second:
        assert isinstance(await node.outcome(eid), ResultProposed)
    assert all(len(g) == 1 and g[0] in ("fake-0", "fake-1") for g in hook.gpus)
    assert hook.peak == 2


async def test_behaviour_27_defaults_and_per_job_limit(make_node: MakeNode) -> None:
    node = await make_node(cpu=1, memory="1GB", max_job_memory="200MB")
    answer = await node.ask(noop_job())  # defaults: 0.1 CPU, 100 MiB
    assert answer.accepted
    assert node.service.node.ledger.committed == Capacity(cpu=0.1, memory=100 * 1024**2)
    too_big = await node.ask(noop_job(memory="300MB"))
    assert not too_big.accepted
    assert "memory" in too_big.reason


async def test_full_node_says_no(make_node: MakeNode) -> None:
    node = await make_node(cpu=1, memory="1GB", queue_factor=0)
    assert (await node.ask(noop_job(cpu="1"))).accepted
    answer = await node.ask(noop_job(cpu="1"))
    assert not answer.accepted
    assert "capacity" in answer.reason


async def test_failed_run_frees_capacity(make_node: MakeNode) -> None:
    node = await make_node(cpu=1, memory="1GB", queue_factor=0, fail_executions=True)
    eid = await node.run(noop_job(cpu="1"))
    assert isinstance(await node.outcome(eid), ExecutionFailed)
    assert node.service.node.ledger.committed == Capacity()
    assert (await node.ask(noop_job(cpu="1"), new_id())).accepted
