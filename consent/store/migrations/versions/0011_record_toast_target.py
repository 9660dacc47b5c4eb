"""consent_record rows stay whole: toast_tuple_target = 8160 (PostgreSQL)

Since 0008 a record row carries its export line (~600 bytes) besides its receipt (~1 KB): about
2 KB in all, right at PostgreSQL's default TOAST threshold (~2 KB). So about half the rows had
their receipt (the largest value, which does not compress) moved out of line into the TOAST
table, and an export fetched it from there for each of those records, which costs PostgreSQL
about a third more CPU per exported record than reading whole rows. With the threshold at its
maximum a row is compressed or moved out of line only above ~8 KB (large evidence).

Rows written before this migration keep their layout until the table is rewritten; PostgreSQL
reads both. An operator may rewrite them at a quiet time (``VACUUM FULL consent_record`` holds
an exclusive lock while it runs; pg_repack does not). Setting the option takes only a SHARE
UPDATE EXCLUSIVE lock: reads and writes go on. SQLite has no such setting: nothing to do.

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-23
"""

from __future__ import annotations

from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

TARGET = 8160  # consent.store.models.RECORD_TOAST_TUPLE_TARGET when this revision was written


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"ALTER TABLE consent_record SET (toast_tuple_target = {TARGET})")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE consent_record RESET (toast_tuple_target)")
