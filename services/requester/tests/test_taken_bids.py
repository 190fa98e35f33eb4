"""ADR 0029: when one node is asked for the one execution a job wants, the ask says ``take`` and
a yes is already accepted on the node: no ``bid_accepted`` follows. The ask waits for the job's
row, a node of an earlier build is accepted as before, and a taken execution the requester
cannot record (or whose answer was lost) is cancelled on its node, not merely rejected."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import exc as sa_exc

from shoal_common.protocol import AskBid
from shoal_common.spec import ExecutionStateType, JobStateType
from shoal_common.testing import wait_for
from shoal_requester.domain.model import Changes
from shoal_requester.store.memory import MemoryRequesterStore
from shoal_requester.testing import (
    FailingCreates,
    FakeComputeNode,
    Harness,
    HeldCommits,
    harness,
    held_commits_harness,
    make_spec,
    submit_payload,
)

JS = JobStateType
ES = ExecutionStateType


class FailingPlacements(MemoryRequesterStore):
    """A memory store whose first placement decision (the write that plans executions) fails
    as a dropped database connection does; every other write goes through."""

    def __init__(self) -> None:
        super().__init__()
        self.failed = 0

    async def apply(self, changes: Changes) -> list:  # type: ignore[type-arg]
        planned = any(u.before is None for u in changes.executions)
        if planned and not self.failed:
            self.failed += 1
            raise sa_exc.OperationalError("INSERT INTO executions ...", {}, ConnectionRefusedError)
        return await super().apply(changes)  # type: ignore[return-value]


class LostAnswers(FakeComputeNode):
    """Takes the first ask, then its answer is lost (the reply never arrives)."""

    async def _ask_bid(self, data: bytes) -> bytes:
        answer = await super()._ask_bid(data)
        if len(self.asked) == 1:
            return b'{"error": "no answer within 5.0s"}'
        return answer


def _asked(node: FakeComputeNode) -> Any:
    async def probe() -> bool:
        return bool(node.asked)

    return probe


async def test_a_single_bid_is_taken_in_the_ask() -> None:
    async with harness() as h:
        node = await h.node("n1")
        job_id = await h.submit()
        assert (await h.wait_state(job_id)).state is JS.COMPLETED
        [ex] = await h.executions(job_id)
        assert node.taken == [ex.id] == node.accepted
        # The history a client reads is the one it always was.
        states = [r.new for r in await h.history(job_id) if r.execution_id == ex.id]
        assert states[:3] == ["AskForBid", "AskForBidAccepted", "BidAccepted"]


async def test_a_node_of_an_earlier_build_is_accepted_by_a_message() -> None:
    async with harness() as h:
        node = await h.node("n1", takes=False)
        job_id = await h.submit()
        assert (await h.wait_state(job_id)).state is JS.COMPLETED
        [ex] = await h.executions(job_id)
        assert node.taken == []
        assert node.accepted == [ex.id]


@pytest.mark.parametrize(
    "deal", [{"Concurrency": 2}, {"Concurrency": 1, "MinBids": 2}], ids=["concurrency", "min-bids"]
)
async def test_jobs_wanting_several_bids_are_asked_then_accepted(deal: dict[str, Any]) -> None:
    async with harness() as h:
        nodes = [await h.node("n1"), await h.node("n2")]
        job_id = await h.submit(make_spec(Deal=deal))
        assert (await h.wait_state(job_id)).state is JS.COMPLETED
        assert [n.taken for n in nodes] == [[], []]
        assert sum(len(n.accepted) for n in nodes) == deal["Concurrency"]


async def test_a_job_with_a_verifier_is_asked_then_accepted() -> None:
    """A lost answer to a take leaves a copy running on the node: a verifier must never see it,
    so only jobs the requester verifies itself (noop) are taken."""
    async with harness() as h:
        node = await h.node("n1")  # every verifier
        job_id = await h.submit(make_spec(Verifier="Deterministic"))
        await h.wait_state(job_id, JS.IN_PROGRESS, *[s for s in JS if s.terminal])
        assert len(node.asked) == 1
        assert node.taken == []
        assert node.accepted == node.asked


async def test_taking_can_be_turned_off() -> None:
    async with harness(take_single_bids=False) as h:
        node = await h.node("n1")
        job_id = await h.submit()
        assert (await h.wait_state(job_id)).state is JS.COMPLETED
        assert node.taken == []
        assert len(node.accepted) == 1


@pytest.fixture
async def held_commits(tmp_path: Path) -> AsyncIterator[tuple[Harness, HeldCommits]]:
    async with held_commits_harness(tmp_path) as pair:
        yield pair


async def test_a_taking_ask_waits_until_the_job_is_stored(
    held_commits: tuple[Harness, HeldCommits],
) -> None:
    h, store = held_commits
    node = await h.node("n1")
    store.hold.clear()  # the job's commit waits
    payload = submit_payload(make_spec(), "client-1")
    submit = asyncio.create_task(
        h.service.jobs.submit(payload, orjson.dumps(payload), client_id="client-1")
    )
    # The job's commit is waiting: its placement started before it, so an ask that did not
    # wait for the row would have been sent by now.
    await asyncio.wait_for(store.held.wait(), 5)
    assert node.asked == []
    assert not submit.done()
    store.hold.set()
    job, created = await submit
    assert created
    assert (await h.wait_state(job.id)).state is JS.COMPLETED
    assert len(node.taken) == 1


async def test_a_job_whose_write_failed_is_never_offered() -> None:
    async with harness(store=FailingCreates(), verifier=False) as h:
        node = await h.node("n1")
        payload = submit_payload(make_spec(), "client-1")
        with pytest.raises(sa_exc.OperationalError):
            await h.service.jobs.submit(payload, orjson.dumps(payload), client_id="client-1")
        await h.service.orchestrator.idle()
        assert node.asked == []


async def test_a_taken_execution_that_could_not_be_recorded_is_cancelled_on_its_node() -> None:
    store = FailingPlacements()
    async with harness(store=store) as h:
        node = await h.node("n1")
        job_id = await h.submit()
        # The first placement's write failed after the node took the bid: the node is told to
        # stop it (a rejection would leave it running), and the placement is tried again.
        assert (await h.wait_state(job_id)).state is JS.COMPLETED
        assert store.failed == 1
        assert len(node.taken) == 2
        assert node.cancelled == [node.taken[0]]
        assert node.rejected == []
        [ex] = await h.executions(job_id)
        assert ex.id == node.taken[1]


async def test_a_taking_ask_whose_answer_was_lost_is_cancelled_on_its_node() -> None:
    async with harness() as h:
        node = LostAnswers(h.bus, "n1")
        await node.start()
        job_id = await h.submit()
        await wait_for(_asked(node))
        first = node.asked[0]

        async def cancelled() -> bool:
            return node.cancelled == [first]

        await wait_for(cancelled)
        assert node.rejected == []
        # The ask counted as not delivered: the job is placed again and completes.
        assert (await h.wait_state(job_id, timeout=10.0)).state is JS.COMPLETED
        # The node ran the first copy too (its result event came): it is not a second result.
        execution = await h.service.store.find_execution(first)
        assert execution is not None
        assert execution.state is ES.ASK_FOR_BID_REJECTED
        completed = [e.id for e in await h.executions(job_id) if e.state is ES.COMPLETED]
        assert completed == [node.asked[-1]]
        assert first not in completed


def test_an_ask_of_an_earlier_build_does_not_take() -> None:
    ask = AskBid.model_validate({"execution_id": "e1", "job": {}})
    assert ask.take is False
