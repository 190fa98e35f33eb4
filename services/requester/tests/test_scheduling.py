"""Scheduling behaviours (13-24, 27, queueing, retries, lost nodes, cancel, timeouts) on a
requester with a memory store, an in-memory bus and scripted compute nodes."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from datetime import timedelta

import pytest

from shoal_common.errors import NotEnoughNodes, NotFound, Unauthorized
from shoal_common.events import (
    Envelope,
    ExecutionsPlanned,
    VerificationEscalated,
    VerificationFailed,
)
from shoal_common.protocol import DEFAULT_CPU, DEFAULT_MEMORY, Capacity
from shoal_common.spec import ExecutionStateType, JobStateType, utcnow
from shoal_common.testing import wait_for
from shoal_requester.domain.model import Changes, new_execution_update
from shoal_requester.domain.orchestrator import PLACEMENT_MAX_YIELD
from shoal_requester.testing import (
    FakeComputeNode,
    GiB,
    Harness,
    harness,
    make_execution,
    make_job,
    make_spec,
    node_info,
)

ES = ExecutionStateType
JS = JobStateType


def states(executions: list) -> Counter[ExecutionStateType]:  # type: ignore[type-arg]
    return Counter(e.state for e in executions)


async def test_13_concurrency_2_on_3_nodes() -> None:
    async with harness() as h:
        for i in range(3):
            await h.node(f"n{i}")
        job_id = await h.submit(make_spec(Deal={"Concurrency": 2}))
        job = await h.wait_state(job_id)
        assert job.state is JS.COMPLETED
        execs = await h.executions(job_id)
        assert states(execs) == {ES.COMPLETED: 2}
        assert len({e.node_id for e in execs}) == 2


async def test_14_single_node_min_bids_0() -> None:
    async with harness() as h:
        await h.node("only")
        job_id = await h.submit(make_spec(Deal={"Concurrency": 1, "MinBids": 0}))
        assert (await h.wait_state(job_id)).state is JS.COMPLETED
        assert states(await h.executions(job_id)) == {ES.COMPLETED: 1}


async def test_15_min_bids_3_accepts_one_rejects_two() -> None:
    async with harness() as h:
        nodes = [await h.node(f"n{i}") for i in range(3)]
        job_id = await h.submit(make_spec(Deal={"Concurrency": 1, "MinBids": 3}))
        assert (await h.wait_state(job_id)).state is JS.COMPLETED
        assert states(await h.executions(job_id)) == {ES.COMPLETED: 1, ES.BID_REJECTED: 2}
        await h.service.orchestrator.idle()
        assert sum(len(n.rejected) for n in nodes) == 2


async def test_16_min_bids_unmet_fails_and_cancels_the_good_bidder() -> None:
    async with harness(max_retries=0, over_ask=1.5) as h:
        good = await h.node("good")
        await h.node("bad-1", bid="error")
        await h.node("bad-2", bid="error")
        job_id = await h.submit(make_spec(Deal={"Concurrency": 1, "MinBids": 2}))
        job = await h.wait_state(job_id)
        assert job.state is JS.ERROR
        assert "not enough bids" in job.status
        execs = await h.executions(job_id)
        assert states(execs) == {ES.CANCELLED: 1, ES.ASK_FOR_BID_REJECTED: 2}
        [cancelled] = [e for e in execs if e.state is ES.CANCELLED]
        assert cancelled.node_id == "good"
        await h.service.orchestrator.idle()
        assert good.rejected == [cancelled.id]
        assert good.accepted == []


async def test_17_concurrency_3_min_bids_3() -> None:
    async with harness() as h:
        for i in range(3):
            await h.node(f"n{i}")
        job_id = await h.submit(make_spec(Deal={"Concurrency": 3, "MinBids": 3}))
        assert (await h.wait_state(job_id)).state is JS.COMPLETED
        assert states(await h.executions(job_id)) == {ES.COMPLETED: 3}


async def test_18_min_bids_above_node_count_refused_at_submit() -> None:
    async with harness() as h:
        for i in range(3):
            await h.node(f"n{i}")
        with pytest.raises(NotEnoughNodes, match="not enough nodes"):
            await h.submit(make_spec(Deal={"Concurrency": 3, "MinBids": 5}))
        assert h.store.jobs == {}


async def test_19_rejection_then_completion_on_the_good_node() -> None:
    async with harness() as h:
        await h.node("refuser", bid="no", bid_reason="node configured to reject bids")
        await h.node("good")
        # Prefer the refusing node so it is asked first.
        spec = make_spec(
            NodeSelectors=[{"Key": "favour_name", "Operator": "=", "Values": ["refuser"]}]
        )
        job_id = await h.submit(spec)
        assert (await h.wait_state(job_id)).state is JS.COMPLETED
        execs = await h.executions(job_id)
        by_node = {e.node_id: e for e in execs}
        assert by_node["refuser"].state is ES.ASK_FOR_BID_REJECTED
        assert by_node["refuser"].status == "node configured to reject bids"
        assert by_node["good"].state is ES.COMPLETED
        comments = [h.comment for h in await h.history(job_id)]
        assert "node configured to reject bids" in comments


async def test_20_only_a_refusing_node_fails_with_the_reason() -> None:
    async with harness() as h:
        await h.node("refuser", bid="no", bid_reason="policy says no")
        job_id = await h.submit()
        job = await h.wait_state(job_id)
        assert job.state is JS.ERROR
        assert "policy says no" in job.status


async def test_21_failure_then_completion_elsewhere() -> None:
    async with harness() as h:
        await h.node("broken", run="fail", fail_error="exit status 3")
        await h.node("good")
        spec = make_spec(
            NodeSelectors=[{"Key": "favour_name", "Operator": "=", "Values": ["broken"]}]
        )
        job_id = await h.submit(spec)
        assert (await h.wait_state(job_id)).state is JS.COMPLETED
        execs = await h.executions(job_id)
        assert states(execs) == {ES.FAILED: 1, ES.COMPLETED: 1}
        [failed] = [e for e in execs if e.state is ES.FAILED]
        assert (failed.node_id, failed.status) == ("broken", "exit status 3")
        assert "exit status 3" in [r.comment for r in await h.history(job_id)]
        assert (await h.store.get_job(job_id)).retries_used == 1


async def test_22_only_failing_node_fails_after_bounded_retries() -> None:
    async with harness(max_retries=2) as h:
        await h.node("broken", run="fail", fail_error="boom")
        job_id = await h.submit()
        job = await h.wait_state(job_id)
        assert job.state is JS.ERROR
        execs = await h.executions(job_id)
        assert states(execs) == {ES.FAILED: 3}  # the first run and two retries
        assert "boom" in job.status
        failures = [r for r in await h.history(job_id) if r.new == "Failed"]
        assert len(failures) == 3


async def test_23_timeouts() -> None:
    async with harness() as h:
        await h.node("fast")
        ok = await h.submit(make_spec(Timeout=5))
        assert (await h.wait_state(ok)).state is JS.COMPLETED
        await h.node("stuck", run="hang")
        spec = make_spec(
            Timeout=0.2, NodeSelectors=[{"Key": "name", "Operator": "=", "Values": ["stuck"]}]
        )
        slow = await h.submit(spec)
        job = await h.wait_state(slow)
        assert job.state is JS.ERROR
        assert "timed out" in job.status
        assert states(await h.executions(slow)) == {ES.CANCELLED: 1}
        await h.service.orchestrator.idle()
        assert h.nodes["stuck"].cancelled


async def test_23_timeout_bounds_and_bypass() -> None:
    async with harness() as h:
        await h.node("bounded", timeout_max=100, bypass_clients=["vip"])
        with pytest.raises(NotEnoughNodes, match="above the node's maximum"):
            await h.submit(make_spec(Timeout=200))
        job_id = await h.submit(make_spec(Timeout=200), client_id="vip")
        assert (await h.wait_state(job_id)).state is JS.COMPLETED


LABELLED = {"compute-1": "prod", "compute-2": "prod", "compute-3": "test"}


@pytest.mark.parametrize(
    ("selectors", "concurrency", "expected"),
    [
        ([("name", "=", ["compute-1"])], 1, {"compute-1"}),
        ([("env", "=", ["prod"])], 2, {"compute-1", "compute-2"}),
        ([("env", "!=", ["prod"])], 1, {"compute-3"}),
        ([("env", "in", ["prod", "test"])], 3, {"compute-1", "compute-2", "compute-3"}),
        ([("favour_env", "=", ["test"])], 1, {"compute-3"}),
        ([("env", "=", ["prod"]), ("favour_name", "=", ["compute-2"])], 1, {"compute-2"}),
    ],
)
async def test_24_label_selection(
    selectors: list[tuple[str, str, list[str]]], concurrency: int, expected: set[str]
) -> None:
    async with harness() as h:
        for name, env in LABELLED.items():
            await h.node(name, labels={"env": env})
        spec = make_spec(
            Deal={"Concurrency": concurrency},
            NodeSelectors=[{"Key": k, "Operator": op, "Values": v} for k, op, v in selectors],
        )
        job_id = await h.submit(spec)
        assert (await h.wait_state(job_id)).state is JS.COMPLETED
        assert {e.node_id for e in await h.executions(job_id)} == expected


async def test_24_notin_matching_nothing_is_refused_at_submit() -> None:
    async with harness() as h:
        for name, env in LABELLED.items():
            await h.node(name, labels={"env": env})
        spec = make_spec(
            NodeSelectors=[{"Key": "env", "Operator": "notin", "Values": ["prod", "test"]}]
        )
        with pytest.raises(NotEnoughNodes, match="label selector env notin"):
            await h.submit(spec)


async def test_27_default_resources_and_per_job_limits() -> None:
    async with harness() as h:
        await h.node("small", cpu=2, memory=1 * GiB)
        job_id = await h.submit()
        job = await h.wait_state(job_id)
        assert job.resources == Capacity(cpu=DEFAULT_CPU, memory=DEFAULT_MEMORY)
        with pytest.raises(NotEnoughNodes, match="more resources"):
            await h.submit(make_spec(Resources={"CPU": "4"}))


async def test_31_missing_engine_is_refused_at_submit() -> None:
    async with harness() as h:
        await h.node("docker-only", engines=[])
        with pytest.raises(NotEnoughNodes, match="engine Noop not available"):
            await h.submit()


async def test_queued_until_capacity_frees() -> None:
    async with harness() as h:
        await h.node("one-slot", cpu=1, run_delay=0.2)
        spec = make_spec(Resources={"CPU": "1"})
        first = await h.submit(spec)
        second = await h.submit(spec)
        queued = await h.wait_state(second, JS.QUEUED)
        assert queued.status == "no node with 1 CPU free; 1 node matches the job"
        assert (await h.wait_state(first)).state is JS.COMPLETED
        assert (await h.wait_state(second)).state is JS.COMPLETED
        history = [r.new for r in await h.history(second) if r.type.value == "JobLevel"]
        assert history == ["New", "Queued", "InProgress", "Completed"]


async def test_queue_timeout() -> None:
    async with harness(queue_timeout=0.3) as h:
        await h.node("one-slot", cpu=1, run="hang")
        spec = make_spec(Resources={"CPU": "1"})
        await h.submit(spec)
        second = await h.submit(spec)
        job = await h.wait_state(second)
        assert job.state is JS.ERROR
        assert "timed out waiting for a node with free capacity" in job.status


async def test_heartbeat_with_more_capacity_wakes_the_queue() -> None:
    async with harness() as h:
        node = await h.node("busy", cpu=1, available=Capacity(cpu=0, memory=GiB))
        job_id = await h.submit(make_spec(Resources={"CPU": "1"}))
        await h.wait_state(job_id, JS.QUEUED)
        await node.heartbeat(available=Capacity(cpu=1, memory=GiB))
        assert (await h.wait_state(job_id)).state is JS.COMPLETED


async def test_lost_node_executions_are_replaced() -> None:
    async with harness(node_lost_after=0.3) as h:
        doomed = await h.node("doomed", run="hang")
        survivor = await h.node("survivor")
        doomed.start_heartbeats(0.05)
        survivor.start_heartbeats(0.05)
        spec = make_spec(
            NodeSelectors=[{"Key": "favour_name", "Operator": "=", "Values": ["doomed"]}]
        )
        job_id = await h.submit(spec)

        async def running_on_doomed() -> bool:
            return any(
                e.node_id == "doomed" and e.state is ES.BID_ACCEPTED
                for e in await h.executions(job_id)
            )

        await wait_for(running_on_doomed)
        doomed.stop_heartbeats()
        assert (await h.wait_state(job_id)).state is JS.COMPLETED
        execs = {e.node_id: e for e in await h.executions(job_id)}
        assert execs["doomed"].state is ES.FAILED
        assert "lost" in execs["doomed"].status
        assert execs["survivor"].state is ES.COMPLETED


async def test_cancel_stops_executions_on_nodes() -> None:
    async with harness() as h:
        node = await h.node("n", run="hang")
        job_id = await h.submit()

        async def running() -> bool:
            return any(e.state is ES.BID_ACCEPTED for e in await h.executions(job_id))

        await wait_for(running)
        job = await h.service.orchestrator.cancel(job_id, "changed my mind")
        assert job.state is JS.CANCELLED
        assert states(await h.executions(job_id)) == {ES.CANCELLED: 1}
        await h.service.orchestrator.idle()
        assert len(node.cancelled) == 1


async def test_escalation_places_more_executions_and_tells_the_verifier() -> None:
    async with harness(verifier=False) as h:
        for i in range(3):
            await h.node(f"n{i}", run="hang")
        spec = make_spec(Verifier="Deterministic", Deal={"Concurrency": 2, "Confidence": 2})
        job_id = await h.submit(spec)

        async def placed(n: int) -> bool:
            return states(await h.executions(job_id))[ES.BID_ACCEPTED] == n

        await wait_for(lambda: placed(2))
        escalation = VerificationEscalated(job_id=job_id, additional=1, reason="a draw")
        await h.bus.publish_event(Envelope.wrap(escalation))
        await wait_for(lambda: placed(3))
        assert len({e.node_id for e in await h.executions(job_id)}) == 3

        async def planned() -> bool:
            expected = [
                ExecutionsPlanned.model_validate(e.data).expected
                for e in h.bus.published
                if e.type == ExecutionsPlanned.type
            ]
            return expected == [2, 3]

        assert await wait_for(planned)
        await h.bus.publish_event(
            Envelope.wrap(VerificationFailed(job_id=job_id, reason="no majority"))
        )
        job = await h.wait_state(job_id)
        assert job.state is JS.ERROR
        assert "no majority" in job.status


async def test_noop_verifier_gets_no_planning_events() -> None:
    async with harness() as h:
        await h.node("n")
        job_id = await h.submit()
        await h.wait_state(job_id)
        assert not [e for e in h.bus.published if e.type == ExecutionsPlanned.type]


async def test_many_jobs_complete() -> None:
    async with harness() as h:
        for i in range(5):
            await h.node(f"n{i}")
        ids = [await h.submit() for _ in range(100)]
        for job_id in ids:
            assert (await h.wait_state(job_id, timeout=20)).state is JS.COMPLETED


async def test_approval_wait_then_approve() -> None:
    async with harness() as h:
        await h.node("careful", bid="wait")
        job_id = await h.submit()
        held = await h.wait_state(job_id, JS.QUEUED)
        assert held.status == "waiting for approval on careful"
        [ex] = await h.executions(job_id)
        assert (ex.state, ex.status) == (ES.ASK_FOR_BID, "waiting for approval")
        await h.service.jobs.approve(job_id, client_id="client-1")
        assert (await h.wait_state(job_id)).state is JS.COMPLETED
        [done] = await h.executions(job_id)
        assert done.state is ES.COMPLETED
        steps = [r.new for r in await h.history(job_id) if r.execution_id == done.id]
        assert steps[:3] == ["AskForBid", "AskForBidAccepted", "BidAccepted"]


async def test_approval_refused_fails_the_job() -> None:
    async with harness(approver_clients=["boss"]) as h:
        await h.node("careful", bid="wait")
        job_id = await h.submit()
        await h.wait_state(job_id, JS.QUEUED)
        with pytest.raises(Unauthorized):
            await h.service.jobs.approve(job_id, client_id="client-1")
        await h.service.jobs.approve(job_id, client_id="boss", approve=False, reason="not today")
        job = await h.wait_state(job_id)
        assert job.state is JS.ERROR
        assert "not today" in job.status
        with pytest.raises(NotFound):
            await h.service.jobs.approve(job_id, client_id="boss")


async def test_reconciliation_redrives_what_a_crash_left_behind() -> None:
    async with harness() as h:
        await h.node("n1")
        await h.node("n2")
        orphan, _ = await h.store.create_job(make_job())  # acknowledged, never placed
        decided, _ = await h.store.create_job(make_job(state=JS.IN_PROGRESS))
        done = make_execution(decided, "n1", state=ES.COMPLETED)
        stuck_job, _ = await h.store.create_job(make_job(state=JS.IN_PROGRESS))
        stuck = make_execution(stuck_job, "n1", state=ES.ASK_FOR_BID).evolve(
            updated=utcnow() - timedelta(minutes=5)  # asked long ago, never answered
        )
        await h.store.apply(
            Changes(
                executions=[
                    new_execution_update(done, [(ES.COMPLETED, "")]),
                    new_execution_update(stuck, [(ES.ASK_FOR_BID, "asked")]),
                ]
            )
        )
        await h.service.orchestrator.reconcile()
        assert (await h.wait_state(orphan.id)).state is JS.COMPLETED
        assert (await h.wait_state(decided.id)).state is JS.COMPLETED
        assert (await h.wait_state(stuck_job.id)).state is JS.COMPLETED
        by_state = states(await h.executions(stuck_job.id))
        assert by_state == {ES.ASK_FOR_BID_REJECTED: 1, ES.COMPLETED: 1}


async def test_restart_confirms_accepted_executions_with_their_nodes() -> None:
    async with harness() as h:
        await h.node("n1")
        job, _ = await h.store.create_job(make_job(state=JS.IN_PROGRESS))
        # Recorded as accepted, but the acceptance never reached the node (crash in between).
        lost = make_execution(job, "n1", state=ES.BID_ACCEPTED, accepted_ask_for_bid=True)
        await h.store.apply(
            Changes(executions=[new_execution_update(lost, [(ES.BID_ACCEPTED, "")])])
        )
        await h.service.orchestrator.reconcile()
        assert (await h.wait_state(job.id)).state is JS.COMPLETED
        by_id = {e.id: e for e in await h.executions(job.id)}
        assert by_id[lost.id].state is ES.FAILED
        assert by_id[lost.id].status == "the node never received the bid acceptance"


async def test_describe_says_why_a_queued_job_waits_now() -> None:
    async with harness() as h:
        await h.node("busy-1", cpu=1, run="hang")
        spec = make_spec(Resources={"CPU": "1"})
        await h.submit(spec)
        waiting = await h.submit(spec)
        queued = await h.wait_state(waiting, JS.QUEUED)
        assert queued.status == "no node with 1 CPU free; 1 node matches the job"
        # Another node joins, busy too: the stored reason is from before, describe says now.
        await h.node("busy-2", cpu=1, available=Capacity(cpu=0, memory=GiB))
        described = await h.service.jobs.describe(waiting)
        assert described.job.state is JS.QUEUED
        assert described.job.status == "no node with 1 CPU free; 2 nodes match the job"
        history = [r.comment for r in await h.history(waiting) if r.new == "Queued"]
        assert history == ["no node with 1 CPU free; 1 node matches the job"]


async def test_asks_that_never_reach_a_node_are_retried_not_counted_as_refusals() -> None:
    """B16: a node that cannot be reached yet (NATS just back, the node not re-subscribed) is
    asked again shortly; the job runs there once it answers, and no retry is spent."""
    async with harness() as h:
        node = FakeComputeNode(h.bus, "late", info=node_info("late"))
        await node.heartbeat()  # known to the requester, not answering calls yet
        job_id = await h.submit()
        await wait_for(lambda: _asked_without_answer(h, job_id), timeout=5)
        await node.start(send_heartbeat=False)
        job = await h.wait_state(job_id, timeout=10)
        assert job.state is JS.COMPLETED, job.status
        assert job.retries_used == 0
        execs = await h.executions(job_id)
        assert states(execs)[ES.COMPLETED] == 1
        await node.stop()


async def _asked_without_answer(h: Harness, job_id: str) -> bool:
    execs = await h.executions(job_id)
    return any(e.status.startswith("no bid: ") for e in execs)


async def test_background_work_never_started_is_closed_not_left_unawaited() -> None:
    """B10: a task cancelled before it ran (or spawned while stopping) closes its coroutine, so
    shutdown does not warn 'coroutine ... was never awaited'."""
    import inspect

    async def work() -> None:
        return None

    async with harness() as h:
        orchestrator = h.service.orchestrator
        cancelled_early = work()
        orchestrator._spawn(cancelled_early, "never-runs")
        await orchestrator.stop()  # cancels the task before its first step
        assert inspect.getcoroutinestate(cancelled_early) == inspect.CORO_CLOSED
        while_closing = work()
        orchestrator._spawn(while_closing, "too-late")
        assert inspect.getcoroutinestate(while_closing) == inspect.CORO_CLOSED


async def test_background_work_that_fails_is_logged_and_forgotten() -> None:
    from structlog.testing import capture_logs

    async def broken() -> None:
        raise RuntimeError("boom")

    async with harness() as h:
        orchestrator = h.service.orchestrator
        with capture_logs() as logs:
            orchestrator._spawn(broken(), "broken-work")
            await orchestrator.idle()
        failed = [e for e in logs if e["event"] == "requester_task_failed"]
        assert [e["task"] for e in failed] == ["broken-work"]
        assert isinstance(failed[0]["exc_info"], RuntimeError)
        assert not orchestrator._tasks


async def test_a_burst_that_fills_every_node_queues_the_job_instead_of_failing_it() -> None:
    """B18: bids refused only because the node is full leave the job Queued, spend no retry,
    and the job runs once a node has room."""
    from shoal_common.protocol import AT_CAPACITY

    async with harness() as h:
        nodes = [await h.node(f"n{i}", bid="no", bid_reason=AT_CAPACITY) for i in range(2)]
        job_id = await h.submit()
        queued = await h.wait_state(job_id, JS.QUEUED)
        assert AT_CAPACITY in queued.status
        assert len(nodes[0].asked) == 1  # full until it reports again: not asked in a loop
        nodes[0].bid = "yes"
        await nodes[0].heartbeat()  # it has room again
        job = await h.wait_state(job_id, timeout=5)
        assert job.state is JS.COMPLETED, job.status
        assert job.retries_used == 0


async def test_an_acceptance_whose_answer_was_lost_is_sent_again_not_failed() -> None:
    """B22: the node got the acceptance but its answer was lost (NATS restarting): the
    requester asks again instead of failing an execution the node is running."""

    class LostFirstAnswer(FakeComputeNode):
        lost = 1

        async def _bid_accepted(self, data: bytes) -> bytes:
            reply = await super()._bid_accepted(data)  # the node has it, and starts
            if self.lost:
                self.lost -= 1
                await asyncio.sleep(1.5)  # past the requester's rpc_timeout (1 s)
            return reply

    async with harness() as h:
        node = LostFirstAnswer(h.bus, "n1", info=node_info("n1"), run_delay=2.5)
        await node.start()
        job_id = await h.submit()
        job = await h.wait_state(job_id, timeout=10)
        assert job.state is JS.COMPLETED, job.status
        execs = await h.executions(job_id)
        assert [e.state for e in execs] == [ES.COMPLETED], [(e.state, e.status) for e in execs]
        assert job.retries_used == 0
        await node.stop()


def _hold_the_loop(seconds: float) -> None:
    time.sleep(seconds)  # a step of CPU-bound work: nothing else on the loop runs meanwhile


class _CountingNode(FakeComputeNode):
    """Answers asks after a pause, counting how many it holds at once."""

    holding: int = 0
    most: int = 0

    async def _ask_bid(self, data: bytes) -> bytes:
        self.holding += 1
        self.most = max(self.most, self.holding)
        try:
            await asyncio.sleep(0.01)
            return await super()._ask_bid(data)
        finally:
            self.holding -= 1


async def test_a_burst_of_submits_places_at_most_placement_parallelism_jobs_at_once() -> None:
    """ADR 0018: the rest wait their turn as durable New jobs, and all of them complete."""
    async with harness(placement_parallelism=3) as h:
        node = await _CountingNode(h.bus, "n0", info=node_info("n0", cpu=100)).start()
        job_ids = [await h.submit() for _ in range(20)]
        await wait_for(_a_backlog_shows)  # shoal_requester_placements_waiting
        assert _placements_waiting() > 0
        for job_id in job_ids:
            assert (await h.wait_state(job_id, timeout=10)).state is JS.COMPLETED
        assert node.most == 3
        assert len(node.asked) == 20
        assert _placements_waiting() == 0


async def _a_backlog_shows() -> bool:
    return _placements_waiting() > 0


def _placements_waiting() -> float:
    from shoal_requester import metrics

    return float(metrics.PLACEMENTS_WAITING._value.get())


async def test_a_placement_waits_while_the_event_loop_is_congested() -> None:
    """ADR 0018: while one trip through the loop takes longer than placement_yield_lag, new
    placements wait (the API's requests go first); once the loop is free they run."""
    async with harness(placement_yield_lag=0.005) as h:
        node = await h.node("n0")
        congested = True

        async def hog() -> None:  # a busy loop: 20 ms steps, always ready to run again
            while congested:
                _hold_the_loop(0.02)
                await asyncio.sleep(0)

        hogs = [asyncio.create_task(hog()) for _ in range(2)]
        job_id = await h.submit()
        await wait_for(_a_backlog_shows)  # its placement has started waiting
        await asyncio.sleep(0.3)  # a window in which it must not be placed (no event to await)
        assert node.asked == []  # waiting for the loop, not placed
        congested = False
        await asyncio.gather(*hogs)
        assert (await h.wait_state(job_id, timeout=5)).state is JS.COMPLETED
        assert len(node.asked) == 1


async def test_by_default_a_placement_does_not_wait_for_a_congested_loop() -> None:
    """ADR 0028: the wait is off by default; a placement runs while the loop is busy."""
    async with harness() as h:
        node = await h.node("n0")
        stop = asyncio.Event()

        async def hog() -> None:  # as above: with the wait on, no placement for up to 1 s
            while not stop.is_set():
                _hold_the_loop(0.02)
                await asyncio.sleep(0)

        hogs = [asyncio.create_task(hog()) for _ in range(2)]
        try:
            await h.submit()

            async def asked() -> bool:
                return bool(node.asked)

            await wait_for(asked, timeout=PLACEMENT_MAX_YIELD / 2)
        finally:
            stop.set()
            await asyncio.gather(*hogs)


async def test_a_congested_loop_delays_a_placement_by_at_most_the_yield_bound() -> None:
    async with harness(placement_yield_lag=0.005) as h:
        node = await h.node("n0")
        stop = asyncio.Event()

        async def hog() -> None:
            while not stop.is_set():
                _hold_the_loop(0.02)
                await asyncio.sleep(0)

        hogs = [asyncio.create_task(hog()) for _ in range(2)]
        try:
            job_id = await h.submit()
            job = await h.wait_state(job_id, timeout=PLACEMENT_MAX_YIELD + 5)
            assert job.state is JS.COMPLETED
            assert len(node.asked) == 1
        finally:
            stop.set()
            await asyncio.gather(*hogs)


async def test_queued_jobs_are_placed_several_at_once_when_capacity_frees() -> None:
    """When a node gains room, the jobs that waited for it are asked for together (in
    placement lanes that go before new jobs), not one bid round trip after another."""
    async with harness(placement_parallelism=4) as h:
        busy = node_info("n0", cpu=8, available=Capacity(cpu=0, memory=GiB))
        node = await _CountingNode(h.bus, "n0", info=busy).start()
        job_ids = [await h.submit() for _ in range(8)]
        for job_id in job_ids:
            await h.wait_state(job_id, JS.QUEUED)
        assert node.asked == []
        await node.heartbeat(available=Capacity(cpu=8, memory=GiB))
        for job_id in job_ids:
            assert (await h.wait_state(job_id, timeout=10)).state is JS.COMPLETED
        assert len(node.asked) == 8
        assert node.most == 4


async def test_a_pass_over_a_queue_that_fits_nowhere_checks_each_kind_of_job_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every capacity event passes over the queue: under load a long queue made each pass
    cost ~15 us a job (requirements and each node's free room built again per job), and the
    requester fell further behind the longer the queue grew."""
    from shoal_requester.domain import inventory, orchestrator

    async with harness() as h:
        for i in range(3):
            await h.node(f"n{i}", cpu=8, available=Capacity(cpu=0, memory=GiB))
        job_ids = [await h.submit() for _ in range(30)]
        for job_id in job_ids:
            await h.wait_state(job_id, JS.QUEUED)
        built, room_checks = [], []
        real_requirements, real_room_for = orchestrator.requirements, inventory.TrackedNode.room_for
        real_free = inventory.TrackedNode.free

        def counted_requirements(*args: object, **kwargs: object) -> object:
            built.append(1)
            return real_requirements(*args, **kwargs)  # type: ignore[arg-type]

        def counted_room_for(self: inventory.TrackedNode, need: Capacity) -> float | None:
            room_checks.append(1)
            return real_room_for(self, need)

        def counted_free(self: inventory.TrackedNode) -> Capacity:
            room_checks.append(1)
            return real_free.fget(self)  # type: ignore[no-any-return]

        monkeypatch.setattr(orchestrator, "requirements", counted_requirements)
        monkeypatch.setattr(inventory.TrackedNode, "room_for", counted_room_for)
        monkeypatch.setattr(inventory.TrackedNode, "free", property(counted_free))
        await h.service.orchestrator._drain_once()
        assert h.service.orchestrator.pending_count == 30
        assert built == []  # remembered from when each job was placed and queued
        assert len(room_checks) <= 3  # once per node for the one kind of job
