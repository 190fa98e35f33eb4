"""A uvicorn server whose idle loop wakes once a second instead of ten times (ADR 0013).

uvicorn's ``Server.main_loop`` sleeps 0.1 s between ticks (to see ``should_exit`` and refresh
the Date header once a second). A devstack runs one server per compute node, so an idle
cluster woke up tens of times a second for nothing. Here a tick comes every second (the Date
header is still refreshed every second) and setting ``should_exit`` wakes the loop at once, so
stopping is as quick as before.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import uvicorn

TICK_S = 1.0


class QuietServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config) -> None:
        self._exit_wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._should_exit = False
        super().__init__(config)

    @property
    def should_exit(self) -> bool:
        return self._should_exit

    @should_exit.setter
    def should_exit(self, value: bool) -> None:
        self._should_exit = value
        if value and self._exit_wake is not None and self._loop is not None:
            # (may be called from a signal handler: hand the wake-up to the loop)
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._exit_wake.set)

    async def main_loop(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._exit_wake = asyncio.Event()
        counter = 0
        should_exit = await self.on_tick(counter)
        while not should_exit and not self._should_exit:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._exit_wake.wait(), TICK_S)
            # on_tick refreshes the Date header when counter % 10 == 0: every tick here.
            counter = (counter + 10) % 864000
            should_exit = await self.on_tick(counter)


def quiet_server(app: Any, **config: Any) -> QuietServer:
    return QuietServer(uvicorn.Config(app, **config))
