"""jobs.estimated_start, jobs.estimated_finish: what was estimated when the job was queued;
stage_runs.load_s: the part of a run spent loading models

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""
from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('estimated_start', sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column('estimated_finish', sa.DateTime(), nullable=True))
    with op.batch_alter_table('stage_runs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('load_s', sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('stage_runs', schema=None) as batch_op:
        batch_op.drop_column('load_s')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('estimated_finish')
        batch_op.drop_column('estimated_start')
