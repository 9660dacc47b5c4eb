"""Consent checks: the hot path. One indexed query per single check; one query for a bulk check.

Staleness is decided inside the query by an EXISTS over policy_purpose (a newer material
version covering the purpose and in effect), so no cache can go stale behind a write.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.orm import Session

from . import crypto
from .catalog import get_purpose, list_purposes
from .errors import ValidationFailed
from .ledger import SI, STATE, parse_subject_ref
from .models import ConsentRecord, PolicyPurpose, Tenant, sqlite_time, utcnow
from .receipts import record_claims
from .state import STATUSES, derive_status, is_allowed
from .tenants import TenantRef

BULK_CHUNK = 20_000  # emails per statement of a large bulk check on SQLite (see _sqlite_email_statuses)

PP = PolicyPurpose.__table__  # type: ignore[attr-defined]
REC = ConsentRecord.__table__  # type: ignore[attr-defined]


def _stale(now: Any) -> Any:
    return sa.exists().where(
        PP.c.tenant_id == STATE.c.tenant_id,
        PP.c.purpose == STATE.c.purpose,
        PP.c.policy_key == STATE.c.policy_key,
        PP.c.material.is_(True),
        PP.c.effective_at <= now,
        PP.c.policy_version_id > STATE.c.policy_version_id,
    ).label("stale")


_COLUMNS = (STATE.c.subject_id, STATE.c.decision, STATE.c.confirmed, STATE.c.policy_version, STATE.c.record_seq,
            STATE.c.gpc)

# GET /v1/check by identifier: one round trip (identifier -> state -> record receipt).
_SINGLE_BY_IDENT = (
    sa.select(*_COLUMNS, REC.c.id.label("record_id"), REC.c.receipt, _stale(sa.bindparam("now")))
    .select_from(SI.join(STATE, sa.and_(STATE.c.tenant_id == SI.c.tenant_id, STATE.c.subject_id == SI.c.subject_id)))
    .join(REC, REC.c.seq == STATE.c.record_seq)
    .where(SI.c.tenant_id == sa.bindparam("t"), SI.c.kind == sa.bindparam("k"),
           SI.c.value_hash == sa.bindparam("h"), STATE.c.purpose == sa.bindparam("p"))
)
_SINGLE_BY_ID = (
    sa.select(*_COLUMNS, REC.c.id.label("record_id"), REC.c.receipt, _stale(sa.bindparam("now")))
    .select_from(STATE.join(REC, REC.c.seq == STATE.c.record_seq))
    .where(STATE.c.tenant_id == sa.bindparam("t"), STATE.c.subject_id == sa.bindparam("s"),
           STATE.c.purpose == sa.bindparam("p"))
)


def check(db: Session, tenant: Tenant | TenantRef, *, purpose: str, kind: str, value: str) -> dict[str, Any]:
    """``{allowed, status, purpose, subject, policy_version, record_id, receipt}`` for one subject."""
    now = utcnow()
    conn = db.connection()  # Perf: Core on the connection, not Session.execute (~60 us CPU saved)
    if kind == "id":
        row = conn.execute(_SINGLE_BY_ID, {"t": tenant.id, "s": value, "p": purpose, "now": now}).first()
    else:
        if kind == "email":
            value = crypto.normalize_email(value)
        h = crypto.keyed_hash(tenant.hash_key, kind, value)
        row = conn.execute(_SINGLE_BY_IDENT, {"t": tenant.id, "k": kind, "h": h, "p": purpose, "now": now}).first()
    if row is None:
        if get_purpose(db, tenant.id, purpose) is None:  # only paid for on a miss
            raise ValidationFailed.field("purpose", f"unknown purpose {purpose!r}")
        return {"allowed": False, "status": "none", "purpose": purpose, "subject": None,
                "policy_version": None, "record_id": None, "receipt": None, "gpc": False}
    status = derive_status(row.decision, confirmed=row.confirmed, stale=row.stale)
    return {"allowed": is_allowed(status), "status": status, "purpose": purpose,
            "subject": row.subject_id, "policy_version": row.policy_version,
            "record_id": row.record_id, "receipt": row.receipt, "gpc": bool(row.gpc)}


def bulk_check(db: Session, tenant: Tenant | TenantRef, *, purpose: str, emails: list[str] | None,
               subjects: list[str] | None) -> dict[str, Any]:
    """One purpose for many emails or subject references, in input order."""
    if get_purpose(db, tenant.id, purpose) is None:
        raise ValidationFailed.field("purpose", f"unknown purpose {purpose!r}")
    now = utcnow()
    conn = db.connection()
    items = emails if emails is not None else subjects or []
    if conn.dialect.name == "postgresql" and len(items) > 1000:
        # Perf: the planner guesses 100 rows for the unpacked key list and probes two indexes per
        # key; for many keys hash joins win: 100,000 emails 3.07 s -> 0.76 s (full bench ledger).
        # SET LOCAL ends with this read-only transaction.
        conn.exec_driver_sql("SET LOCAL enable_nestloop = off")
        conn.exec_driver_sql("SET LOCAL work_mem = '64MB'")
    if emails is not None:
        # Perf: one precomputed HMAC state for all 100,000 emails (0.18 s instead of 0.43 s);
        # no per-input tuples or dicts on the way (crypto.normalize_emails).
        if conn.dialect.name == "sqlite" and len(emails) > 2 * BULK_CHUNK:
            statuses = _sqlite_email_statuses(conn, tenant, purpose, emails, now)
        else:
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


def _sqlite_email_statuses(conn: sa.Connection, tenant: Tenant | TenantRef, purpose: str, emails: list[str],
                           now: datetime) -> list[str]:
    """Many emails on SQLite, a chunk at a time, hashing the next chunk in a thread while SQLite
    looks up this one (sqlite3 lets go of the GIL while a statement runs; hashing needs it).

    Still one snapshot: every statement
    runs in this unit of work's one SQLite read transaction, which pins the snapshot that its
    first statement (the purpose lookup) took.
    """
    chunks = [emails[i:i + BULK_CHUNK] for i in range(0, len(emails), BULK_CHUNK)]

    def hashes(chunk: list[str]) -> list[str]:
        return crypto.keyed_hashes(tenant.hash_key, "email", crypto.normalize_emails(chunk))

    out: list[str] = []
    with ThreadPoolExecutor(1, thread_name_prefix="bulk-hmac") as pool:
        ready = hashes(chunks[0])
        for n in range(len(chunks)):
            upcoming = pool.submit(hashes, chunks[n + 1]) if n + 1 < len(chunks) else None
            out += _statuses(conn, tenant.id, purpose, "email", ready, now)
            if upcoming is not None:
                ready = upcoming.result()
    return out


def _statuses(conn: sa.Connection, tenant_id: str, purpose: str, kind: str, keys: list[str], now: datetime) -> list[str]:
    """``bulk_codes`` for keys that may repeat (each distinct key is looked up once)."""
    unique = list(dict.fromkeys(keys))
    statuses = bulk_codes(conn, tenant_id, purpose, kind, unique, now)
    if len(unique) == len(keys):
        return statuses
    by_key = dict(zip(unique, statuses))
    return [by_key[k] for k in keys]


# The states of one purpose for many keys as ONE string: a code per key, in key order, joined
# by commas; a code is decision + confirmed (0/1) + stale (0/1), or empty for no state.
# Perf: 100,000 result rows cost more in the driver and SQLAlchemy (row objects, type
# processing) and in the Python loop over them than finding them (SQLite: 1.5 s -> 0.8 s
# for the query and its rows; docs/bench.md). Staleness is a join to the newest material
# version per policy in effect (a tiny aggregate built once), not an EXISTS per row. All keys
# travel in ONE bound parameter, a JSON array (or comma-joined hashes, below) unpacked by the
# database in C (no 100,000 bound parameters to render, no per-element array dumping in
# psycopg). One statement, one snapshot.
_BULK_FROM = {
    "ident": "LEFT JOIN subject_identifier si ON si.tenant_id = :t AND si.kind = :k AND si.value_hash = j.value "
             "LEFT JOIN consent_state s ON s.tenant_id = :t AND s.subject_id = si.subject_id AND s.purpose = :p ",
    "id": "LEFT JOIN consent_state s ON s.tenant_id = :t AND s.subject_id = j.value AND s.purpose = :p ",
}
_BULK_NEWEST = ("LEFT JOIN (SELECT policy_key, max(policy_version_id) AS newest FROM policy_purpose "
                "WHERE tenant_id = :t AND purpose = :p AND material = {true} AND effective_at <= :now "
                "GROUP BY policy_key) n ON n.policy_key = s.policy_key ")
# SQLite has no ordered aggregate before 3.44, and needs none here: it runs joins as nested loops
# and never reorders outer joins (its query planner documentation), so json_each, left of every
# LEFT JOIN, is the outermost loop and group_concat sees one row per key in array order (an
# ORDER BY in a subquery would cost a temporary B-tree sort). The tests compare every answer
# with single checks, and
# ``bulk_codes`` checks the count.
_BULK_SQLITE = ("SELECT group_concat(coalesce(s.decision || s.confirmed || coalesce(n.newest > s.policy_version_id, 0), "
                "''), ',') FROM json_each(:keys) j {joins}" + _BULK_NEWEST.format(true=1))
_BULK_POSTGRES = ("SELECT string_agg(coalesce(s.decision || CASE WHEN s.confirmed THEN '1' ELSE '0' END || "
                  "CASE WHEN n.newest > s.policy_version_id THEN '1' ELSE '0' END, ''), ',' ORDER BY j.i) "
                  "FROM {keys} WITH ORDINALITY AS j(value, i) {joins}" + _BULK_NEWEST.format(true="true"))
# PostgreSQL: identifier hashes (hex digits, never a comma) travel as one comma-joined text, split in
# C by string_to_array (no JSON parsing of 100,000 keys); subject ids, which may hold any
# character, as a JSON array.
_PG_KEYS = {True: "jsonb_array_elements_text(CAST(:keys AS jsonb))", False: "unnest(string_to_array(:keys, ','))"}
_BULK_SQL = {(postgres, by_id): sa.text(
    _BULK_POSTGRES.format(keys=_PG_KEYS[by_id], joins=_BULK_FROM["id" if by_id else "ident"]) if postgres
    else _BULK_SQLITE.format(joins=_BULK_FROM["id" if by_id else "ident"]))
    for postgres in (False, True) for by_id in (False, True)}


def bulk_codes(conn: sa.Connection, tenant_id: str, purpose: str, kind: str, keys: list[str], now: datetime) -> list[str]:
    """The status of each of ``keys`` (subject ids, or identifier hashes of ``kind``), in order."""
    postgres, by_id = conn.dialect.name == "postgresql", kind == "id"
    packed = ",".join(keys) if postgres and not by_id else orjson.dumps(keys).decode()
    params = {"t": tenant_id, "p": purpose, "k": kind, "keys": packed, "now": now if postgres else sqlite_time(now)}
    joined = conn.execute(_BULK_SQL[(postgres, by_id)], params).scalar()
    codes = joined.split(",") if joined is not None else []
    if len(codes) != len(keys):  # never expected: the statement yields one code per key
        raise RuntimeError(f"bulk check: {len(codes)} answers for {len(keys)} keys")
    statuses = {code: _status_of(code) for code in set(codes)}
    return [statuses[code] for code in codes]


def _status_of(code: str) -> str:
    if not code:
        return "none"
    return derive_status(code[:-2], confirmed=code[-2] == "1", stale=code[-1] == "1")


def subject_states(db: Session, tenant: Tenant, subject_id: str, *, at: datetime | None = None) -> list[dict[str, Any]]:
    """Current state of every purpose of the tenant for one subject."""
    now = at or utcnow()
    rows = db.execute(
        sa.select(STATE.c.purpose, *_COLUMNS, REC.c.id.label("record_id"), REC.c.receipt,
                  REC.c.recorded_at, _stale(now))
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
        status = derive_status(r.decision, confirmed=r.confirmed, stale=stale(r)) if r else "none"
        out.append({
            "purpose": p.key, "status": status, "allowed": is_allowed(status),
            "policy_version": r.policy_version if r else None,
            "recorded_at": r.recorded_at if r else None,
            "record_id": record_id(r) if r else None,
            "receipt": r.receipt if r else None,
            "gpc": bool(r.gpc) if r else False,
            "legal_basis": p.legal_basis,
        })
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
