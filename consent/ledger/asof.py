"""As-of answers: the state of a purpose as it was at a past time T, derived from the ledger
rows recorded at or before T (never from consent_state, which only knows "now").

Staleness is judged as of T too: a material version counts only if it had taken effect by T.
The receipt returned is the one of the record that was in force at T.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session
from sqlmodel import col

from consent import crypto
from consent.errors import ValidationFailed
from consent.ledger import statements
from consent.ledger.catalog import get_purpose, list_purposes
from consent.ledger.checks import decision_answer, purpose_states
from consent.ledger.recorder import SI
from consent.ledger.tenants import TenantRef
from consent.store.models import Subject, Tenant, utcnow
from consent.store.tables import RECORD as REC

SKEW = timedelta(seconds=5)


def require_past(at: datetime) -> datetime:
    """``at`` may not lie in the future: the ledger does not know it yet."""
    if at > utcnow() + SKEW:
        raise ValidationFailed.field("at", "must not be in the future")
    return at


def _latest(db: Session, tenant_id: str, subject_id: str, at: datetime, purpose: str | None = None) -> list[Any]:
    q = (sa.select(REC.c.purpose, REC.c.decision, REC.c.confirmed, REC.c.policy_key, REC.c.policy_version_id,
                   REC.c.policy_version, REC.c.id, REC.c.receipt, REC.c.recorded_at, REC.c.seq, REC.c.gpc)
         .where(REC.c.tenant_id == tenant_id, REC.c.subject_id == subject_id, REC.c.recorded_at <= at,
                REC.c.decision.not_in(("erased", "notified"))))  # notified: told of a change, not a choice
    if purpose is not None:
        q = q.where(REC.c.purpose == purpose)
    # The newest decision by recorded_at wins (ties: the later write), as in consent_state.
    latest: dict[str, Any] = {}
    for row in db.execute(q.order_by(REC.c.recorded_at, REC.c.seq)):
        latest[row.purpose] = row
    return list(latest.values())


def _stale(db: Session, tenant_id: str, row: Any, at: datetime) -> bool:
    if row.policy_version_id is None:
        return False
    return bool(db.execute(sa.select(statements.stale(
        tenant_id, row.purpose, row.policy_key, row.policy_version_id, at))).scalar())


def _subject_id(db: Session, tenant: Tenant | TenantRef, kind: str, value: str) -> str | None:
    if kind == "id":
        return db.execute(sa.select(col(Subject.id)).where(col(Subject.id) == value,
                                                           col(Subject.tenant_id) == tenant.id)).scalar()
    if kind == "email":
        value = crypto.normalize_email(value)
    h = crypto.keyed_hash(tenant.hash_key, kind, value)
    return db.execute(sa.select(SI.c.subject_id).where(
        SI.c.tenant_id == tenant.id, SI.c.kind == kind, SI.c.value_hash == h)).scalar()


def check_at(db: Session, tenant: Tenant | TenantRef, *, purpose: str, kind: str, value: str, at: datetime) -> dict[str, Any]:
    """Like ``checks.check``, as it would have answered at ``at``."""
    require_past(at)
    if get_purpose(db, tenant.id, purpose) is None:
        raise ValidationFailed.field("purpose", f"unknown purpose {purpose!r}")
    sid = _subject_id(db, tenant, kind, value)
    rows = _latest(db, tenant.id, sid, at, purpose) if sid else []
    row = rows[0] if rows else None
    return {"purpose": purpose, "subject": sid, **decision_answer(
        row.decision if row else None, confirmed=row and row.confirmed,
        stale=row is not None and _stale(db, tenant.id, row, at), policy_version=row and row.policy_version,
        record_id=row and row.id, receipt=row and row.receipt, gpc=row and row.gpc)}


def subject_states_at(db: Session, tenant: Tenant, subject_id: str, at: datetime) -> list[dict[str, Any]]:
    """Like ``checks.subject_states``, as it was at ``at``."""
    require_past(at)
    by_purpose = {r.purpose: r for r in _latest(db, tenant.id, subject_id, at)}
    return purpose_states(list_purposes(db, tenant.id), by_purpose,
                          lambda r: _stale(db, tenant.id, r, at), lambda r: r.id)
