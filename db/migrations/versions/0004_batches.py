"""Reprocessing batches: the batch and batch_item tables (db.batches).

Revision ID: 0004
Revises: 0003
"""
from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('batch',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('started_by', sa.String(length=128), nullable=False),
    sa.Column('selector', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('state', sa.Enum('queued', 'running', 'cancelled', 'done', name='batch_state', native_enum=False, create_constraint=True, length=16), nullable=False),
    sa.Column('max_rate', sa.Float(), nullable=True),
    sa.Column('publish_credit_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_batch'))
    )
    with op.batch_alter_table('batch', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_batch_state'), ['state'], unique=False)

    op.create_table('batch_item',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('batch_id', sa.Integer(), nullable=False),
    sa.Column('study_id', sa.Integer(), nullable=False),
    sa.Column('revision', sa.Integer(), nullable=True),
    sa.Column('previous_status', sa.String(length=16), nullable=True),
    sa.Column('state', sa.Enum('queued', 'done', 'failed', 'cancelled', name='batch_item_state', native_enum=False, create_constraint=True, length=16), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['batch_id'], ['batch.id'], name=op.f('fk_batch_item_batch_id_batch'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['study_id'], ['study.id'], name=op.f('fk_batch_item_study_id_study'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_batch_item')),
    sa.UniqueConstraint('batch_id', 'study_id', name=op.f('uq_batch_item_batch_id_study_id'))
    )
    with op.batch_alter_table('batch_item', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_batch_item_batch_id'), ['batch_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_batch_item_state'), ['state'], unique=False)
        batch_op.create_index(batch_op.f('ix_batch_item_study_id_revision'), ['study_id', 'revision'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('batch_item', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_batch_item_study_id_revision'))
        batch_op.drop_index(batch_op.f('ix_batch_item_state'))
        batch_op.drop_index(batch_op.f('ix_batch_item_batch_id'))

    op.drop_table('batch_item')
    with op.batch_alter_table('batch', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_batch_state'))

    op.drop_table('batch')
