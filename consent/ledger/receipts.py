"""Receipt signing keys (created on first start, rotated, old public keys kept) and the
receipt claims, after the Kantara Consent Receipt idea."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session
from sqlmodel import col

from consent import crypto
from consent.store.models import SigningKey, utcnow


def ensure_signing_key(db: Session) -> SigningKey:
    """The active signing key, created if there is none."""
    key = db.execute(
        sa.select(SigningKey).where(col(SigningKey.retired_at).is_(None)).order_by(col(SigningKey.created_at).desc())
    ).scalars().first()
    if key is None:
        key = _new_key(db)
    return key


def rotate_signing_key(db: Session) -> SigningKey:
    """Retire the active key (its public half stays in the JWKS) and create a new one."""
    db.execute(sa.update(SigningKey).where(SigningKey.retired_at.is_(None)).values(retired_at=utcnow()))  # type: ignore[union-attr]
    return _new_key(db)


def _new_key(db: Session) -> SigningKey:
    pair = crypto.generate_signing_key()
    key = SigningKey(kid=pair.kid, private_pem=pair.private_pem, public_jwk=pair.public_jwk, created_at=utcnow())
    db.add(key)
    db.flush()
    return key


def jwks(db: Session) -> dict[str, Any]:
    """Every public key, newest first (retired ones too, so old receipts still verify)."""
    rows = db.execute(sa.select(col(SigningKey.public_jwk)).order_by(col(SigningKey.created_at).desc())).scalars()
    return {"keys": list(rows)}


def record_claims(
    *,
    issuer: str,
    tenant_id: str,
    subject_id: str,
    record: dict[str, Any],
    policy: dict[str, Any] | None,
    purposes: list[dict[str, Any]],
    gpc: bool = False,
    tlog_index: int | None = None,
) -> dict[str, Any]:
    """Claims of a receipt for one record (``record`` holds id, hash, source, recorded_at).

    ``tlog_index`` is the record's leaf index in the tenant's transparency log: with it the
    holder fetches the record's inclusion proof later with no secret (docs/transparency.md).

    ``aud`` is the tenant: a receipt is proof for that tenant only, and a consumer that pins
    its tenant (``consumer.verify_receipt(audience=...)``) refuses another tenant's receipt."""
    now = utcnow()
    claims = {
        "iss": issuer,
        "aud": tenant_id,
        "sub": subject_id,
        "tenant": tenant_id,
        "jti": crypto.new_id("rct", 12),
        "iat": int(now.timestamp()),
        "version": "consent-receipt/1",
        "policy": policy,
        "purposes": purposes,
        "recorded_at": record["recorded_at"],
        "source": record["source"],
        "record_id": record["id"],
        "record_hash": record["record_hash"],
    }
    if gpc:  # the decision came with a Global Privacy Control signal (in the record hash too)
        claims["gpc"] = True
    if tlog_index is not None:
        claims["tlog_index"] = tlog_index
    return claims
