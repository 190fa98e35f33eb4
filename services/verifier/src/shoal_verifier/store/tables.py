"""The verifier's tables (the ORM-free SQLAlchemy Core schema; Alembic owns the changes)."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    LargeBinary,
    String,
    Table,
    Text,
)

from shoal_common.db import new_metadata, outbox_table, processed_events_table

metadata = new_metadata()

jobs = Table(
    "verifier_jobs",
    metadata,
    Column("job_id", String(64), primary_key=True),
    Column("verifier", String(32), nullable=False),
    Column("verifier_from_plan", Boolean, nullable=False),
    Column("base", Integer, nullable=False),
    Column("plan_expected", Integer, nullable=True),
    Column("plan_time", Float, nullable=True),
    Column("floor", Integer, nullable=False),
    Column("confidence", Integer, nullable=False),
    Column("planned", JSON, nullable=False),
    Column("escalations", Integer, nullable=False),
    Column("extra_executions", Integer, nullable=False),
    Column("status", String(16), nullable=False),
    Column("accepted_cid", String(128), nullable=True),
    Column("reason", Text, nullable=False),
    Column("round_started", Float, nullable=True),
    Column("version", Integer, nullable=False),
    Column("created", Float, nullable=False),
    Column("updated", Float, nullable=False),
)
# The deadline sweep looks for open jobs by round start.
Index("ix_verifier_jobs_status_round", jobs.c.status, jobs.c.round_started)

proposals = Table(
    "verifier_proposals",
    metadata,
    Column("execution_id", String(64), primary_key=True),
    Column("job_id", String(64), nullable=False, index=True),
    Column("node_id", String(128), nullable=False),
    Column("result_cid", String(128), nullable=False),
    Column("received", Float, nullable=False),
    Column("status", String(16), nullable=False),
    Column("reason", Text, nullable=False),
    Column("invalid_reason", Text, nullable=True),
    Column("sealed", Boolean, nullable=False),
    Column("publisher", JSON, nullable=False),
    Column("result_url", Text, nullable=True),
    Column("run_output", JSON, nullable=True),
    Column("event_id", String(64), nullable=False),
)

keys = Table(
    "verifier_keys",
    metadata,
    Column("name", String(32), primary_key=True),
    Column("private_key", LargeBinary, nullable=False),
    Column("created", Float, nullable=False),
)

outbox = outbox_table(metadata)
processed_events = processed_events_table(metadata)
