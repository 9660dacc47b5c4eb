"""The append-only consent ledger: subjects, their identifiers, and recording a decision
with its hash chain link and signed receipt, in one transaction."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value
from sqlmodel import col

from consent import crypto
from consent.errors import IdempotencyConflict, NotFound, ValidationFailed
from consent.ledger import events, statements
from consent.ledger.catalog import CLOCK_SKEW, purpose_and_version
from consent.ledger.receipts import record_claims
from consent.ledger.schemas import ConsentIn, SubjectRef
from consent.ledger.state import derive_status
from consent.store.models import (
    ConsentRecord,
    Subject,
    Tenant,
    utcnow,
)
from consent.store.tables import SUBJECT
from consent.store.tables import SUBJECT_IDENTIFIER as SI

PRIORITY = ("user", "email", "anon")


def insert_for(db: Session) -> Any:
    """The dialect's INSERT (for ON CONFLICT), SQLite or PostgreSQL."""
    return postgresql.insert if db.get_bind().dialect.name == "postgresql" else sqlite.insert


def identifier_hashes(tenant: Tenant, ref: SubjectRef) -> list[tuple[str, str, str]]:
    """(kind, keyed hash, raw value) for each identifier given, highest priority first."""
    out = []
    if ref.user_id:
        out.append(("user", crypto.keyed_hash(tenant.hash_key, "user", ref.user_id), ref.user_id))
    if ref.email:
        email = crypto.normalize_email(ref.email)
        out.append(("email", crypto.keyed_hash(tenant.hash_key, "email", email), email))
    if ref.anonymous_id:
        out.append(("anon", crypto.keyed_hash(tenant.hash_key, "anon", ref.anonymous_id), ref.anonymous_id))
    return out


def find_subject_id(db: Session, tenant: Tenant, kind: str, value: str) -> str | None:
    """The subject known by one identifier (``kind`` user, email or anon), if any."""
    if kind == "email":
        value = crypto.normalize_email(value)
    h = crypto.keyed_hash(tenant.hash_key, kind, value)
    return db.execute(
        sa.select(SI.c.subject_id).where(SI.c.tenant_id == tenant.id, SI.c.kind == kind, SI.c.value_hash == h)
    ).scalar()


def parse_subject_ref(value: str) -> tuple[str, str]:
    """A path/query subject: ``sub_…`` (our id), ``email:…``, ``anon:…``, ``user:…``, else a user id."""
    if value.startswith("sub_"):
        return "id", value
    for kind, prefix in (("email", "email:"), ("anon", "anon:"), ("user", "user:")):
        if value.startswith(prefix):
            return kind, value[len(prefix):]
    return "user", value


def lookup_subject(db: Session, tenant: Tenant, value: str) -> Subject:
    """The subject named by a path parameter, or 404 (another tenant's is simply not found)."""
    kind, raw = parse_subject_ref(value)
    sid = raw if kind == "id" else find_subject_id(db, tenant, kind, raw)
    subject = follow_merges(db, db.get(Subject, sid)) if sid else None
    if subject is None or subject.tenant_id != tenant.id:
        raise NotFound("subject not found")
    return subject


def follow_merges(db: Session, subject: Subject | None) -> Subject | None:
    """The subject a merged one now lives on (consent/ledger/identity.py), else ``subject`` itself."""
    for _ in range(16):  # a merge chain is one step long; the bound only guards a broken row
        if subject is None or subject.merged_into is None:
            return subject
        subject = db.get(Subject, subject.merged_into)
    return subject


_SUBJECT_BY_IDENTIFIER = (
    sa.select(Subject).join(SI, SI.c.subject_id == Subject.id)
    .where(SI.c.tenant_id == sa.bindparam("t"), SI.c.kind == sa.bindparam("k"), SI.c.value_hash == sa.bindparam("h"))
    .with_for_update(of=Subject).execution_options(populate_existing=True)
)


def resolve_subject(db: Session, tenant: Tenant, ref: SubjectRef) -> Subject:
    """Find or create the subject for these identifiers and lock it for a chain append.

    The highest-priority known identifier wins (user id, then email, then anonymous id);
    identifiers not yet known are attached to it; one owned by another subject is left alone.
    """
    ids = identifier_hashes(tenant, ref)
    if len(ids) == 1:
        # Perf: one identifier (the usual case): find and lock its subject in one statement.
        k, h, _ = ids[0]
        known = db.execute(_SUBJECT_BY_IDENTIFIER, {"t": tenant.id, "k": k, "h": h}).scalar_one_or_none()
        if known is not None:
            return known
        owners: dict[str, str] = {}
    else:
        cond = sa.or_(*[sa.and_(SI.c.kind == k, SI.c.value_hash == h) for k, h, _ in ids])
        rows = db.execute(sa.select(SI.c.kind, SI.c.subject_id).where(SI.c.tenant_id == tenant.id, cond)).all()
        owners = {r.kind: r.subject_id for r in rows}
    subject_id = next((owners[k] for k in PRIORITY if k in owners), None)
    now = utcnow()
    if subject_id is None:
        subject_id = crypto.new_id("sub", 12)
        db.add(Subject(
            id=subject_id, tenant_id=tenant.id, created_at=now,
            pseudonym=crypto.keyed_hash(tenant.hash_key, "subject", subject_id),
        ))
        db.flush()
    missing = [(k, h, v) for k, h, v in ids if k not in owners]
    if missing:
        ins = insert_for(db)(SI).values([
            {"tenant_id": tenant.id, "kind": k, "value_hash": h, "value": v,
             "subject_id": subject_id, "created_at": now}
            for k, h, v in missing
        ]).on_conflict_do_nothing()
        db.execute(ins)
        if not owners:
            # A concurrent request may have created the same person first: follow its owner.
            k, h, _ = ids[0]
            winner = db.execute(sa.select(SI.c.subject_id).where(
                SI.c.tenant_id == tenant.id, SI.c.kind == k, SI.c.value_hash == h)).scalar_one()
            if winner != subject_id:
                db.execute(sa.delete(SI).where(SI.c.subject_id == subject_id))
                db.execute(sa.delete(SUBJECT).where(SUBJECT.c.id == subject_id))
                subject_id = winner
    return lock_subject(db, subject_id)


def lock_subject(db: Session, subject_id: str) -> Subject:
    """The subject row, locked until commit (PostgreSQL) so chain appends stay linear."""
    q = sa.select(Subject).where(col(Subject.id) == subject_id).with_for_update()
    subject = db.execute(q.execution_options(populate_existing=True)).scalar_one()
    return subject


def truncate_ip(ip: str, full: bool) -> str | None:
    """IPv4 to /24 and IPv6 to /48 unless the tenant keeps full addresses; junk is dropped."""
    try:
        addr = ipaddress.ip_address(ip.strip())
    except ValueError:
        return None
    if full:
        return str(addr)
    prefix = 24 if addr.version == 4 else 48
    return str(ipaddress.ip_network(f"{addr}/{prefix}", strict=False).network_address)


def build_evidence(tenant: Tenant, given: dict[str, Any] | None, *, ip: str | None, user_agent: str | None) -> dict[str, Any]:
    evidence = dict(given or {})
    ip = evidence.pop("ip", None) or ip
    ua = evidence.pop("user_agent", None) or user_agent
    if ip:
        kept = truncate_ip(ip, tenant.store_full_ip)
        if kept:
            evidence["ip"] = kept
    if ua and tenant.store_user_agent:
        evidence["user_agent"] = ua[:1000]
    return evidence


def record_content(record: ConsentRecord | NewRecord, pseudonym: str, disclosures_sha256: str | None) -> dict[str, Any]:
    """What a record hash covers. Identifiers appear only as the subject's keyed pseudonym and
    evidence only by its hash, so erasure can drop both without breaking the chain. ``gpc``
    appears only when a GPC signal came with the decision (older records hash unchanged)."""
    content = {
        "v": 1,
        "id": record.id,
        "tenant": record.tenant_id,
        "subject": pseudonym,
        "purpose": record.purpose,
        "decision": record.decision,
        "confirmed": record.confirmed,
        "policy": {"key": record.policy_key, "version": record.policy_version},
        "source": record.source,
        "evidence_sha256": record.evidence_sha256,
        "disclosures_sha256": disclosures_sha256,
        "recorded_at": crypto.iso(record.recorded_at),
        "prev_hash": record.prev_hash,
    }
    if getattr(record, "gpc", None):
        content["gpc"] = True
    return content


def hashed_content(record: Any, pseudonym: str) -> dict[str, Any]:
    """``record_content`` of a record (or any row with its columns), disclosures hashed."""
    disclosures = crypto.sha256_hex(crypto.canonical_json(record.disclosures)) if record.disclosures else None
    return record_content(record, pseudonym, disclosures)


def compute_record_hash(record: ConsentRecord | NewRecord, pseudonym: str) -> str:
    return crypto.sha256_hex(crypto.canonical_json(hashed_content(record, pseudonym)))


# An export line is the record content plus n, linked, record_hash and receipt, keys sorted. The
# keys of the content sort around the per-export ones (linked, n) and the receipt, so the line is
# stored as three pieces that go around them (see ``export_line``).
LINE_SEP = b"\x1f"  # never in canonical JSON output: control characters are escaped there
_LINE_A = ("confirmed", "decision", "disclosures_sha256", "evidence_sha256", "id")  # ... linked, n
_LINE_A_GPC = (*_LINE_A, "gpc")  # ``gpc`` (only when true) sorts among them
_LINE_B = ("policy", "prev_hash", "purpose")  # ... receipt
_LINE_C = ("record_hash", "recorded_at", "source", "subject", "tenant", "v")


def export_line(content: dict[str, Any], record_hash: str) -> bytes:
    """The record's export line without ``n``, ``linked`` and ``receipt``, as the three pieces
    (joined by ``LINE_SEP``) of canonical JSON that go before, between and after them.
    Written once with the record (all of it is fixed when the record is), so an export only
    joins stored bytes (``exports.Lines``); tests/test_export_format.py checks the lines equal
    ``canonical_json`` of the whole line."""
    line = {**content, "record_hash": record_hash}
    opt = orjson.OPT_SORT_KEYS
    a = orjson.dumps({k: line[k] for k in _LINE_A_GPC if k in line}, option=opt)[:-1] + b","
    b = orjson.dumps({k: line[k] for k in _LINE_B}, option=opt)[1:-1] + b","
    c = b"," + orjson.dumps({k: line[k] for k in _LINE_C}, option=opt)[1:]
    return LINE_SEP.join((a, b, c))


def seal_record(record: ConsentRecord | NewRecord, pseudonym: str) -> None:
    """Set the record's hash and its stored export line (both from its content)."""
    content = hashed_content(record, pseudonym)
    record.record_hash = crypto.sha256_hex(crypto.canonical_json(content))
    record.export_line = export_line(content, record.record_hash)


@dataclass
class Recorded:
    record: ConsentRecord | NewRecord
    created: bool
    status: str


def find_by_idempotency_key(db: Session, tenant_id: str, key: str) -> ConsentRecord | None:
    q = sa.select(ConsentRecord).where(col(ConsentRecord.tenant_id) == tenant_id,
                                   col(ConsentRecord.idempotency_key) == key)
    return db.execute(q).scalars().first()


def replay(existing: ConsentRecord, request_sha256: str) -> Recorded:
    if existing.request_sha256 != request_sha256:
        raise IdempotencyConflict("this Idempotency-Key was used with a different request body")
    return Recorded(existing, False, status_of_record(existing))


def superseded(db: Session, record: NewRecord) -> bool:
    """A newer material version covering the record's purpose is in effect (the check's rule)."""
    return bool(db.execute(sa.select(statements.stale(
        record.tenant_id, record.purpose, record.policy_key, record.policy_version_id, utcnow()))).scalar())


def status_of_record(record: ConsentRecord | NewRecord) -> str:
    return derive_status(record.decision, confirmed=record.confirmed, stale=False)


@dataclass
class NewRecord:
    """A record being appended: the columns of ``consent_record`` (``seq`` once inserted).
    A plain object, not an ORM instance (perf: a SQLModel instance cost ~0.3 ms to build);
    records are inserted with Core and never updated in place."""

    id: str
    tenant_id: str
    subject_id: str
    purpose: str
    decision: str
    confirmed: bool
    policy_key: str | None
    policy_version_id: int | None
    policy_version: str | None
    source: str
    evidence: dict[str, Any] | None
    evidence_sha256: str
    disclosures: list[dict[str, Any]] | None
    recorded_at: datetime
    idempotency_key: str | None
    request_sha256: str | None
    prev_hash: str | None
    record_hash: str = ""
    receipt: str = ""
    export_line: bytes | None = None
    gpc: bool | None = None
    leaf_index: int | None = None  # its transparency-log index, taken just before signing
    seq: int | None = None


def request_digest(spec: ConsentIn) -> str:
    """What an Idempotency-Key is bound to: the SHA-256 of the canonical request."""
    return crypto.sha256_hex(crypto.canonical_json(spec.model_dump(mode="json")))


def checked_version(spec: ConsentIn, purpose: Any, version: Any, at: datetime) -> Any:
    """The version a decision is recorded under (None for a withdrawal outside any version),
    or ValidationFailed (422) naming what is wrong. ``purpose`` is known here."""
    if spec.decision == "acknowledged" and purpose.kind != "notice":
        raise ValidationFailed.field("decision", "acknowledged is only for notice purposes")
    if spec.decision != "acknowledged" and purpose.kind == "notice" and spec.decision not in ("withdrawn", "notified"):
        raise ValidationFailed.field("decision", f"notice purpose {purpose.key!r} takes acknowledged")
    if at > utcnow() + CLOCK_SKEW:  # a future-dated import would outrank every later decision
        raise ValidationFailed.field("recorded_at", "may not be in the future")
    if spec.policy_version and version is None:
        raise ValidationFailed.field("policy_version", f"policy {spec.policy!r} has no version {spec.policy_version!r}")
    withdrawal = spec.decision == "withdrawn"  # always accepted, with or without a version
    if version is None and not withdrawal:
        raise ValidationFailed.field("policy_version", f"no version of policy {spec.policy!r} covering {spec.purpose!r} is in effect; give policy_version")
    if version is not None and spec.purpose not in version.purposes:
        if not withdrawal:
            raise ValidationFailed.field("purpose", f"purpose {spec.purpose!r} is not in {spec.policy} version {version.version!r}")
        version = None
    return version


def new_record(tenant: Any, spec: ConsentIn, purpose: Any, version: Any, *, subject_id: str, pseudonym: str,
               prev_hash: str | None, at: datetime, confirmed: bool | None, idempotency_key: str | None,
               request_sha256: str, ip: str | None, user_agent: str | None, gpc: bool = False) -> NewRecord:
    """The record (hashed, not yet signed) of a validated decision; ``tenant`` needs ``id``,
    ``store_full_ip`` and ``store_user_agent``, ``version`` may be None."""
    if confirmed is None:
        confirmed = not (spec.decision == "granted" and purpose.double_opt_in)
    evidence = build_evidence(tenant, spec.evidence.model_dump(exclude_none=True) if spec.evidence else None,
                              ip=ip, user_agent=user_agent)
    disclosures = None
    if spec.decision == "acknowledged" and version is not None:
        disclosures = [c for c in version.cookies if c.get("purpose") == purpose.key] or list(version.cookies)
    record = NewRecord(
        id=crypto.new_id("rec", 12),
        tenant_id=tenant.id,
        subject_id=subject_id,
        purpose=purpose.key,
        decision=spec.decision,
        confirmed=confirmed,
        policy_key=version.policy_key if version else None,
        policy_version_id=version.id if version else None,
        policy_version=version.version if version else None,
        source=spec.source,
        evidence=evidence,
        evidence_sha256=crypto.sha256_hex(crypto.canonical_json(evidence)),
        disclosures=disclosures,
        recorded_at=at,
        idempotency_key=idempotency_key,
        request_sha256=request_sha256,
        prev_hash=prev_hash,
        gpc=True if gpc else None,
    )
    seal_record(record, pseudonym)
    return record


def sign_record(record: NewRecord, purpose: Any, version: Any, status: str, *, signer: crypto.Signer,
                issuer: str) -> None:
    """Set the record's receipt: a JWS over its id, hash, policy and resulting status."""
    policy = None
    if version is not None:
        policy = {"key": version.policy_key, "version": version.version,
                  "sha256": version.document_sha256, "url": version.document_url}
    record.receipt = signer.sign(record_claims(
        issuer=issuer, tenant_id=record.tenant_id, subject_id=record.subject_id, policy=policy,
        record={"id": record.id, "record_hash": record.record_hash, "source": record.source,
                "recorded_at": crypto.iso(record.recorded_at)},
        purposes=[{"purpose": purpose.key, "status": status, "legal_basis": purpose.legal_basis,
                   "kind": purpose.kind}],
        gpc=bool(record.gpc), tlog_index=record.leaf_index,
    ))


def record_decision(
    db: Session,
    tenant: Tenant,
    spec: ConsentIn,
    *,
    signer: crypto.Signer,
    issuer: str,
    idempotency_key: str | None = None,
    ip: str | None = None,
    user_agent: str | None = None,
    confirmed: bool | None = None,
    gpc: bool = False,
) -> Recorded:
    """Validate and append one decision, with its chain link, state update and receipt.
    (``batch_writes`` writes the common case in group commits with the same statements; both
    build the record with ``checked_version``, ``new_record`` and ``sign_record``.)"""
    request_sha256 = request_digest(spec)
    if idempotency_key:
        existing = find_by_idempotency_key(db, tenant.id, idempotency_key)
        if existing is not None:
            return replay(existing, request_sha256)

    at = spec.recorded_at or utcnow()
    purpose, version = purpose_and_version(db, tenant.id, spec.purpose, spec.policy, spec.policy_version, at)
    if purpose is None:
        raise ValidationFailed.field("purpose", f"unknown purpose {spec.purpose!r}")
    version = checked_version(spec, purpose, version, at)
    subject = resolve_subject(db, tenant, spec.subject)
    record = new_record(tenant, spec, purpose, version, subject_id=subject.id, pseudonym=subject.pseudonym,
                        prev_hash=subject.head_hash, at=at, confirmed=confirmed, idempotency_key=idempotency_key,
                        request_sha256=request_sha256, ip=ip, user_agent=user_agent, gpc=gpc)
    # A version picked by default is the newest in effect, so only a named one can be superseded.
    stale = bool(spec.policy_version) and version is not None and superseded(db, record)
    status = derive_status(record.decision, confirmed=record.confirmed, stale=stale)

    def append() -> None:  # the log index (held to commit, events.next_leaf) is in the receipt
        record.leaf_index = events.next_leaf(db, tenant.id)
        sign_record(record, purpose, version, status, signer=signer, issuer=issuer)
        insert_record(db, record)

    if idempotency_key is None:
        # Perf: no Idempotency-Key, no race to recover from: skip the SAVEPOINT and its RELEASE
        # (2 of the 14 statements of a record on PostgreSQL).
        append()
    else:
        try:
            with db.begin_nested():  # a lost race gives its leaf index back with the savepoint
                append()
        except IntegrityError:
            # Same Idempotency-Key committed by a concurrent request after our first look.
            existing = find_by_idempotency_key(db, tenant.id, idempotency_key)
            if existing is None:
                raise
            return replay(existing, request_sha256)
    move_head(db, subject, record)
    if record.decision != "notified":  # a policy-change notice is proof of telling, not a choice
        upsert_state(db, record)
    events.on_record(db, record, status)  # change feed + webhook outbox, written at commit
    return Recorded(record, True, status)


RECORD_COLUMNS = statements.RECORD_COLUMNS


def insert_record(db: Session, record: NewRecord) -> None:
    """INSERT the record (Core, prebuilt; no ORM unit of work) and take its ``seq``. The object
    stays outside the session: records are never updated in place."""
    record.seq = db.execute(statements.RECORD_INSERT, {k: getattr(record, k) for k in RECORD_COLUMNS}).scalar_one()


def move_head(db: Session, subject: Subject, record: NewRecord) -> None:
    """Move the subject's chain head to ``record`` (``statements.MOVE_HEAD``: only from the head
    the record links to). The caller holds the subject's row lock (``lock_subject``), so the
    move cannot miss; if it did, the chain would fork, so the transaction fails instead."""
    moved = db.execute(statements.MOVE_HEAD, {"sid": subject.id, "prev": record.prev_hash, "head": record.record_hash})
    if moved.rowcount != 1:  # type: ignore[attr-defined]
        raise RuntimeError(f"chain head of {subject.id} moved under its row lock")
    set_committed_value(subject, "head_hash", record.record_hash)


def upsert_state(db: Session, record: NewRecord) -> None:
    """Keep consent_state in step: the newest decision (by recorded_at) per subject and purpose."""
    values = {
        "tenant_id": record.tenant_id, "subject_id": record.subject_id, "purpose": record.purpose,
        "record_seq": record.seq, "decision": record.decision, "confirmed": record.confirmed,
        "policy_key": record.policy_key, "policy_version_id": record.policy_version_id,
        "policy_version": record.policy_version, "recorded_at": record.recorded_at,
        # The copy a check reads instead of the record (valid while receipt_seq = record_seq).
        "receipt_seq": record.seq, "record_id": record.id, "receipt": record.receipt, "gpc": record.gpc,
    }
    db.execute(statements.STATE_UPSERT[db.get_bind().dialect.name], values)


def record_out(record: ConsentRecord | NewRecord, status: str | None = None) -> dict[str, Any]:
    return {
        "id": record.id,
        "subject": record.subject_id,
        "purpose": record.purpose,
        "decision": record.decision,
        "status": status or status_of_record(record),
        "policy": {"key": record.policy_key, "version": record.policy_version},
        "source": record.source,
        "recorded_at": record.recorded_at,
        "record_hash": record.record_hash,
        "prev_hash": record.prev_hash,
        "receipt": record.receipt,
    }


def records_of(db: Session, tenant_id: str, subject_id: str, *, before: datetime | None = None) -> list[ConsentRecord]:
    q = sa.select(ConsentRecord).where(col(ConsentRecord.tenant_id) == tenant_id,
                                       col(ConsentRecord.subject_id) == subject_id)
    if before is not None:
        q = q.where(col(ConsentRecord.recorded_at) <= before)
    return list(db.execute(q.order_by(col(ConsentRecord.seq))).scalars())
