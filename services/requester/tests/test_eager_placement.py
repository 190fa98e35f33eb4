"""ADR 0026: a submitted job's nodes are asked while its row is being written, and what
placement decides is recorded only after that row; a job that was never stored leaves nothing
behind but released bids.

A single-bid ask that takes its yes (ADR 0029) waits for the job's row instead, so these tests
turn taking off: they are about the asks that still overlap the write (several bids, or taking
off). test_taken_bids.py covers the other."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import exc as sa_exc
from structlog.testing import capture_logs

from shoal_common.spec import ExecutionStateType, JobStateType
from shoal_common.testing import wait_for
from shoal_requester.domain.model import JobRecord
from shoal_requester.testing import (
    FailingCreates,
    Harness,
    HeldCommits,
    harness,
    held_commits_harness,
    make_spec,
    submit_payload,
)

JS = JobStateType
ES = ExecutionStateType
# Logged when a placement's write conflicted or a background task failed: never for a job that
# was simply not stored.
NOISE = {"placement_conflict", "requester_task_failed"}


@pytest.fixture
async def sqlite_harness(tmp_path: Path) -> AsyncIterator[tuple[Harness, HeldCommits]]:
    async with held_commits_harness(tmp_path, take_single_bids=False) as pair:
        yield pair


async def _submit(h: Harness, payload: dict[str, Any]) -> tuple[JobRecord, bool]:
    return await h.service.jobs.submit(payload, orjson.dumps(payload), client_id="client-1")


def _until(check: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    async def probe() -> bool:
        return check()

    return probe


async def test_nodes_are_asked_while_the_job_is_written_and_accepted_after_it(
    sqlite_harness: tuple[Harness, HeldCommits],
) -> None:
    h, store = sqlite_harness
    node = await h.node("n1")
    store.hold.clear()  # the job's commit waits
    submit = asyncio.create_task(_submit(h, submit_payload(make_spec(), "client-1")))
    await wait_for(_until(lambda: bool(node.asked)), timeout=5.0)
    # Asked, but nothing is committed yet, so nothing may run.
    assert not submit.done()
    assert node.accepted == []
    store.hold.set()
    job, created = await submit
    assert created
    done = await h.wait_state(job.id, JS.COMPLETED)
    assert done.state is JS.COMPLETED
    [ex] = await h.executions(job.id)
    assert ex.id == node.asked[0]
    # The history keeps the order of the writes: the job, then its accepted bid.
    news = [r.new for r in await h.history(job.id)]
    assert news.index("New") < news.index("BidAccepted")


async def test_a_replayed_submit_releases_its_bids_and_records_nothing(
    sqlite_harness: tuple[Harness, HeldCommits],
) -> None:
    h, _store = sqlite_harness
    node = await h.node("n1")
    payload = submit_payload(make_spec(), "client-1")
    first, created = await _submit(h, payload)
    assert created
    await h.wait_state(first.id, JS.COMPLETED)
    with capture_logs() as logs:
        again, created = await _submit(h, payload)
        await h.service.orchestrator.idle()
    assert (again.id, created) == (first.id, False)
    # The replay's placement asked the node before the store answered; its bid is released.
    assert len(node.asked) == 2
    await wait_for(_until(lambda: node.rejected == [node.asked[1]]), timeout=5.0)
    assert [e.id for e in await h.executions(first.id)] == [node.asked[0]]
    assert await h.service.store.find_execution(node.asked[1]) is None
    assert not [e for e in logs if e["event"] in NOISE]


async def test_a_job_whose_write_failed_releases_its_bids_and_records_nothing() -> None:
    store = FailingCreates()
    async with harness(store=store, verifier=False, take_single_bids=False) as h:
        node = await h.node("n1")
        with capture_logs() as logs:
            with pytest.raises(sa_exc.OperationalError):
                await _submit(h, submit_payload(make_spec(), "client-1"))
            await h.service.orchestrator.idle()
        assert store.jobs == {}
        assert store.executions == {}
        # The node, asked before the write failed, gets its bid released.
        assert node.asked
        assert node.rejected == node.asked
        assert node.accepted == []
        assert not [e for e in logs if e["event"] in NOISE]
