"""Placement lanes: a bounded number of placements at once, queued jobs first."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator


class PlacementLanes:
    """A semaphore with two queues: waiters marked ``first`` are served before the others.

    Jobs that waited in Queued for capacity take their lane with ``first=True``: when capacity
    frees under a steady stream of submits, the oldest waiting jobs get it, not the newest
    arrivals (which would otherwise win every race to a freed slot, and leave a queued job
    waiting for seconds). Within each queue waiters are served in arrival order.
    """

    def __init__(self, lanes: int) -> None:
        self._free = lanes
        self._first: deque[asyncio.Future[None]] = deque()
        self._rest: deque[asyncio.Future[None]] = deque()

    @contextlib.asynccontextmanager
    async def lane(self, *, first: bool = False) -> AsyncIterator[None]:
        await self._acquire(first)
        try:
            yield
        finally:
            self._release()

    async def _acquire(self, first: bool) -> None:
        if self._free > 0 and not self._first and not self._rest:
            self._free -= 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        (self._first if first else self._rest).append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release()  # handed a lane just as it was cancelled: pass it on
            else:
                with contextlib.suppress(ValueError):
                    (self._first if first else self._rest).remove(waiter)
            raise

    def _release(self) -> None:
        for queue in (self._first, self._rest):
            while queue:
                waiter = queue.popleft()
                if not waiter.done():
                    waiter.set_result(None)  # the lane passes straight to the waiter
                    return
        self._free += 1

    @property
    def waiting(self) -> int:
        return len(self._first) + len(self._rest)
