"""Job timeouts without asking the database on every tick (ADR 0014): deadlines still bite on
time, a job queued again with its first queue deadline included, and after a restart."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import pytest

from shoal_common.spec import JobStateType, utcnow
from shoal_common.testing import wait_for
from shoal_requester.domain.model import Changes, job_transition
from shoal_requester.store.memory import MemoryRequesterStore
from shoal_requester.testing import Harness, harness, make_job, make_spec

JS = JobStateType


def count_calls(monkeypatch: pytest.MonkeyPatch, obj: object, name: str) -> list[float]:
    """Replace ``obj.name`` by a wrapper that records when it was called."""
    calls: list[float] = []
    original: Callable[..., Any] = getattr(obj, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls.append(utcnow().timestamp())
        return original(*args, **kwargs)

    monkeypatch.setattr(obj, name, wrapper)
    return calls


def expiry_queries(h: Harness, monkeypatch: pytest.MonkeyPatch) -> list[float]:
    return count_calls(monkeypatch, h.store, "list_expired_jobs")


async def ended_at(h: Harness, job_id: str, timeout: float = 5.0) -> datetime:
    job = await h.wait_state(job_id, timeout=timeout)
    assert job.state is JS.ERROR
    assert "timed out" in job.status
    return job.updated


async def test_expired_jobs_are_not_asked_for_on_every_tick(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with harness(job_timeout_grace=30.0, housekeeping_interval=0.02) as h:
        queries = expiry_queries(h, monkeypatch)
        ticks = count_calls(monkeypatch, h.service.inventory, "expire")
        await h.node("n1")
        job_id = await h.submit()
        assert (await h.wait_state(job_id)).state is JS.COMPLETED

        async def many_ticks() -> bool:
            return len(ticks) >= 30

        await wait_for(many_ticks)
        # The first tick asks (for the jobs due within the 30 s horizon); none until then.
        assert len(queries) <= 1


async def test_a_timeout_set_after_the_last_query_is_acted_on_at_its_deadline() -> None:
    async with harness(job_timeout_grace=0.5, housekeeping_interval=0.02) as h:
        await h.node("stuck", run="hang")
        job_id = await h.submit(make_spec(Timeout=0.3))
        running = await h.wait_state(job_id, JS.IN_PROGRESS)
        assert running.timeout_at is not None
        ended = await ended_at(h, job_id)
        assert running.timeout_at <= ended < running.timeout_at + timedelta(seconds=2)


async def test_a_job_queued_again_with_its_first_queue_deadline_expires_then(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A 3 s horizon: without the history listener the next look would come 3 s after the last.
    async with harness(queue_timeout=3.0, job_timeout_grace=30.0) as h:
        queries = expiry_queries(h, monkeypatch)

        async def asked(times: int) -> None:
            async def probe() -> bool:
                return len(queries) >= times

            await wait_for(probe)

        await asked(1)  # after the start's reconciliation, which would re-queue the job
        job = make_job(state=JS.IN_PROGRESS, timeout_at=utcnow() + timedelta(hours=1))
        await h.store.create_job(job)
        await asked(2)
        # Queued again (say after its node was lost) with the deadline of its first wait.
        deadline = utcnow() + timedelta(seconds=0.3)
        queued = job_transition(job, JS.QUEUED, now=utcnow(), queue_deadline=deadline)
        assert await h.store.apply(Changes(jobs=[queued]))
        ended = await ended_at(h, job.id, timeout=2.0)
        assert ended >= deadline


async def test_after_a_restart_overdue_jobs_end_at_once_later_ones_at_their_deadline() -> None:
    store = MemoryRequesterStore()
    now = utcnow()
    overdue = make_job(state=JS.QUEUED, queue_deadline=now - timedelta(seconds=1))
    later = make_job(state=JS.QUEUED, queue_deadline=now + timedelta(seconds=3))
    for job in (overdue, later):
        await store.create_job(job)
    async with harness(store=store, queue_timeout=30.0, job_timeout_grace=30.0) as h:
        assert later.queue_deadline is not None
        assert (await ended_at(h, overdue.id)) < later.queue_deadline
        ended = await ended_at(h, later.id)
        assert later.queue_deadline <= ended < later.queue_deadline + timedelta(seconds=2)
