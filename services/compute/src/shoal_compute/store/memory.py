"""In-memory :class:`ExecutionStore` for unit tests (same contract, nothing survives)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Collection, Sequence
from typing import Any

from shoal_common.errors import Conflict, InvalidTransition, NotFound
from shoal_common.events import Envelope, Event
from shoal_compute.domain.execution import ExecutionRecord, LocalState
from shoal_compute.store.base import PublishFn, Relay


class MemoryExecutionStore:
    def __init__(self) -> None:
        self._records: dict[str, ExecutionRecord] = {}
        self.outbox: list[Envelope] = []
        self._relays: list[MemoryRelay] = []

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def _stage(self, events: Sequence[Event]) -> None:
        self.outbox.extend(Envelope.wrap(e) for e in events)

    async def create(
        self,
        record: ExecutionRecord,
        *,
        events: Sequence[Event] = (),
        on_ordered: Callable[[], None] | None = None,
    ) -> None:
        if record.id in self._records:
            raise Conflict(f"execution {record.id} already exists")
        self._records[record.id] = record
        self._stage(events)
        if on_ordered is not None:
            on_ordered()

    async def find(self, execution_id: str) -> ExecutionRecord | None:
        return self._records.get(execution_id)

    async def get(self, execution_id: str) -> ExecutionRecord:
        record = self._records.get(execution_id)
        if record is None:
            raise NotFound(f"execution {execution_id} is not known on this node")
        return record

    async def transition(
        self,
        execution_id: str,
        *,
        expected: Collection[LocalState],
        new: LocalState,
        events: Sequence[Event] = (),
        **changes: Any,
    ) -> None:
        current = await self.get(execution_id)
        if current.state not in expected:
            raise InvalidTransition(
                f"execution {execution_id} is {current.state.value}, not "
                f"{'/'.join(sorted(s.value for s in expected))}; cannot move it to {new.value}"
            )
        self._records[execution_id] = current.moved_to(new, **changes)
        self._stage(events)

    async def find_by_result(self, result_cid: str) -> ExecutionRecord | None:
        for record in self._records.values():
            if record.result_cid == result_cid:
                return record
        return None

    async def list_executions(
        self,
        *,
        states: Collection[LocalState] | None = None,
        limit: int = 1000,
        newest_first: bool = False,
    ) -> list[ExecutionRecord]:
        found = [r for r in self._records.values() if states is None or r.state in states]
        return sorted(found, key=lambda r: r.created, reverse=newest_first)[:limit]

    async def stage_events(self, *events: Event) -> None:
        self._stage(events)

    def relay(self, publish: PublishFn, *, service: str) -> Relay:
        relay = MemoryRelay(self, publish)
        self._relays.append(relay)
        return relay


class MemoryRelay:
    """Publishes the memory outbox when notified (and once more on stop)."""

    def __init__(self, store: MemoryExecutionStore, publish: PublishFn) -> None:
        self._store = store
        self._publish = publish
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def notify(self) -> None:
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.relay_once()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self.relay_once()

    async def relay_once(self) -> int:
        batch, self._store.outbox[:] = list(self._store.outbox), []
        for envelope in batch:
            await self._publish(envelope)
        return len(batch)
