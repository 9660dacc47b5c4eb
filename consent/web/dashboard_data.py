"""What the dashboard reads and writes, without the web: its users, sessions and audit trail,
the overview's aggregates and one person's verified history. Takes a Session first and never
commits (the dashboard's page wrapper does, once per request)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import jwt
import sqlalchemy as sa
from sqlalchemy.orm import Session
from sqlmodel import col

from consent import crypto
from consent.audit import verify
from consent.errors import BadToken, Conflict, NotFound, ValidationFailed
from consent.integrations import webhooks
from consent.ledger import catalog, checks, receipts, recorder, statements
from consent.ledger.state import STATUSES, derive_status
from consent.ledger.tenants import key_live, record_change
from consent.store.models import (
    ApiKey,
    ConsentRecord,
    DashboardRollup,
    DashboardSession,
    DashboardUser,
    ExportManifest,
    PolicyVersion,
    Subject,
    Tenant,
    TenantAudit,
    utcnow,
)
from consent.store.tables import API_KEY, STATE, TENANT_AUDIT

ROLES = ("admin", "read_only")
SEARCH_KINDS = ("email", "user", "anon", "subject")
# The overview's activity window: the newest records, read from the (tenant, recorded_at) index;
# a bounded read per page view whatever the ledger's size.
RECENT_WINDOW = 5000
TOUCH_EVERY = timedelta(seconds=60)  # last_seen_at is written at most this often per session



# --- users ---------------------------------------------------------------------------------

def create_user(db: Session, tenant_id: str, *, email: str, password: str, role: str) -> DashboardUser:
    """A dashboard user of this tenant (409 if the email is taken)."""
    email = crypto.normalize_email(email)
    if "@" not in email or len(email) > 320:
        raise ValidationFailed.field("email", "must be an email address")
    if len(password) < 12 or len(password) > 1000:
        raise ValidationFailed.field("password", "must be 12 to 1000 characters")
    if role not in ROLES:
        raise ValidationFailed.field("role", f"must be one of {', '.join(ROLES)}")
    if db.execute(sa.select(col(DashboardUser.id)).where(col(DashboardUser.tenant_id) == tenant_id,
                                                    col(DashboardUser.email) == email)).first():
        raise Conflict("a dashboard user with this email exists")
    user = DashboardUser(id=crypto.new_id("usr", 8), tenant_id=tenant_id, email=email,
                         password_hash=crypto.hash_password(password), role=role, created_at=utcnow())
    db.add(user)
    db.flush()
    return user


def list_users(db: Session, tenant_id: str) -> list[DashboardUser]:
    return list(db.execute(sa.select(DashboardUser).where(col(DashboardUser.tenant_id) == tenant_id)
                           .order_by(col(DashboardUser.email))).scalars())


def authenticate_user(db: Session, tenant_id: str, email: str, password: str) -> DashboardUser | None:
    """The enabled user with this email and password, or None (same work when unknown)."""
    user = db.execute(sa.select(DashboardUser).where(
        col(DashboardUser.tenant_id) == tenant_id, col(DashboardUser.email) == crypto.normalize_email(email),
        col(DashboardUser.disabled_at).is_(None))).scalars().first()
    if user is None:
        crypto.dummy_password_check(password)
        return None
    return user if crypto.password_matches(user.password_hash, password) else None


# --- sessions ------------------------------------------------------------------------------

@dataclass(frozen=True)
class SignedIn:
    """Who is behind a dashboard request."""

    tenant_id: str
    actor: str
    role: str
    csrf: str
    session_hash: str
    stale_seen: bool = False  # last seen long enough ago to be written again

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


def start_session(db: Session, tenant_id: str, *, actor: str, role: str, key_id: str | None = None,
                  user_id: str | None = None) -> str:
    """A new session; returns the raw id (for the signed cookie, never stored)."""
    raw = secrets.token_urlsafe(32)
    now = utcnow()
    db.add(DashboardSession(id_hash=crypto.hash_token(raw), tenant_id=tenant_id, actor=actor, key_id=key_id,
                            user_id=user_id, role=role, csrf=secrets.token_urlsafe(24), created_at=now,
                            last_seen_at=now))
    db.flush()
    return raw


def load_session(db: Session, raw: str, *, idle_seconds: int) -> SignedIn | None:
    """The live session with this id: not ended, not idle too long, its key not revoked and
    its user not disabled. Reads only (``touch_session`` moves its last-seen time)."""
    row = db.get(DashboardSession, crypto.hash_token(raw))
    now = utcnow()
    key = API_KEY
    if row is None or row.ended_at is not None or now - row.last_seen_at > timedelta(seconds=idle_seconds):
        return None
    # a key in its grace period after a rotation still works here as on the API
    if row.key_id is not None and db.execute(sa.select(key.c.id).where(
            key.c.id == row.key_id, key_live(key, now))).first() is None:
        return None
    if row.user_id is not None and db.execute(sa.select(col(DashboardUser.id)).where(
            col(DashboardUser.id) == row.user_id, col(DashboardUser.disabled_at).is_(None))).first() is None:
        return None
    return SignedIn(row.tenant_id, row.actor, row.role, row.csrf, row.id_hash,
                    stale_seen=now - row.last_seen_at > TOUCH_EVERY)


def touch_session(db: Session, session_hash: str) -> None:
    """The session was used now: its idle timeout starts again."""
    db.execute(sa.update(DashboardSession).where(col(DashboardSession.id_hash) == session_hash)
               .values(last_seen_at=utcnow()))


def rebind_session(db: Session, session_hash: str, key_id: str) -> None:
    """The session goes on under a new key of its tenant (the one that replaced its own)."""
    row = db.get(DashboardSession, session_hash)
    if row is not None:
        row.key_id, row.actor = key_id, f"key:{key_id}"


def tenant_actor(user: SignedIn) -> str:
    """Who a change made in the dashboard is by, as the tenant audit trail names it (the API
    names the key id alone); cut to the trail's 64-character column."""
    return trail_actor(user.actor)


def trail_actor(actor: str) -> str:
    """``key:<key id>`` or ``user:<email>`` as the tenant audit trail names a dashboard actor."""
    return f"dashboard {actor}"[:64]


def api_keys(db: Session, tenant_id: str) -> list[ApiKey]:
    """The tenant's keys (prefix and dates only; the keys themselves are never stored)."""
    return list(db.execute(sa.select(ApiKey).where(col(ApiKey.tenant_id) == tenant_id)
                           .order_by(col(ApiKey.created_at).desc())).scalars())


def end_session(db: Session, session_hash: str) -> None:
    row = db.get(DashboardSession, session_hash)
    if row is not None and row.ended_at is None:
        row.ended_at = utcnow()


# --- audit trail ---------------------------------------------------------------------------

DASHBOARD_ACTION = "dashboard."  # the prefix of the trail's actions taken in the dashboard


def log_event(db: Session, tenant_id: str, actor: str, action: str, target: str | None = None,
              detail: dict[str, Any] | None = None) -> None:
    """Append one dashboard action (a sign-in, a search, an erasure...) to the tenant audit
    trail, the one ``GET /v1/tenant/audit`` serves, in the caller's transaction: the action
    ``dashboard.<action>``, what it was on in ``after`` (``target``, ``detail``)."""
    after: dict[str, Any] = {}
    if target:
        after["target"] = target[:400]
    if detail is not None:
        after["detail"] = detail
    record_change(db, tenant_id, trail_actor(actor), DASHBOARD_ACTION + action, {}, after)


@dataclass
class TrailEntry:
    """One line of the audit page: a tenant audit entry, a dashboard action (source
    "dashboard") or a change to the settings, keys, retention or closing (source "tenant",
    whatever wrote it: the API, the CLI or the dashboard)."""

    at: datetime
    actor: str
    action: str
    target: str | None
    detail: dict[str, Any] | None
    changes: list[tuple[str, Any, Any]]  # (field, before, after) of a tenant audit entry
    source: str  # "dashboard" | "tenant"


def audit_trail(db: Session, tenant_id: str, limit: int = 100) -> list[TrailEntry]:
    """The tenant audit trail, its newest ``limit`` entries by the (tenant, id) index, newest
    first. A change made in the dashboard through a domain function is written once, by that
    function, so it shows once."""
    audit = TENANT_AUDIT
    out = []
    for a in db.execute(sa.select(TenantAudit).where(audit.c.tenant_id == tenant_id)
                        .order_by(audit.c.id.desc()).limit(limit)).scalars():
        before, after = a.before or {}, a.after or {}
        if a.action.startswith(DASHBOARD_ACTION):
            out.append(TrailEntry(a.changed_at, a.actor, a.action, after.get("target"), after.get("detail"),
                                  [], "dashboard"))
        elif a.action in ("settings.update", "retention.update"):  # field by field, before and after
            out.append(TrailEntry(a.changed_at, a.actor, a.action, None, None,
                                  [(k, before.get(k), v) for k, v in after.items()], "tenant"))
        else:
            out.append(TrailEntry(a.changed_at, a.actor, a.action, None, _trail_detail(a.action, before, after),
                                  [], "tenant"))
    # by time (stable, so ties keep the id order): rows moved from the former dashboard table
    # got ids after the entries that were already there
    out.sort(key=lambda e: e.at, reverse=True)
    return out


def _trail_detail(action: str, before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """A short summary of a non-settings entry: a rotation's issued keys (prefixes) and until
    when the old ones work; anything else as written."""
    if action == "keys.rotate":
        return {"issued": ", ".join(f"{k['kind']} {k['prefix']}…" for k in after.get("issued", [])),
                "old keys work until": ", ".join(f"{k['prefix']}… {k['expires_at']}" for k in after.get("keys", []))
                or "none were live", "leaked": after.get("leaked", False)}
    return {**{f"before {k}": v for k, v in before.items()}, **after}


# --- overview ------------------------------------------------------------------------------

COUNTED = ("granted", "denied", "withdrawn", "stale", "pending_confirmation", "acknowledged")


@dataclass
class VersionCounts:
    version: str | None
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTED, 0))

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@dataclass
class PurposeOverview:
    key: str
    title: str
    kind: str
    versions: list[VersionCounts]
    totals: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.totals.values())

    @property
    def opt_in_rate(self) -> float | None:
        """Share of the subjects with a choice on record whose choice currently allows."""
        return self.totals["granted"] / self.total if self.total and self.kind == "consent" else None


@dataclass
class Overview:
    purposes: list[PurposeOverview]
    window: int  # records in the activity window
    gpc: int  # of those, made under Global Privacy Control
    per_day: list[tuple[str, dict[str, int]]]  # (date, decision -> count), oldest first
    withdrawals: list[dict[str, Any]]
    computed_at: datetime
    # (date, policy version -> records), oldest first; "" for records made under no version
    per_day_versions: list[tuple[str, dict[str, int]]] = field(default_factory=list)

    @property
    def versions_seen(self) -> list[str]:
        """The policy versions in the activity window by the day they first appear, then name
        (a stored rollup's JSON may not keep key order)."""
        seen: dict[str, None] = {}
        for _, counts in self.per_day_versions:
            seen.update(dict.fromkeys(sorted(counts)))
        return list(seen)

    def to_json(self) -> dict[str, Any]:
        return {"purposes": [{"key": p.key, "title": p.title, "kind": p.kind, "totals": p.totals,
                              "versions": [{"version": v.version, "counts": v.counts} for v in p.versions]}
                             for p in self.purposes],
                "window": self.window, "gpc": self.gpc, "per_day": self.per_day,
                "per_day_versions": self.per_day_versions,
                "withdrawals": [{**w, "recorded_at": w["recorded_at"].isoformat()} for w in self.withdrawals]}

    @classmethod
    def from_json(cls, d: dict[str, Any], computed_at: datetime) -> Overview:
        purposes = [PurposeOverview(p["key"], p["title"], p["kind"],
                                    [VersionCounts(v["version"], v["counts"]) for v in p["versions"]], p["totals"])
                    for p in d["purposes"]]
        withdrawals = [{**w, "recorded_at": datetime.fromisoformat(w["recorded_at"])} for w in d["withdrawals"]]
        # a rollup stored before the per-version series existed has none until it is recomputed
        per_version = [(day, c) for day, c in d.get("per_day_versions", [])]
        return cls(purposes, d["window"], d["gpc"], [(day, c) for day, c in d["per_day"]], withdrawals,
                   computed_at, per_version)


def _state_counts(db: Session, tenant_id: str, now: datetime) -> list[Any]:
    """Current states of every subject, counted per purpose, version and decision. Read from
    ``ix_consent_state_bulk`` alone (every grouped column is in it); staleness by the one rule
    the checks use (``statements.stale_state``), decided once per group instead of once per row."""
    cols = (STATE.c.purpose, STATE.c.policy_key, STATE.c.policy_version_id, STATE.c.decision, STATE.c.confirmed)
    stale = statements.stale_state(now)
    return list(db.execute(
        sa.select(*cols, stale, sa.func.count().label("n"))
        .where(STATE.c.tenant_id == tenant_id)
        .group_by(STATE.c.tenant_id, *cols)
    ).all())


def overview(db: Session, tenant_id: str, *, now: datetime | None = None) -> Overview:
    now = now or utcnow()
    labels: dict[int | None, str] = dict(db.execute(
        sa.select(col(PolicyVersion.id), col(PolicyVersion.version)).where(col(PolicyVersion.tenant_id) == tenant_id)).all())
    by_purpose: dict[str, dict[int | None, VersionCounts]] = {}
    for r in _state_counts(db, tenant_id, now):
        status = derive_status(r.decision, confirmed=r.confirmed, stale=bool(r.stale))
        if status not in COUNTED:
            continue
        of_purpose = by_purpose.setdefault(r.purpose, {})
        vc = of_purpose.setdefault(r.policy_version_id, VersionCounts(labels.get(r.policy_version_id)))
        vc.counts[status] += int(r.n)
    purposes = []
    for p in catalog.list_purposes(db, tenant_id):
        versions = sorted(by_purpose.get(p.key, {}).values(), key=lambda v: (v.version is None, v.version or ""))
        totals = dict.fromkeys(COUNTED, 0)
        for v in versions:
            for k, n in v.counts.items():
                totals[k] += n
        purposes.append(PurposeOverview(p.key, p.title or p.key, p.kind, versions, totals))
    recent = db.execute(
        sa.select(col(ConsentRecord.id), col(ConsentRecord.subject_id), col(ConsentRecord.purpose), col(ConsentRecord.decision),
                  col(ConsentRecord.source), col(ConsentRecord.policy_version), col(ConsentRecord.recorded_at))
        .where(col(ConsentRecord.tenant_id) == tenant_id)
        .order_by(col(ConsentRecord.recorded_at).desc()).limit(RECENT_WINDOW)
    ).all()
    days: dict[str, dict[str, int]] = {}
    by_version: dict[str, dict[str, int]] = {}
    for r in recent:
        date = r.recorded_at.date().isoformat()
        day = days.setdefault(date, {})
        day[r.decision] = day.get(r.decision, 0) + 1
        vday = by_version.setdefault(date, {})
        vday[r.policy_version or ""] = vday.get(r.policy_version or "", 0) + 1
    withdrawals = [r._asdict() for r in recent if r.decision == "withdrawn"][:10]
    return Overview(purposes, len(recent), sum(1 for r in recent if r.source == "gpc"),
                    sorted(days.items())[-30:], withdrawals, now, sorted(by_version.items())[-30:])


def stored_overview(db: Session, tenant_id: str) -> Overview | None:
    """The tenant's overview as last computed (one row by primary key), or None."""
    row = db.get(DashboardRollup, tenant_id)
    return Overview.from_json(row.data, row.computed_at) if row is not None else None


def store_overview(db: Session, tenant_id: str, ov: Overview) -> None:
    """Keep a computed overview for the page views that follow (a newer one is never replaced)."""
    row = db.get(DashboardRollup, tenant_id)
    if row is not None and row.computed_at >= ov.computed_at:
        return
    if row is None:
        db.add(DashboardRollup(tenant_id=tenant_id, computed_at=ov.computed_at, data=ov.to_json()))
    else:
        row.computed_at, row.data = ov.computed_at, ov.to_json()
    db.flush()


# --- policy versions ----------------------------------------------------------------------

@dataclass
class VersionRow:
    version: PolicyVersion
    in_effect: bool
    # For a material version: choices (subject and purpose) of its purposes made under it or
    # later (re-consented), still under an earlier version and stale, and notices recorded.
    reconsented: int = 0
    stale: int = 0
    notified: int = 0


def policy_versions(db: Session, tenant_id: str, *, now: datetime | None = None) -> list[VersionRow]:
    """Every version of every policy, newest first, with the material versions' numbers: from
    the same grouped state counts as the overview, and the ``notified`` records read from the
    (tenant, recorded_at) index from the version's publication on."""
    now = now or utcnow()
    versions = list(db.execute(sa.select(PolicyVersion).where(col(PolicyVersion.tenant_id) == tenant_id)
                               .order_by(col(PolicyVersion.policy_key), col(PolicyVersion.id).desc())).scalars())
    rows = [VersionRow(v, v.effective_at <= now) for v in versions]
    if not any(v.material for v in versions):
        return rows
    counts = _state_counts(db, tenant_id, now)
    for row in rows:
        v = row.version
        if not v.material:
            continue
        for c in counts:
            if c.purpose not in v.purposes or c.policy_key != v.policy_key:
                continue
            if c.policy_version_id is not None and c.policy_version_id >= v.id:
                row.reconsented += int(c.n)
            elif bool(c.stale):
                row.stale += int(c.n)
        row.notified = int(db.execute(
            sa.select(sa.func.count()).select_from(ConsentRecord)
            .where(col(ConsentRecord.tenant_id) == tenant_id, col(ConsentRecord.recorded_at) >= v.published_at,
                   col(ConsentRecord.decision) == "notified", col(ConsentRecord.policy_version_id) == v.id)
        ).scalar_one())
    return rows


# --- exports and webhooks ------------------------------------------------------------------

def recent_exports(db: Session, tenant_id: str, limit: int = 20) -> list[dict[str, Any]]:
    """The tenant's latest completed exports with their manifests' claims (as signed)."""
    rows = db.execute(sa.select(ExportManifest).where(col(ExportManifest.tenant_id) == tenant_id)
                      .order_by(col(ExportManifest.created_at).desc()).limit(limit)).scalars()
    out = []
    for m in rows:
        claims = jwt.decode(m.manifest, options={"verify_signature": False})  # ours, from our table
        out.append({"row": m, "claims": claims})
    return out


def webhook_overview(db: Session, tenant_id: str, deliveries: int = 10) -> list[dict[str, Any]]:
    """Each live endpoint with its latest deliveries (status, attempts, latency of the last try)."""
    out = []
    for ep in webhooks.list_endpoints(db, tenant_id):
        items, _ = webhooks.list_deliveries(db, tenant_id, ep.id, limit=deliveries, cursor=None)
        for d in items:
            d["latency_ms"] = d["log"][-1]["duration_ms"] if d["log"] else None
        out.append({"endpoint": ep, "deliveries": items,
                    "pending": sum(1 for d in items if d["status"] == "pending"),
                    "failed": sum(1 for d in items if d["status"] == "failed")})
    return out


# --- one person ----------------------------------------------------------------------------

def find_subject(db: Session, tenant: Tenant, kind: str, value: str) -> Subject:
    """The subject of this tenant known by an email, user id, anonymous id or our id (404)."""
    value = value.strip()
    if kind not in SEARCH_KINDS:
        raise ValidationFailed.field("kind", f"must be one of {', '.join(SEARCH_KINDS)}")
    if not value or len(value) > 320 or "\x00" in value:
        raise ValidationFailed.field("q", "enter 1 to 320 characters")
    if kind == "subject":
        if not value.startswith("sub_"):
            raise NotFound("subject not found")
        return recorder.lookup_subject(db, tenant, value)
    return recorder.lookup_subject(db, tenant, f"{kind}:{value}")


@dataclass
class CheckedRecord:
    """One record of a subject's chain and what was checked about it."""

    record: ConsentRecord
    position: int
    status: str
    hash_ok: bool
    link: str  # "genesis" | "linked" | "anchor" (earlier records removed by retention) | "broken"
    receipt_problem: str | None
    kid: str | None

    @property
    def verified(self) -> bool:
        return self.hash_ok and self.link != "broken" and self.receipt_problem is None


@dataclass
class SubjectView:
    subject: Subject
    identifiers: list[dict[str, Any]]
    states: list[dict[str, Any]]
    history: list[CheckedRecord]
    head_ok: bool

    @property
    def verified(self) -> bool:
        return self.head_ok and all(r.verified for r in self.history)


def subject_view(db: Session, tenant: Tenant, subject: Subject) -> SubjectView:
    """Current state per purpose and the whole history, each record checked as ``consent
    verify`` checks an export line: its hash from its content, its link to the previous record,
    and its receipt's signature against the service's public keys (the JWKS)."""
    keys = crypto.KeySet(receipts.jwks(db))
    records = recorder.records_of(db, tenant.id, subject.id)
    history = []
    prev: str | None = None
    for i, r in enumerate(records):
        if i == 0:
            link = "genesis" if r.prev_hash is None else "anchor"
        else:
            link = "linked" if r.prev_hash == prev else "broken"
        prev = r.record_hash
        status = "erased" if r.decision == "erased" else derive_status(r.decision, confirmed=r.confirmed, stale=False)
        history.append(CheckedRecord(
            r, i + 1, status, recorder.compute_record_hash(r, subject.pseudonym) == r.record_hash, link,
            verify.receipt_problem(keys, r.receipt, r.record_hash, r.id, tenant.id), _kid(r.receipt)))
    idents = db.execute(sa.select(recorder.SI.c.kind, recorder.SI.c.value, recorder.SI.c.created_at).where(
        recorder.SI.c.tenant_id == tenant.id, recorder.SI.c.subject_id == subject.id)
        .order_by(recorder.SI.c.created_at)).all()
    return SubjectView(subject, [i._asdict() for i in idents], checks.subject_states(db, tenant, subject.id),
                       list(reversed(history)), (records[-1].record_hash if records else None) == subject.head_hash)


def _kid(token: str) -> str | None:
    try:
        kid = jwt.get_unverified_header(token).get("kid")
    except jwt.PyJWTError:  # a receipt we cannot even parse: its problem is reported separately
        return None
    return kid if isinstance(kid, str) else None


# --- the verifier --------------------------------------------------------------------------

@dataclass
class ReceiptResult:
    ok: bool
    problem: str | None
    claims: dict[str, Any] | None
    kid: str | None
    unverified: dict[str, Any] | None = None  # what a token that failed says, shown as unproven


def _unverified_claims(token: str) -> dict[str, Any] | None:
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return None
    return claims if isinstance(claims, dict) else None


def check_receipt(db: Session, token: str, issuer: str) -> ReceiptResult:
    """A pasted receipt checked against the public keys alone, as a consumer would offline."""
    token = "".join(token.split())
    kid = _kid(token)
    keys = crypto.KeySet(receipts.jwks(db))
    try:
        claims = keys.verify(token)
    except BadToken as exc:
        return ReceiptResult(False, exc.detail, None, kid, _unverified_claims(token))
    if claims.get("iss") != issuer:
        return ReceiptResult(False, f"issuer {claims.get('iss')!r} is not this service ({issuer})", claims, kid)
    return ReceiptResult(True, None, claims, kid)


def check_export(db: Session, body: bytes, manifest: str | None) -> verify.Report:
    """An uploaded export (JSONL, or CSV with its manifest) checked like ``consent verify``;
    raises ``verify.VerifyError`` naming the first line that fails."""
    keys = crypto.KeySet(receipts.jwks(db))
    lines = body.splitlines(keepends=True)
    if body.startswith(f"{verify.CSV_COLUMNS[0]},".encode()):
        if not manifest:
            raise verify.VerifyError(None, "a CSV export needs its manifest: paste it in the manifest field")
        return verify.verify_csv(lines, keys, manifest)
    return verify.verify_jsonl(lines, keys, manifest or None)


__all__ = ["ROLES", "SEARCH_KINDS", "STATUSES", "Overview", "SignedIn", "SubjectView"]
