"""The requester's labelled metric children are looked up once and still count (ADR 0031)."""

from __future__ import annotations

from shoal_common.spec import JobStateType
from shoal_requester import metrics
from shoal_requester.testing import harness


def _count(metric: object, *values: str) -> float:
    return float(metrics.labelled(metric, *values)._value.get())  # type: ignore[attr-defined]


def test_a_child_is_the_one_labels_returns() -> None:
    child = metrics.labelled(metrics.EVENTS_HANDLED, "result_proposed")
    assert child is metrics.EVENTS_HANDLED.labels(type="result_proposed")
    assert metrics.labelled(metrics.EVENTS_HANDLED, "result_proposed") is child


async def test_a_completed_job_is_counted_through_the_cached_children() -> None:
    finished = _count(metrics.JOBS_FINISHED, JobStateType.COMPLETED.value)
    handled = _count(metrics.EVENTS_HANDLED, "result_proposed")
    bids = _count(metrics.BIDS, "yes")
    async with harness() as h:
        await h.node("n1")
        job_id = await h.submit()
        await h.wait_state(job_id, JobStateType.COMPLETED)
    assert _count(metrics.JOBS_FINISHED, JobStateType.COMPLETED.value) == finished + 1
    assert _count(metrics.EVENTS_HANDLED, "result_proposed") >= handled + 1
    assert _count(metrics.BIDS, "yes") == bids + 1
