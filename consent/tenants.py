"""Tenants, their API keys (stored hashed, rotatable) and admin tokens."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session, make_transient_to_detached
from sqlalchemy.orm.util import identity_key

from . import crypto
from .errors import NotFound
from .models import AdminToken, ApiKey, Tenant, utcnow
from .schemas import TenantIn


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


def rotate_keys(db: Session, tenant_id: str, kinds: list[str]) -> dict[str, str]:
    """Revoke every live key of each kind and issue a fresh one."""
    get_tenant(db, tenant_id)
    out = {}
    for kind in kinds:
        db.execute(
            sa.update(ApiKey)
            .where(ApiKey.tenant_id == tenant_id, ApiKey.kind == kind, ApiKey.revoked_at.is_(None))  # type: ignore[union-attr]
            .values(revoked_at=utcnow())
        )
        out[kind] = issue_key(db, tenant_id, kind)
    return out


def get_tenant(db: Session, tenant_id: str) -> Tenant:
    tenant = db.get(Tenant, tenant_id)
    if tenant is None:
        raise NotFound(f"tenant {tenant_id!r} not found")
    return tenant


_KEY = ApiKey.__table__  # type: ignore[attr-defined]
_TENANT = Tenant.__table__  # type: ignore[attr-defined]
# Perf: the key and its tenant's hash key in one indexed join (unique key_hash), so a check
# needs no second query for the tenant (2 queries per GET /v1/check instead of 3); Core
# columns run on the connection, skipping the ORM execute path (~120 us CPU per request).
_TENANT_COLS = [c.key for c in _TENANT.c]
_KEY_LOOKUP = (
    sa.select(_KEY.c.tenant_id, _KEY.c.kind, _KEY.c.id, _KEY.c.key_hash, _TENANT.c.hash_key,
              *[_TENANT.c[k].label(f"t_{k}") for k in _TENANT_COLS])
    .join(_TENANT, _TENANT.c.id == _KEY.c.tenant_id)
    .where(_KEY.c.key_hash == sa.bindparam("h"), _KEY.c.revoked_at.is_(None))
)


def authenticate_key(db: Session, raw: str) -> Principal | None:
    """The principal behind a raw API key, or None (unknown or revoked)."""
    digest = crypto.hash_token(raw)
    row = db.connection().execute(_KEY_LOOKUP, {"h": digest}).first()
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
        return existing  # type: ignore[no-any-return]
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
        sa.select(AdminToken.token_hash).where(
            AdminToken.token_hash == digest, AdminToken.revoked_at.is_(None)  # type: ignore[union-attr]
        )
    ).first()
    return row is not None and crypto.tokens_equal(row.token_hash, digest)
