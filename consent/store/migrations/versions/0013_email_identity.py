"""One person, one subject: emails keyed by one rule, colliding subjects merged; GPC recorded

``consent_record.gpc`` and ``consent_state.gpc`` (nullable booleans) say a decision came
with a Global Privacy Control signal; existing rows stay NULL (their hashes do not change).

Email identifiers were keyed by ``strip().lower()``; ``crypto.normalize_email`` now also
applies Unicode NFKC, full case folding, removal of zero-width characters and the IDNA A-label
form of the domain. This revision adds ``subject.merged_into``, re-keys every stored email
identifier under the rule and merges subjects that turn out to share an address
(``consent/ledger/identity.py``: records are appended, never rewritten, so every chain verifies, and
each merge is itself a record on both chains). The merge records are signed with the active
receipt key and name ``CONSENT_ISSUER`` as issuer.

Downgrade drops the column only: re-keyed identifiers and merge records stay (they are valid
under the looser rule too, and the ledger is append-only).

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    from consent.ledger.identity import rekey_emails

    op.add_column("subject", sa.Column("merged_into", sqlmodel.sql.sqltypes.AutoString(length=40), nullable=True))
    op.add_column("consent_record", sa.Column("gpc", sa.Boolean(), nullable=True))
    op.add_column("consent_state", sa.Column("gpc", sa.Boolean(), nullable=True))
    rekey_emails(op.get_bind())


def downgrade() -> None:
    for table, column in (("consent_state", "gpc"), ("consent_record", "gpc"), ("subject", "merged_into")):
        with op.batch_alter_table(table) as batch:
            batch.drop_column(column)
