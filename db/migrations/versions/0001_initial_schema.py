"""Initial schema: study, instance, job, model_version, result, image_result, delivery.

Revision ID: 0001
Revises: 
"""
from alembic import op
import sqlalchemy as sa


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('model_version',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('version', sa.String(length=64), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('threshold', sa.Float(), nullable=False),
    sa.Column('intended_population', sa.Text(), nullable=False),
    sa.Column('max_age_years', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_model_version')),
    sa.UniqueConstraint('name', 'version', 'sha256', name=op.f('uq_model_version_name_version_sha256'))
    )
    op.create_table('study',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('study_uid', sa.String(length=64), nullable=False),
    sa.Column('patient_id', sa.String(length=64), nullable=True),
    sa.Column('accession_number', sa.String(length=16), nullable=True),
    sa.Column('study_date', sa.Date(), nullable=True),
    sa.Column('patient_age', sa.String(length=4), nullable=True),
    sa.Column('status', sa.Enum('receiving', 'queued', 'processing', 'done', 'failed', 'dead-letter', name='study_status', native_enum=False, create_constraint=True, length=16), nullable=False),
    sa.Column('revision', sa.Integer(), nullable=False),
    sa.Column('received_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('queued_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('completed_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_study')),
    sa.UniqueConstraint('study_uid', name=op.f('uq_study_study_uid'))
    )
    with op.batch_alter_table('study', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_study_accession_number'), ['accession_number'], unique=False)
        batch_op.create_index(batch_op.f('ix_study_patient_id'), ['patient_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_study_status'), ['status'], unique=False)
        batch_op.create_index(batch_op.f('ix_study_study_date'), ['study_date'], unique=False)

    op.create_table('instance',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('study_id', sa.Integer(), nullable=False),
    sa.Column('sop_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('series_uid', sa.String(length=64), nullable=False),
    sa.Column('sop_class_uid', sa.String(length=64), nullable=False),
    sa.Column('transfer_syntax_uid', sa.String(length=64), nullable=False),
    sa.Column('path', sa.Text(), nullable=False),
    sa.Column('size', sa.BigInteger(), nullable=False),
    sa.Column('calling_aet', sa.String(length=16), nullable=False),
    sa.Column('received_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('selection', sa.Enum('pending', 'selected', 'skipped', name='selection_status', native_enum=False, create_constraint=True, length=16), nullable=False),
    sa.Column('skip_reason', sa.String(length=128), nullable=True),
    sa.ForeignKeyConstraint(['study_id'], ['study.id'], name=op.f('fk_instance_study_id_study'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_instance')),
    sa.UniqueConstraint('sop_instance_uid', name=op.f('uq_instance_sop_instance_uid'))
    )
    with op.batch_alter_table('instance', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_instance_study_id'), ['study_id'], unique=False)

    op.create_table('job',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('study_id', sa.Integer(), nullable=False),
    sa.Column('kind', sa.Enum('process', 'deliver', name='job_kind', native_enum=False, create_constraint=True, length=16), nullable=False),
    sa.Column('task_id', sa.String(length=64), nullable=True),
    sa.Column('queue', sa.String(length=64), nullable=True),
    sa.Column('worker_host', sa.String(length=255), nullable=True),
    sa.Column('attempt', sa.Integer(), nullable=False),
    sa.Column('revision', sa.Integer(), nullable=False),
    sa.Column('status', sa.Enum('running', 'succeeded', 'retrying', 'dead-letter', name='job_status', native_enum=False, create_constraint=True, length=16), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('ended_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.ForeignKeyConstraint(['study_id'], ['study.id'], name=op.f('fk_job_study_id_study'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_job'))
    )
    with op.batch_alter_table('job', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_job_status'), ['status'], unique=False)
        batch_op.create_index(batch_op.f('ix_job_study_id'), ['study_id'], unique=False)

    op.create_table('result',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('study_id', sa.Integer(), nullable=False),
    sa.Column('model_version_id', sa.Integer(), nullable=False),
    sa.Column('revision', sa.Integer(), nullable=False),
    sa.Column('status', sa.Enum('complete', 'no-usable-image', name='result_status', native_enum=False, create_constraint=True, length=16), nullable=False),
    sa.Column('probability', sa.Float(), nullable=True),
    sa.Column('finding', sa.Boolean(), nullable=True),
    sa.Column('threshold', sa.Float(), nullable=False),
    sa.Column('ood', sa.Boolean(), nullable=False),
    sa.Column('outside_intended_use', sa.Boolean(), nullable=False),
    sa.Column('flags', sa.JSON(), nullable=False),
    sa.Column('summary', sa.Text(), nullable=False),
    sa.Column('sr_sop_instance_uid', sa.String(length=64), nullable=True),
    sa.Column('sr_path', sa.Text(), nullable=True),
    sa.Column('timings', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['model_version_id'], ['model_version.id'], name=op.f('fk_result_model_version_id_model_version')),
    sa.ForeignKeyConstraint(['study_id'], ['study.id'], name=op.f('fk_result_study_id_study'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_result')),
    sa.UniqueConstraint('study_id', 'model_version_id', 'revision', name=op.f('uq_result_study_id_model_version_id_revision'))
    )
    with op.batch_alter_table('result', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_result_created_at'), ['created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_result_finding'), ['finding'], unique=False)
        batch_op.create_index(batch_op.f('ix_result_model_version_id'), ['model_version_id'], unique=False)

    op.create_table('delivery',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('result_id', sa.Integer(), nullable=False),
    sa.Column('destination', sa.String(length=300), nullable=False),
    sa.Column('status', sa.Enum('pending', 'sent', 'failed', name='delivery_status', native_enum=False, create_constraint=True, length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('sent_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['result_id'], ['result.id'], name=op.f('fk_delivery_result_id_result'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_delivery')),
    sa.UniqueConstraint('result_id', 'destination', name=op.f('uq_delivery_result_id_destination'))
    )
    with op.batch_alter_table('delivery', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_delivery_status'), ['status'], unique=False)

    op.create_table('image_result',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('result_id', sa.Integer(), nullable=False),
    sa.Column('instance_id', sa.Integer(), nullable=False),
    sa.Column('probability', sa.Float(), nullable=False),
    sa.Column('ood_score', sa.Float(), nullable=False),
    sa.Column('is_chest', sa.Boolean(), nullable=False),
    sa.Column('finding', sa.Boolean(), nullable=False),
    sa.Column('sc_sop_instance_uid', sa.String(length=64), nullable=True),
    sa.Column('sc_path', sa.Text(), nullable=True),
    sa.ForeignKeyConstraint(['instance_id'], ['instance.id'], name=op.f('fk_image_result_instance_id_instance'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['result_id'], ['result.id'], name=op.f('fk_image_result_result_id_result'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_image_result')),
    sa.UniqueConstraint('result_id', 'instance_id', name=op.f('uq_image_result_result_id_instance_id'))
    )


def downgrade() -> None:
    op.drop_table('image_result')
    with op.batch_alter_table('delivery', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_delivery_status'))

    op.drop_table('delivery')
    with op.batch_alter_table('result', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_result_model_version_id'))
        batch_op.drop_index(batch_op.f('ix_result_finding'))
        batch_op.drop_index(batch_op.f('ix_result_created_at'))

    op.drop_table('result')
    with op.batch_alter_table('job', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_job_study_id'))
        batch_op.drop_index(batch_op.f('ix_job_status'))

    op.drop_table('job')
    with op.batch_alter_table('instance', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_instance_study_id'))

    op.drop_table('instance')
    with op.batch_alter_table('study', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_study_study_date'))
        batch_op.drop_index(batch_op.f('ix_study_status'))
        batch_op.drop_index(batch_op.f('ix_study_patient_id'))
        batch_op.drop_index(batch_op.f('ix_study_accession_number'))

    op.drop_table('study')
    op.drop_table('model_version')
