"""SQLAlchemy tables of the compute node (schema changes only through Alembic migrations)."""

from __future__ import annotations

from sqlalchemy import Column, Float, Index, Integer, LargeBinary, String, Table, Text

from shoal_common.db import new_metadata, outbox_table

metadata = new_metadata()

executions = Table(
    "executions",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("job_id", String(64), nullable=False),
    Column("state", String(16), nullable=False),
    Column("version", Integer, nullable=False),
    Column("requester_id", String(128), nullable=False, default=""),
    # JSON blobs (orjson): the job in wire form, its resources, the run output.
    Column("job", LargeBinary, nullable=False),
    Column("resources", LargeBinary, nullable=False),
    Column("run_output", LargeBinary, nullable=True),
    Column("result_cid", String(128), nullable=True),
    # A run's results folder while it is kept in the row (RunFiles.encode, ADR 0030).
    Column("result_files", LargeBinary, nullable=True),
    Column("error", Text, nullable=False, default=""),
    Column("created", Float, nullable=False),
    Column("updated", Float, nullable=False),
    Index("ix_executions_state", "state"),
    # GET /content/{cid} of an older result finds its folder through this.
    Index("ix_executions_result_cid", "result_cid"),
)

outbox = outbox_table(metadata)
