"""Streaming, offline-verifiable exports of a tenant's consent ledger.

One line per record, in ledger order (``seq``), streamed by one query inside one snapshot
transaction, so memory stays flat however large the ledger. A line carries exactly
what its record hash covers (``ledger.record_content``: the subject appears only as its keyed
pseudonym, evidence only by its SHA-256) plus the record hash and receipt, its position ``n``
and ``linked`` (whether its ``prev_hash`` is the hash of an earlier line of the same export).
Anyone can recompute every hash without a secret.

The export ends with a manifest, an EdDSA JWT signed by the service key: filters, count, time
range, SHA-256 of the body, and a digest of every subject's chain (anchor, head, count). It is
the last JSONL line, and is stored so it can also be fetched by export id (CSV has no trailer).

Speed (a million records in seconds, see docs/audit.md): every line's fixed part is stored with
its record when it is written (``consent_record.export_line``, ``ledger.export_line``: canonical
JSON in three pieces), so a JSONL export fetches three columns per record and joins bytes around
``linked``, ``n`` and the receipt (``Lines.stored_jsonl``; on PostgreSQL in binary, streamed
in chunks). A tenant with any record lacking it (rows written by other means) and CSV
exports build lines from the columns instead (``Lines.dicts``: plain driver tuples, timestamps
formatted once, orjson). Many lines go per chunk, SHA-256 runs in a thread, and the chain heads
are computed on a second connection while the records stream.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
import sqlalchemy as sa
from psycopg import pq as psycopg_pq
from sqlalchemy.engine import Engine

from consent import crypto
from consent.audit.tlog import CHECKPOINT
from consent.ledger.recorder import LINE_SEP
from consent.store.db import transaction
from consent.store.models import ExportManifest, utcnow
from consent.store.tables import POLICY_VERSION as PV
from consent.store.tables import RECORD as REC
from consent.store.tables import SUBJECT as SUBJ

FORMATS = ("jsonl", "csv")
MANIFEST_TYPE = "consent-export-manifest/1"
CONTENT_KEYS = ("v", "id", "tenant", "subject", "purpose", "decision", "confirmed", "policy", "source",
                "evidence_sha256", "disclosures_sha256", "recorded_at", "prev_hash")
LINE_KEYS = frozenset((*CONTENT_KEYS, "n", "leaf", "linked", "record_hash", "receipt"))
GPC_LINE_KEYS = LINE_KEYS | {"gpc"}  # a record made with a GPC signal: ``"gpc": true`` is hashed too
# CSV exports made before the ``gpc`` column still verify (``consent verify`` takes either header).
CSV_COLUMNS_V1 = ("n", "linked", "v", "id", "tenant", "subject", "purpose", "decision", "confirmed",
                  "policy_key", "policy_version", "source", "evidence_sha256", "disclosures_sha256",
                  "recorded_at", "prev_hash", "record_hash", "receipt")
# Then the readable columns: ``gpc``; the policy document of the record's version (URL and
# SHA-256); the disclosure it acknowledged, as cookie names and as the canonical JSON whose
# SHA-256 is ``disclosures_sha256`` (``consent verify`` checks both against the record).
CSV_COLUMNS = (*CSV_COLUMNS_V1, "gpc", "policy_url", "policy_sha256", "disclosed_cookies", "disclosures")
# JSONL: after the records, one line per policy document and per disclosure snapshot the
# records point to (``References``), before the manifest (so inside ``body_sha256``).
POLICY_LINE, DISCLOSURE_LINE = "policy_document", "disclosure"
CHUNK = 1024  # records per yielded chunk (~1.6 MiB of JSONL): fewer thread hand-offs and writes
HEADS_WORK_MEM = "64MB"  # PostgreSQL, for the chain-heads query of an export


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


ISO_PG = 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'  # crypto.iso, formatted by the server


def _upto(max_seq: int | None) -> list[Any]:
    return [] if max_seq is None else [REC.c.seq <= max_seq]


def _records_query(flt: ExportFilter, dialect: str, max_seq: int | None) -> Any:
    """The columns of a line for ``Lines``, as plain values (no per-row conversion by SQLAlchemy:
    ``recorded_at`` as text, 0/1 for booleans on SQLite)."""
    at: sa.ColumnElement[str]
    if dialect == "postgresql":
        at = sa.func.to_char(sa.func.timezone("UTC", REC.c.recorded_at), ISO_PG, type_=sa.Text)
    else:
        at = sa.type_coerce(REC.c.recorded_at, sa.Text)
    linked = sa.case((_linked(flt), 1), else_=0) if flt.partial else sa.null()
    return (
        sa.select(REC.c.id, REC.c.purpose, REC.c.decision, sa.type_coerce(REC.c.confirmed, sa.Integer),
                  REC.c.policy_key, REC.c.policy_version, REC.c.source, REC.c.evidence_sha256,
                  sa.cast(REC.c.disclosures, sa.Text), at, REC.c.prev_hash, REC.c.record_hash,
                  REC.c.receipt, SUBJ.c.pseudonym, linked, sa.type_coerce(REC.c.gpc, sa.Integer),
                  REC.c.policy_version_id, PV.c.document_url, PV.c.document_sha256, REC.c.leaf_index)
        .select_from(REC.join(SUBJ, SUBJ.c.id == REC.c.subject_id)
                     .outerjoin(PV, PV.c.id == REC.c.policy_version_id))
        .where(*flt.where(REC), *_upto(max_seq))
        .order_by(REC.c.seq)
    )


def _stored_lines_query(flt: ExportFilter, dialect: str, max_seq: int | None) -> Any:
    """For ``Lines.stored_jsonl``: each record's stored line pieces, receipt and ``linked``.

    The receipt comes as its UTF-8 bytes (perf: no text decoding by the driver, no JSON
    encoding per line).
    ``convert_to`` on PostgreSQL: a ``text::bytea`` cast would read backslashes as escapes."""
    linked = _linked(flt) if flt.partial else REC.c.prev_hash.is_not(None)
    receipt: sa.ColumnElement[bytes]
    if dialect == "postgresql":
        receipt = sa.func.convert_to(REC.c.receipt, sa.literal_column("'UTF8'"), type_=sa.LargeBinary)
    else:
        receipt = sa.cast(REC.c.receipt, sa.LargeBinary)
    # The policy version the record points to; its disclosure (if any) is read from the line
    # itself (``stored_jsonl``): the disclosure JSON as a column costs more per row.
    return (sa.select(REC.c.export_line, receipt, sa.case((linked, 1), else_=0), REC.c.policy_version_id,
                      REC.c.leaf_index)
            .where(*flt.where(REC), *_upto(max_seq)).order_by(REC.c.seq))


def _lines_stored(conn: Any, flt: ExportFilter, max_seq: int | None) -> bool:
    """Whether every record of the tenant has its line stored (one probe of a partial index)."""
    missing = sa.select(REC.c.seq).where(REC.c.tenant_id == flt.tenant_id, REC.c.export_line.is_(None),
                                         *_upto(max_seq)).limit(1)
    return conn.execute(missing).first() is None


def _heads_query(flt: ExportFilter, dialect: str, max_seq: int | None = None) -> Any:
    """Per subject in the export: pseudonym, anchor (first line's prev_hash), head, count."""
    g = (sa.select(REC.c.subject_id, sa.func.min(REC.c.seq).label("first"), sa.func.max(REC.c.seq).label("last"),
                   sa.func.count().label("n"))
         .where(*flt.where(REC), *_upto(max_seq)).group_by(REC.c.subject_id).subquery())
    first, last = REC.alias("first_rec"), REC.alias("last_rec")
    order = sa.collate(SUBJ.c.pseudonym, "C") if dialect == "postgresql" else SUBJ.c.pseudonym
    return (sa.select(SUBJ.c.pseudonym, first.c.prev_hash.label("anchor"), last.c.record_hash.label("head"), g.c.n)
            .select_from(g.join(SUBJ, SUBJ.c.id == g.c.subject_id)
                         .join(first, first.c.seq == g.c.first).join(last, last.c.seq == g.c.last))
            .order_by(order))


def _unfiltered_heads_query(flt: ExportFilter, dialect: str, max_seq: int | None = None) -> Any:
    """``_heads_query`` for an unfiltered export, read where the subjects' rows are of the same
    snapshot as the records: every chain is whole there (records are only ever deleted with
    their subject, and ``consent verify`` allows an anchor only in a filtered export), so the
    anchor is null and the head is ``subject.head_hash``, which every writer sets in the
    transaction that appends the record. Only the counts come from the records, read from the
    (tenant, subject, seq) index alone.

    Perf: no lookup of each subject's first and last record rows, which cost most of an
    export's time on a large ledger."""
    assert not flt.partial
    g = (sa.select(REC.c.subject_id, sa.func.count().label("n"))
         .where(*flt.where(REC), *_upto(max_seq)).group_by(REC.c.subject_id).subquery())
    order = sa.collate(SUBJ.c.pseudonym, "C") if dialect == "postgresql" else SUBJ.c.pseudonym
    return (sa.select(SUBJ.c.pseudonym, sa.null().label("anchor"), SUBJ.c.head_hash.label("head"), g.c.n)
            .select_from(g.join(SUBJ, SUBJ.c.id == g.c.subject_id)).order_by(order))


class Disclosures:
    """``disclosures_sha256`` of stored disclosure JSON, cached by the text (most records of a
    policy version share one list) in a bounded dict."""

    def __init__(self) -> None:
        self._cache: dict[str, str | None] = {}

    def __call__(self, text: str | None) -> str | None:
        if text is None:
            return None
        digest = self._cache.get(text, "")
        if digest == "":
            value = json.loads(text)
            digest = crypto.sha256_hex(crypto.canonical_json(value)) if value else None
            if len(self._cache) >= 1024:
                self._cache.clear()
            self._cache[text] = digest
        return digest


class Lines:
    """Export lines (JSONL or CSV) from ``_records_query`` rows, a chunk at a time.

    The JSONL bytes are exactly ``crypto.canonical_json`` of the line: orjson with sorted keys
    gives the same bytes for the str/int/bool/None values of a line (tests/test_export_format.py).
    """

    def __init__(self, tenant_id: str, partial: bool):
        self.tenant_id = tenant_id
        self.partial = partial
        self.count = 0
        self._disclosures = Disclosures()
        self.references = References()

    def dicts(self, rows: Iterable[Any]) -> Iterator[dict[str, Any]]:
        n = self.count
        tenant = self.tenant_id
        disclosures = self._disclosures
        partial = self.partial
        versions, texts = self.references.versions, self.references.texts
        try:
            for (rid, purpose, decision, confirmed, policy_key, policy_version, source, evidence_sha256,
                 disclosures_json, at, prev_hash, record_hash, receipt, pseudonym, linked, gpc, version_id,
                 _url, _sha, leaf) in rows:
                n += 1
                versions.add(version_id)
                if disclosures_json is not None:
                    texts.add(disclosures_json)
                if len(at) != 27:  # PostgreSQL formats it already; SQLite stores 'YYYY-MM-DD HH:MM:SS.ffffff'
                    at = f"{at[:10]}T{at[11:]}Z" if len(at) == 26 and at[10] == " " else _iso_text(at)
                line = {
                    "confirmed": bool(confirmed), "decision": decision,
                    "disclosures_sha256": disclosures(disclosures_json), "evidence_sha256": evidence_sha256,
                    "id": rid, "leaf": leaf, "linked": bool(linked) if partial else prev_hash is not None, "n": n,
                    "policy": {"key": policy_key, "version": policy_version}, "prev_hash": prev_hash,
                    "purpose": purpose, "receipt": receipt, "record_hash": record_hash,
                    "recorded_at": at, "source": source, "subject": pseudonym, "tenant": tenant, "v": 1,
                }
                if gpc:  # only on records made with a GPC signal (``ledger.record_content``)
                    line["gpc"] = True
                yield line
        finally:
            self.count = n

    def jsonl(self, rows: Iterable[Any]) -> bytes:
        opt = orjson.OPT_SORT_KEYS | orjson.OPT_APPEND_NEWLINE
        return b"".join([orjson.dumps(line, option=opt) for line in self.dicts(rows)])

    def csv(self, rows: Iterable[Any]) -> bytes:
        rows = list(rows)
        return csv_bytes([csv_row(line, readable=(row[17], row[18], row[8]))
                          for row, line in zip(rows, self.dicts(rows))])

    def stored_jsonl(self, rows: Iterable[Any]) -> bytes:
        """JSONL from ``_stored_lines_query`` rows: each record's stored line pieces
        (``ledger.export_line``) joined around ``linked``, ``n`` and the receipt. The same
        bytes as ``jsonl`` at a fraction of the work: no per-column values, no encoding.

        A receipt (its UTF-8 bytes) goes between quotes as it is: every receipt is a compact
        JWS made by this service's signer (base64url and dots), which JSON never escapes. The
        stored pieces are trusted the same way; a line altered in the database fails
        verification (``consent.audit.verify``) either way."""
        n = self.count
        parts: list[bytes] = []
        extend, sep = parts.extend, LINE_SEP
        refs = self.references
        versions_add, disclosure_in = refs.versions.add, refs.disclosure_in
        for stored, receipt, linked, version_id, leaf in rows:
            n += 1
            a, b, c = stored.split(sep, 2)
            versions_add(version_id)
            # ``"disclosures_sha256":"`` (not ``null``) lies within a's first 90 bytes (after
            # ``confirmed`` and ``decision``): a bounded search in C.
            if a.find(_DISCLOSED, 20, 90) >= 0:
                disclosure_in(a)
            extend((a, _NO_LEAF if leaf is None else b'"leaf":%d,' % leaf, _LINKED if linked else _UNLINKED,
                    b"%d," % n, b, _RECEIPT, receipt, b'"', c, b"\n"))
        self.count = n
        return b"".join(parts)


_DISCLOSED = b'"disclosures_sha256":"'
_LINKED, _UNLINKED, _RECEIPT = b'"linked":true,"n":', b'"linked":false,"n":', b'"receipt":"'
_NO_LEAF = b'"leaf":null,'  # a record without a log index (only below the migration that gives one)


def _iso_text(at: str) -> str:
    """``crypto.iso`` of a stored timestamp text in another form than the usual one."""
    dt = datetime.fromisoformat(at.removesuffix("Z"))
    return crypto.iso(dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC))


def _csv_value(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def csv_row(line: dict[str, Any], readable: tuple[Any, Any, Any] = (None, None, None)) -> list[str]:
    """A line as CSV cells; ``readable``: the version's document URL and SHA-256 and the
    record's stored disclosure JSON (None where there is none)."""
    url, sha, disclosures_json = readable
    cookies = json.loads(disclosures_json) if disclosures_json and line["disclosures_sha256"] else None
    flat = {**line, "policy_key": line["policy"]["key"], "policy_version": line["policy"]["version"],
            "gpc": line.get("gpc"), "policy_url": url, "policy_sha256": sha,
            "disclosed_cookies": "; ".join(str(c.get("name")) for c in cookies) if cookies else None,
            "disclosures": crypto.canonical_json(cookies).decode() if cookies else None}
    return [_csv_value(flat[c]) for c in CSV_COLUMNS]


class References:
    """What the streamed records point to: policy versions (by id) and disclosure snapshots
    (their stored JSON), collected while streaming; ``lines`` reads the versions in the same
    snapshot and returns one canonical line per document and per snapshot."""

    def __init__(self) -> None:
        self.versions: set[int | None] = set()
        self.texts: set[str] = set()
        self.first_with: dict[bytes, bytes] = {}  # disclosures_sha256 -> id of a record holding it

    def disclosure_in(self, a: bytes) -> None:
        """Note the disclosure of a stored line's first piece (``ledger.export_line``: it holds
        ``disclosures_sha256`` and ends with ``id``); its JSON is read once per hash, at the end.
        An empty disclosure list is hashed as null: nothing to note."""
        at = a.find(_DISCLOSED) + len(_DISCLOSED)
        sha = a[at:at + 64]
        if sha not in self.first_with:
            self.first_with[sha] = a[a.rindex(b'"id":"') + 6:-2]

    def lines(self, conn: Any, tenant_id: str) -> list[bytes]:
        records = [i.decode() for i in self.first_with.values()]
        for i in range(0, len(records), 500):
            self.texts.update(conn.execute(sa.select(sa.cast(REC.c.disclosures, sa.Text)).where(
                REC.c.tenant_id == tenant_id, REC.c.id.in_(records[i:i + 500]))).scalars())
        ids = sorted(v for v in self.versions if v is not None)
        docs = []
        for i in range(0, len(ids), 500):
            docs += conn.execute(sa.select(PV.c.policy_key, PV.c.version, PV.c.document_url, PV.c.document_sha256,
                                           PV.c.effective_at, PV.c.material)
                                 .where(PV.c.tenant_id == tenant_id, PV.c.id.in_(ids[i:i + 500]))).all()
        out = [crypto.canonical_json({POLICY_LINE: {
            "key": d.policy_key, "version": d.version, "url": d.document_url, "sha256": d.document_sha256,
            "effective_at": crypto.iso(_utc(d.effective_at)), "material": bool(d.material)}})
            for d in sorted(docs, key=lambda d: (d.policy_key, d.version))]
        snapshots: dict[str, Any] = {}
        for text in self.texts:
            cookies = json.loads(text)
            if cookies:  # an empty list is hashed as null by the record (``ledger.hashed_content``)
                snapshots[crypto.sha256_hex(crypto.canonical_json(cookies))] = cookies
        out += [crypto.canonical_json({DISCLOSURE_LINE: {"sha256": sha, "cookies": snapshots[sha]}})
                for sha in sorted(snapshots)]
        return [line + b"\n" for line in out]


def _utc(value: Any) -> datetime:
    """A timestamp read by a Core select of a column whose type converts it (tz-aware) or, on
    some drivers, as stored text."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


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
    """Yield the export body in chunks of bytes (``chunk`` records each, ~1.6 MiB), then
    (JSONL) the manifest line; the manifest is stored under ``export_id`` once the body is complete.

    One streaming query reads the records (a server-side cursor on PostgreSQL) while a second
    connection, seeing the same data, computes the chain heads and time range in a thread.
    Memory holds one chunk whatever the ledger size.
    """
    body = hashlib.sha256()
    dialect = engine.dialect.name
    with engine.connect() as conn:
        if dialect == "postgresql":  # one snapshot for the records and the chain heads
            conn = conn.execution_options(isolation_level="REPEATABLE READ")
        with conn.begin():
            if dialect == "postgresql":  # a JIT compile costs seconds and saves nothing on a streaming scan
                conn.exec_driver_sql("SET LOCAL jit = off")
            heads = _Heads(engine, conn, flt)
            checkpoint = conn.execute(sa.select(CHECKPOINT.c.size, CHECKPOINT.c.note).where(
                CHECKPOINT.c.tenant_id == flt.tenant_id).order_by(CHECKPOINT.c.size.desc()).limit(1)).first()
            lines = Lines(flt.tenant_id, flt.partial)
            stored = fmt == "jsonl" and _lines_stored(conn, flt, heads.max_seq)
            if stored:
                encode, query = lines.stored_jsonl, _stored_lines_query(flt, dialect, heads.max_seq)
            else:
                encode = lines.csv if fmt == "csv" else lines.jsonl
                query = _records_query(flt, dialect, heads.max_seq)
            hasher = ThreadPoolExecutor(1, thread_name_prefix="export-sha256")  # in order, off this thread
            hashing: Future[None] | None = None
            try:
                if fmt == "csv":
                    header = csv_bytes([list(CSV_COLUMNS)])
                    body.update(header)
                    yield header
                for rows in _chunks(conn, query, chunk, binary=stored):
                    data = encode(rows)
                    if hashing is not None:
                        hashing.result()  # one chunk in the hasher at a time: memory stays flat
                    hashing = hasher.submit(body.update, data)  # hashlib lets go of the GIL
                    yield data
                    if progress is not None:
                        progress(lines.count)
                references = lines.references.lines(conn, flt.tenant_id) if fmt == "jsonl" else []
                if references:  # inside the body the manifest hashes
                    data = b"".join(references)
                    if hashing is not None:
                        hashing.result()
                    hashing = hasher.submit(body.update, data)
                    yield data
            finally:
                hasher.shutdown(wait=True)
            summary = heads.result(conn)
    count = lines.count
    if summary.count != count:  # a record in range was deleted as the export started (retention)
        raise RuntimeError(f"export inconsistent: {count} records streamed, {summary.count} in the chain heads")
    claims: dict[str, Any] = {
        "iss": issuer, "typ": MANIFEST_TYPE, "jti": export_id, "iat": int(utcnow().timestamp()),
        "tenant": flt.tenant_id, "format": fmt, "filters": flt.claims(), "partial": flt.partial,
        "count": count, "first_recorded_at": summary.first_at, "last_recorded_at": summary.last_at,
        "body_sha256": body.hexdigest(), "subjects": summary.subjects, "heads_sha256": summary.heads_sha256,
        # The newest checkpoint of the tenant's transparency log in the export's snapshot: every
        # leaf below its size is a line of an unfiltered export ("leaf"); ``consent verify``
        # recomputes its root (docs/transparency.md).
        "tlog": {"size": checkpoint.size, "checkpoint": checkpoint.note} if checkpoint else None,
        "references": len(references),  # policy-document and disclosure lines before the manifest
    }
    manifest = signer.sign(claims)
    with transaction(engine, write=True) as db:
        db.add(ExportManifest(id=export_id, tenant_id=flt.tenant_id, format=fmt, count=count,
                              body_sha256=claims["body_sha256"], manifest=manifest, created_at=utcnow()))
    if fmt == "jsonl":
        yield crypto.canonical_json({"manifest": manifest}) + b"\n"


def _chunks(conn: Any, query: Any, chunk: int, binary: bool = False) -> Iterator[Any]:
    """The rows of a query, ``chunk`` at a time, as the driver's plain tuples.

    PostgreSQL: a server-side cursor read ahead by a thread (psycopg lets go of the GIL while
    it waits, so the server computes the next rows while these are encoded); with ``binary``
    straight through psycopg in binary format (``bytea`` then travels as its bytes, not as
    twice as many hex digits; only for columns whose Python values are the same either way),
    streamed in chunks where libpq allows it (17+).
    SQLite: straight from the DBAPI cursor (SQLAlchemy's per-row result handling costs as much
    as SQLite itself; a reading thread would not help, sqlite3 takes the GIL back for every row).
    """
    if conn.dialect.name == "postgresql":
        yield from _ReadAhead(conn, query, chunk, binary)
        return
    result = conn.execute(query)
    try:
        cursor = result.cursor
        while rows := cursor.fetchmany(chunk):
            yield rows
    finally:
        result.close()


class _ReadAhead:
    """Iterates over the partitions of a streamed query fetched by a thread, a few ahead."""

    _END = object()

    def __init__(self, conn: Any, query: Any, chunk: int, binary: bool = False, ahead: int = 2):
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=ahead)
        self._stop = threading.Event()
        read = self._run_binary if binary else self._run
        self._thread = threading.Thread(target=self._guarded, args=(read, conn, query, chunk), daemon=True,
                                        name="export-read")
        self._thread.start()

    def _run(self, conn: Any, query: Any, chunk: int) -> None:
        result = conn.execution_options(stream_results=True, yield_per=chunk).execute(query)
        try:
            for rows in result.partitions():
                if not self._put(rows):
                    return
        finally:
            result.close()

    def _run_binary(self, conn: Any, query: Any, chunk: int) -> None:
        compiled = query.compile(dialect=conn.dialect)
        raw = conn.connection.driver_connection  # inside the export's transaction and snapshot
        if psycopg_pq.version() >= 170000:  # libpq 17: rows streamed in chunks
            # Perf: the server sends every row without waiting to be asked (a named cursor
            # waits for each FETCH: the server idles while a batch is read, ~25 % slower).
            with raw.cursor(binary=True) as cursor:
                rows = cursor.stream(str(compiled), compiled.params, size=chunk)
                try:
                    while part := list(itertools.islice(rows, chunk)):
                        if not self._put(part):
                            return
                finally:
                    rows.close()  # an export abandoned midway: psycopg cancels the query
            return
        with raw.cursor(name="export_lines", binary=True) as cursor:
            cursor.itersize = chunk
            cursor.execute(str(compiled), compiled.params)
            while part := cursor.fetchmany(chunk):
                if not self._put(part):
                    return

    def _guarded(self, read: Callable[[Any, Any, int], None], conn: Any, query: Any, chunk: int) -> None:
        try:
            read(conn, query, chunk)
            self._put(self._END)
        except BaseException as exc:  # noqa: BLE001 - raised in the consumer
            self._put(exc)

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[Any]:
        try:
            while (item := self._queue.get()) is not self._END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:  # also when the export is abandoned: the connection is this thread's again
            self._stop.set()
            self._thread.join()


@dataclass
class HeadsSummary:
    subjects: int
    heads_sha256: str
    count: int
    first_at: str | None
    last_at: str | None


class _Heads:
    """The chain-heads digest and time range of an export, computed while its records stream.

    It runs in a thread on a second connection that sees exactly the records of the streaming
    one: on PostgreSQL it imports the export transaction's snapshot; on SQLite (one writer at a
    time, so ``seq`` grows in commit order) both read up to the same highest ``seq``, and the
    counts are compared at the end. An in-memory SQLite database has one connection: the
    heads are computed after the records there.
    """

    def __init__(self, engine: Engine, conn: Any, flt: ExportFilter):
        self.flt = flt
        self.dialect = engine.dialect.name
        self.max_seq: int | None = None
        snapshot = None
        if self.dialect == "postgresql":
            snapshot = conn.execute(sa.select(sa.func.pg_export_snapshot())).scalar_one()
        else:  # also starts this connection's read snapshot
            self.max_seq = self._max_seq(conn)
        self._outcome: HeadsSummary | BaseException | None = None
        self._thread: threading.Thread | None = None
        if snapshot is not None or engine.url.database not in (None, "", ":memory:"):
            self._thread = threading.Thread(target=self._run, args=(engine, snapshot), daemon=True,
                                            name="export-heads")
            self._thread.start()

    def _run(self, engine: Engine, snapshot: str | None) -> None:
        try:
            with engine.connect() as conn:
                if snapshot is not None:
                    conn = conn.execution_options(isolation_level="REPEATABLE READ")
                with conn.begin():
                    if snapshot is not None:
                        conn.execute(sa.text("SET TRANSACTION SNAPSHOT " + _sql_string(snapshot)))
                        # one hash aggregate over the ledger's subjects, in memory rather than on disk
                        conn.exec_driver_sql(f"SET LOCAL work_mem = '{HEADS_WORK_MEM}'")
                        conn.exec_driver_sql("SET LOCAL jit = off")
                    # SQLite: this connection's snapshot is the export's when no record came since
                    # (seq grows in commit order; a deletion shows in the counts, see result()).
                    same = snapshot is not None or self._max_seq(conn) == self.max_seq
                    self._outcome = self._compute(conn, same_snapshot=same)
        except BaseException as exc:  # noqa: BLE001 - raised by result(), in the export's thread
            self._outcome = exc

    @staticmethod
    def _max_seq(conn: Any) -> int:
        return int(conn.execute(sa.select(sa.func.max(REC.c.seq))).scalar() or 0)

    def _compute(self, conn: Any, same_snapshot: bool = True) -> HeadsSummary:
        # The time range from the (tenant, recorded_at) index, one row at each end. Perf: min() and
        # max() with SQLite's seq bound scanned every record (0.52 s -> 0.004 s, full ledger).
        cond = [*self.flt.where(REC), *_upto(self.max_seq)]
        span = [conn.execute(sa.select(REC.c.recorded_at).where(*cond).order_by(order).limit(1)).scalar()
                for order in (REC.c.recorded_at, REC.c.recorded_at.desc())]
        heads = _heads_query if self.flt.partial or not same_snapshot else _unfiltered_heads_query
        digest = hashlib.sha256()
        subjects = counted = 0
        for part in _chunks(conn, heads(self.flt, self.dialect, self.max_seq), 500):
            subjects += len(part)
            counted += sum(h[3] for h in part)
            digest.update(b"".join([head_digest_line(*h) for h in part]))
        return HeadsSummary(subjects, digest.hexdigest(), counted,
                            crypto.iso(span[0]) if span[0] is not None else None,
                            crypto.iso(span[1]) if span[1] is not None else None)

    def result(self, conn: Any) -> HeadsSummary:
        """The summary; ``conn`` (the export's) computes it when there is no thread."""
        if self._thread is None:
            return self._compute(conn)
        self._thread.join()
        if isinstance(self._outcome, BaseException):
            raise self._outcome
        assert self._outcome is not None
        return self._outcome


def _sql_string(s: str) -> str:
    if not s.replace("-", "").isalnum():  # pg_export_snapshot() ids look like 00000003-0000001B-1
        raise ValueError(f"unexpected snapshot id {s!r}")
    return f"'{s}'"


def get_manifest(db: Any, tenant_id: str, export_id: str) -> ExportManifest | None:
    m = db.get(ExportManifest, export_id)
    return m if m is not None and m.tenant_id == tenant_id else None


def new_export_id() -> str:
    return crypto.new_id("exp", 12)
