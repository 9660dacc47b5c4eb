"""One audit trail: the dashboard's sign-ins and actions move into ``tenant_audit``

Every ``dashboard_event`` row is copied into ``tenant_audit`` keeping its time: the actor
``dashboard <actor>`` cut to 64 characters, the action ``dashboard.<action>``, ``before`` empty
and ``after`` holding ``target`` and ``detail`` (what the dashboard now writes). The copies
get ids after the entries already there, in their own order. Then ``dashboard_event`` is
dropped. Downgrade recreates ``dashboard_event`` EMPTY: the dashboard entries stay in
``tenant_audit``, where they remain visible over ``GET /v1/tenant/audit``.

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-06
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlmodel.sql.sqltypes import AutoString

from consent.store.models import UTCDateTime

revision = "0019"
down_revision = "0018"
branch_labels = None
depends_on = None

BigInt = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
BATCH = 1000

EVENT = sa.table("dashboard_event", sa.column("id", BigInt), sa.column("tenant_id", AutoString(40)),
                 sa.column("at", UTCDateTime(timezone=True)), sa.column("actor", AutoString(400)),
                 sa.column("action", AutoString(40)), sa.column("target", AutoString(400)),
                 sa.column("detail", sa.JSON()))
AUDIT = sa.table("tenant_audit", sa.column("tenant_id", AutoString(40)), sa.column("actor", AutoString(64)),
                 sa.column("action", AutoString(32)), sa.column("changed_at", UTCDateTime(timezone=True)),
                 sa.column("before", sa.JSON()), sa.column("after", sa.JSON()))


def _entry(row: Any) -> dict[str, Any]:
    after: dict[str, Any] = {}
    if row.target:
        after["target"] = row.target
    if row.detail is not None:
        after["detail"] = row.detail
    return {"tenant_id": row.tenant_id, "actor": f"dashboard {row.actor}"[:64],
            "action": f"dashboard.{row.action}"[:32], "changed_at": row.at, "before": {}, "after": after}


def upgrade() -> None:
    conn = op.get_bind()
    last = -1
    while True:  # in id order, a bounded batch at a time
        rows = conn.execute(sa.select(EVENT).where(EVENT.c.id > last).order_by(EVENT.c.id).limit(BATCH)).all()
        if not rows:
            break
        conn.execute(sa.insert(AUDIT), [_entry(r) for r in rows])
        last = rows[-1].id
    op.drop_index("ix_dashboard_event_tenant_id_id", table_name="dashboard_event")
    op.drop_table("dashboard_event")


def downgrade() -> None:
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
