"""tenant audit trail: every change to a tenant's settings or keys (which key, when, before, after)

Key rotation with overlap needs no column: ``api_key.revoked_at`` is the instant a key stops
working, which an ordinary rotation sets in the future (its grace period).

Revision ID: 0014
Revises: 0012
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

import consent.store.models

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "tenant_audit",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("tenant_id", sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
        sa.Column("actor", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("action", sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
        sa.Column("changed_at", consent.store.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("before", sa.JSON(), nullable=False),
        sa.Column("after", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenant.id"], name=op.f("fk_tenant_audit_tenant_id_tenant")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tenant_audit")),
    )
    op.create_index(op.f("ix_tenant_audit_tenant_id_id"), "tenant_audit", ["tenant_id", "id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_tenant_audit_tenant_id_id"), table_name="tenant_audit")
    op.drop_table("tenant_audit")
