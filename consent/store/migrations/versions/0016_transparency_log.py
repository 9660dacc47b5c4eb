"""transparency log: per-tenant RFC 9162 Merkle tree, sequencer state and signed checkpoints

The tree of an existing ledger is built by the service's sequencer (tlog.py) the first time it
runs, or by ``consent tlog build``; the migration only creates the tables, so it stays quick
on a large ledger.

Revision ID: 0016
Revises: 0012
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

import consent.store.models

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None

S = sqlmodel.sql.sqltypes.AutoString
BigInt = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "tlog_leaf",
        sa.Column("tenant_id", S(length=40), nullable=False),
        sa.Column("idx", BigInt, nullable=False, autoincrement=False),
        sa.Column("record_id", S(length=40), nullable=False),
        sa.Column("jti", S(length=40), nullable=True),
        sa.Column("hash", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "idx", name=op.f("pk_tlog_leaf")),
        sa.UniqueConstraint("record_id", name=op.f("uq_tlog_leaf_record_id")),
    )
    op.create_index(op.f("ix_tlog_leaf_jti"), "tlog_leaf", ["jti"], unique=False)
    op.create_table(
        "tlog_node",
        sa.Column("tenant_id", S(length=40), nullable=False),
        sa.Column("level", sa.Integer(), nullable=False, autoincrement=False),
        sa.Column("idx", BigInt, nullable=False, autoincrement=False),
        sa.Column("hash", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "level", "idx", name=op.f("pk_tlog_node")),
    )
    op.create_table(
        "tlog_state",
        sa.Column("tenant_id", S(length=40), nullable=False),
        sa.Column("size", BigInt, nullable=False),
        sa.Column("position", BigInt, nullable=False),
        sa.Column("build_seq", BigInt, nullable=False),
        sa.Column("build_until", BigInt, nullable=False),
        sa.Column("signed_size", BigInt, nullable=False),
        sa.Column("updated_at", consent.store.models.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", name=op.f("pk_tlog_state")),
    )
    op.create_table(
        "tlog_checkpoint",
        sa.Column("tenant_id", S(length=40), nullable=False),
        sa.Column("size", BigInt, nullable=False, autoincrement=False),
        sa.Column("root", sa.LargeBinary(), nullable=False),
        sa.Column("note", S(), nullable=False),
        sa.Column("created_at", consent.store.models.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "size", name=op.f("pk_tlog_checkpoint")),
    )


def downgrade() -> None:
    op.drop_table("tlog_checkpoint")
    op.drop_table("tlog_state")
    op.drop_table("tlog_node")
    op.drop_index(op.f("ix_tlog_leaf_jti"), table_name="tlog_leaf")
    op.drop_table("tlog_leaf")
