"""audit exports: signed export manifests and a (tenant_id, seq) index for keyset streaming

Revision ID: 0003
Revises: 0001
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

import consent.store.models

revision = "0003"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "export_manifest",
        sa.Column("id", sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
        sa.Column("tenant_id", sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
        sa.Column("format", sqlmodel.sql.sqltypes.AutoString(length=8), nullable=False),
        sa.Column("count", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("body_sha256", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("manifest", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("created_at", consent.store.models.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenant.id"], name=op.f("fk_export_manifest_tenant_id_tenant")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_export_manifest")),
    )
    with op.batch_alter_table("export_manifest", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_export_manifest_tenant_id"), ["tenant_id"], unique=False)
    with op.batch_alter_table("consent_record", schema=None) as batch_op:
        batch_op.create_index("ix_consent_record_tenant_id_seq", ["tenant_id", "seq"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("consent_record", schema=None) as batch_op:
        batch_op.drop_index("ix_consent_record_tenant_id_seq")
    with op.batch_alter_table("export_manifest", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_export_manifest_tenant_id"))
    op.drop_table("export_manifest")
