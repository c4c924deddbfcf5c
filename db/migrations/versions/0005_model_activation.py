"""The active model: the model_activation table (db.models_registry).

Revision ID: 0005
Revises: 0004
"""
from alembic import op
import sqlalchemy as sa


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('model_activation',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('model_version_id', sa.Integer(), nullable=False),
    sa.Column('path', sa.Text(), nullable=False),
    sa.Column('activated_by', sa.String(length=128), nullable=False),
    sa.Column('activated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['model_version_id'], ['model_version.id'], name=op.f('fk_model_activation_model_version_id_model_version')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_model_activation'))
    )
    with op.batch_alter_table('model_activation', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_model_activation_model_version_id'), ['model_version_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('model_activation', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_model_activation_model_version_id'))

    op.drop_table('model_activation')
