"""executions.result_files: a run's results kept in its row until something reads them

Noop runs no longer write a results folder per job (ADR 0030): their stdout, stderr, exit code
and empty output folders are stored here, in the commit that records the outcome, and the
folder is written the first time it is read. NULL for every other run (and every older row).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("executions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("result_files", sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("executions", schema=None) as batch_op:
        batch_op.drop_column("result_files")
