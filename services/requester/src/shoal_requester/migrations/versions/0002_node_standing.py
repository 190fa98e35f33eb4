"""Node reputation in its own table (node_standing), moved out of nodes.

The counters on ``nodes`` were never written; they move to ``node_standing``, which the store
increments in the transaction of the execution change that earns them (and which heartbeats,
rewriting ``nodes`` rows whole, no longer touch). Existing values are carried over.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('node_standing',
    sa.Column('node_id', sa.String(length=128), nullable=False),
    sa.Column('completed', sa.Integer(), server_default='0', nullable=False),
    sa.Column('failed', sa.Integer(), server_default='0', nullable=False),
    sa.Column('rejected', sa.Integer(), server_default='0', nullable=False),
    sa.Column('last_rejected', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('node_id', name=op.f('pk_node_standing'))
    )
    op.execute(
        'INSERT INTO node_standing (node_id, completed, failed, rejected) '
        'SELECT id, completed, failed, rejected FROM nodes '
        'WHERE completed > 0 OR failed > 0 OR rejected > 0'
    )
    with op.batch_alter_table('nodes', schema=None) as batch_op:
        batch_op.drop_column('rejected')
        batch_op.drop_column('failed')
        batch_op.drop_column('completed')


def downgrade() -> None:
    with op.batch_alter_table('nodes', schema=None) as batch_op:
        batch_op.add_column(sa.Column('completed', sa.Integer(), server_default='0', nullable=False))
        batch_op.add_column(sa.Column('failed', sa.Integer(), server_default='0', nullable=False))
        batch_op.add_column(sa.Column('rejected', sa.Integer(), server_default='0', nullable=False))
    op.execute(
        'UPDATE nodes SET '
        'completed = (SELECT s.completed FROM node_standing s WHERE s.node_id = nodes.id), '
        'failed = (SELECT s.failed FROM node_standing s WHERE s.node_id = nodes.id), '
        'rejected = (SELECT s.rejected FROM node_standing s WHERE s.node_id = nodes.id) '
        'WHERE id IN (SELECT node_id FROM node_standing)'
    )
    op.drop_table('node_standing')
