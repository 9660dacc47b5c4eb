"""Policy-change notices: who must be told about a new (material) version before it takes
effect, and ``notified`` records proving that they were, per subject and purpose.

A subject must be told when their current decision for one of the version's purposes was made
under an *earlier* version of the same policy. A ``notified`` record names the new version,
changes no consent state, and is idempotent per (version, subject, purpose).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from consent import crypto
from consent.errors import IdempotencyConflict
from consent.ledger import events, recorder, statements
from consent.ledger.schemas import ConsentIn, Evidence, SubjectRef
from consent.ledger.state import derive_status
from consent.store.db import transaction
from consent.store.models import PolicyVersion, Tenant
from consent.store.tables import RECORD as REC
from consent.store.tables import STATE

SUBJECT = statements.SUBJECT
PAGE = 500


def _candidates(version: PolicyVersion) -> Any:
    return sa.and_(
        STATE.c.tenant_id == version.tenant_id,
        STATE.c.purpose.in_(list(version.purposes)),
        STATE.c.policy_key == version.policy_key,
        STATE.c.policy_version_id < version.id,
    )


def page(db: Session, version: PolicyVersion, *, after: str | None, limit: int) -> list[dict[str, Any]]:
    """Up to ``limit`` subjects (ordered by id, after ``after``) who must be told, with what was sent."""
    q = sa.select(STATE.c.subject_id).where(_candidates(version)).distinct().order_by(STATE.c.subject_id)
    if after:
        q = q.where(STATE.c.subject_id > after)
    ids = list(db.execute(q.limit(limit)).scalars())
    if not ids:
        return []
    states = db.execute(sa.select(STATE).where(_candidates(version), STATE.c.subject_id.in_(ids))
                        .order_by(STATE.c.subject_id, STATE.c.purpose)).all()
    told = {(r.subject_id, r.purpose): r.recorded_at for r in db.execute(
        sa.select(REC.c.subject_id, REC.c.purpose, sa.func.min(REC.c.recorded_at).label("recorded_at"))
        .where(REC.c.tenant_id == version.tenant_id, REC.c.decision == "notified",
               REC.c.policy_version_id == version.id, REC.c.subject_id.in_(ids))
        .group_by(REC.c.subject_id, REC.c.purpose))}
    idents = events.identifiers(db, version.tenant_id, ids)
    out: dict[str, dict[str, Any]] = {}
    for s in states:
        ident = idents.get(s.subject_id, {})
        line = out.setdefault(s.subject_id, {"subject": s.subject_id, **ident, "reachable": bool(ident),
                                             "purposes": [], "notified": True})
        at = told.get((s.subject_id, s.purpose))
        line["purposes"].append({"purpose": s.purpose, "policy_version": s.policy_version,
                                 "status": derive_status(s.decision, confirmed=s.confirmed, stale=False),
                                 "notified_at": crypto.iso(at) if at else None})
        line["notified"] = line["notified"] and at is not None
    return [out[i] for i in ids if i in out]


def stream(engine: Engine, tenant_id: str, version_id: int, *, pending_only: bool) -> Iterator[dict[str, Any]]:
    """Every subject to tell, page by page, each page in its own short read transaction."""
    after: str | None = None
    while True:
        with transaction(engine) as db:
            version = db.get(PolicyVersion, version_id)
            assert version is not None and version.tenant_id == tenant_id
            lines = page(db, version, after=after, limit=PAGE)
        if not lines:
            return
        for line in lines:
            if not (pending_only and line["notified"]):
                yield line
        after = lines[-1]["subject"]


def record_notices(db: Session, tenant: Tenant, version: PolicyVersion, *, limit: int,
                   evidence: dict[str, Any] | None, signer: crypto.Signer, issuer: str) -> dict[str, Any]:
    """Record up to ``limit`` ``notified`` records for subjects not yet told; call again until done."""
    _lock_subjects(db, version, limit)
    done = 0
    after: str | None = None
    more = False
    while True:
        lines = page(db, version, after=after, limit=PAGE)
        if not lines:
            break
        for line in lines:
            for p in line["purposes"]:
                if p["notified_at"] is not None:
                    continue
                if done >= limit:
                    more = True
                    break
                ref = _ref(line)
                if ref is None:  # erased meanwhile: nobody left to tell
                    continue
                spec = ConsentIn(subject=ref, purpose=p["purpose"], decision="notified", source="api",
                                 policy=version.policy_key, policy_version=version.version,
                                 evidence=Evidence.model_validate({**(evidence or {}), "notice_for_version": version.version,
                                                                   "effective_at": crypto.iso(version.effective_at)}))
                try:
                    r = recorder.record_decision(db, tenant, spec, signer=signer, issuer=issuer,
                                               idempotency_key=f"notice:{version.id}:{line['subject']}:{p['purpose']}")
                except IdempotencyConflict:  # told by a concurrent call a moment ago
                    continue
                done += r.created
            if more:
                break
        if more:
            break
        after = lines[-1]["subject"]
    return {"policy": version.policy_key, "version": version.version, "effective_at": version.effective_at,
            "notified": done, "more": more}


def _lock_subjects(db: Session, version: PolicyVersion, limit: int) -> None:
    """Lock, in id order, the subjects this call will tell, before its first record takes the
    tenant's transparency-log counter row (events.next_leaf, held to commit): every writer locks
    subject rows before that row, so no deadlock cycle can close."""
    ids: list[str] = []
    wanted, after = 0, None
    while wanted < limit:
        lines = page(db, version, after=after, limit=PAGE)
        if not lines:
            break
        for line in lines:
            untold = sum(p["notified_at"] is None for p in line["purposes"])
            if untold and _ref(line) is not None:
                ids.append(line["subject"])
                wanted += untold
        after = lines[-1]["subject"]
    ids.sort()
    for i in range(0, len(ids), PAGE):
        db.execute(sa.select(SUBJECT.c.id).where(SUBJECT.c.id.in_(ids[i:i + PAGE]))
                   .order_by(SUBJECT.c.id).with_for_update()).all()


def _ref(line: dict[str, Any]) -> SubjectRef | None:
    if line.get("user_id"):
        return SubjectRef(user_id=line["user_id"])
    if line.get("email"):
        return SubjectRef(email=line["email"])
    return None
