"""The publisher's store on SQLAlchemy 2 async: SQLite (embedded default) or Postgres."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import bindparam, func, insert, select, update
from sqlalchemy.engine import RowMapping

from shoal_common.db import (
    StoreConnection,
    StoreEngine,
    add_to_outbox,
    create_store_engine,
    mark_processed,
    run_migrations,
)
from shoal_common.direct_relay import DirectOutboxRelay
from shoal_common.events import Envelope, Event
from shoal_publisher.domain.models import Publication, PublicationStatus
from shoal_publisher.store import tables as t
from shoal_publisher.store.base import Publish

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"


def _values(p: Publication) -> dict[str, Any]:
    return {
        "execution_id": p.execution_id,
        "job_id": p.job_id,
        "node_id": p.node_id,
        "result_cid": p.result_cid,
        "publisher": p.publisher,
        "status": p.status.value,
        "result": p.result,
        "error": p.error,
        "attempts": p.attempts,
        "created": p.created,
        "updated": p.updated,
    }


def _publication(row: RowMapping) -> Publication:
    return Publication(
        execution_id=row["execution_id"],
        job_id=row["job_id"],
        node_id=row["node_id"],
        result_cid=row["result_cid"],
        publisher=row["publisher"],
        status=PublicationStatus(row["status"]),
        result=row["result"],
        error=row["error"],
        attempts=row["attempts"],
        created=row["created"],
        updated=row["updated"],
    )


# Built once: constructing a statement per call cost more than running it (stress profile).
_SELECT_PUBLICATION = select(t.publications).where(
    t.publications.c.execution_id == bindparam("b_execution_id")
)
_INSERT_PUBLICATION = insert(t.publications)
_UPDATE_PUBLICATION = update(t.publications).where(
    t.publications.c.execution_id == bindparam("b_execution_id")
)


async def _find(conn: StoreConnection, execution_id: str) -> Publication | None:
    found = await conn.execute(_SELECT_PUBLICATION, {"b_execution_id": execution_id})
    row = found.mappings().first()
    return _publication(row) if row else None


class SqlTx:
    def __init__(self, conn: StoreConnection) -> None:
        self._conn = conn
        self.staged: list[Envelope] = []  # handed to the relay once the transaction commits

    async def mark_processed(self, event_id: str) -> bool:
        return await mark_processed(self._conn, t.processed_events, event_id)

    async def find_publication(self, execution_id: str) -> Publication | None:
        return await _find(self._conn, execution_id)

    async def save_publication(self, publication: Publication) -> None:
        values = _values(publication)
        changed = {k: v for k, v in values.items() if k != "execution_id"}
        result = await self._conn.execute(
            _UPDATE_PUBLICATION, {**changed, "b_execution_id": publication.execution_id}
        )
        if result.rowcount == 0:
            await self._conn.execute(_INSERT_PUBLICATION, values)

    async def add_events(self, *events: Event) -> list[Envelope]:
        envelopes = await add_to_outbox(self._conn, t.outbox, *events)
        self.staged.extend(envelopes)
        return envelopes


class SqlPublisherStore:
    """:class:`~shoal_publisher.store.base.PublisherStore` on a SQLAlchemy async engine."""

    def __init__(self, url: str, *, engine: StoreEngine | None = None) -> None:
        self.url = url
        self.engine = engine or create_store_engine(url)
        self._relay: DirectOutboxRelay | None = None

    async def migrate(self) -> None:
        await asyncio.to_thread(run_migrations, self.url, MIGRATIONS)

    async def close(self) -> None:
        await self.engine.dispose()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[SqlTx]:
        async with self.engine.begin() as conn:
            tx = SqlTx(conn)
            yield tx
        # Committed: publish from memory now instead of reading the outbox back.
        if tx.staged and self._relay is not None:
            self._relay.handoff(tx.staged)

    def relay(self, publish: Publish, *, poll_interval: float = 1.0) -> DirectOutboxRelay:
        self._relay = DirectOutboxRelay(
            self.engine, t.outbox, publish, service="publisher", poll_interval=poll_interval
        )
        return self._relay

    async def is_processed(self, event_id: str) -> bool:
        query = select(t.processed_events.c.event_id).where(
            t.processed_events.c.event_id == event_id
        )
        async with self.engine.connect() as conn:
            return (await conn.execute(query)).first() is not None

    async def find_publication(self, execution_id: str) -> Publication | None:
        async with self.engine.connect() as conn:
            return await _find(conn, execution_id)

    async def list_publications(self, job_id: str) -> list[Publication]:
        query = (
            select(t.publications)
            .where(t.publications.c.job_id == job_id)
            .order_by(t.publications.c.created, t.publications.c.execution_id)
        )
        async with self.engine.connect() as conn:
            return [_publication(r) for r in (await conn.execute(query)).mappings()]

    async def outbox_size(self) -> int:
        async with self.engine.connect() as conn:
            count = await conn.execute(select(func.count()).select_from(t.outbox))
            return int(count.scalar_one())
