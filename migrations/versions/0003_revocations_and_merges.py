"""revocations, merge versions with two parents, rebuilt versions

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-21 12:00:00
"""
from alembic import op
import sqlalchemy as sa

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'revocations',
        sa.Column('skill_name', sa.String(length=128), nullable=False),
        sa.Column('reason', sa.Text(), nullable=False),
        sa.Column('author', sa.String(length=128), nullable=False),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint('skill_name', name=op.f('pk_revocations')),
    )
    with op.batch_alter_table('versions', schema=None) as batch_op:
        batch_op.add_column(sa.Column('second_parent_id', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('rebuilt_from_id', sa.Integer(), nullable=True))
        batch_op.create_foreign_key(batch_op.f('fk_versions_second_parent_id_versions'), 'versions',
                                    ['second_parent_id'], ['id'])
        batch_op.create_foreign_key(batch_op.f('fk_versions_rebuilt_from_id_versions'), 'versions',
                                    ['rebuilt_from_id'], ['id'])


def downgrade() -> None:
    with op.batch_alter_table('versions', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('fk_versions_rebuilt_from_id_versions'), type_='foreignkey')
        batch_op.drop_constraint(batch_op.f('fk_versions_second_parent_id_versions'), type_='foreignkey')
        batch_op.drop_column('rebuilt_from_id')
        batch_op.drop_column('second_parent_id')
    op.drop_table('revocations')
