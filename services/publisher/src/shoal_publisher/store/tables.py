"""The publisher's tables (SQLAlchemy Core; Alembic owns the changes)."""

from __future__ import annotations

from sqlalchemy import JSON, Column, Float, Integer, String, Table, Text

from shoal_common.db import new_metadata, outbox_table, processed_events_table

metadata = new_metadata()

publications = Table(
    "publications",
    metadata,
    Column("execution_id", String(64), primary_key=True),
    Column("job_id", String(64), nullable=False, index=True),
    Column("node_id", String(128), nullable=False),
    Column("result_cid", String(128), nullable=False),
    Column("publisher", String(32), nullable=False),
    Column("status", String(16), nullable=False),
    Column("result", JSON, nullable=True),
    Column("error", Text, nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("created", Float, nullable=False),
    Column("updated", Float, nullable=False),
)

outbox = outbox_table(metadata)
processed_events = processed_events_table(metadata)
