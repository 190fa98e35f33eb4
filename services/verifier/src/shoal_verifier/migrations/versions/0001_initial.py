"""Initial schema: jobs, proposals, sealing key, outbox, processed events.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "outbox",
        sa.Column(
            "seq",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("event_id", sa.String(length=64), nullable=False),
        sa.Column("envelope", sa.LargeBinary(), nullable=False),
        sa.Column("created", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_outbox")),
        sa.UniqueConstraint("event_id", name=op.f("uq_outbox_event_id")),
    )
    op.create_table(
        "processed_events",
        sa.Column("event_id", sa.String(length=64), nullable=False),
        sa.Column("processed", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("event_id", name=op.f("pk_processed_events")),
    )
    op.create_table(
        "verifier_jobs",
        sa.Column("job_id", sa.String(length=64), nullable=False),
        sa.Column("verifier", sa.String(length=32), nullable=False),
        sa.Column("verifier_from_plan", sa.Boolean(), nullable=False),
        sa.Column("base", sa.Integer(), nullable=False),
        sa.Column("plan_expected", sa.Integer(), nullable=True),
        sa.Column("plan_time", sa.Float(), nullable=True),
        sa.Column("floor", sa.Integer(), nullable=False),
        sa.Column("confidence", sa.Integer(), nullable=False),
        sa.Column("planned", sa.JSON(), nullable=False),
        sa.Column("escalations", sa.Integer(), nullable=False),
        sa.Column("extra_executions", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("accepted_cid", sa.String(length=128), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("round_started", sa.Float(), nullable=True),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("created", sa.Float(), nullable=False),
        sa.Column("updated", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("job_id", name=op.f("pk_verifier_jobs")),
    )
    op.create_index(
        "ix_verifier_jobs_status_round", "verifier_jobs", ["status", "round_started"]
    )
    op.create_table(
        "verifier_keys",
        sa.Column("name", sa.String(length=32), nullable=False),
        sa.Column("private_key", sa.LargeBinary(), nullable=False),
        sa.Column("created", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_verifier_keys")),
    )
    op.create_table(
        "verifier_proposals",
        sa.Column("execution_id", sa.String(length=64), nullable=False),
        sa.Column("job_id", sa.String(length=64), nullable=False),
        sa.Column("node_id", sa.String(length=128), nullable=False),
        sa.Column("result_cid", sa.String(length=128), nullable=False),
        sa.Column("received", sa.Float(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("invalid_reason", sa.Text(), nullable=True),
        sa.Column("sealed", sa.Boolean(), nullable=False),
        sa.Column("publisher", sa.JSON(), nullable=False),
        sa.Column("result_url", sa.Text(), nullable=True),
        sa.Column("run_output", sa.JSON(), nullable=True),
        sa.Column("event_id", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("execution_id", name=op.f("pk_verifier_proposals")),
    )
    op.create_index(
        op.f("ix_verifier_proposals_job_id"), "verifier_proposals", ["job_id"]
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_verifier_proposals_job_id"), table_name="verifier_proposals")
    op.drop_table("verifier_proposals")
    op.drop_table("verifier_keys")
    op.drop_index("ix_verifier_jobs_status_round", table_name="verifier_jobs")
    op.drop_table("verifier_jobs")
    op.drop_table("processed_events")
    op.drop_table("outbox")
