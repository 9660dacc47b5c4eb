"""Tenants, their API keys (stored hashed, rotatable) and admin tokens."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session, make_transient_to_detached
from sqlalchemy.orm.util import identity_key
from sqlmodel import col

from consent import crypto
from consent.errors import Conflict, NotFound
from consent.ledger.schemas import TenantIn, TenantPatch
from consent.store.models import AdminToken, ApiKey, Tenant, TenantAudit, UTCDateTime, utcnow
from consent.store.tables import API_KEY as _KEY
from consent.store.tables import TENANT as _TENANT
from consent.store.tables import TENANT_AUDIT

# How long an old key keeps working after an ordinary rotation: pages embedding a publishable
# key are cached (CDNs, static builds), secret keys live in deployments that roll out in hours.
GRACE_DEFAULTS = {"publishable": timedelta(days=7), "secret": timedelta(hours=24)}
SETTINGS_FIELDS = ("name", "allowed_origins", "notice_days", "default_lang", "store_full_ip",
                   "store_user_agent")


def key_live_sql(alias: str, now: str) -> str:
    """The one rule for "this API key works at ``now``", as SQL text for the statements written
    by hand (``statements``): ``revoked_at`` is the instant a key stops working, in
    the future while an old key is in its grace period after a rotation."""
    return f"({alias}.revoked_at IS NULL OR {alias}.revoked_at > {now})"


def key_live(table: Any, now: Any) -> Any:
    """``key_live_sql`` as a SQLAlchemy expression on the ``api_key`` table (or an alias)."""
    return sa.or_(table.c.revoked_at.is_(None), table.c.revoked_at > now)


@dataclass(frozen=True)
class Principal:
    """Who is calling: the tenant and the kind of key (``secret`` or ``publishable``)."""

    tenant_id: str
    kind: str
    key_id: str
    hash_key: str = field(default="", repr=False, compare=False)  # the tenant's, read with the key
    # The whole tenant row, read with the key (perf: ``Ctx.tenant`` needs no second query).
    tenant_row: dict[str, Any] | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class TenantRef:
    """What the check queries need of a tenant (read in the same query as the API key)."""

    id: str
    hash_key: str = field(repr=False)


def create_tenant(db: Session, spec: TenantIn) -> tuple[Tenant, dict[str, str]]:
    """A new tenant with one secret and one publishable key (returned raw, once)."""
    tenant = Tenant(
        id=crypto.new_id("ten", 8),
        name=spec.name,
        allowed_origins=spec.allowed_origins,
        notice_days=spec.notice_days,
        store_full_ip=spec.store_full_ip,
        store_user_agent=spec.store_user_agent,
        default_lang=spec.default_lang,
        hash_key=crypto.new_secret_hex(),
        token_secret=crypto.new_secret_hex(),
        created_at=utcnow(),
    )
    db.add(tenant)
    db.flush()
    keys = {kind: issue_key(db, tenant.id, kind) for kind in ("secret", "publishable")}
    return tenant, keys


def issue_key(db: Session, tenant_id: str, kind: str) -> str:
    raw = crypto.new_api_key(kind)
    db.add(
        ApiKey(
            id=crypto.new_id("key", 8),
            tenant_id=tenant_id,
            kind=kind,
            key_hash=crypto.hash_token(raw),
            prefix=raw[:7],
            created_at=utcnow(),
        )
    )
    db.flush()
    return raw


def rotation_kinds(kind: str) -> list[str]:
    """The key kinds a rotation request names: ``secret``, ``publishable`` or ``both``."""
    return ["secret", "publishable"] if kind == "both" else [kind]


def grace_periods(publishable_days: int | None, secret_hours: int | None) -> dict[str, timedelta]:
    """Per-call grace periods for ``rotate_keys``; a kind left out keeps its default."""
    grace = {}
    if publishable_days is not None:
        grace["publishable"] = timedelta(days=publishable_days)
    if secret_hours is not None:
        grace["secret"] = timedelta(hours=secret_hours)
    return grace


def rotate_keys(db: Session, tenant_id: str, kinds: list[str], *, actor: str = "cli", leaked: bool = False,
                grace: dict[str, timedelta] | None = None) -> dict[str, str]:
    """Issue a fresh key of each kind. The keys it replaces keep working for their grace period
    (``GRACE_DEFAULTS``, or ``grace``), or stop at once when ``leaked``; a key already in its
    grace period never gets longer."""
    if get_tenant(db, tenant_id).closed_at is not None:
        raise Conflict("the tenant is closed; its keys stay revoked", code="tenant_closed")
    now = utcnow()
    out, before, after = {}, [], []
    for kind in kinds:
        until = now if leaked else now + (grace or {}).get(kind, GRACE_DEFAULTS[kind])
        old = db.execute(sa.select(ApiKey).where(
            _KEY.c.tenant_id == tenant_id, _KEY.c.kind == kind, key_live(_KEY, now))).scalars().all()
        for key in old:
            before.append(key_view(key))
            key.revoked_at = until if key.revoked_at is None else min(key.revoked_at, until)
            after.append(key_view(key))
        out[kind] = issue_key(db, tenant_id, kind)
    db.flush()
    record_change(db, tenant_id, actor, "keys.rotate", {"keys": before},
                  {"keys": after, "leaked": leaked, "issued": [{"kind": k, "prefix": v[:7]} for k, v in out.items()]})
    return out


def revoke_all_keys(db: Session, tenant_id: str, actor: str) -> int:
    """Every key of the tenant stops working now (grace periods included); how many did."""
    now = utcnow()
    keys = db.execute(sa.select(ApiKey).where(_KEY.c.tenant_id == tenant_id, key_live(_KEY, now))).scalars().all()
    for key in keys:
        key.revoked_at = now
    db.flush()
    return len(keys)


def key_view(key: ApiKey) -> dict[str, Any]:
    """An API key as the API shows it (never its hash)."""
    return {"id": key.id, "kind": key.kind, "prefix": key.prefix, "created_at": key.created_at,
            "expires_at": key.revoked_at}


def live_keys(db: Session, tenant_id: str) -> list[dict[str, Any]]:
    """The tenant's keys that work now, current ones first, then old ones by expiry."""
    keys = db.execute(sa.select(ApiKey).where(_KEY.c.tenant_id == tenant_id, key_live(_KEY, utcnow()))
                      .order_by(_KEY.c.kind, _KEY.c.created_at.desc())).scalars().all()
    return [key_view(k) for k in keys]


def update_settings(db: Session, tenant: Tenant, patch: TenantPatch, actor: str) -> dict[str, Any]:
    """Apply the given settings; one audit entry with what changed (nothing changed: none)."""
    before, after = {}, {}
    for name in SETTINGS_FIELDS:
        if name not in patch.model_fields_set:
            continue
        value = getattr(patch, name)
        if getattr(tenant, name) != value:
            before[name], after[name] = getattr(tenant, name), value
            setattr(tenant, name, value)
    if after:
        db.flush()
        record_change(db, tenant.id, actor, "settings.update", before, after)
    return after


def record_change(db: Session, tenant_id: str, actor: str, action: str, before: dict[str, Any],
                  after: dict[str, Any]) -> None:
    """Append one entry to the tenant's audit trail (in the caller's transaction)."""
    db.add(TenantAudit(tenant_id=tenant_id, actor=actor, action=action, changed_at=utcnow(),
                       before=_jsonable(before), after=_jsonable(after)))
    db.flush()


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return crypto.iso(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def audit_trail(db: Session, tenant_id: str, *, limit: int, cursor: str | None) -> tuple[list[TenantAudit], str | None]:
    """The tenant's audit entries, newest first; ``cursor`` is the last id of the previous page."""
    from consent.errors import ValidationFailed

    audit = TENANT_AUDIT
    q = sa.select(TenantAudit).where(audit.c.tenant_id == tenant_id)
    if cursor is not None:
        if not cursor.isdigit() or len(cursor) > 18:
            raise ValidationFailed.field("cursor", "not a cursor from this list")
        q = q.where(audit.c.id < int(cursor))
    rows = list(db.execute(q.order_by(audit.c.id.desc()).limit(limit + 1)).scalars())
    nxt = str(rows[limit - 1].id) if len(rows) > limit else None
    return rows[:limit], nxt


def get_tenant(db: Session, tenant_id: str) -> Tenant:
    tenant = db.get(Tenant, tenant_id)
    if tenant is None:
        raise NotFound(f"tenant {tenant_id!r} not found")
    return tenant


# Perf: the key and its tenant's hash key in one indexed join (unique key_hash), so a check
# needs no second query for the tenant (2 queries per GET /v1/check instead of 3); Core
# columns run on the connection, skipping the ORM execute path (~120 us CPU per request).
_TENANT_COLS = [c.key for c in _TENANT.c]
_KEY_LOOKUP = (
    sa.select(_KEY.c.tenant_id, _KEY.c.kind, _KEY.c.id, _KEY.c.key_hash, _TENANT.c.hash_key,
              *[_TENANT.c[k].label(f"t_{k}") for k in _TENANT_COLS])
    .join(_TENANT, _TENANT.c.id == _KEY.c.tenant_id)
    .where(_KEY.c.key_hash == sa.bindparam("h"), key_live(_KEY, sa.bindparam("now", type_=UTCDateTime())))
)


def authenticate_key(db: Session, raw: str) -> Principal | None:
    """The principal behind a raw API key, or None (unknown or revoked)."""
    digest = crypto.hash_token(raw)
    row = db.connection().execute(_KEY_LOOKUP, {"h": digest, "now": utcnow()}).first()
    if row is None or not crypto.tokens_equal(row.key_hash, digest):
        return None
    m = row._mapping
    return Principal(tenant_id=row.tenant_id, kind=row.kind, key_id=row.id, hash_key=row.hash_key,
                     tenant_row={k: m[f"t_{k}"] for k in _TENANT_COLS})


def attach_tenant(db: Session, row: dict[str, Any]) -> Tenant:
    """The tenant as a persistent object of this session, built from a row already read (no
    query); changes to it flush as usual. The session's own copy wins if it has one."""
    existing = db.identity_map.get(identity_key(Tenant, row["id"]))
    if existing is not None:
        return existing
    tenant = Tenant(**row)
    make_transient_to_detached(tenant)
    db.add(tenant)
    return tenant


def create_admin_token(db: Session) -> str:
    raw = "adm_" + crypto.new_secret_hex(24)
    db.add(AdminToken(id=crypto.new_id("adm", 6), token_hash=crypto.hash_token(raw), created_at=utcnow()))
    db.flush()
    return raw


def is_admin_token(db: Session, raw: str, env_token: str | None) -> bool:
    if env_token and crypto.tokens_equal(raw, env_token):
        return True
    digest = crypto.hash_token(raw)
    row = db.execute(
        sa.select(col(AdminToken.token_hash)).where(
            col(AdminToken.token_hash) == digest, col(AdminToken.revoked_at).is_(None)
        )
    ).first()
    return row is not None and crypto.tokens_equal(row.token_hash, digest)
