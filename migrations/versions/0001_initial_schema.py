"""initial schema: versions, skills, task vectors, refs, reflog, evals

Revision ID: 0001
Revises: 
Create Date: 2026-11-21 10:49:11.501967
"""
from alembic import op
import sqlalchemy as sa


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('meta',
    sa.Column('key', sa.String(length=64), nullable=False),
    sa.Column('value', sa.Text(), nullable=False),
    sa.PrimaryKeyConstraint('key', name=op.f('pk_meta'))
    )
    op.create_table('versions',
    sa.Column('id', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('parent_id', sa.Integer(), nullable=True),
    sa.Column('skill_id', sa.Integer(), nullable=True),
    sa.Column('method', sa.String(length=32), nullable=False),
    sa.Column('alphas', sa.JSON(), nullable=True),
    sa.Column('group_preset', sa.String(length=128), nullable=True),
    sa.Column('digest', sa.String(length=32), nullable=False),
    sa.Column('manifest', sa.String(length=32), nullable=False),
    sa.Column('source', sa.Text(), nullable=True),
    sa.Column('n_params', sa.BigInteger(), nullable=False),
    sa.Column('n_bytes', sa.BigInteger(), nullable=False),
    sa.Column('author', sa.String(length=128), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('message', sa.Text(), nullable=True),
    sa.ForeignKeyConstraint(['parent_id'], ['versions.id'], name=op.f('fk_versions_parent_id_versions')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_versions'))
    )
    with op.batch_alter_table('versions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_versions_digest'), ['digest'], unique=False)
        batch_op.create_index(batch_op.f('ix_versions_parent_id'), ['parent_id'], unique=False)

    op.create_table('evals',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('version_id', sa.Integer(), nullable=False),
    sa.Column('suite', sa.String(length=255), nullable=False),
    sa.Column('split', sa.String(length=32), nullable=False),
    sa.Column('metric', sa.String(length=64), nullable=False),
    sa.Column('value', sa.Float(), nullable=False),
    sa.Column('episodes', sa.Integer(), nullable=True),
    sa.Column('seed', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['version_id'], ['versions.id'], name=op.f('fk_evals_version_id_versions')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_evals'))
    )
    with op.batch_alter_table('evals', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_evals_version_id'), ['version_id'], unique=False)

    op.create_table('reflog',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('ref', sa.String(length=255), nullable=False),
    sa.Column('old_version_id', sa.Integer(), nullable=True),
    sa.Column('new_version_id', sa.Integer(), nullable=False),
    sa.Column('action', sa.String(length=32), nullable=False),
    sa.Column('message', sa.Text(), nullable=True),
    sa.Column('author', sa.String(length=128), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['new_version_id'], ['versions.id'], name=op.f('fk_reflog_new_version_id_versions')),
    sa.ForeignKeyConstraint(['old_version_id'], ['versions.id'], name=op.f('fk_reflog_old_version_id_versions')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_reflog'))
    )
    with op.batch_alter_table('reflog', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_reflog_ref'), ['ref'], unique=False)

    op.create_table('refs',
    sa.Column('name', sa.String(length=255), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('version_id', sa.Integer(), nullable=False),
    sa.Column('updated_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['version_id'], ['versions.id'], name=op.f('fk_refs_version_id_versions')),
    sa.PrimaryKeyConstraint('name', name=op.f('pk_refs'))
    )
    op.create_table('task_vectors',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('parent_version_id', sa.Integer(), nullable=False),
    sa.Column('codec', sa.String(length=64), nullable=False),
    sa.Column('codec_params', sa.JSON(), nullable=True),
    sa.Column('object', sa.String(length=32), nullable=False),
    sa.Column('raw_bytes', sa.BigInteger(), nullable=False),
    sa.Column('stored_bytes', sa.BigInteger(), nullable=False),
    sa.Column('rel_error', sa.Float(), nullable=False),
    sa.Column('rel_norm', sa.Float(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['parent_version_id'], ['versions.id'], name=op.f('fk_task_vectors_parent_version_id_versions')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_task_vectors'))
    )
    op.create_table('skills',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('parent_version_id', sa.Integer(), nullable=False),
    sa.Column('finetuned_source', sa.Text(), nullable=True),
    sa.Column('finetuned_digest', sa.String(length=32), nullable=False),
    sa.Column('demos_uri', sa.Text(), nullable=True),
    sa.Column('demos_digest', sa.String(length=64), nullable=True),
    sa.Column('demos_dvc_hash', sa.String(length=64), nullable=True),
    sa.Column('demos_git_rev', sa.String(length=64), nullable=True),
    sa.Column('trainer', sa.String(length=64), nullable=True),
    sa.Column('trainer_settings', sa.JSON(), nullable=True),
    sa.Column('task_vector_id', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['parent_version_id'], ['versions.id'], name=op.f('fk_skills_parent_version_id_versions')),
    sa.ForeignKeyConstraint(['task_vector_id'], ['task_vectors.id'], name=op.f('fk_skills_task_vector_id_task_vectors')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_skills'))
    )
    with op.batch_alter_table('skills', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_skills_name'), ['name'], unique=False)

    # versions <-> skills reference each other: the second key is added once both tables exist.
    with op.batch_alter_table('versions', schema=None) as batch_op:
        batch_op.create_foreign_key(op.f('fk_versions_skill_id_skills'), 'skills', ['skill_id'], ['id'])


def downgrade() -> None:
    with op.batch_alter_table('versions', schema=None) as batch_op:
        batch_op.drop_constraint(op.f('fk_versions_skill_id_skills'), type_='foreignkey')
    with op.batch_alter_table('skills', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_skills_name'))

    op.drop_table('skills')
    op.drop_table('task_vectors')
    op.drop_table('refs')
    with op.batch_alter_table('reflog', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_reflog_ref'))

    op.drop_table('reflog')
    with op.batch_alter_table('evals', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_evals_version_id'))

    op.drop_table('evals')
    with op.batch_alter_table('versions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_versions_parent_id'))
        batch_op.drop_index(batch_op.f('ix_versions_digest'))

    op.drop_table('versions')
    op.drop_table('meta')
