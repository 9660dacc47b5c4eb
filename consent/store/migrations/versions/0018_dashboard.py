"""The dashboard's users, sessions and audit trail

``dashboard_user`` (email, argon2 password hash, role), ``dashboard_session`` (the signed
cookie names one; ending it signs out everywhere), ``dashboard_event`` (sign-ins and every
dashboard action, per tenant) and ``dashboard_rollup`` (the overview's numbers per tenant). New tables only: no existing data moves.

Revision ID: 0018
Revises: 0012
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlmodel.sql.sqltypes import AutoString

from consent.store.models import UTCDateTime

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None

BigInt = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "dashboard_user",
        sa.Column("id", AutoString(40), nullable=False),
        sa.Column("tenant_id", AutoString(40), nullable=False),
        sa.Column("email", AutoString(320), nullable=False),
        sa.Column("password_hash", AutoString(200), nullable=False),
        sa.Column("role", AutoString(16), nullable=False),
        sa.Column("created_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("disabled_at", UTCDateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenant.id"], name="fk_dashboard_user_tenant_id_tenant"),
        sa.PrimaryKeyConstraint("id", name="pk_dashboard_user"),
        sa.UniqueConstraint("tenant_id", "email", name="uq_dashboard_user_tenant_id_email"),
    )
    op.create_table(
        "dashboard_session",
        sa.Column("id_hash", AutoString(64), nullable=False),
        sa.Column("tenant_id", AutoString(40), nullable=False),
        sa.Column("actor", AutoString(400), nullable=False),
        sa.Column("key_id", AutoString(40), nullable=True),
        sa.Column("user_id", AutoString(40), nullable=True),
        sa.Column("role", AutoString(16), nullable=False),
        sa.Column("csrf", AutoString(64), nullable=False),
        sa.Column("created_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("last_seen_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("ended_at", UTCDateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenant.id"], name="fk_dashboard_session_tenant_id_tenant"),
        sa.PrimaryKeyConstraint("id_hash", name="pk_dashboard_session"),
    )
    op.create_index("ix_dashboard_session_tenant_id", "dashboard_session", ["tenant_id"])
    op.create_table(
        "dashboard_rollup",
        sa.Column("tenant_id", sa.String(40), nullable=False),
        sa.Column("computed_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenant.id"], name="fk_dashboard_rollup_tenant_id_tenant"),
        sa.PrimaryKeyConstraint("tenant_id", name="pk_dashboard_rollup"),
    )
    op.create_table(
        "dashboard_event",
        sa.Column("id", BigInt, autoincrement=True, nullable=False),
        sa.Column("tenant_id", AutoString(40), nullable=False),
        sa.Column("at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("actor", AutoString(400), nullable=False),
        sa.Column("action", AutoString(40), nullable=False),
        sa.Column("target", AutoString(400), nullable=True),
        sa.Column("detail", sa.JSON(), nullable=True),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenant.id"], name="fk_dashboard_event_tenant_id_tenant"),
        sa.PrimaryKeyConstraint("id", name="pk_dashboard_event"),
    )
    op.create_index("ix_dashboard_event_tenant_id_id", "dashboard_event", ["tenant_id", "id"])


def downgrade() -> None:
    op.drop_index("ix_dashboard_event_tenant_id_id", table_name="dashboard_event")
    op.drop_table("dashboard_event")
    op.drop_table("dashboard_rollup")
    op.drop_index("ix_dashboard_session_tenant_id", table_name="dashboard_session")
    op.drop_table("dashboard_session")
    op.drop_table("dashboard_user")
