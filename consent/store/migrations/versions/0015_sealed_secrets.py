"""sealed secrets: every stored secret sealed under the key-encryption key (CONSENT_SECRET_KEYS)

Receipt signing keys, tenant hash keys and link secrets, subject-token and webhook secrets are
rewritten in place as AES-256-GCM ciphertext (consent.crypto.Keyring); no column changes, as a
sealed 64-character secret fits its 128-character column. Webhook endpoints get the columns
of a secret rotation (the previous secret, signing too until a time). Downgrade writes the
secrets back in plain text (it needs the same keys).

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import consent.store.models
from consent import crypto
from consent.store import db

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None

# (table, primary key column, column): the secrets as they stood at this revision.
COLUMNS = (
    ("tenant", "id", "hash_key"),
    ("tenant", "id", "token_secret"),
    ("signing_key", "kid", "private_pem"),
    ("subject_token_key", "kid", "secret"),
    ("email_link_secret", "id", "secret"),
    ("webhook_endpoint", "id", "secret"),
)


def upgrade() -> None:
    op.add_column("webhook_endpoint", sa.Column("previous_secret", sa.String(length=128), nullable=True))
    op.add_column("webhook_endpoint", sa.Column("previous_secret_until", consent.store.models.UTCDateTime(timezone=True),
                                                nullable=True))
    db.reseal(op.get_bind(), COLUMNS)


def downgrade() -> None:
    conn = op.get_bind()
    for table, pk, column in COLUMNS:
        t = sa.table(table, sa.column(pk), sa.column(column))
        for key, value in conn.execute(sa.select(t.c[pk], t.c[column])).all():
            if value is not None and value.startswith(crypto.SEALED_PREFIX):
                plain = crypto.open_secret(conn, value, f"{table}.{column}")
                conn.execute(sa.update(t).where(t.c[pk] == key).values({column: plain}))
    with op.batch_alter_table("webhook_endpoint") as batch_op:
        batch_op.drop_column("previous_secret_until")
        batch_op.drop_column("previous_secret")
