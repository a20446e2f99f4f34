"""keyframes: versions kept whole in the store so long chains rebuild fast

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21 11:10:00
"""
from alembic import op
import sqlalchemy as sa

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'keyframes',
        sa.Column('version_id', sa.Integer(), nullable=False),
        sa.Column('reason', sa.String(length=16), nullable=False),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(['version_id'], ['versions.id'], name=op.f('fk_keyframes_version_id_versions')),
        sa.PrimaryKeyConstraint('version_id', name=op.f('pk_keyframes')),
    )


def downgrade() -> None:
    op.drop_table('keyframes')
