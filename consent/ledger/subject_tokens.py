"""Subject-token secrets of a tenant: created on first use, rotated with one predecessor kept,
and the verification the snippet route uses. The JWT work itself is in crypto.py."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from consent import crypto
from consent.store.models import SubjectTokenKey, Tenant, utcnow
from consent.store.tables import SUBJECT_TOKEN_KEY as STK

LIVE_KEYS = 2  # the signing key and the one before it (tokens live 10 minutes at most)


def live_keys(db: Session, tenant_id: str) -> list[SubjectTokenKey]:
    """The tenant's live keys, newest first."""
    q = (sa.select(SubjectTokenKey)
         .where(STK.c.tenant_id == tenant_id, STK.c.retired_at.is_(None))
         .order_by(STK.c.created_at.desc(), STK.c.kid))
    return list(db.execute(q).scalars())


def current_key(db: Session, tenant_id: str) -> SubjectTokenKey:
    """The signing key, created on first use."""
    keys = live_keys(db, tenant_id)
    return keys[0] if keys else _new_key(db, tenant_id)


def rotate(db: Session, tenant_id: str) -> SubjectTokenKey:
    """A new signing key; the previous one keeps verifying until the next rotation."""
    key = _new_key(db, tenant_id)
    old = [k.kid for k in live_keys(db, tenant_id)[LIVE_KEYS:]]
    if old:
        db.execute(sa.update(STK).where(STK.c.kid.in_(old)).values(retired_at=utcnow()))
    return key


def _new_key(db: Session, tenant_id: str) -> SubjectTokenKey:
    key = SubjectTokenKey(kid=crypto.new_id("stk", 8), tenant_id=tenant_id,
                          secret=crypto.new_subject_token_secret(), created_at=utcnow())
    db.add(key)
    db.flush()
    return key


def secret_out(db: Session, tenant_id: str, key: SubjectTokenKey) -> dict[str, Any]:
    previous = [k.kid for k in live_keys(db, tenant_id) if k.kid != key.kid]
    return {"kid": key.kid, "secret": key.secret, "algorithm": crypto.SUBJECT_TOKEN_ALGORITHM,
            "max_age_seconds": crypto.SUBJECT_TOKEN_MAX_AGE, "audience": tenant_id,
            "previous_kid": previous[0] if previous else None}


def mint(db: Session, tenant_id: str, user_id: str, ttl: int) -> dict[str, Any]:
    """A token for ``user_id`` signed with the current key (what a backend would do offline)."""
    key = current_key(db, tenant_id)
    now = int(datetime.now(UTC).timestamp())
    token = crypto.sign_subject_token(key.secret, key.kid, user_id, ttl=ttl, now=now)
    return {"token": token, "kid": key.kid, "expires_at": datetime.fromtimestamp(now + ttl, UTC)}


def verify(db: Session, tenant: Tenant, token: str) -> str:
    """The user id a valid subject token names; raises BadToken (see crypto.verify_subject_token)."""
    keys = {k.kid: k.secret for k in live_keys(db, tenant.id)}
    return str(crypto.verify_subject_token(token, keys, audience=tenant.id)["sub"])
