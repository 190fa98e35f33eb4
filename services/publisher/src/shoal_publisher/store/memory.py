"""In-memory :class:`PublisherStore` for unit tests: same contract, no database."""

from __future__ import annotations

import asyncio
import contextlib
import copy
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from shoal_common.events import Envelope, Event
from shoal_publisher.domain.models import Publication
from shoal_publisher.store.base import Publish


@dataclass
class _State:
    publications: dict[str, Publication] = field(default_factory=dict)
    processed: set[str] = field(default_factory=set)
    outbox: list[Envelope] = field(default_factory=list)


class MemoryTx:
    def __init__(self, state: _State) -> None:
        self._s = state

    async def mark_processed(self, event_id: str) -> bool:
        if event_id in self._s.processed:
            return False
        self._s.processed.add(event_id)
        return True

    async def find_publication(self, execution_id: str) -> Publication | None:
        found = self._s.publications.get(execution_id)
        return copy.deepcopy(found) if found else None

    async def save_publication(self, publication: Publication) -> None:
        self._s.publications[publication.execution_id] = copy.deepcopy(publication)

    async def add_events(self, *events: Event) -> list[Envelope]:
        envelopes = [Envelope.wrap(e) for e in events]
        self._s.outbox.extend(envelopes)
        return envelopes


class MemoryRelay:
    """Drains the fake's outbox to the bus, like ``shoal_common.db.OutboxRelay``."""

    def __init__(self, store: MemoryPublisherStore, publish: Publish, poll: float) -> None:
        self._store = store
        self._publish = publish
        self._poll = poll
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def notify(self) -> None:
        self._wake.set()

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._poll)
            self._wake.clear()
            await self._store.relay_once(self._publish)


class MemoryPublisherStore:
    """A dict-backed store; a transaction snapshots the state and restores it on error."""

    def __init__(self) -> None:
        self._state = _State()
        self._lock = asyncio.Lock()

    async def migrate(self) -> None:
        return None

    async def close(self) -> None:
        return None

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[MemoryTx]:
        async with self._lock:
            snapshot = copy.deepcopy(self._state)
            try:
                yield MemoryTx(self._state)
            except BaseException:
                self._state = snapshot
                raise

    def relay(self, publish: Publish, *, poll_interval: float = 1.0) -> MemoryRelay:
        return MemoryRelay(self, publish, poll_interval)

    async def relay_once(self, publish: Publish) -> int:
        async with self._lock:
            batch = list(self._state.outbox)
        for env in batch:
            await publish(env)
        async with self._lock:
            sent = {e.id for e in batch}
            self._state.outbox = [e for e in self._state.outbox if e.id not in sent]
        return len(batch)

    async def is_processed(self, event_id: str) -> bool:
        return event_id in self._state.processed

    async def find_publication(self, execution_id: str) -> Publication | None:
        found = self._state.publications.get(execution_id)
        return copy.deepcopy(found) if found else None

    async def list_publications(self, job_id: str) -> list[Publication]:
        found = [copy.deepcopy(p) for p in self._state.publications.values() if p.job_id == job_id]
        return sorted(found, key=lambda p: (p.created, p.execution_id))

    async def outbox_size(self) -> int:
        return len(self._state.outbox)

    def processed_count(self) -> int:
        """How many consumed events were applied (tests wait on it)."""
        return len(self._state.processed)
