"""Table models. Portable across SQLite and PostgreSQL: tz-aware UTC timestamps, JSON columns,
named constraints. API shapes live in ``schemas.py`` so no internal column leaks."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, SQLModel

SQLModel.metadata.naming_convention = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

BigInt = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


class UTCDateTime(TypeDecorator[datetime]):
    """Timestamps stored as UTC and always returned tz-aware, on every backend."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Sealed(TypeDecorator[str]):
    """A secret stored sealed under the database's key-encryption key (crypto.Keyring, put on
    the engine's dialect by db.create_db_engine): sealed on write, opened on read, with
    ``where`` ("table.column") as associated data. Statements written as SQL text read the
    sealed text: they open it with crypto.open_secret."""

    impl = sa.String
    cache_ok = True

    def __init__(self, where: str, length: int | None = None):
        super().__init__(length=length)
        self.where = where
        self.length = length

    def process_bind_param(self, value: str | None, dialect: Any) -> str | None:
        if value is None:
            return None
        from consent.crypto import keyring_of

        sealed = keyring_of(dialect).seal(value, self.where)
        if self.length is not None and len(sealed) > self.length:
            raise ValueError(f"{self.where}: the sealed secret is longer than its column")
        return sealed

    def process_result_value(self, value: str | None, dialect: Any) -> str | None:
        if value is None:
            return None
        from consent.crypto import keyring_of

        return keyring_of(dialect).open(value, self.where)


def sealed(where: str, length: int | None = None, nullable: bool = False) -> Any:
    return Field(sa_column=sa.Column(where.partition(".")[2], Sealed(where, length), nullable=nullable))


def utcnow() -> datetime:
    return datetime.now(UTC)


def sqlite_time(value: datetime) -> str:
    """A UTC time as SQLAlchemy stores DateTime on SQLite (so text comparison orders times),
    for statements written as SQL text."""
    # Perf: isoformat, not strftime (~3 us less per fast check on this machine); the same text.
    return value.astimezone(UTC).isoformat(" ", "microseconds")[:26]


def ts(nullable: bool = False, index: bool = False) -> Any:
    return Field(sa_column=sa.Column(UTCDateTime(), nullable=nullable, index=index))


def jsoncol(nullable: bool = False) -> Any:
    return Field(sa_column=sa.Column(sa.JSON(), nullable=nullable))


class Tenant(SQLModel, table=True):
    __tablename__ = "tenant"
    id: str = Field(primary_key=True, max_length=40)
    name: str = Field(max_length=200)
    allowed_origins: list[str] = jsoncol()
    notice_days: int = 30
    store_full_ip: bool = False
    store_user_agent: bool = True
    default_lang: str = Field(default="en", max_length=16)
    hash_key: str = sealed("tenant.hash_key", 128)  # HMAC key for identifier hashes, never returned
    token_secret: str = sealed("tenant.token_secret", 128)  # signs subject tokens and email links
    evidence_retention_days: int | None = None
    record_retention_years: int | None = None
    created_at: datetime = ts()
    closed_at: datetime | None = ts(nullable=True)


class ApiKey(SQLModel, table=True):
    __tablename__ = "api_key"
    id: str = Field(primary_key=True, max_length=40)
    tenant_id: str = Field(foreign_key="tenant.id", index=True, max_length=40)
    kind: str = Field(max_length=16)  # secret | publishable
    key_hash: str = Field(unique=True, max_length=64)
    prefix: str = Field(max_length=16)
    created_at: datetime = ts()
    revoked_at: datetime | None = ts(nullable=True)


class AdminToken(SQLModel, table=True):
    __tablename__ = "admin_token"
    id: str = Field(primary_key=True, max_length=40)
    token_hash: str = Field(unique=True, max_length=64)
    created_at: datetime = ts()
    revoked_at: datetime | None = ts(nullable=True)


class SigningKey(SQLModel, table=True):
    __tablename__ = "signing_key"
    kid: str = Field(primary_key=True, max_length=64)
    algorithm: str = Field(default="EdDSA", max_length=16)
    private_pem: str = sealed("signing_key.private_pem")  # never leaves the service
    public_jwk: dict[str, Any] = jsoncol()
    created_at: datetime = ts()
    retired_at: datetime | None = ts(nullable=True)


class Purpose(SQLModel, table=True):
    __tablename__ = "purpose"
    tenant_id: str = Field(foreign_key="tenant.id", primary_key=True, max_length=40)
    key: str = Field(primary_key=True, max_length=64)
    kind: str = Field(max_length=16)  # consent | notice
    legal_basis: str = Field(max_length=32)
    double_opt_in: bool = False
    gpc: bool = False  # a GPC signal counts as an opt-out for this purpose
    title: str = Field(default="", max_length=200)
    description: str = Field(default="", max_length=2000)
    translations: dict[str, Any] = jsoncol()
    created_at: datetime = ts()
    updated_at: datetime = ts()


class Cookie(SQLModel, table=True):
    __tablename__ = "cookie"
    tenant_id: str = Field(foreign_key="tenant.id", primary_key=True, max_length=40)
    name: str = Field(primary_key=True, max_length=128)
    provider: str = Field(max_length=200)
    purpose: str = Field(max_length=64)
    http_only: bool = False
    secure: bool = True
    same_site: str = Field(default="Lax", max_length=8)
    lifetime: str = Field(max_length=32)  # "session" or a number of seconds
    description: str = Field(default="", max_length=2000)
    translations: dict[str, Any] = jsoncol()
    created_at: datetime = ts()
    updated_at: datetime = ts()


class PolicyVersion(SQLModel, table=True):
    __tablename__ = "policy_version"
    __table_args__ = (sa.UniqueConstraint("tenant_id", "policy_key", "version"),)
    id: int | None = Field(default=None, sa_column=sa.Column(BigInt, primary_key=True, autoincrement=True))
    tenant_id: str = Field(foreign_key="tenant.id", index=True, max_length=40)
    policy_key: str = Field(max_length=64)
    version: str = Field(max_length=64)
    document_url: str = Field(max_length=2000)
    document_sha256: str = Field(max_length=64)
    published_at: datetime = ts()
    effective_at: datetime = ts()
    material: bool = False
    purposes: list[str] = jsoncol()
    cookies: list[dict[str, Any]] = jsoncol()  # snapshot of the disclosures in force


class PolicyPurpose(SQLModel, table=True):
    """One row per purpose a policy version covers: makes staleness one indexed EXISTS."""

    __tablename__ = "policy_purpose"
    __table_args__ = (sa.Index(None, "tenant_id", "purpose", "policy_key", "effective_at"),)
    policy_version_id: int = Field(
        sa_column=sa.Column(BigInt, sa.ForeignKey("policy_version.id"), primary_key=True)
    )
    purpose: str = Field(primary_key=True, max_length=64)
    tenant_id: str = Field(max_length=40)
    policy_key: str = Field(max_length=64)
    material: bool = False
    effective_at: datetime = ts()


class Subject(SQLModel, table=True):
    __tablename__ = "subject"
    id: str = Field(primary_key=True, max_length=40)
    tenant_id: str = Field(foreign_key="tenant.id", index=True, max_length=40)
    pseudonym: str = Field(max_length=64)  # keyed hash used inside record hashes and exports
    head_hash: str | None = Field(default=None, max_length=64)  # last record hash (chain head)
    created_at: datetime = ts()
    erased_at: datetime | None = ts(nullable=True)
    # Set when this subject was found to be the same person as another (consent/ledger/identity.py):
    # its chain is closed and lookups by its id follow to the survivor.
    merged_into: str | None = Field(default=None, max_length=40)


IDENTIFIER_COVER_INDEX = "ix_subject_identifier_cover"


class SubjectIdentifier(SQLModel, table=True):
    """How a subject is found: keyed hashes of user id, email and anonymous ids."""

    __tablename__ = "subject_identifier"
    # Key and subject id in one index: a check finds its subject without reading the table
    # (the fast check's SQLite statements name it; migration 0012).
    __table_args__ = (sa.Index(IDENTIFIER_COVER_INDEX, "tenant_id", "kind", "value_hash", "subject_id"),)
    tenant_id: str = Field(primary_key=True, max_length=40)
    kind: str = Field(primary_key=True, max_length=8)  # user | email | anon
    value_hash: str = Field(primary_key=True, max_length=64)
    value: str | None = Field(default=None, max_length=320)  # raw, dropped on erasure
    subject_id: str = Field(foreign_key="subject.id", index=True, max_length=40)
    created_at: datetime = ts()


RECORD_TOAST_TUPLE_TARGET = 8160  # the largest PostgreSQL allows (one row per 8 KB page at most)


class ConsentRecord(SQLModel, table=True):
    """One append-only decision. Never updated in place (erasure only drops evidence)."""

    __tablename__ = "consent_record"
    __table_args__ = (
        sa.UniqueConstraint("tenant_id", "idempotency_key"),
        sa.Index(None, "tenant_id", "subject_id", "seq"),
        sa.Index(None, "tenant_id", "recorded_at"),
        # The record's place in its tenant's transparency log (tlog.py): unique, and the order the
        # sequencer appends leaves in.
        sa.Index(None, "tenant_id", "leaf_index", unique=True),
        sa.Index("ix_consent_record_without_line", "tenant_id", sqlite_where=sa.text("export_line IS NULL"),
                 postgresql_where=sa.text("export_line IS NULL")),
        # PostgreSQL: rows (~2 KB with the receipt and export line) stay whole instead of having
        # the receipt moved out of line (migration 0011: exports read them ~30 % cheaper).
        {"postgresql_with": {"toast_tuple_target": RECORD_TOAST_TUPLE_TARGET}},
    )
    seq: int | None = Field(default=None, sa_column=sa.Column(BigInt, primary_key=True, autoincrement=True))
    id: str = Field(unique=True, max_length=40)
    tenant_id: str = Field(foreign_key="tenant.id", max_length=40)
    subject_id: str = Field(foreign_key="subject.id", max_length=40)
    purpose: str = Field(max_length=64)
    decision: str = Field(max_length=24)
    confirmed: bool = True  # false only for a double-opt-in grant awaiting confirmation
    policy_key: str | None = Field(default=None, max_length=64)
    policy_version_id: int | None = Field(default=None, sa_column=sa.Column(BigInt, nullable=True))
    policy_version: str | None = Field(default=None, max_length=64)
    source: str = Field(max_length=16)
    evidence: dict[str, Any] | None = jsoncol(nullable=True)
    evidence_sha256: str = Field(max_length=64)
    disclosures: list[dict[str, Any]] | None = jsoncol(nullable=True)
    recorded_at: datetime = ts()
    idempotency_key: str | None = Field(default=None, max_length=200)
    request_sha256: str | None = Field(default=None, max_length=64)
    prev_hash: str | None = Field(default=None, max_length=64)
    record_hash: str = Field(max_length=64)
    receipt: str
    # The export line's fixed bytes (``ledger.export_line``), written with the record; NULL only
    # for rows written by other means, which exports then build from the columns above.
    export_line: bytes | None = Field(default=None, sa_column=sa.Column(sa.LargeBinary(), nullable=True))
    # True when a Global Privacy Control signal came with the decision (hashed into the record
    # and named in its receipt); NULL otherwise, so records without it hash as they always did.
    gpc: bool | None = None
    # The record's leaf index in its tenant's transparency log, taken in the record's own
    # transaction from ``event_counter.leaves`` (events.next_leaf) and named in its receipt
    # (``tlog_index``). Every writer sets it; NULL only in a database written below the revision
    # that added it, which that revision's migration fills.
    leaf_index: int | None = Field(default=None, sa_column=sa.Column(BigInt, nullable=True))


BULK_INDEX = "ix_consent_state_bulk"
BULK_INDEX_COLUMNS = ("tenant_id", "purpose", "subject_id", "decision", "confirmed", "policy_key", "policy_version_id")


class ConsentState(SQLModel, table=True):
    """Current decision per subject and purpose, kept in step with the ledger on every write."""

    __tablename__ = "consent_state"
    # The bulk check reads one purpose's states of a tenant from this index alone (an index-only
    # scan on PostgreSQL, a covering index on SQLite), not from the table, whose rows carry ~1 KB
    # receipts (migration 0010).
    __table_args__ = (sa.Index(BULK_INDEX, *BULK_INDEX_COLUMNS),)
    tenant_id: str = Field(primary_key=True, max_length=40)
    subject_id: str = Field(primary_key=True, max_length=40)
    purpose: str = Field(primary_key=True, max_length=64)
    record_seq: int = Field(sa_column=sa.Column(BigInt, nullable=False))
    decision: str = Field(max_length=24)
    confirmed: bool = True
    policy_key: str | None = Field(default=None, max_length=64)
    policy_version_id: int | None = Field(default=None, sa_column=sa.Column(BigInt, nullable=True))
    policy_version: str | None = Field(default=None, max_length=64)
    recorded_at: datetime = ts()
    # A copy of the current record's id and receipt, so a check reads one row instead of also
    # probing consent_record. Valid only while ``receipt_seq`` equals
    # ``record_seq``: every writer sets the three with ``record_seq`` in the same statement, and a
    # reader falls back to consent_record otherwise (a row written before migration 0009, or by
    # code that predates it).
    receipt_seq: int | None = Field(default=None, sa_column=sa.Column(BigInt, nullable=True))
    record_id: str | None = Field(default=None, max_length=40)
    receipt: str | None = None
    gpc: bool | None = None  # the current record's ``gpc``: the status was set under the signal


TABLES = SQLModel.metadata


# --- reliability -------------------------------------------------------------

class RateLimitCounter(SQLModel, table=True):
    """Fixed-window request counters shared by every service process (see ratelimit.py)."""

    __tablename__ = "rate_limit"
    bucket: str = Field(primary_key=True, max_length=100)
    window_start: int = Field(sa_column=sa.Column(BigInt, primary_key=True, autoincrement=False))
    hits: int = 0
class SubjectTokenKey(SQLModel, table=True):
    """A tenant's HS256 secret for subject tokens (minted by its backend, verified here).
    The newest live key signs; the one before it still verifies until the next rotation."""

    __tablename__ = "subject_token_key"
    kid: str = Field(primary_key=True, max_length=40)
    tenant_id: str = Field(foreign_key="tenant.id", index=True, max_length=40)
    secret: str = sealed("subject_token_key.secret", 128)  # returned to the tenant's secret-key holder, never logged
    created_at: datetime = ts()
    retired_at: datetime | None = ts(nullable=True)
# --- audit exports ---------------------------------------------------------------

# Keyset pagination of a tenant's ledger by seq (streaming exports): one index range scan.
sa.Index("ix_consent_record_tenant_id_seq", ConsentRecord.__table__.c.tenant_id,  # type: ignore[attr-defined]
         ConsentRecord.__table__.c.seq)  # type: ignore[attr-defined]


class ExportManifest(SQLModel, table=True):
    """The signed manifest of every completed ledger export, fetchable after the stream."""

    __tablename__ = "export_manifest"
    id: str = Field(primary_key=True, max_length=40)
    tenant_id: str = Field(foreign_key="tenant.id", index=True, max_length=40)
    format: str = Field(max_length=8)
    count: int = Field(sa_column=sa.Column(BigInt, nullable=False))
    body_sha256: str = Field(max_length=64)
    manifest: str  # the EdDSA JWT
    created_at: datetime = ts()


# --- integrations: email-link secrets, change feed, webhook outbox ---------------------


class EmailLinkSecret(SQLModel, table=True):
    """Extra email-link signing secrets of a tenant (after ``Tenant.token_secret``), newest last."""

    __tablename__ = "email_link_secret"
    id: str = Field(primary_key=True, max_length=40)
    tenant_id: str = Field(foreign_key="tenant.id", index=True, max_length=40)
    secret: str = sealed("email_link_secret.secret", 128)
    created_at: datetime = ts()


class EventCounter(SQLModel, table=True):
    """Per tenant, the last change-feed position and the number of transparency-log leaves
    handed out; its row lock, held to the commit, orders both (events.py)."""

    __tablename__ = "event_counter"
    tenant_id: str = Field(foreign_key="tenant.id", primary_key=True, max_length=40)
    last_position: int = Field(sa_column=sa.Column(BigInt, nullable=False))
    leaves: int = Field(default=0, sa_column=sa.Column(BigInt, nullable=False, server_default="0"))


class Event(SQLModel, table=True):
    """One change-feed entry per consent record, at a gap-free, commit-ordered position."""

    __tablename__ = "event"
    tenant_id: str = Field(foreign_key="tenant.id", primary_key=True, max_length=40)
    position: int = Field(sa_column=sa.Column(BigInt, primary_key=True, autoincrement=False))
    id: str = Field(unique=True, max_length=40)
    type: str = Field(max_length=64)
    record_id: str = Field(max_length=40)
    subject_id: str = Field(max_length=40)
    data: dict[str, Any] = jsoncol()
    created_at: datetime = ts()


class WebhookEndpoint(SQLModel, table=True):
    __tablename__ = "webhook_endpoint"
    id: str = Field(primary_key=True, max_length=40)
    tenant_id: str = Field(foreign_key="tenant.id", index=True, max_length=40)
    url: str = Field(max_length=2000)
    event_types: list[str] = jsoncol()
    description: str = Field(default="", max_length=200)
    secret: str = sealed("webhook_endpoint.secret", 128)  # whsec_..., needed to sign; returned once at creation
    # the secret before the last rotation: deliveries carry its signature too until then
    previous_secret: str | None = sealed("webhook_endpoint.previous_secret", 128, nullable=True)
    previous_secret_until: datetime | None = ts(nullable=True)
    enabled: bool = True
    consecutive_failures: int = 0
    disabled_reason: str | None = Field(default=None, max_length=200)
    created_at: datetime = ts()
    disabled_at: datetime | None = ts(nullable=True)
    deleted_at: datetime | None = ts(nullable=True)


class WebhookDelivery(SQLModel, table=True):
    """The transactional outbox: one row per (event, endpoint), written with the record."""

    __tablename__ = "webhook_delivery"
    __table_args__ = (
        sa.Index(None, "status", "next_attempt_at"),
        sa.Index(None, "endpoint_id", "id"),
    )
    id: int | None = Field(default=None, sa_column=sa.Column(BigInt, primary_key=True, autoincrement=True))
    tenant_id: str = Field(max_length=40)
    endpoint_id: str = Field(foreign_key="webhook_endpoint.id", max_length=40)
    event_id: str = Field(max_length=40)
    event_position: int = Field(sa_column=sa.Column(BigInt, nullable=False))
    event_type: str = Field(max_length=64)
    status: str = Field(default="pending", max_length=16)  # pending | delivered | failed
    attempts: int = 0
    next_attempt_at: datetime = ts()
    last_status_code: int | None = None
    last_error: str | None = Field(default=None, max_length=500)
    created_at: datetime = ts()
    delivered_at: datetime | None = ts(nullable=True)


class WebhookAttempt(SQLModel, table=True):
    """One HTTP attempt of a delivery (the delivery log)."""

    __tablename__ = "webhook_attempt"
    id: int | None = Field(default=None, sa_column=sa.Column(BigInt, primary_key=True, autoincrement=True))
    delivery_id: int = Field(sa_column=sa.Column(BigInt, sa.ForeignKey("webhook_delivery.id"), nullable=False,
                                                 index=True))
    attempted_at: datetime = ts()
    status_code: int | None = None
    error: str | None = Field(default=None, max_length=500)
    duration_ms: int = 0



# --- tenant settings and key rotation ---------------------------------------

class TenantAudit(SQLModel, table=True):
    """One entry of the tenant's audit trail: a change to its settings or keys (who: which key,
    the admin, the CLI or a dashboard session; when; the changed fields before and after), or
    a dashboard sign-in or action (``dashboard.*``, its target and detail in ``after``).
    Append-only; never holds a raw key."""

    __tablename__ = "tenant_audit"
    __table_args__ = (sa.Index(None, "tenant_id", "id"),)
    id: int | None = Field(default=None, sa_column=sa.Column(BigInt, primary_key=True, autoincrement=True))
    tenant_id: str = Field(foreign_key="tenant.id", max_length=40)
    actor: str = Field(max_length=64)  # key id, "admin", "cli" or "dashboard key:/user:..."
    action: str = Field(max_length=32)  # settings.update | keys.rotate | tenant.close | dashboard.*
    changed_at: datetime = ts()
    before: dict[str, Any] = jsoncol()
    after: dict[str, Any] = jsoncol()


# --- transparency log: a per-tenant RFC 9162 Merkle tree over the records ----------


class TlogLeaf(SQLModel, table=True):
    """One leaf per record, at its index in the tenant's log (SHA-256(0x00 || record_hash))."""

    __tablename__ = "tlog_leaf"
    tenant_id: str = Field(primary_key=True, max_length=40)
    idx: int = Field(sa_column=sa.Column(BigInt, primary_key=True, autoincrement=False))
    record_id: str = Field(unique=True, max_length=40)
    jti: str | None = Field(default=None, index=True, max_length=40)  # the receipt's, for proofs by jti
    hash: bytes = Field(sa_column=sa.Column(sa.LargeBinary(), nullable=False))


class TlogNode(SQLModel, table=True):
    """The hash of a complete subtree of ``2**level`` leaves (only levels >= tlog.NODE_LEVEL)."""

    __tablename__ = "tlog_node"
    tenant_id: str = Field(primary_key=True, max_length=40)
    level: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    idx: int = Field(sa_column=sa.Column(BigInt, primary_key=True, autoincrement=False))
    hash: bytes = Field(sa_column=sa.Column(sa.LargeBinary(), nullable=False))


class TlogState(SQLModel, table=True):
    """The sequencer's place per tenant; its row lock lets one process append at a time."""

    __tablename__ = "tlog_state"
    tenant_id: str = Field(primary_key=True, max_length=40)
    size: int = Field(sa_column=sa.Column(BigInt, nullable=False))  # leaves in the tree
    signed_size: int = Field(sa_column=sa.Column(BigInt, nullable=False))  # size of the newest checkpoint
    updated_at: datetime = ts()


class TlogCheckpoint(SQLModel, table=True):
    """A signed tree head (C2SP tlog-checkpoint note), kept for ever."""

    __tablename__ = "tlog_checkpoint"
    tenant_id: str = Field(primary_key=True, max_length=40)
    size: int = Field(sa_column=sa.Column(BigInt, primary_key=True, autoincrement=False))
    root: bytes = Field(sa_column=sa.Column(sa.LargeBinary(), nullable=False))
    note: str
    created_at: datetime = ts()

# --- dashboard ------------------------------------------------------------------

class DashboardUser(SQLModel, table=True):
    """A person who signs in to the dashboard with an email and a password (argon2 hash)."""

    __tablename__ = "dashboard_user"
    __table_args__ = (sa.UniqueConstraint("tenant_id", "email"),)
    id: str = Field(primary_key=True, max_length=40)
    tenant_id: str = Field(foreign_key="tenant.id", max_length=40)
    email: str = Field(max_length=320)
    password_hash: str = Field(max_length=200)
    role: str = Field(max_length=16)  # admin | read_only
    created_at: datetime = ts()
    disabled_at: datetime | None = ts(nullable=True)


class DashboardSession(SQLModel, table=True):
    """A signed-in browser: the cookie carries the id (signed), so sign-out and the idle
    timeout end it on the server, in every process."""

    __tablename__ = "dashboard_session"
    id_hash: str = Field(primary_key=True, max_length=64)  # SHA-256 of the id in the cookie
    tenant_id: str = Field(foreign_key="tenant.id", index=True, max_length=40)
    actor: str = Field(max_length=400)  # "key:<key id>" or "user:<email>"
    key_id: str | None = Field(default=None, max_length=40)  # a revoked key ends its sessions
    user_id: str | None = Field(default=None, max_length=40)
    role: str = Field(max_length=16)
    csrf: str = Field(max_length=64)
    created_at: datetime = ts()
    last_seen_at: datetime = ts()
    ended_at: datetime | None = ts(nullable=True)


class DashboardRollup(SQLModel, table=True):
    """The overview's numbers per tenant, as of ``computed_at``: a page view reads this row; the
    dashboard recomputes it (from consent_state's index) when it is older than its maximum age."""

    __tablename__ = "dashboard_rollup"
    tenant_id: str = Field(sa_column=sa.Column(sa.String(40), sa.ForeignKey("tenant.id"), primary_key=True))
    computed_at: datetime = ts()
    data: dict[str, Any] = jsoncol()


class SnippetSettings(SQLModel, table=True):
    """One version of a tenant's banner texts and theme; every change adds a row (history)."""

    __tablename__ = "snippet_settings"
    tenant_id: str = Field(foreign_key="tenant.id", primary_key=True, max_length=40)
    version: int = Field(primary_key=True)
    texts: dict[str, Any] = jsoncol()  # {lang: {text key: text}}, overrides of the built-in texts
    theme: dict[str, Any] = jsoncol()  # mode, layout, brand, radius, font
    refusal_cooldown_days: int = 182
    created_at: datetime = ts()
