"""In-process fan-out of history rows to live subscribers (the event stream, behaviour 40)."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Iterator, Sequence

from shoal_common.spec import JobHistoryType
from shoal_requester.domain.model import HistoryRecord


class Subscription:
    """Rows for one job (or all jobs when ``job_id`` is None), in commit order; with
    ``level`` set, only the rows of that level (job-level rows: the job's state changes).

    A subscriber that falls ``max_queued`` rows behind is cut off (``overflowed``) rather than
    letting it hold memory or slow the writers; it can reconnect and catch up from the store.
    Rows wait in a deque behind one wake-up event: a reader that is behind takes every queued
    row at once (one chunk on the wire), and a reader that is waiting costs no extra tasks.
    """

    def __init__(
        self, job_id: str | None, max_queued: int, level: JobHistoryType | None = None
    ) -> None:
        self.job_id = job_id
        self.level = level
        self.max_queued = max_queued
        self.overflowed = False
        self.closed = asyncio.Event()
        self._rows: deque[HistoryRecord] = deque()
        self._wake = asyncio.Event()

    def offer(self, row: HistoryRecord) -> None:
        if self.overflowed or (self.level is not None and row.type is not self.level):
            return
        if len(self._rows) >= self.max_queued:
            self.overflowed = True
            self.close()
            return
        self._rows.append(row)
        self._wake.set()

    def close(self) -> None:
        self.closed.set()
        self._wake.set()

    async def next_batch(self, timeout: float) -> list[HistoryRecord]:
        """Every queued row (at least one), or none after ``timeout`` seconds or once closed.

        A closed subscription still hands out the rows queued before it closed, unless it was
        cut off for falling behind (its reader must catch up from the store anyway)."""
        if self.overflowed:
            return []
        if not self._rows and not self.closed.is_set():
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
        if self.overflowed:
            return []
        rows = list(self._rows)
        self._rows.clear()
        return rows


class HistoryHub:
    """Register as a store history listener; hands each row to the matching subscribers."""

    def __init__(self, *, max_queued: int = 10_000) -> None:
        self._max_queued = max_queued
        self._by_job: dict[str | None, set[Subscription]] = {}

    def publish(self, rows: Sequence[HistoryRecord]) -> None:
        everyone = self._by_job.get(None, ())
        for row in rows:
            for sub in (*everyone, *self._by_job.get(row.job_id, ())):
                sub.offer(row)

    @contextlib.contextmanager
    def subscribe(
        self, job_id: str | None, level: JobHistoryType | None = None
    ) -> Iterator[Subscription]:
        sub = Subscription(job_id=job_id, max_queued=self._max_queued, level=level)
        self._by_job.setdefault(job_id, set()).add(sub)
        try:
            yield sub
        finally:
            subs = self._by_job.get(job_id)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._by_job[job_id]

    def close_all(self) -> None:
        for subs in self._by_job.values():
            for sub in subs:
                sub.close()

    @property
    def subscribers(self) -> int:
        return sum(len(s) for s in self._by_job.values())
