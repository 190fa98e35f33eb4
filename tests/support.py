"""Running a devstack for end-to-end tests: in a background thread with its own event loop, so
tests drive it through the real (synchronous) client and CLI exactly as users do."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

from shoal_cli.devstack import Devstack, DevstackConfig
from shoal_client.client import ShoalClient
from shoal_common.signing import ClientKey
from shoal_common.spec import JobState

T = TypeVar("T")


class DevstackThread:
    """A Devstack running on a private event loop in a daemon thread."""

    def __init__(self, config: DevstackConfig) -> None:
        self.config = config
        self.stack = Devstack(config)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._clients: list[ShoalClient] = []

    def start(self) -> DevstackThread:
        self._thread.start()
        self.call(self.stack.start(), timeout=60)
        return self

    def call(self, coro: Any, timeout: float = 30) -> Any:
        """Run a coroutine on the devstack's loop and wait for its result."""
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(timeout)

    def stop(self) -> None:
        for client in self._clients:
            client.close()
        try:
            self.call(self.stack.stop(), timeout=30)
        except TimeoutError:
            stuck = [t.get_stack() for t in asyncio.all_tasks(self._loop)]
            raise AssertionError(f"devstack did not stop within 30 s; tasks: {stuck}") from None
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    @property
    def api_url(self) -> str:
        return self.stack.api_url

    def client(self, key_dir: Path) -> ShoalClient:
        client = ShoalClient(self.api_url, key=ClientKey.load_or_create(key_dir))
        self._clients.append(client)  # closed with the stack
        return client


def wait_until(probe: Callable[[], T | None], *, timeout: float = 20.0, what: str = "") -> T:
    """Poll a synchronous probe until truthy (tests wait on state with a deadline, not sleeps)."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or probe}: last={last!r}")


def execution_states(state: JobState) -> list[str]:
    return sorted(e.state.value for e in state.executions)


def count(state: JobState, name: str) -> int:
    return sum(1 for e in state.executions if e.state.value == name)
