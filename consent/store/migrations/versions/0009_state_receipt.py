"""consent_state carries a copy of its record's id and receipt (``record_id``, ``receipt``,
``receipt_seq``)

A check then reads one row per subject and purpose instead of also probing consent_record and
its TOAST table, which costs PostgreSQL about 40 % of its CPU per check. The copy
is valid only while ``receipt_seq`` equals ``record_seq``; readers fall back to consent_record
otherwise, so rows not yet filled (or moved by code older than this revision) are never answered
with another record's receipt.

Existing rows are filled in batches of ``BATCH`` in key order. On PostgreSQL the columns are
committed first and every batch is its own transaction (one statement), so the ledger stays
readable and writable meanwhile; SQLite fills them in the migration's transaction.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

BATCH = 5000
KEY = "(tenant_id, subject_id, purpose)"
NEXT = sa.text(f"SELECT tenant_id, subject_id, purpose FROM consent_state WHERE {KEY} > (:a, :b, :c) "
               "ORDER BY tenant_id, subject_id, purpose LIMIT 1 OFFSET :n")
LAST = sa.text("SELECT tenant_id, subject_id, purpose FROM consent_state "
               "ORDER BY tenant_id DESC, subject_id DESC, purpose DESC LIMIT 1")
FILL = sa.text(
    "UPDATE consent_state SET receipt_seq = record_seq, "
    "record_id = (SELECT r.id FROM consent_record r WHERE r.seq = consent_state.record_seq), "
    "receipt = (SELECT r.receipt FROM consent_record r WHERE r.seq = consent_state.record_seq) "
    f"WHERE {KEY} > (:a, :b, :c) AND {KEY} <= (:x, :y, :z) "
    "AND (receipt_seq IS NULL OR receipt_seq <> record_seq)")


def backfill(conn: sa.Connection) -> None:
    """Fill the copy of every row in key ranges of ``BATCH`` rows."""
    after = ("", "", "")
    last = conn.execute(LAST).first()
    while last is not None:
        upto = conn.execute(NEXT, {"a": after[0], "b": after[1], "c": after[2], "n": BATCH - 1}).first() or last
        conn.execute(FILL, {"a": after[0], "b": after[1], "c": after[2], "x": upto[0], "y": upto[1], "z": upto[2]})
        if tuple(upto) == tuple(last):
            return
        after = tuple(upto)


def upgrade() -> None:
    with op.batch_alter_table("consent_state", schema=None) as batch_op:
        batch_op.add_column(sa.Column("receipt_seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True))
        batch_op.add_column(sa.Column("record_id", sqlmodel.sql.sqltypes.AutoString(length=40), nullable=True))
        batch_op.add_column(sa.Column("receipt", sqlmodel.sql.sqltypes.AutoString(), nullable=True))
    if op.get_bind().dialect.name == "postgresql":
        with op.get_context().autocommit_block():  # commits the columns; each batch then commits alone
            backfill(op.get_bind())
    else:
        backfill(op.get_bind())


def downgrade() -> None:
    with op.batch_alter_table("consent_state", schema=None) as batch_op:
        batch_op.drop_column("receipt")
        batch_op.drop_column("record_id")
        batch_op.drop_column("receipt_seq")
