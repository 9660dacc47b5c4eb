"""transparency log: each record stores its leaf index, taken in its own transaction

``consent_record.leaf_index`` (unique per tenant) and ``event_counter.leaves`` (the tenant's
next leaf index). Existing records keep the index the log already gave them (``tlog_leaf``);
records not in the log yet get the next ones after the log's last leaf, in ``seq`` order, so no
leaf of any checkpoint is renumbered. Each tenant's counter then continues after its highest
index. The sequencer no longer reads the change feed, so ``tlog_state`` loses its feed position
and build range. Downgrade drops the column and the counter's ``leaves``; the leaves stay in
``tlog_leaf`` and the older sequencer finds the records not yet in the log by its build range.

Revision ID: 0020
Revises: 0019
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0020"
down_revision = "0019"
branch_labels = None
depends_on = None

BigInt = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

# Records already in the log: the index of their leaf.
KEEP = """
UPDATE consent_record SET leaf_index = l.idx
FROM tlog_leaf l WHERE l.record_id = consent_record.id
"""
# The others: after the tenant's last leaf, in seq order.
NEXT = """
UPDATE consent_record SET leaf_index = x.idx
FROM (SELECT r.seq, COALESCE(b.size, 0) + ROW_NUMBER() OVER (PARTITION BY r.tenant_id ORDER BY r.seq) - 1 AS idx
      FROM consent_record r
      LEFT JOIN (SELECT tenant_id, MAX(idx) + 1 AS size FROM tlog_leaf GROUP BY tenant_id) b
        ON b.tenant_id = r.tenant_id
      WHERE r.leaf_index IS NULL) x
WHERE consent_record.seq = x.seq
"""
# Every tenant with records or leaves gets a counter row continuing after its highest index.
COUNTERS = """
INSERT INTO event_counter (tenant_id, last_position, leaves)
SELECT t.id, 0, 0 FROM tenant t
WHERE NOT EXISTS (SELECT 1 FROM event_counter c WHERE c.tenant_id = t.id)
  AND (EXISTS (SELECT 1 FROM consent_record r WHERE r.tenant_id = t.id)
       OR EXISTS (SELECT 1 FROM tlog_leaf l WHERE l.tenant_id = t.id))
"""
LEAVES = """
UPDATE event_counter SET leaves = COALESCE((
  SELECT MAX(m) + 1 FROM (
    SELECT MAX(leaf_index) AS m FROM consent_record r WHERE r.tenant_id = event_counter.tenant_id
    UNION ALL SELECT MAX(idx) FROM tlog_leaf l WHERE l.tenant_id = event_counter.tenant_id) x), 0)
"""


def upgrade() -> None:
    op.add_column("consent_record", sa.Column("leaf_index", BigInt, nullable=True))
    op.add_column("event_counter", sa.Column("leaves", BigInt, nullable=False, server_default="0"))
    op.execute(KEEP)
    op.execute(NEXT)
    # Before the counters: their highest index per tenant is then read from the index.
    op.create_index("ix_consent_record_tenant_id_leaf_index", "consent_record", ["tenant_id", "leaf_index"],
                    unique=True)
    op.execute(COUNTERS)
    op.execute(LEAVES)
    with op.batch_alter_table("tlog_state") as batch:
        batch.drop_column("position")
        batch.drop_column("build_seq")
        batch.drop_column("build_until")


def downgrade() -> None:
    with op.batch_alter_table("tlog_state") as batch:
        batch.add_column(sa.Column("position", BigInt, nullable=False, server_default="0"))
        batch.add_column(sa.Column("build_seq", BigInt, nullable=False, server_default="0"))
        batch.add_column(sa.Column("build_until", BigInt, nullable=False, server_default="0"))
    # The older sequencer reads the change feed from position 0 (skipping records already in
    # the log) after appending, in seq order, every record up to build_until not in the log.
    op.execute("UPDATE tlog_state SET build_until = COALESCE("
               "(SELECT MAX(seq) FROM consent_record r WHERE r.tenant_id = tlog_state.tenant_id), 0)")
    with op.batch_alter_table("tlog_state") as batch:
        for name in ("position", "build_seq", "build_until"):
            batch.alter_column(name, server_default=None)
    op.drop_index("ix_consent_record_tenant_id_leaf_index", table_name="consent_record")
    with op.batch_alter_table("event_counter") as batch:
        batch.drop_column("leaves")
    with op.batch_alter_table("consent_record") as batch:
        batch.drop_column("leaf_index")
