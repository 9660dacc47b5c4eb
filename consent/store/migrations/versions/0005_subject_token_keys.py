"""subject token keys (snippet: backend-signed subject tokens)

Revision ID: 0005
Revises: 0001
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

import consent.store.models

revision = '0005'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('subject_token_key',
    sa.Column('kid', sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
    sa.Column('tenant_id', sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
    sa.Column('secret', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('created_at', consent.store.models.UTCDateTime(timezone=True), nullable=False),
    sa.Column('retired_at', consent.store.models.UTCDateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenant.id'], name=op.f('fk_subject_token_key_tenant_id_tenant')),
    sa.PrimaryKeyConstraint('kid', name=op.f('pk_subject_token_key'))
    )
    with op.batch_alter_table('subject_token_key', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_subject_token_key_tenant_id'), ['tenant_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('subject_token_key', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_subject_token_key_tenant_id'))

    op.drop_table('subject_token_key')
