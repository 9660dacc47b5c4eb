"""Streaming, offline-verifiable exports of a tenant's consent ledger.

One line per record, in ledger order (``seq``), read by keyset pagination in chunks inside one
snapshot transaction, so memory stays flat however large the ledger. A line carries exactly
what its record hash covers (``ledger.record_content``: the subject appears only as its keyed
pseudonym, evidence only by its SHA-256) plus the record hash and receipt, its position ``n``
and ``linked`` (whether its ``prev_hash`` is the hash of an earlier line of the same export).
Anyone can recompute every hash without a secret.

The export ends with a manifest, an EdDSA JWT signed by the service key: filters, count, time
range, SHA-256 of the body, and a digest of every subject's chain (anchor, head, count). It is
the last JSONL line, and is stored so it can also be fetched by export id (CSV has no trailer).
"""

from __future__ import annotations

import csv
import hashlib
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from . import crypto
from .db import transaction
from .ledger import record_content
from .models import ConsentRecord, ExportManifest, Subject, utcnow

REC = ConsentRecord.__table__  # type: ignore[attr-defined]
SUBJ = Subject.__table__  # type: ignore[attr-defined]
FORMATS = ("jsonl", "csv")
MANIFEST_TYPE = "consent-export-manifest/1"
CONTENT_KEYS = ("v", "id", "tenant", "subject", "purpose", "decision", "confirmed", "policy", "source",
                "evidence_sha256", "disclosures_sha256", "recorded_at", "prev_hash")
LINE_KEYS = frozenset((*CONTENT_KEYS, "n", "linked", "record_hash", "receipt"))
CSV_COLUMNS = ("n", "linked", "v", "id", "tenant", "subject", "purpose", "decision", "confirmed",
               "policy_key", "policy_version", "source", "evidence_sha256", "disclosures_sha256",
               "recorded_at", "prev_hash", "record_hash", "receipt")
CHUNK = 1000


@dataclass(frozen=True)
class ExportFilter:
    """Which records an export holds: one tenant, optionally a time range, purpose, version."""

    tenant_id: str
    start: datetime | None = None  # recorded_at >= start
    end: datetime | None = None  # recorded_at < end
    purpose: str | None = None
    policy_version: str | None = None

    @property
    def partial(self) -> bool:
        """True when chains may start or continue outside the export."""
        return any(v is not None for v in (self.start, self.end, self.purpose, self.policy_version))

    def where(self, t: Any) -> list[Any]:
        cond = [t.c.tenant_id == self.tenant_id]
        if self.start is not None:
            cond.append(t.c.recorded_at >= self.start)
        if self.end is not None:
            cond.append(t.c.recorded_at < self.end)
        if self.purpose is not None:
            cond.append(t.c.purpose == self.purpose)
        if self.policy_version is not None:
            cond.append(t.c.policy_version == self.policy_version)
        return cond

    def claims(self) -> dict[str, Any]:
        return {"from": crypto.iso(self.start) if self.start else None,
                "to": crypto.iso(self.end) if self.end else None,
                "purpose": self.purpose, "policy_version": self.policy_version}


def _linked(flt: ExportFilter) -> Any:
    """Whether a record's predecessor in its chain is in the export too (SQL expression)."""
    if not flt.partial:
        return REC.c.prev_hash.is_not(None)
    prev = REC.alias("prev")
    prev_seq = (sa.select(sa.func.max(prev.c.seq))
                .where(prev.c.tenant_id == REC.c.tenant_id, prev.c.subject_id == REC.c.subject_id,
                       prev.c.seq < REC.c.seq)
                .correlate(REC).scalar_subquery())
    inside = REC.alias("inside")
    return sa.exists().where(inside.c.seq == prev_seq, *flt.where(inside)).correlate(REC)


def _records_query(flt: ExportFilter, chunk: int) -> Any:
    return (
        sa.select(REC.c.seq, REC.c.id, REC.c.tenant_id, REC.c.purpose, REC.c.decision, REC.c.confirmed,
                  REC.c.policy_key, REC.c.policy_version, REC.c.source, REC.c.evidence_sha256,
                  REC.c.disclosures, REC.c.recorded_at, REC.c.prev_hash, REC.c.record_hash, REC.c.receipt,
                  SUBJ.c.pseudonym, _linked(flt).label("linked"))
        .select_from(REC.join(SUBJ, SUBJ.c.id == REC.c.subject_id))
        .where(*flt.where(REC), REC.c.seq > sa.bindparam("after"))
        .order_by(REC.c.seq)
        .limit(chunk)
    )


def _heads_query(flt: ExportFilter, dialect: str) -> Any:
    """Per subject in the export: pseudonym, anchor (first line's prev_hash), head, count."""
    g = (sa.select(REC.c.subject_id, sa.func.min(REC.c.seq).label("first"), sa.func.max(REC.c.seq).label("last"),
                   sa.func.count().label("n"))
         .where(*flt.where(REC)).group_by(REC.c.subject_id).subquery())
    first, last = REC.alias("first_rec"), REC.alias("last_rec")
    order = sa.collate(SUBJ.c.pseudonym, "C") if dialect == "postgresql" else SUBJ.c.pseudonym
    return (sa.select(SUBJ.c.pseudonym, first.c.prev_hash.label("anchor"), last.c.record_hash.label("head"), g.c.n)
            .select_from(g.join(SUBJ, SUBJ.c.id == g.c.subject_id)
                         .join(first, first.c.seq == g.c.first).join(last, last.c.seq == g.c.last))
            .order_by(order))


def line_of(row: Any, n: int) -> dict[str, Any]:
    """The export line of one record row (must carry the pseudonym and ``linked``)."""
    disclosures = crypto.sha256_hex(crypto.canonical_json(row.disclosures)) if row.disclosures else None
    line = record_content(row, row.pseudonym, disclosures)
    line.update(n=n, linked=bool(row.linked), record_hash=row.record_hash, receipt=row.receipt)
    return line


def jsonl_line(line: dict[str, Any]) -> bytes:
    return crypto.canonical_json(line) + b"\n"


def _csv_value(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def csv_row(line: dict[str, Any]) -> list[str]:
    flat = {**line, "policy_key": line["policy"]["key"], "policy_version": line["policy"]["version"]}
    return [_csv_value(flat[c]) for c in CSV_COLUMNS]


def csv_bytes(rows: list[list[str]]) -> bytes:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue().encode()


def head_digest_line(pseudonym: str, anchor: str | None, head: str, count: int) -> bytes:
    """One subject's entry in ``heads_sha256`` (entries sorted by pseudonym)."""
    return f"{pseudonym} {anchor or '-'} {head} {count}\n".encode()


def count_records(engine: Engine, flt: ExportFilter) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(REC).where(*flt.where(REC))).scalar_one())


def stream_export(
    engine: Engine,
    flt: ExportFilter,
    fmt: str,
    *,
    signer: crypto.Signer,
    issuer: str,
    export_id: str,
    chunk: int = CHUNK,
    progress: Callable[[int], None] | None = None,
) -> Iterator[bytes]:
    """Yield the export body in chunks of bytes, then (JSONL) the manifest line; the manifest
    is stored under ``export_id`` once the body is complete."""
    body = hashlib.sha256()
    heads = hashlib.sha256()
    count = subjects = 0
    first_at: datetime | None = None
    last_at: datetime | None = None
    dialect = engine.dialect.name
    with engine.connect() as conn:
        if dialect == "postgresql":  # one snapshot for the records and the chain heads
            conn = conn.execution_options(isolation_level="REPEATABLE READ")
        with conn.begin():
            if fmt == "csv":
                header = csv_bytes([list(CSV_COLUMNS)])
                body.update(header)
                yield header
            query = _records_query(flt, chunk)
            after = -1
            while True:
                rows = conn.execute(query, {"after": after}).all()
                if not rows:
                    break
                lines = []
                for row in rows:
                    count += 1
                    lines.append(line_of(row, count))
                    at = row.recorded_at
                    first_at = at if first_at is None or at < first_at else first_at
                    last_at = at if last_at is None or at > last_at else last_at
                after = rows[-1].seq
                data = csv_bytes([csv_row(x) for x in lines]) if fmt == "csv" else b"".join(map(jsonl_line, lines))
                body.update(data)
                yield data
                if progress is not None:
                    progress(count)
            result = conn.execution_options(yield_per=chunk).execute(_heads_query(flt, dialect))
            for h in result:
                subjects += 1
                heads.update(head_digest_line(h.pseudonym, h.anchor, h.head, h.n))
            result.close()
    claims = {
        "iss": issuer, "typ": MANIFEST_TYPE, "jti": export_id, "iat": int(utcnow().timestamp()),
        "tenant": flt.tenant_id, "format": fmt, "filters": flt.claims(), "partial": flt.partial,
        "count": count, "first_recorded_at": crypto.iso(first_at) if first_at else None,
        "last_recorded_at": crypto.iso(last_at) if last_at else None,
        "body_sha256": body.hexdigest(), "subjects": subjects, "heads_sha256": heads.hexdigest(),
    }
    manifest = signer.sign(claims)
    with transaction(engine, write=True) as db:
        db.add(ExportManifest(id=export_id, tenant_id=flt.tenant_id, format=fmt, count=count,
                              body_sha256=claims["body_sha256"], manifest=manifest, created_at=utcnow()))
    if fmt == "jsonl":
        yield crypto.canonical_json({"manifest": manifest}) + b"\n"


def get_manifest(db: Any, tenant_id: str, export_id: str) -> ExportManifest | None:
    m = db.get(ExportManifest, export_id)
    return m if m is not None and m.tenant_id == tenant_id else None


def new_export_id() -> str:
    return crypto.new_id("exp", 12)
