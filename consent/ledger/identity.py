"""One person, one subject: re-key stored email identifiers under ``crypto.normalize_email``
and merge the subjects that the rule finds to be one person.

Run once by migration 0013 (the rule was looser before). Records never move and are never
rewritten, so every chain still verifies; instead each merge is itself recorded:
- the absorbed subject's chain ends with a ``merged`` record (purpose ``*``) naming the
  survivor, and the subject row points at it (``merged_into``);
- the survivor's chain gets a ``merged`` record naming the absorbed subject (its id,
  pseudonym and chain head), then, for each purpose the absorbed subject had a decision for,
  a copy of that decision (``source`` ``merge``, the original ``recorded_at``, evidence naming
  the original record id and hash). The ordinary state rule (the newest decision by
  ``recorded_at`` counts) then gives the person one answer per purpose.
The survivor is the subject created first. A group is every subject that shares a normalised
email with another member, directly or through a chain of them.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from consent import crypto
from consent.ledger import recorder
from consent.ledger.receipts import record_claims
from consent.ledger.state import derive_status
from consent.store.models import (
    utcnow,
)
from consent.store.tables import RECORD as _REC
from consent.store.tables import SIGNING_KEY as _KEY
from consent.store.tables import STATE as _ST
from consent.store.tables import SUBJECT as _SUBJ
from consent.store.tables import SUBJECT_IDENTIFIER as _SI

MERGED = "merged"
MERGE_SOURCE = "merge"
ALL_PURPOSES = "*"

_RECORD_COLUMNS = ("id", "tenant_id", "subject_id", "purpose", "decision", "confirmed", "policy_key",
                   "policy_version_id", "policy_version", "source", "evidence", "evidence_sha256",
                   "disclosures", "recorded_at", "idempotency_key", "request_sha256", "prev_hash",
                   "record_hash", "receipt", "export_line")
# The tables as revision 0013 has them (named columns only: a later revision's columns are
# not this code's to write).
RECORD = sa.table("consent_record", *[sa.column(c, _REC.c[c].type) for c in ("seq", *_RECORD_COLUMNS)])
SUBJECT = sa.table("subject", *[sa.column(c, _SUBJ.c[c].type) for c in
                                ("id", "tenant_id", "pseudonym", "head_hash", "created_at", "merged_into")])
IDENT = sa.table("subject_identifier", *[sa.column(c, _SI.c[c].type) for c in
                                         ("tenant_id", "kind", "value_hash", "value", "subject_id", "created_at")])
STATE = sa.table("consent_state", *[sa.column(c, _ST.c[c].type) for c in (
    "tenant_id", "subject_id", "purpose", "record_seq", "decision", "confirmed", "policy_key",
    "policy_version_id", "policy_version", "recorded_at", "receipt_seq", "record_id", "receipt")])


@dataclass
class Report:
    rekeyed: int = 0  # email identifiers whose key changed
    merged: int = 0  # subjects absorbed into another


def rekey_emails(conn: sa.Connection, *, issuer: str | None = None) -> Report:
    """Re-key every stored email identifier and merge the subjects that now collide."""
    if not issuer:
        from consent.settings import env_setting

        issuer = env_setting("issuer")
    issuer = str(issuer).rstrip("/")
    report = Report()
    keys: dict[str, str] = {r.id: crypto.open_secret(conn, r.hash_key, "tenant.hash_key")
                            for r in conn.execute(sa.text("SELECT id, hash_key FROM tenant"))}
    rows = conn.execute(sa.select(IDENT.c.tenant_id, IDENT.c.value_hash, IDENT.c.value, IDENT.c.subject_id,
                                  IDENT.c.created_at)
                        .where(IDENT.c.kind == "email", IDENT.c.value.is_not(None))).all()
    groups: dict[tuple[str, str], list[Any]] = defaultdict(list)  # (tenant, new hash) -> rows
    spelling: dict[tuple[str, str], str] = {}
    for r in rows:
        value = crypto.normalize_email(r.value)
        key = (r.tenant_id, crypto.keyed_hash(keys[r.tenant_id], "email", value))
        groups[key].append(r)
        spelling[key] = value
    # Union-find over subjects: two subjects sharing a normalised email are one person.
    parent: dict[str, str] = {}

    def find(s: str) -> str:
        while parent.setdefault(s, s) != s:
            parent[s] = parent[parent[s]]
            s = parent[s]
        return s

    for members in groups.values():
        first = find(members[0].subject_id)
        for m in members[1:]:
            other = find(m.subject_id)
            if other != first:
                parent[other] = first
    components: dict[str, list[str]] = defaultdict(list)
    for s in list(parent):
        components[find(s)].append(s)
    survivor_of: dict[str, str] = {}
    signer: crypto.Signer | None = None
    for members in components.values():
        if len(members) == 1:
            survivor_of[members[0]] = members[0]
            continue
        subjects = conn.execute(sa.select(SUBJECT).where(SUBJECT.c.id.in_(members))
                                .order_by(SUBJECT.c.created_at, SUBJECT.c.id)).all()
        survivor = subjects[0]
        signer = signer or _signer(conn)
        for absorbed in subjects[1:]:
            survivor_head = conn.execute(sa.select(SUBJECT.c.head_hash).where(SUBJECT.c.id == survivor.id)).scalar()
            _merge(conn, survivor, survivor_head, absorbed, signer=signer, issuer=issuer)
            report.merged += 1
        for s in members:
            survivor_of[s] = survivor.id
    for (tenant_id, new_hash), members in groups.items():
        owner = survivor_of[members[0].subject_id]
        if len(members) == 1 and members[0].value_hash == new_hash and members[0].value == spelling[(tenant_id, new_hash)] \
                and members[0].subject_id == owner:
            continue
        report.rekeyed += sum(m.value_hash != new_hash for m in members)
        conn.execute(sa.delete(IDENT).where(IDENT.c.tenant_id == tenant_id, IDENT.c.kind == "email",
                                            IDENT.c.value_hash.in_([m.value_hash for m in members] + [new_hash])))
        conn.execute(sa.insert(IDENT).values(
            tenant_id=tenant_id, kind="email", value_hash=new_hash, value=spelling[(tenant_id, new_hash)],
            subject_id=owner, created_at=min(m.created_at for m in members)))
    return report


def _signer(conn: sa.Connection) -> crypto.Signer:
    row = conn.execute(sa.select(_KEY.c.kid, _KEY.c.private_pem).where(_KEY.c.retired_at.is_(None))
                       .order_by(_KEY.c.created_at.desc())).first()
    if row is None:  # records exist, so a key does; a database without records never gets here
        raise RuntimeError("no active signing key to sign the merge records with")
    return crypto.Signer(row.kid, row.private_pem)


def _append(conn: sa.Connection, subject: Any, head: str | None, *, purpose: str, decision: str,
            confirmed: bool, evidence: dict[str, Any], recorded_at: Any, status: str, signer: crypto.Signer,
            issuer: str, policy: tuple[Any, Any, Any] = (None, None, None),
            disclosures: Any = None) -> recorder.NewRecord:
    """Append one record to a subject's chain (hash, export line, receipt) and move its head."""
    record = recorder.NewRecord(
        id=crypto.new_id("rec", 12), tenant_id=subject.tenant_id, subject_id=subject.id, purpose=purpose,
        decision=decision, confirmed=confirmed, policy_key=policy[0], policy_version_id=policy[1],
        policy_version=policy[2], source=MERGE_SOURCE, evidence=evidence,
        evidence_sha256=crypto.sha256_hex(crypto.canonical_json(evidence)), disclosures=disclosures,
        recorded_at=recorded_at, idempotency_key=None, request_sha256=None, prev_hash=head)
    recorder.seal_record(record, subject.pseudonym)
    record.receipt = signer.sign(record_claims(
        issuer=issuer, tenant_id=record.tenant_id, subject_id=record.subject_id,
        policy={"key": policy[0], "version": policy[2]} if policy[0] else None,
        record={"id": record.id, "record_hash": record.record_hash, "source": record.source,
                "recorded_at": crypto.iso(record.recorded_at)},
        purposes=[{"purpose": purpose, "status": status}]))
    record.seq = conn.execute(sa.insert(RECORD).values({c: getattr(record, c) for c in _RECORD_COLUMNS})
                              .returning(RECORD.c.seq)).scalar_one()
    conn.execute(sa.update(SUBJECT).where(SUBJECT.c.id == subject.id).values(head_hash=record.record_hash))
    return record


def _merge(conn: sa.Connection, survivor: Any, survivor_head: str | None, absorbed: Any, *,
           signer: crypto.Signer, issuer: str) -> None:
    now = utcnow()
    head = _append(conn, survivor, survivor_head, purpose=ALL_PURPOSES, decision=MERGED, confirmed=True,
                   evidence={"merged_from": absorbed.id, "merged_pseudonym": absorbed.pseudonym,
                             "merged_head": absorbed.head_hash}, recorded_at=now, status=MERGED,
                   signer=signer, issuer=issuer).record_hash
    states = conn.execute(
        sa.select(STATE.c.purpose, STATE.c.recorded_at, RECORD.c.id, RECORD.c.record_hash, RECORD.c.decision,
                  RECORD.c.confirmed, RECORD.c.policy_key, RECORD.c.policy_version_id, RECORD.c.policy_version,
                  RECORD.c.disclosures)
        .select_from(STATE.join(RECORD, RECORD.c.seq == STATE.c.record_seq))
        .where(STATE.c.tenant_id == absorbed.tenant_id, STATE.c.subject_id == absorbed.id)
        .order_by(STATE.c.purpose)).all()
    for s in states:
        status = derive_status(s.decision, confirmed=s.confirmed, stale=False)
        copy = _append(conn, survivor, head, purpose=s.purpose, decision=s.decision, confirmed=s.confirmed,
                       evidence={"merged_from": absorbed.id, "record_id": s.id, "record_hash": s.record_hash},
                       recorded_at=s.recorded_at, status=status, signer=signer, issuer=issuer,
                       policy=(s.policy_key, s.policy_version_id, s.policy_version), disclosures=s.disclosures)
        head = copy.record_hash
        _keep_newest_state(conn, copy)
    _append(conn, absorbed, absorbed.head_hash, purpose=ALL_PURPOSES, decision=MERGED, confirmed=True,
            evidence={"merged_into": survivor.id, "merged_pseudonym": survivor.pseudonym}, recorded_at=now,
            status=MERGED, signer=signer, issuer=issuer)
    conn.execute(sa.delete(STATE).where(STATE.c.tenant_id == absorbed.tenant_id, STATE.c.subject_id == absorbed.id))
    conn.execute(sa.update(SUBJECT).where(SUBJECT.c.id == absorbed.id).values(merged_into=survivor.id))
    # The person's other identifiers (user id, anonymous ids) now find the survivor.
    conn.execute(sa.update(IDENT).where(IDENT.c.tenant_id == absorbed.tenant_id, IDENT.c.subject_id == absorbed.id,
                                        IDENT.c.kind != "email").values(subject_id=survivor.id))


def _keep_newest_state(conn: sa.Connection, record: recorder.NewRecord) -> None:
    """consent_state's rule: the newest decision by recorded_at counts (ties: the later write)."""
    where = (STATE.c.tenant_id == record.tenant_id, STATE.c.subject_id == record.subject_id,
             STATE.c.purpose == record.purpose)
    current = conn.execute(sa.select(STATE.c.recorded_at).where(*where)).first()
    if current is not None and current.recorded_at > record.recorded_at:
        return
    values = {"record_seq": record.seq, "decision": record.decision, "confirmed": record.confirmed,
              "policy_key": record.policy_key, "policy_version_id": record.policy_version_id,
              "policy_version": record.policy_version, "recorded_at": record.recorded_at,
              "receipt_seq": record.seq, "record_id": record.id, "receipt": record.receipt}
    if current is None:
        conn.execute(sa.insert(STATE).values(tenant_id=record.tenant_id, subject_id=record.subject_id,
                                             purpose=record.purpose, **values))
    else:
        conn.execute(sa.update(STATE).where(*where).values(**values))
