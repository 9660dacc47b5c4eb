"""Purposes, cookie disclosures and immutable policy versions of a tenant."""

from __future__ import annotations

import base64
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from sqlmodel import col

from consent.errors import BadRequest, Conflict, NotFound, ValidationFailed
from consent.ledger.schemas import CookieIn, PolicyVersionIn, PurposeIn
from consent.store.models import Cookie, PolicyPurpose, PolicyVersion, Purpose, utcnow
from consent.store.tables import POLICY_PURPOSE, POLICY_VERSION

CLOCK_SKEW = timedelta(minutes=1)


def put_purpose(db: Session, tenant_id: str, key: str, spec: PurposeIn) -> tuple[Purpose, bool]:
    """Create or update a purpose; returns (purpose, created)."""
    now = utcnow()
    purpose = db.get(Purpose, (tenant_id, key))
    data = spec.model_dump(mode="json")
    if purpose is None:
        purpose = Purpose(tenant_id=tenant_id, key=key, created_at=now, updated_at=now, **data)
        db.add(purpose)
        db.flush()
        return purpose, True
    if purpose.kind != spec.kind and _purpose_published(db, tenant_id, key):
        raise Conflict(f"purpose {key!r} is in a published policy version; its kind cannot change")
    for name, value in data.items():
        setattr(purpose, name, value)
    purpose.updated_at = now
    db.flush()
    return purpose, False


def _purpose_published(db: Session, tenant_id: str, key: str) -> bool:
    q = sa.select(col(PolicyPurpose.policy_version_id)).where(
        col(PolicyPurpose.tenant_id) == tenant_id, col(PolicyPurpose.purpose) == key
    )
    return db.execute(q.limit(1)).first() is not None


def get_purpose(db: Session, tenant_id: str, key: str) -> Purpose | None:
    return db.get(Purpose, (tenant_id, key))


def list_purposes(db: Session, tenant_id: str) -> list[Purpose]:
    q = sa.select(Purpose).where(col(Purpose.tenant_id) == tenant_id).order_by(col(Purpose.key))
    return list(db.execute(q).scalars())


def put_cookie(db: Session, tenant_id: str, name: str, spec: CookieIn) -> tuple[Cookie, bool]:
    """Create or update a cookie disclosure; its purpose must exist."""
    if get_purpose(db, tenant_id, spec.purpose) is None:
        raise ValidationFailed.field("purpose", f"unknown purpose {spec.purpose!r}")
    now = utcnow()
    data = spec.model_dump(mode="json")
    data["lifetime"] = str(data["lifetime"])
    cookie = db.get(Cookie, (tenant_id, name))
    created = cookie is None
    if cookie is None:
        cookie = Cookie(tenant_id=tenant_id, name=name, created_at=now, updated_at=now, **data)
        db.add(cookie)
    else:
        for field, value in data.items():
            setattr(cookie, field, value)
        cookie.updated_at = now
    db.flush()
    return cookie, created


def list_cookies(db: Session, tenant_id: str) -> list[Cookie]:
    q = sa.select(Cookie).where(col(Cookie.tenant_id) == tenant_id).order_by(col(Cookie.name))
    return list(db.execute(q).scalars())


def cookie_out(cookie: Cookie) -> dict[str, Any]:
    """The public shape of a disclosure (also the snapshot kept in versions and records)."""
    lifetime: str | int = cookie.lifetime if cookie.lifetime == "session" else int(cookie.lifetime)
    return {
        "name": cookie.name,
        "provider": cookie.provider,
        "purpose": cookie.purpose,
        "http_only": cookie.http_only,
        "secure": cookie.secure,
        "same_site": cookie.same_site,
        "lifetime": lifetime,
        "description": cookie.description,
        "translations": cookie.translations,
    }


def publish_version(
    db: Session, tenant_id: str, notice_days: int, policy_key: str, spec: PolicyVersionIn
) -> PolicyVersion:
    """Publish an immutable policy version, enforcing the notice period for material ones."""
    now = utcnow()
    errors: list[dict[str, str]] = []
    known = {p.key for p in list_purposes(db, tenant_id)}
    for i, key in enumerate(spec.purposes):
        if key not in known:
            errors.append({"field": f"purposes[{i}]", "message": f"unknown purpose {key!r}"})
    if len(set(spec.purposes)) != len(spec.purposes):
        errors.append({"field": "purposes", "message": "purposes must not repeat"})
    cookies = {c.name: c for c in list_cookies(db, tenant_id)}
    if spec.cookies is None:
        chosen = [c for c in cookies.values() if c.purpose in spec.purposes]
    else:
        chosen = []
        for i, name in enumerate(spec.cookies):
            if name not in cookies:
                errors.append({"field": f"cookies[{i}]", "message": f"unknown cookie {name!r}"})
            elif cookies[name].purpose not in spec.purposes:
                errors.append({"field": f"cookies[{i}]", "message": f"cookie {name!r} is for purpose "
                               f"{cookies[name].purpose!r}, which this version does not cover"})
            else:
                chosen.append(cookies[name])
        if len(set(spec.cookies)) != len(spec.cookies):
            errors.append({"field": "cookies", "message": "cookies must not repeat"})
    earliest = earliest_effective(notice_days, material=spec.material, now=now)
    effective = spec.effective_at or earliest
    if spec.material and effective < earliest - CLOCK_SKEW:
        errors.append({
            "field": "effective_at",
            "message": f"a material version may take effect no sooner than {notice_days} days "
            f"after publication (the tenant's notice period): {earliest.isoformat()}",
        })
    elif effective < now - CLOCK_SKEW:
        errors.append({"field": "effective_at", "message": "may not be before publication"})
    if errors:
        raise ValidationFailed(errors)
    version = PolicyVersion(
        tenant_id=tenant_id,
        policy_key=policy_key,
        version=spec.version,
        document_url=spec.document_url,
        document_sha256=spec.document_sha256,
        published_at=now,
        effective_at=effective,
        material=spec.material,
        purposes=list(spec.purposes),
        cookies=[cookie_out(c) for c in chosen],
    )
    try:
        with db.begin_nested():
            db.add(version)
            db.flush()
    except IntegrityError as exc:
        raise Conflict(f"policy {policy_key!r} already has version {spec.version!r}") from exc
    assert version.id is not None  # the flush above assigned it
    for key in spec.purposes:
        db.add(PolicyPurpose(
            policy_version_id=version.id, purpose=key, tenant_id=tenant_id, policy_key=policy_key,
            material=spec.material, effective_at=effective,
        ))
    db.flush()
    return version


def earliest_effective(notice_days: int, *, material: bool, now: datetime) -> datetime:
    """The earliest a version published ``now`` may take effect (and its default): a material
    one after the tenant's notice period, any other at once."""
    return now + timedelta(days=notice_days) if material else now


def version_out(v: PolicyVersion) -> dict[str, Any]:
    return {
        "policy": v.policy_key,
        "version": v.version,
        "document_url": v.document_url,
        "document_sha256": v.document_sha256,
        "published_at": v.published_at,
        "effective_at": v.effective_at,
        "material": v.material,
        "purposes": v.purposes,
        "cookies": v.cookies,
    }


def encode_cursor(value: int) -> str:
    return base64.urlsafe_b64encode(str(value).encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> int | None:
    if not cursor:
        return None
    try:
        value = int(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode())
    except ValueError as exc:
        raise BadRequest("cursor is not one this service issued", code="bad_cursor") from exc
    if not 0 < value < 2**63:  # ids are positive BIGINTs; larger values overflow the driver
        raise BadRequest("cursor is not one this service issued", code="bad_cursor")
    return value


def list_versions(
    db: Session, tenant_id: str, policy_key: str, *, limit: int, cursor: str | None
) -> tuple[list[PolicyVersion], str | None]:
    """Versions newest first, cursor-paginated."""
    q = sa.select(PolicyVersion).where(
        col(PolicyVersion.tenant_id) == tenant_id, col(PolicyVersion.policy_key) == policy_key
    )
    after = decode_cursor(cursor)
    if after is not None:
        q = q.where(col(PolicyVersion.id) < after)
    rows = list(db.execute(q.order_by(col(PolicyVersion.id).desc()).limit(limit + 1)).scalars())
    more = len(rows) > limit
    rows = rows[:limit]
    if not (more and rows):
        return rows, None
    last = rows[-1].id
    assert last is not None  # a stored version has its id
    return rows, encode_cursor(last)


def get_version(db: Session, tenant_id: str, policy_key: str, version: str) -> PolicyVersion | None:
    q = sa.select(PolicyVersion).where(
        col(PolicyVersion.tenant_id) == tenant_id,
        col(PolicyVersion.policy_key) == policy_key,
        col(PolicyVersion.version) == version,
    )
    return db.execute(q).scalars().first()


def current_version(
    db: Session, tenant_id: str, policy_key: str, at: datetime | None = None, purpose: str | None = None
) -> PolicyVersion | None:
    """The newest version in effect at ``at`` (default now), optionally covering ``purpose``."""
    q = sa.select(PolicyVersion).where(
        col(PolicyVersion.tenant_id) == tenant_id,
        col(PolicyVersion.policy_key) == policy_key,
        col(PolicyVersion.effective_at) <= (at or utcnow()),
    )
    if purpose is not None:
        q = q.join(PolicyPurpose, col(PolicyPurpose.policy_version_id) == col(PolicyVersion.id)).where(
            col(PolicyPurpose.purpose) == purpose
        )
    return db.execute(q.order_by(col(PolicyVersion.id).desc()).limit(1)).scalars().first()


def _purpose_and_version_query(named: bool) -> Any:
    pv = POLICY_VERSION
    pp = POLICY_PURPOSE
    of_policy = (pv.c.tenant_id == sa.bindparam("t"), pv.c.policy_key == sa.bindparam("k"))
    if named:
        vid = sa.select(pv.c.id).where(*of_policy, pv.c.version == sa.bindparam("v")).limit(1)
    else:
        vid = (sa.select(pv.c.id).join(pp, pp.c.policy_version_id == pv.c.id)
               .where(*of_policy, pv.c.effective_at <= sa.bindparam("at", type_=pv.c.effective_at.type),
                      pp.c.purpose == sa.bindparam("p"))
               .order_by(pv.c.id.desc()).limit(1))
    return (sa.select(Purpose, PolicyVersion).select_from(Purpose)
            .outerjoin(PolicyVersion, col(PolicyVersion.id) == vid.scalar_subquery())
            .where(col(Purpose.tenant_id) == sa.bindparam("t"), col(Purpose.key) == sa.bindparam("p")))


# Built once (perf: building and cache-keying the statement per call cost more than running it).
_PURPOSE_AND_VERSION = {named: _purpose_and_version_query(named) for named in (True, False)}


def purpose_and_version(
    db: Session, tenant_id: str, purpose: str, policy_key: str, version: str | None, at: datetime
) -> tuple[Purpose | None, PolicyVersion | None]:
    """In one statement (perf: the record path): the purpose, and the version ``version`` of
    the policy if named, else the newest one in effect at ``at`` covering the purpose
    (``get_version`` / ``current_version``). (None, None) when the purpose is unknown."""
    params: dict[str, Any] = {"t": tenant_id, "k": policy_key, "p": purpose}
    if version:
        params["v"] = version
    else:
        params["at"] = at
    row = db.execute(_PURPOSE_AND_VERSION[bool(version)], params).first()
    return (row[0], row[1]) if row is not None else (None, None)


def require_version(db: Session, tenant_id: str, policy_key: str, version: str) -> PolicyVersion:
    v = get_version(db, tenant_id, policy_key, version)
    if v is None:
        raise NotFound(f"policy {policy_key!r} has no version {version!r}")
    return v
