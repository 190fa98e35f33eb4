"""Initial schema: jobs, tags, executions, history, nodes, outbox, processed events.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0001'
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('jobs',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('client_id', sa.String(length=128), nullable=False),
    sa.Column('job', sa.Text(), nullable=False),
    sa.Column('state', sa.String(length=32), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('created', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated', sa.DateTime(timezone=True), nullable=False),
    sa.Column('timeout_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('queue_deadline', sa.DateTime(timezone=True), nullable=True),
    sa.Column('retries_used', sa.Integer(), server_default='0', nullable=False),
    sa.Column('extra_executions', sa.Integer(), server_default='0', nullable=False),
    sa.Column('status', sa.Text(), server_default='', nullable=False),
    sa.Column('submit_key', sa.String(length=64), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_jobs')),
    sa.UniqueConstraint('submit_key', name=op.f('uq_jobs_submit_key'))
    )
    op.create_index('ix_jobs_client_created', 'jobs', ['client_id', 'created'])
    op.create_index('ix_jobs_created', 'jobs', ['created'])
    op.create_index('ix_jobs_queue_deadline', 'jobs', ['queue_deadline'])
    op.create_index('ix_jobs_state', 'jobs', ['state'])
    op.create_index('ix_jobs_timeout_at', 'jobs', ['timeout_at'])

    op.create_table('nodes',
    sa.Column('id', sa.String(length=128), nullable=False),
    sa.Column('info', sa.Text(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('first_seen', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_seen', sa.DateTime(timezone=True), nullable=False),
    sa.Column('completed', sa.Integer(), server_default='0', nullable=False),
    sa.Column('failed', sa.Integer(), server_default='0', nullable=False),
    sa.Column('rejected', sa.Integer(), server_default='0', nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_nodes'))
    )
    op.create_table('outbox',
    sa.Column('seq', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('event_id', sa.String(length=64), nullable=False),
    sa.Column('envelope', sa.LargeBinary(), nullable=False),
    sa.Column('created', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('seq', name=op.f('pk_outbox')),
    sa.UniqueConstraint('event_id', name=op.f('uq_outbox_event_id'))
    )
    op.create_table('processed_events',
    sa.Column('event_id', sa.String(length=64), nullable=False),
    sa.Column('processed', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('event_id', name=op.f('pk_processed_events'))
    )
    op.create_table('executions',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('job_id', sa.String(length=64), nullable=False),
    sa.Column('node_id', sa.String(length=128), nullable=False),
    sa.Column('state', sa.String(length=32), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('accepted_ask_for_bid', sa.Boolean(), server_default=sa.false(), nullable=False),
    sa.Column('status', sa.Text(), server_default='', nullable=False),
    sa.Column('run_output', sa.Text(), nullable=True),
    sa.Column('result_cid', sa.String(length=128), nullable=True),
    sa.Column('published', sa.Text(), nullable=True),
    sa.Column('verification', sa.Text(), nullable=True),
    sa.Column('retryable', sa.Boolean(), server_default=sa.true(), nullable=False),
    sa.Column('created', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_executions_job_id_jobs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_executions'))
    )
    op.create_index('ix_executions_job_id', 'executions', ['job_id'])
    op.create_index('ix_executions_node_state', 'executions', ['node_id', 'state'])
    op.create_index('ix_executions_state_updated', 'executions', ['state', 'updated'])

    op.create_table('history',
    sa.Column('seq', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('job_id', sa.String(length=64), nullable=False),
    sa.Column('type', sa.String(length=16), nullable=False),
    sa.Column('execution_id', sa.String(length=64), nullable=True),
    sa.Column('node_id', sa.String(length=128), nullable=True),
    sa.Column('previous', sa.String(length=32), nullable=True),
    sa.Column('new', sa.String(length=32), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('comment', sa.Text(), server_default='', nullable=False),
    sa.Column('time', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_history_job_id_jobs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('seq', name=op.f('pk_history'))
    )
    op.create_index('ix_history_job_seq', 'history', ['job_id', 'seq'])

    op.create_table('job_tags',
    sa.Column('job_id', sa.String(length=64), nullable=False),
    sa.Column('tag', sa.String(length=256), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_job_tags_job_id_jobs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('job_id', 'tag', name=op.f('pk_job_tags'))
    )
    op.create_index('ix_job_tags_tag', 'job_tags', ['tag'])



def downgrade() -> None:
    op.drop_index('ix_job_tags_tag', table_name='job_tags')

    op.drop_table('job_tags')
    op.drop_index('ix_history_job_seq', table_name='history')

    op.drop_table('history')
    op.drop_index('ix_executions_state_updated', table_name='executions')
    op.drop_index('ix_executions_node_state', table_name='executions')
    op.drop_index('ix_executions_job_id', table_name='executions')

    op.drop_table('executions')
    op.drop_table('processed_events')
    op.drop_table('outbox')
    op.drop_table('nodes')
    op.drop_index('ix_jobs_timeout_at', table_name='jobs')
    op.drop_index('ix_jobs_state', table_name='jobs')
    op.drop_index('ix_jobs_queue_deadline', table_name='jobs')
    op.drop_index('ix_jobs_created', table_name='jobs')
    op.drop_index('ix_jobs_client_created', table_name='jobs')

    op.drop_table('jobs')
