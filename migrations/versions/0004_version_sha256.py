"""versions.sha256: a cryptographic digest of every version's canonical weights

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22 10:00:00

Existing rows get NULL: computing it means rebuilding every version, which a schema migration
should not do; `skillbank db backfill-sha256` fills them.
"""
from alembic import op
import sqlalchemy as sa

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('versions', schema=None) as batch_op:
        batch_op.add_column(sa.Column('sha256', sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('versions', schema=None) as batch_op:
        batch_op.drop_column('sha256')
