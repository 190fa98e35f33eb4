"""In-process fan-out of history rows to live subscribers (the event stream, behaviour 40)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from shoal_requester.domain.model import HistoryRecord


@dataclass(eq=False)
class Subscription:
    """Rows for one job (or all jobs when ``job_id`` is None), in commit order.

    A subscriber that falls ``max_queued`` rows behind is cut off (``overflowed``) rather than
    letting it hold memory or slow the writers; it can reconnect and catch up from the store.
    """

    job_id: str | None
    max_queued: int
    queue: asyncio.Queue[HistoryRecord] = field(default_factory=asyncio.Queue)
    overflowed: bool = False
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    def offer(self, row: HistoryRecord) -> None:
        if self.overflowed:
            return
        if self.queue.qsize() >= self.max_queued:
            self.overflowed = True
            self.closed.set()
            return
        self.queue.put_nowait(row)

    async def next(self, timeout: float) -> HistoryRecord | None:
        """The next row, or None after ``timeout`` seconds (or when cut off)."""
        if self.overflowed:
            return None
        getter = asyncio.ensure_future(self.queue.get())
        closer = asyncio.ensure_future(self.closed.wait())
        try:
            done, _ = await asyncio.wait(
                {getter, closer}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for task in (getter, closer):
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
        if getter in done and not getter.cancelled():
            return getter.result()
        return None


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
    def subscribe(self, job_id: str | None) -> Iterator[Subscription]:
        sub = Subscription(job_id=job_id, max_queued=self._max_queued)
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
                sub.closed.set()

    @property
    def subscribers(self) -> int:
        return sum(len(s) for s in self._by_job.values())
