"""The deadline indexes hold only the jobs that have a deadline (partial indexes).

Most jobs never queue, and none has a timeout before it runs: their NULL keys filled
``ix_jobs_queue_deadline`` and the start of ``ix_jobs_timeout_at``, and every commit that set a
deadline moved an entry from one page to another. The expiry query's ``<= now`` implies
``IS NOT NULL``, so both backends still use the indexes for it (ADR 0033).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0003'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_DEADLINES = (('ix_jobs_timeout_at', 'timeout_at'), ('ix_jobs_queue_deadline', 'queue_deadline'))


def upgrade() -> None:
    for name, column in _DEADLINES:
        op.drop_index(name, table_name='jobs')
        where = sa.text(f'{column} IS NOT NULL')
        op.create_index(name, 'jobs', [column], sqlite_where=where, postgresql_where=where)


def downgrade() -> None:
    for name, column in _DEADLINES:
        op.drop_index(name, table_name='jobs')
        op.create_index(name, 'jobs', [column])
