"""The event loop a service process runs on: uvloop unless told otherwise (ADR 0020).

Every Shoal service is one asyncio event loop doing small things very often: HTTP requests,
NATS messages, timers, hand-offs from the SQLite commit thread. The standard library's loop
spends a large share of a busy service's CPU in its own Python code (selector, handles,
transports); uvloop (libuv, in C; already installed with ``uvicorn[standard]``) does the same
work in C. ``SHOAL_EVENT_LOOP=asyncio`` keeps the standard loop (to compare, or to rule uvloop
out); a platform without uvloop gets the standard loop anyway.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

ENV = "SHOAL_EVENT_LOOP"


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop constructor, or None for the standard one."""
    if os.environ.get(ENV, "uvloop") == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:  # not on every platform (Windows)
        return None
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on the service event loop."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)
