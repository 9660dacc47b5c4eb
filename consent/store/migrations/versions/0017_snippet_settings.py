"""Per-tenant snippet texts and theme, one row per version (the history of every change)

Revision ID: 0017
Revises: 0012
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

import consent.store.models

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "snippet_settings",
        sa.Column("tenant_id", sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("texts", sa.JSON(), nullable=False),
        sa.Column("theme", sa.JSON(), nullable=False),
        sa.Column("refusal_cooldown_days", sa.Integer(), nullable=False),
        sa.Column("created_at", consent.store.models.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenant.id"], name=op.f("fk_snippet_settings_tenant_id_tenant")),
        sa.PrimaryKeyConstraint("tenant_id", "version", name=op.f("pk_snippet_settings")),
    )


def downgrade() -> None:
    op.drop_table("snippet_settings")
