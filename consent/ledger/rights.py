"""Data-subject rights: the access export (everything held about one person) and erasure.

Erasure is the one documented exception to "records are never updated": it deletes the
person's identifiers (raw values and their lookup hashes, so nobody can find them again by
email, user id or anonymous id), sets the evidence of their records to NULL (the
``evidence_sha256`` stays, inside every record hash), and appends an ``erased`` record to the
subject's chain. Decisions, hashes and receipts stay under the keyed pseudonym, so every
chain and every export still verifies.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session
from sqlmodel import col

from consent import crypto
from consent.ledger import checks, events
from consent.ledger.receipts import record_claims
from consent.ledger.recorder import (
    SI,
    NewRecord,
    insert_record,
    lock_subject,
    move_head,
    seal_record,
)
from consent.ledger.state import derive_status
from consent.store.db import rowcount
from consent.store.models import ConsentRecord, Subject, Tenant, utcnow
from consent.store.tables import RECORD as REC

ERASED = "erased"
MERGED = "merged"  # consent/ledger/identity.py: one person's two subjects joined
ALL_PURPOSES = "*"  # the purpose of an erasure record: it concerns the whole subject


def _record(r: ConsentRecord) -> dict[str, Any]:
    status = r.decision if r.decision in (ERASED, MERGED) else derive_status(r.decision, confirmed=r.confirmed, stale=False)
    return {
        "id": r.id, "purpose": r.purpose, "decision": r.decision, "confirmed": r.confirmed,
        "status_when_recorded": status,
        "policy": {"key": r.policy_key, "version": r.policy_version}, "source": r.source,
        "evidence": r.evidence, "evidence_sha256": r.evidence_sha256, "disclosures": r.disclosures,
        "recorded_at": r.recorded_at, "prev_hash": r.prev_hash, "record_hash": r.record_hash,
        "receipt": r.receipt,
    }


def access_export(db: Session, tenant: Tenant, subject: Subject, *, signer: crypto.Signer,
                  issuer: str) -> dict[str, Any]:
    """Identifiers (raw where still held), every record with its evidence, current state, receipts."""
    idents = db.execute(sa.select(SI.c.kind, SI.c.value, SI.c.created_at)
                        .where(SI.c.tenant_id == tenant.id, SI.c.subject_id == subject.id)
                        .order_by(SI.c.created_at, SI.c.kind)).all()
    records = db.execute(sa.select(ConsentRecord).where(
        col(ConsentRecord.tenant_id) == tenant.id, col(ConsentRecord.subject_id) == subject.id,
    ).order_by(col(ConsentRecord.seq))).scalars().all()
    states = checks.subject_states(db, tenant, subject.id)
    receipt = signer.sign(checks.state_receipt_claims(issuer, tenant, subject.id, states))
    return {
        "subject": subject.id,
        "pseudonym": subject.pseudonym,
        "tenant": tenant.id,
        "created_at": subject.created_at,
        "erased_at": subject.erased_at,
        "generated_at": utcnow(),
        "identifiers": [{"kind": i.kind, "value": i.value, "created_at": i.created_at} for i in idents],
        "records": [_record(r) for r in records],
        "state": states,
        "state_receipt": receipt,
        "chain_head": subject.head_hash,
    }


# What people typed (user agents, evidence, identifiers) reaches this document: as text,
# never as Markdown or HTML (no links, images, tags or table breaks a renderer would act on).
_MD_ESCAPE = str.maketrans({**{c: "\\" + c for c in "\\`*_[]()!|~>"},
                            "<": "&lt;", "&": "&amp;", "\n": " ", "\r": " "})


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if hasattr(v, "isoformat"):
        return crypto.iso(v)
    return str(v).translate(_MD_ESCAPE)


def access_markdown(data: dict[str, Any]) -> str:
    """The access export as a Markdown document a person can read."""
    out = [f"# Data held about subject `{data['subject']}`", "",
           f"- Tenant: `{data['tenant']}`",
           f"- Pseudonym (used in audit exports): `{data['pseudonym']}`",
           f"- First seen: {_cell(data['created_at'])}",
           f"- Erased: {_cell(data['erased_at']) or 'no'}",
           f"- Generated: {_cell(data['generated_at'])}", "", "## Identifiers", ""]
    if data["identifiers"]:
        out += ["| kind | value | since |", "|---|---|---|"]
        out += [f"| {i['kind']} | {_cell(i['value']) or '(not kept)'} | {_cell(i['created_at'])} |"
                for i in data["identifiers"]]
    else:
        out.append("None held (erased).")
    out += ["", "## Current choices", "", "| purpose | status | policy version | recorded at |", "|---|---|---|---|"]
    out += [f"| {s['purpose']} | {s['status']} | {_cell(s['policy_version'])} | {_cell(s['recorded_at'])} |"
            for s in data["state"]]
    out += ["", "## Every recorded decision", "",
            "| recorded at | purpose | decision | policy | source | evidence | record hash |",
            "|---|---|---|---|---|---|---|"]
    for r in data["records"]:
        policy = f"{r['policy']['key']} {r['policy']['version']}" if r["policy"]["version"] else ""
        evidence = ", ".join(f"{k}: {v}" for k, v in (r["evidence"] or {}).items()) or "(none kept)"
        out.append(f"| {_cell(r['recorded_at'])} | {r['purpose']} | {r['decision']} | {_cell(policy)} | "
                   f"{r['source']} | {_cell(evidence)} | `{r['record_hash'][:16]}…` |")
    out += ["", "## Receipts", "",
            "Each receipt is a JWT signed by the service; verify it with the keys at `/.well-known/jwks.json`.", ""]
    out += [f"- `{r['id']}`: `{r['receipt']}`" for r in data["records"]]
    out += [f"- current state: `{data['state_receipt']}`", ""]
    return "\n".join(out)


def erase(db: Session, tenant: Tenant, subject: Subject, *, signer: crypto.Signer, issuer: str) -> tuple[bool, dict[str, Any]]:
    """Erase one subject (idempotent): returns (erased now, summary)."""
    subject = lock_subject(db, subject.id)
    if subject.erased_at is not None:
        record = db.execute(sa.select(ConsentRecord).where(
            col(ConsentRecord.subject_id) == subject.id, col(ConsentRecord.decision) == ERASED,
        ).order_by(col(ConsentRecord.seq).desc())).scalars().first()
        return False, _summary(subject, record, 0, 0)
    # Subjects merged into this one (consent/ledger/identity.py) are the same person: erased too.
    absorbed = [e["merged_from"] for e in db.execute(sa.select(REC.c.evidence).where(
        REC.c.tenant_id == tenant.id, REC.c.subject_id == subject.id, REC.c.decision == MERGED,
        REC.c.purpose == ALL_PURPOSES)).scalars() if isinstance(e, dict) and e.get("merged_from")]
    for sid in absorbed:
        other = db.get(Subject, sid)
        if other is not None and other.tenant_id == tenant.id:
            erase(db, tenant, other, signer=signer, issuer=issuer)
    removed = rowcount(db.execute(sa.delete(SI).where(SI.c.tenant_id == tenant.id, SI.c.subject_id == subject.id)))
    cleared = rowcount(db.execute(sa.update(REC).where(REC.c.tenant_id == tenant.id, REC.c.subject_id == subject.id,
                                                        REC.c.evidence.is_not(None)).values(evidence=sa.null())))
    now = utcnow()
    evidence: dict[str, Any] = {}
    erased = NewRecord(
        id=crypto.new_id("rec", 12), tenant_id=tenant.id, subject_id=subject.id, purpose=ALL_PURPOSES,
        decision=ERASED, confirmed=True, policy_key=None, policy_version_id=None, policy_version=None,
        source="api", evidence=evidence, evidence_sha256=crypto.sha256_hex(crypto.canonical_json(evidence)),
        disclosures=None, recorded_at=now, idempotency_key=None, request_sha256=None, prev_hash=subject.head_hash,
    )
    seal_record(erased, subject.pseudonym)
    erased.leaf_index = events.next_leaf(db, tenant.id)  # in the receipt: taken before signing
    erased.receipt = signer.sign(record_claims(
        issuer=issuer, tenant_id=tenant.id, subject_id=subject.id, policy=None,
        record={"id": erased.id, "record_hash": erased.record_hash, "source": erased.source,
                "recorded_at": crypto.iso(now)},
        purposes=[{"purpose": ALL_PURPOSES, "status": ERASED}], tlog_index=erased.leaf_index,
    ))
    insert_record(db, erased)
    move_head(db, subject, erased)  # the chain's one rule, as every record's
    subject.erased_at = now
    db.flush()
    return True, _summary(subject, erased, removed, cleared)


def _summary(subject: Subject, record: ConsentRecord | NewRecord | None, removed: int, cleared: int) -> dict[str, Any]:
    return {
        "subject": subject.id, "pseudonym": subject.pseudonym, "erased_at": subject.erased_at,
        "identifiers_removed": removed, "evidence_cleared": cleared,
        "record": {"id": record.id, "record_hash": record.record_hash, "prev_hash": record.prev_hash,
                   "receipt": record.receipt} if record else None,
    }
