"""consent_record.export_line: the fixed bytes of each record's export line, stored with it

Existing records get theirs from their columns (what an export wrote for them before), in
batches by ``seq``. The partial index finds records without one, so an export knows in one probe
whether it can join stored lines or must build them from columns. On PostgreSQL the new column
is committed first and every batch is its own transaction (one statement), so the ledger stays
readable and writable while it fills (exports build lines from columns until it is full); the
rewritten rows are left to (auto)vacuum. SQLite (one writer at a time) fills it in the
migration's transaction.

Revision ID: 0008
Revises: 0002
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import consent.store.models
from consent.ledger.recorder import export_line, hashed_content

revision = "0008"
down_revision = "0002"
branch_labels = None
depends_on = None

BATCH = 5000
REC = sa.table(
    "consent_record", sa.column("seq", sa.BigInteger()), sa.column("id", sa.String()),
    sa.column("tenant_id", sa.String()), sa.column("subject_id", sa.String()), sa.column("purpose", sa.String()),
    sa.column("decision", sa.String()), sa.column("confirmed", sa.Boolean()), sa.column("policy_key", sa.String()),
    sa.column("policy_version", sa.String()), sa.column("source", sa.String()),
    sa.column("evidence_sha256", sa.String()), sa.column("disclosures", sa.JSON()),
    sa.column("recorded_at", consent.store.models.UTCDateTime(timezone=True)), sa.column("prev_hash", sa.String()),
    sa.column("record_hash", sa.String()), sa.column("export_line", sa.LargeBinary()),
)
SUBJ = sa.table("subject", sa.column("id", sa.String()), sa.column("pseudonym", sa.String()))
NO_LINE = sa.text("export_line IS NULL")


UPDATE_ONE = sa.update(REC).where(REC.c.seq == sa.bindparam("s")).values(export_line=sa.bindparam("line"))
UPDATE_BATCH = sa.text(  # PostgreSQL: a batch in one statement (so in one transaction under autocommit)
    "UPDATE consent_record SET export_line = d.line FROM unnest(CAST(:seqs AS bigint[]), CAST(:lines AS bytea[])) "
    "AS d(seq, line) WHERE consent_record.seq = d.seq AND consent_record.export_line IS NULL")


def backfill(conn: sa.Connection) -> int:
    """Set ``export_line`` of every record without one; returns how many."""
    done, after = 0, -1
    while True:
        rows = conn.execute(
            sa.select(REC, SUBJ.c.pseudonym).join(SUBJ, SUBJ.c.id == REC.c.subject_id)
            .where(REC.c.seq > after, REC.c.export_line.is_(None)).order_by(REC.c.seq).limit(BATCH)).all()
        if not rows:
            return done
        lines = [export_line(hashed_content(r, r.pseudonym), r.record_hash) for r in rows]
        if conn.dialect.name == "postgresql":
            conn.execute(UPDATE_BATCH, {"seqs": [r.seq for r in rows], "lines": lines})
        else:
            conn.execute(UPDATE_ONE, [{"s": r.seq, "line": line} for r, line in zip(rows, lines)])
        done += len(rows)
        after = rows[-1].seq


def upgrade() -> None:
    with op.batch_alter_table("consent_record", schema=None) as batch_op:
        batch_op.add_column(sa.Column("export_line", sa.LargeBinary(), nullable=True))
        batch_op.create_index("ix_consent_record_without_line", ["tenant_id"], unique=False,
                              sqlite_where=NO_LINE, postgresql_where=NO_LINE)
    if op.get_bind().dialect.name == "postgresql":
        with op.get_context().autocommit_block():  # commits the column; each batch then commits alone
            backfill(op.get_bind())
    else:
        backfill(op.get_bind())


def downgrade() -> None:
    with op.batch_alter_table("consent_record", schema=None) as batch_op:
        batch_op.drop_index("ix_consent_record_without_line", sqlite_where=NO_LINE, postgresql_where=NO_LINE)
        batch_op.drop_column("export_line")
