"""The part of a consumer service's SQL store that is the same in every service.

A verifier or publisher store is: its own tables, an outbox and a processed-events table in one
database; transactions in which a handler marks the event it applies as processed, changes its
rows and stages the events it emits; and a relay that publishes what was committed. Subclasses
add their tables' queries to a :class:`OutboxTx` subclass and to the store.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import ClassVar, Generic, TypeVar

from sqlalchemy import Table, func, select

from shoal_common.db import (
    StoreConnection,
    StoreEngine,
    add_to_outbox,
    create_store_engine,
    mark_processed,
    run_migrations,
)
from shoal_common.direct_relay import DirectOutboxRelay, PublishFn
from shoal_common.events import Envelope, Event


class OutboxTx:
    """One transaction: de-duplication and staged events; subclasses add their own rows."""

    outbox: ClassVar[Table]
    processed_events: ClassVar[Table]

    def __init__(self, conn: StoreConnection) -> None:
        self._conn = conn
        self.staged: list[Envelope] = []  # handed to the relay once the transaction commits

    async def mark_processed(self, event_id: str) -> bool:
        return await mark_processed(self._conn, self.processed_events, event_id)

    async def add_events(self, *events: Event) -> list[Envelope]:
        envelopes = await add_to_outbox(self._conn, self.outbox, *events)
        self.staged.extend(envelopes)
        return envelopes


TxT = TypeVar("TxT", bound=OutboxTx)


class OutboxSqlStore(Generic[TxT]):
    """Engine, migrations, transactions and the relay of a service's store."""

    service: ClassVar[str]
    migrations: ClassVar[Path]
    tx_type: type[TxT]

    def __init__(self, url: str, *, engine: StoreEngine | None = None) -> None:
        self.url = url
        self.engine = engine or create_store_engine(url)
        self._relay: DirectOutboxRelay | None = None

    async def migrate(self) -> None:
        await asyncio.to_thread(run_migrations, self.url, self.migrations)

    async def close(self) -> None:
        await self.engine.dispose()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[TxT]:
        async with self.engine.begin() as conn:
            tx = self.tx_type(conn)
            yield tx
        # Committed: publish from memory now instead of reading the outbox back.
        if tx.staged and self._relay is not None:
            self._relay.handoff(tx.staged)

    def relay(self, publish: PublishFn, *, poll_interval: float = 1.0) -> DirectOutboxRelay:
        self._relay = DirectOutboxRelay(
            self.engine,
            self.tx_type.outbox,
            publish,
            service=self.service,
            poll_interval=poll_interval,
        )
        return self._relay

    async def outbox_size(self) -> int:
        async with self.engine.connect() as conn:
            count = await conn.execute(select(func.count()).select_from(self.tx_type.outbox))
            return int(count.scalar_one())
