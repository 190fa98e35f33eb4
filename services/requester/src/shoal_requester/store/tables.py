"""The requester's tables (SQLAlchemy Core). Schema changes only through Alembic migrations."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    Text,
    false,
    text,
    true,
)
from sqlalchemy.types import TypeDecorator

from shoal_common.db import new_metadata, outbox_table, processed_events_table


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend.

    Postgres keeps the zone (timestamptz); SQLite stores naive text, so values are normalised to
    UTC on the way in and marked UTC on the way out. Wire timestamps must be RFC 3339 with a zone.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _index_where_set(name: str, column: str) -> Index:
    """A partial index of the rows where ``column`` is set, on both backends.

    For the deadlines: rows without one used to sit in the index as NULL keys, so setting it
    moved an entry between two pages on every commit (ADR 0033). A query's ``column <= x``
    implies ``IS NOT NULL``, so it can still use the index.
    """
    where = text(f"{column} IS NOT NULL")
    return Index(name, column, sqlite_where=where, postgresql_where=where)


metadata = new_metadata()

ID = String(64)
STATE = String(32)

jobs = Table(
    "jobs",
    metadata,
    Column("id", ID, primary_key=True),
    Column("client_id", String(128), nullable=False),
    Column("job", Text, nullable=False),  # wire JSON (to_wire(Job))
    Column("state", STATE, nullable=False),
    Column("version", Integer, nullable=False),
    Column("created", UTCDateTime, nullable=False),
    Column("updated", UTCDateTime, nullable=False),
    Column("timeout_at", UTCDateTime, nullable=True),
    Column("queue_deadline", UTCDateTime, nullable=True),
    Column("retries_used", Integer, nullable=False, server_default="0"),
    Column("extra_executions", Integer, nullable=False, server_default="0"),
    Column("status", Text, nullable=False, server_default=""),
    # sha256 hex of the signed payload bytes; unique so a replayed submit cannot create a job.
    Column("submit_key", String(64), nullable=True, unique=True),
    Index("ix_jobs_client_created", "client_id", "created"),
    Index("ix_jobs_created", "created"),
    Index("ix_jobs_state", "state"),
    _index_where_set("ix_jobs_timeout_at", "timeout_at"),
    _index_where_set("ix_jobs_queue_deadline", "queue_deadline"),
)

# Annotations, one row each, so include/exclude tag filters are plain indexed SQL.
job_tags = Table(
    "job_tags",
    metadata,
    Column("job_id", ID, ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    Column("tag", String(256), primary_key=True),
    Index("ix_job_tags_tag", "tag"),
)

executions = Table(
    "executions",
    metadata,
    Column("id", ID, primary_key=True),
    Column("job_id", ID, ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
    Column("node_id", String(128), nullable=False),
    Column("state", STATE, nullable=False),
    Column("version", Integer, nullable=False),
    Column("accepted_ask_for_bid", Boolean, nullable=False, server_default=false()),
    Column("status", Text, nullable=False, server_default=""),
    Column("run_output", Text, nullable=True),  # RunOutput JSON, truncated
    Column("result_cid", String(128), nullable=True),
    Column("published", Text, nullable=True),  # StorageSpec JSON of the published result
    Column("verification", Text, nullable=True),  # {"Complete", "Result"} JSON
    Column("retryable", Boolean, nullable=False, server_default=true()),
    Column("created", UTCDateTime, nullable=False),
    Column("updated", UTCDateTime, nullable=False),
    Index("ix_executions_job_id", "job_id"),
    Index("ix_executions_node_state", "node_id", "state"),
    Index("ix_executions_state_updated", "state", "updated"),
)

history = Table(
    "history",
    metadata,
    Column(
        "seq",
        BigInteger().with_variant(Integer, "sqlite"),
        primary_key=True,
        autoincrement=True,
    ),
    Column("job_id", ID, ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
    Column("type", String(16), nullable=False),  # JobLevel | ExecutionLevel
    Column("execution_id", ID, nullable=True),
    Column("node_id", String(128), nullable=True),
    Column("previous", STATE, nullable=True),
    Column("new", STATE, nullable=False),
    Column("version", Integer, nullable=False),
    Column("comment", Text, nullable=False, server_default=""),
    Column("time", UTCDateTime, nullable=False),
    Index("ix_history_job_seq", "job_id", "seq"),
)

nodes = Table(
    "nodes",
    metadata,
    Column("id", String(128), primary_key=True),
    Column("info", Text, nullable=False),  # NodeInfo JSON from the last heartbeat that changed it
    Column("state", String(16), nullable=False),
    Column("first_seen", UTCDateTime, nullable=False),
    Column("last_seen", UTCDateTime, nullable=False),
)

# Each node's reputation (domain.model.NodeStanding). Apart from ``nodes`` because it changes
# with executions, in their transactions, by increments; ``nodes`` rows are rewritten whole
# from heartbeats and must not race with it.
node_standing = Table(
    "node_standing",
    metadata,
    Column("node_id", String(128), primary_key=True),
    Column("completed", Integer, nullable=False, server_default="0"),
    Column("failed", Integer, nullable=False, server_default="0"),
    Column("rejected", Integer, nullable=False, server_default="0"),
    Column("last_rejected", UTCDateTime, nullable=True),
)

outbox = outbox_table(metadata)
processed_events = processed_events_table(metadata)
