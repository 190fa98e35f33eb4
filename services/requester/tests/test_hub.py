"""The history hub: live rows fanned out to event-stream subscribers."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from shoal_common.spec import JobHistoryType
from shoal_requester.domain.hub import HistoryHub
from shoal_requester.domain.model import HistoryRecord


def _row(job_id: str, seq: int, level: JobHistoryType = JobHistoryType.JOB_LEVEL) -> HistoryRecord:
    return HistoryRecord(
        job_id=job_id,
        type=level,
        new="InProgress",
        version=seq,
        time=datetime.now(UTC),
        seq=seq,
    )


async def test_a_reader_behind_gets_every_queued_row_at_once() -> None:
    hub = HistoryHub()
    with hub.subscribe("job-a") as sub:
        hub.publish([_row("job-a", 1), _row("job-b", 2), _row("job-a", 3)])
        hub.publish([_row("job-a", 4)])
        assert [r.seq for r in await sub.next_batch(1.0)] == [1, 3, 4]
        assert await sub.next_batch(0.01) == []


async def test_a_waiting_reader_wakes_on_the_next_row() -> None:
    hub = HistoryHub()
    with hub.subscribe(None) as sub:
        reader = asyncio.create_task(sub.next_batch(5.0))
        await asyncio.sleep(0)
        assert not reader.done()
        hub.publish([_row("job-x", 7)])
        rows = await asyncio.wait_for(reader, 1.0)
        assert [r.seq for r in rows] == [7]


async def test_a_reader_that_falls_behind_is_cut_off() -> None:
    hub = HistoryHub(max_queued=2)
    with hub.subscribe(None) as sub:
        hub.publish([_row("j", 1), _row("j", 2), _row("j", 3)])
        assert sub.overflowed
        assert sub.closed.is_set()
        assert await sub.next_batch(1.0) == []


async def test_close_all_wakes_readers_and_unsubscribing_forgets_them() -> None:
    hub = HistoryHub()
    with hub.subscribe("job-a") as sub:
        reader = asyncio.create_task(sub.next_batch(30.0))
        await asyncio.sleep(0)
        hub.close_all()
        assert await asyncio.wait_for(reader, 1.0) == []
        assert hub.subscribers == 1
    assert hub.subscribers == 0


async def test_a_reader_of_one_level_is_offered_only_its_rows() -> None:
    hub = HistoryHub(max_queued=2)
    execution = JobHistoryType.EXECUTION_LEVEL
    with hub.subscribe(None, JobHistoryType.JOB_LEVEL) as sub:
        hub.publish([_row("a", 1), _row("a", 2, execution), _row("a", 3, execution)])
        hub.publish([_row("b", 4, execution), _row("b", 5)])
        # Rows of the other level are not queued: they never count towards an overflow.
        assert not sub.overflowed
        assert [r.seq for r in await sub.next_batch(1.0)] == [1, 5]
