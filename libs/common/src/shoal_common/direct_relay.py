"""An outbox relay with a fast path: events are published straight after their commit.

:class:`shoal_common.db.OutboxRelay` reads committed events back from the outbox before
publishing them: a database round trip on every event's critical path. Here the store hands
the envelopes it has just committed to the relay, which publishes them from memory at once and
then deletes their rows in one statement. On the group-commit SQLite engine that delete has no
commit of its own: it rides in the store's next group (``GroupCommitEngine.defer``, ADR 0026),
and its events count as in flight until then, so the poll loop does not publish them again.
The rows stay the source of truth: anything not
published (NATS down, a crash between commit and publish) is found by the poll loop, which
relays rows older than a short grace period exactly as OutboxRelay does. The poll loop runs at
once on start, every ``poll_interval`` while it finds rows or the fast path has failed, and only
every ``idle_poll_interval`` once the table is empty (ADR 0013: an idle service does not query
its database every second).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import structlog
from sqlalchemy import Table, bindparam, delete, select

from shoal_common import telemetry
from shoal_common.db import IDLE_POLL_INTERVAL_S
from shoal_common.events import Envelope
from shoal_common.sqlite_store import DeferredDone, DeferredWork, GroupCommitEngine, LoopConnection

if TYPE_CHECKING:
    from shoal_common.db import StoreEngine

PublishFn = Callable[[Envelope], Awaitable[None]]

log = structlog.get_logger(__name__)


class DirectOutboxRelay:
    """An outbox relay fed by :meth:`handoff` after each commit (used by the services' stores)."""

    def __init__(
        self,
        engine: StoreEngine,
        outbox: Table,
        publish: PublishFn,
        *,
        service: str,
        poll_interval: float = 1.0,
        idle_poll_interval: float = IDLE_POLL_INTERVAL_S,
        grace: float = 2.0,
        batch: int = 500,
    ) -> None:
        self._engine = engine
        self._outbox = outbox
        self._publish = publish
        self._service = service
        self._poll_interval = poll_interval
        self._idle_poll_interval = max(idle_poll_interval, poll_interval)
        self._grace = grace  # rows younger than this belong to the fast path
        self._batch = batch
        self._pending: list[tuple[Envelope, float]] = []
        self._wake = asyncio.Event()
        self._leftovers = asyncio.Event()  # the fast path left rows behind: poll soon
        self._inflight: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        # Prebuilt and run once per row (executemany): on SQLite it then takes the group-commit
        # engine's driver path, where an expanding IN list was compiled by SQLAlchemy each time.
        # Not a range on seq: a batch may have holes (a failed publish), and on Postgres a row
        # with a lower seq can commit after a higher one was read.
        self._delete_published = delete(outbox).where(outbox.c.event_id == bindparam("b_id"))
        self._delete_seq = delete(outbox).where(outbox.c.seq == bindparam("b_seq"))
        self._select_rows = (
            select(outbox.c.seq, outbox.c.event_id, outbox.c.envelope, outbox.c.created)
            .order_by(outbox.c.seq)
            .limit(batch)
        )
        self._lag = telemetry.OUTBOX_LAG.labels(service=service)

    # --- Relay ---

    def handoff(self, envelopes: list[Envelope]) -> None:
        """Envelopes whose outbox rows were just committed: publish them now."""
        if not envelopes or self._stopping:
            return
        now = time.time()
        for envelope in envelopes:
            self._inflight.add(envelope.id)
            self._pending.append((envelope, now))
        self._wake.set()

    def notify(self) -> None:
        """Nothing to do: committed events arrive through :meth:`handoff`."""

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._pump(), name=f"outbox-fast-{self._service}"),
            asyncio.create_task(self._poll(), name=f"outbox-poll-{self._service}"),
        ]

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        # Whatever the fast path still held is published now (or left to the next start).
        with contextlib.suppress(Exception):
            await self._publish_pending(defer_delete=False)

    async def relay_once(self) -> int:
        """Publish up to one batch of committed rows (fast path first, then leftovers)."""
        done = await self._publish_pending(defer_delete=False)
        relayed, _ = await self._relay_leftovers(max_age=0.0)
        return done + relayed

    # --- loops ---

    async def _pump(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._publish_pending()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the rows remain: the poll loop retries them
                log.warning("outbox_fast_path_failed", service=self._service, error=repr(exc))

    async def _poll(self) -> None:
        interval = 0.0  # the first pass at once: rows a previous run left
        while True:
            if interval:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._leftovers.wait(), interval)
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise asyncio.CancelledError  # (3.11's wait_for can drop a racing cancel)
            if self._leftovers.is_set():
                # Rows the fast path could not publish: they are relayed once past the grace.
                self._leftovers.clear()
                interval = self._poll_interval
                continue
            try:
                relayed, waiting = await self._relay_leftovers(max_age=self._grace)
                while relayed >= self._batch:
                    relayed, waiting = await self._relay_leftovers(max_age=self._grace)
                busy = relayed or waiting
                interval = self._poll_interval if busy else self._idle_poll_interval
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("outbox_relay_failed", service=self._service, error=repr(exc))
                interval = self._poll_interval

    # --- work ---

    async def _publish_pending(self, *, defer_delete: bool = True) -> int:
        batch, self._pending = self._pending, []
        if not batch:
            return 0
        deleting: set[str] = set()  # stay in flight until their rows' delete is durable
        try:
            results = await asyncio.gather(
                *(self._publish(envelope) for envelope, _ in batch), return_exceptions=True
            )
            published = [
                envelope.id
                for (envelope, _), result in zip(batch, results, strict=True)
                if not isinstance(result, BaseException)
            ]
            if len(published) < len(batch):
                self._leftovers.set()
                log.warning(
                    "outbox_publish_failed",
                    service=self._service,
                    failed=len(batch) - len(published),
                )
            now = time.time()
            for _, committed in batch:
                self._lag.observe(max(0.0, now - committed))
            if published and defer_delete and isinstance(self._engine, GroupCommitEngine):
                # No commit of its own: the delete rides in the next group (ADR 0026).
                deleting.update(published)
                self._engine.defer(self._deleter(published), self._deleted(published))
            elif published:
                try:
                    async with self._engine.begin() as conn:
                        await conn.execute(self._delete_published, [{"b_id": i} for i in published])
                except Exception:
                    self._leftovers.set()  # published, rows kept: relayed again (same ids)
                    raise
            return len(published)
        finally:
            for envelope, _ in batch:
                if envelope.id not in deleting:
                    self._inflight.discard(envelope.id)

    def _deleter(self, event_ids: list[str]) -> DeferredWork:
        params = [{"b_id": i} for i in event_ids]

        async def delete_rows(conn: LoopConnection) -> None:
            await conn.execute(self._delete_published, params)

        return delete_rows

    def _deleted(self, event_ids: list[str]) -> DeferredDone:
        def done(error: BaseException | None) -> None:
            for event_id in event_ids:
                self._inflight.discard(event_id)
            if error is not None:
                self._leftovers.set()  # published, rows kept: relayed again (same ids)

        return done

    async def _relay_leftovers(self, *, max_age: float) -> tuple[int, int]:
        """Rows older than ``max_age`` seconds the fast path does not hold: publish, delete.

        Returns how many were relayed and how many younger ones (not held by the fast path
        either) wait for a later pass.
        """
        cutoff = time.time() - max_age
        async with self._engine.connect() as conn:
            found = (await conn.execute(self._select_rows)).all()
        loose = [r for r in found if r.event_id not in self._inflight]
        rows = [r for r in loose if r.created <= cutoff]
        if not rows:
            return 0, len(loose)
        envelopes = [Envelope.from_bytes(r.envelope) for r in rows]
        await asyncio.gather(*(self._publish(e) for e in envelopes))
        async with self._engine.begin() as conn:
            await conn.execute(self._delete_seq, [{"b_seq": r.seq} for r in rows])
        return len(rows), len(loose) - len(rows)
