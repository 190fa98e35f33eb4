"""The publisher's store on SQLAlchemy 2 async: SQLite (embedded default) or Postgres."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.engine import RowMapping

from shoal_common.db import StoreConnection
from shoal_common.outbox_store import OutboxSqlStore, OutboxTx
from shoal_publisher.domain.models import Publication, PublicationStatus
from shoal_publisher.store import tables as t

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
_SELECT_PROCESSED = select(t.processed_events.c.event_id).where(
    t.processed_events.c.event_id == bindparam("b_event_id")
)
_INSERT_PUBLICATION = insert(t.publications)
_UPDATE_PUBLICATION = update(t.publications).where(
    t.publications.c.execution_id == bindparam("b_execution_id")
)


async def _find(conn: StoreConnection, execution_id: str) -> Publication | None:
    found = await conn.execute(_SELECT_PUBLICATION, {"b_execution_id": execution_id})
    row = found.mappings().first()
    return _publication(row) if row else None


class SqlTx(OutboxTx):
    outbox = t.outbox
    processed_events = t.processed_events

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


class SqlPublisherStore(OutboxSqlStore[SqlTx]):
    """:class:`~shoal_publisher.store.base.PublisherStore` on SQLite (group commit) or Postgres."""

    service = "publisher"
    migrations = MIGRATIONS
    tx_type = SqlTx

    async def is_processed(self, event_id: str) -> bool:
        async with self.engine.connect() as conn:
            found = await conn.execute(_SELECT_PROCESSED, {"b_event_id": event_id})
            return found.first() is not None

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
