"""Consent checks: the single check's per-request executor and the one answer builder, the
bulk check, a subject's state. The statements are ``statements.CHECK`` / ``statements.BULK``;
staleness is decided inside them (``statements.stale``, compiled into them), so no cache can go
stale behind a write.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.orm import Session

from consent import crypto
from consent.errors import Unauthorized, ValidationFailed
from consent.ledger import statements
from consent.ledger.catalog import get_purpose, list_purposes
from consent.ledger.receipts import record_claims
from consent.ledger.recorder import parse_subject_ref
from consent.ledger.state import STATUSES, derive_status, is_allowed
from consent.ledger.tenants import TenantRef
from consent.store.models import Tenant, sqlite_time, utcnow
from consent.store.tables import RECORD as REC
from consent.store.tables import STATE


def check_rows(conn: sa.Connection, items: list[tuple[str, str, str, str, str]], now: datetime) -> list[tuple[Any, ...]]:
    """The per-request executor of ``statements.CHECK``: the rows ``batch_reads`` gets for the
    same checks ((key digest, tenant id, kind, hash or subject id, purpose) each), in order."""
    if conn.dialect.name == "postgresql":
        rows = conn.execute(statements.CHECK["postgresql"],
                            {"inputs": statements.check_input_pg(items).decode(), "now": now}).all()
        return [tuple(r[1:]) for r in rows]
    inputs, order = statements.check_input_sqlite(items)
    answers, receipts = conn.execute(statements.CHECK["sqlite"], {"inputs": inputs,
                                                                  "now": sqlite_time(now)}).one()
    return statements.check_rows_sqlite(answers, receipts, order)


def decision_answer(decision: str | None, *, confirmed: Any, stale: Any, policy_version: str | None,
                    record_id: str | None, receipt: str | None, gpc: Any) -> dict[str, Any]:
    """What every answer about one purpose says (single, as-of and subject-state answers):
    status by ``state.derive_status`` (``none`` without a decision), and the record behind it."""
    if decision is None:
        return {"allowed": False, "status": "none", "policy_version": None, "record_id": None, "receipt": None,
                "gpc": False}
    status = derive_status(decision, confirmed=bool(confirmed), stale=bool(stale))
    return {"allowed": is_allowed(status), "status": status, "policy_version": policy_version,
            "record_id": record_id, "receipt": receipt, "gpc": bool(gpc)}


def check_answer(purpose: str, row: tuple[Any, ...]) -> dict[str, Any]:
    """The body of ``GET /v1/check`` from a row of ``statements.CHECK``, or the error it means:
    401 for a key revoked since it was cached, 422 for an unknown purpose."""
    key_ok, purpose_ok, subject_id, decision, confirmed, policy_version, record_id, receipt, stale, gpc = row
    if not key_ok:
        raise Unauthorized("unknown or revoked API key")
    if decision is None and not purpose_ok:
        raise ValidationFailed.field("purpose", f"unknown purpose {purpose!r}")
    return {"purpose": purpose, "subject": subject_id, **decision_answer(
        decision, confirmed=confirmed, stale=stale, policy_version=policy_version, record_id=record_id,
        receipt=receipt, gpc=gpc)}


def check_item(key_digest: str, tenant: Tenant | TenantRef, purpose: str, kind: str, value: str) -> tuple[str, str, str, str, str]:
    """One check as ``statements.CHECK`` takes it: the identifier keyed under the tenant's hash
    key (a ``sub_`` id as it is)."""
    if kind != "id":
        value = crypto.keyed_hash(tenant.hash_key, kind, crypto.normalize_email(value) if kind == "email" else value)
    return key_digest, tenant.id, kind, value, purpose


def check(db: Session, tenant: Tenant | TenantRef, key_digest: str, *, purpose: str, kind: str,
          value: str) -> dict[str, Any]:
    """``GET /v1/check``'s answer on the per-request executor (the key given by its digest)."""
    row, = check_rows(db.connection(), [check_item(key_digest, tenant, purpose, kind, value)], utcnow())
    return check_answer(purpose, row)


def bulk_check(db: Session, tenant: Tenant | TenantRef, *, purpose: str, emails: list[str] | None,
               subjects: list[str] | None) -> dict[str, Any]:
    """One purpose for many emails or subject references, in input order."""
    if get_purpose(db, tenant.id, purpose) is None:
        raise ValidationFailed.field("purpose", f"unknown purpose {purpose!r}")
    now = utcnow()
    conn = db.connection()
    items = emails if emails is not None else subjects or []
    if emails is not None:
        # Perf: one precomputed HMAC state for all 100,000 emails; no per-input tuples or dicts
        # on the way (crypto.normalize_emails).
        hashes = crypto.keyed_hashes(tenant.hash_key, "email", crypto.normalize_emails(emails))
        statuses = _statuses(conn, tenant.id, purpose, "email", hashes, now)
    else:
        by_kind: dict[str, tuple[list[int], list[str]]] = {}  # kind -> (input positions, keys)
        for i, raw in enumerate(items):
            kind, value = parse_subject_ref(raw)
            where, keys = by_kind.setdefault(kind, ([], []))
            where.append(i)
            if kind == "email":
                value = crypto.normalize_email(value)
            keys.append(value if kind == "id" else crypto.keyed_hash(tenant.hash_key, kind, value))
        statuses = ["none"] * len(items)
        for kind, (where, keys) in by_kind.items():
            for i, status in zip(where, _statuses(conn, tenant.id, purpose, kind, keys, now)):
                statuses[i] = status
    allows = {status: is_allowed(status) for status in STATUSES}
    results = [{"id": raw, "allowed": allows[status], "status": status} for raw, status in zip(items, statuses)]
    allowed_count = sum(statuses.count(status) for status, yes in allows.items() if yes)
    return {"purpose": purpose, "count": len(results), "allowed_count": allowed_count, "results": results}


def _statuses(conn: sa.Connection, tenant_id: str, purpose: str, kind: str, keys: list[str], now: datetime) -> list[str]:
    """The status of each of ``keys`` (subject ids, or identifier hashes of ``kind``; repeats
    allowed), in order."""
    codes = bulk_codes(conn, tenant_id, purpose, kind, keys, now)
    status_of: dict[str | None, str] = {code: _status_of(code) for code in set(codes.values()) if code}
    return [status_of.get(codes.get(key), "none") for key in keys]


def bulk_codes(conn: sa.Connection, tenant_id: str, purpose: str, kind: str, keys: list[str],
               now: datetime) -> dict[str, str | None]:
    """``statements.BULK`` for ``keys``: key -> code for each key with a state on ``purpose``
    (and null for the others on SQLite)."""
    postgres, by_id = conn.dialect.name == "postgresql", kind == "id"
    if postgres:
        # Settings of this transaction only (like SET LOCAL) that choose the plan. Many keys: one
        # generic plan whatever their number and the ledger's size, so the keys stay a parameter,
        # which a parallel worker gets as it is (a constant would be copied into the worker's
        # plan): one pass over the tenant's identifiers and the purpose's states, hash joins only,
        # split with one worker (each process splits and hashes the keys itself), hash tables in
        # memory, no JIT. An index probe per key costs ~3 us here, more than that pass for
        # 100,000 keys on 1,000,000 subjects. A few keys: a plan made for them, which probes
        # (psycopg prepares a statement run 5 times; PostgreSQL could then keep a generic plan).
        conn.exec_driver_sql(
            "SELECT set_config('plan_cache_mode', 'force_generic_plan', true), set_config('enable_nestloop', 'off', true), "
            "set_config('max_parallel_workers_per_gather', '1', true), set_config('work_mem', '64MB', true), "
            "set_config('jit', 'off', true)" if len(keys) > 1000
            else "SELECT set_config('plan_cache_mode', 'force_custom_plan', true)")
        packed = statements.pg_text_array(keys) if by_id else ",".join(keys)  # hex digests: no commas
    else:
        # Distinct and sorted: consecutive probes of the indexes then share their pages.
        packed = orjson.dumps(sorted(set(keys))).decode()
    params = {"t": tenant_id, "p": purpose, "k": kind, "keys": packed, "now": now if postgres else sqlite_time(now)}
    out = conn.execute(statements.BULK[(postgres, by_id)], params).scalar()
    return orjson.loads(out) if out is not None else {}


def _status_of(code: str) -> str:
    return derive_status(code[:-2], confirmed=code[-2] == "1", stale=code[-1] == "1")


def subject_states(db: Session, tenant: Tenant, subject_id: str, *, at: datetime | None = None) -> list[dict[str, Any]]:
    """Current state of every purpose of the tenant for one subject."""
    now = at or utcnow()
    rows = db.execute(
        sa.select(STATE.c.purpose, STATE.c.subject_id, STATE.c.decision, STATE.c.confirmed, STATE.c.policy_version,
                  STATE.c.gpc, REC.c.id.label("record_id"), REC.c.receipt, REC.c.recorded_at,
                  statements.stale_state(now))
        .select_from(STATE.join(REC, REC.c.seq == STATE.c.record_seq))
        .where(STATE.c.tenant_id == tenant.id, STATE.c.subject_id == subject_id)
    ).all()
    return purpose_states(list_purposes(db, tenant.id), {r.purpose: r for r in rows},
                          lambda r: bool(r.stale), lambda r: r.record_id)


def purpose_states(purposes: list[Any], by_purpose: dict[str, Any], stale: Any, record_id: Any) -> list[dict[str, Any]]:
    """One state entry per purpose of the tenant from each purpose's latest row (or none);
    shared by the current answer and the as-of answer, which differ only in how rows are found."""
    out = []
    for p in purposes:
        r = by_purpose.get(p.key)
        answer = decision_answer(None, confirmed=None, stale=None, policy_version=None, record_id=None,
                                 receipt=None, gpc=None) if r is None else decision_answer(
            r.decision, confirmed=r.confirmed, stale=stale(r), policy_version=r.policy_version,
            record_id=record_id(r), receipt=r.receipt, gpc=r.gpc)
        out.append({"purpose": p.key, **answer, "recorded_at": r.recorded_at if r else None,
                    "legal_basis": p.legal_basis})
    return out


def state_receipt_claims(issuer: str, tenant: Tenant, subject_id: str, states: list[dict[str, Any]]) -> dict[str, Any]:
    """A receipt over a subject's whole current state (signed at read time)."""
    claims = record_claims(
        issuer=issuer, tenant_id=tenant.id, subject_id=subject_id, policy=None,
        record={"id": None, "record_hash": None, "source": "state", "recorded_at": crypto.iso(utcnow())},
        purposes=[{"purpose": s["purpose"], "status": s["status"], "legal_basis": s["legal_basis"],
                   "record_id": s["record_id"], "policy_version": s["policy_version"]} for s in states],
    )
    return claims
