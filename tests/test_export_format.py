"""The fast export path writes exactly the bytes of ``crypto.canonical_json`` (which the verifier
requires of every line): orjson, checked character by character, and whole exports compared with
lines rebuilt from the database by the slow, obvious code (ORM rows, ``record_content``)."""

from __future__ import annotations

import secrets

import orjson
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from consent import crypto
from consent.audit import exports, tlog, verify
from consent.ledger.recorder import record_content
from consent.store.models import ConsentRecord, Subject, TlogLeaf

from .helpers import Tenant
from .ledger_factory import generate_ledger

# every character that JSON may escape, a few that it must not, and the edges of Unicode
CHARS = [chr(c) for c in (*range(0x800), 0x2028, 0x2029, 0xFEFF, 0xFFFD, 0xFFFF, 0x10000, 0x1F600, 0x10FFFF)]
SORT = orjson.OPT_SORT_KEYS | orjson.OPT_APPEND_NEWLINE


def test_orjson_writes_canonical_json_for_every_line_value() -> None:
    for ch in [*CHARS, *(chr(c) for c in range(0x800, 0x10000, 97) if not 0xD800 <= c <= 0xDFFF)]:
        line = {"s": f"a{ch}b", "policy": {"version": ch, "key": None}, "n": 10**12, "linked": True, "x": False}
        assert orjson.dumps(line, option=SORT) == crypto.canonical_json(line) + b"\n", repr(ch)


def expected_lines(engine, tenant_id: str) -> list[bytes]:
    """Each export line rebuilt the slow way: ORM rows, ``record_content``, ``canonical_json``."""
    out = []
    with Session(engine) as db:
        rows = db.execute(sa.select(ConsentRecord, Subject.pseudonym)
                            .join(Subject, Subject.id == ConsentRecord.subject_id)
                            .where(ConsentRecord.tenant_id == tenant_id).order_by(ConsentRecord.seq)).all()
        leaves = dict(db.execute(sa.select(TlogLeaf.record_id, TlogLeaf.idx)).all())
    for n, (rec, pseudonym) in enumerate(rows, 1):
        disclosures = crypto.sha256_hex(crypto.canonical_json(rec.disclosures)) if rec.disclosures else None
        line = record_content(rec, pseudonym, disclosures)
        assert leaves.get(rec.id, rec.leaf_index) == rec.leaf_index  # the log's leaf is the stored index
        line.update(n=n, linked=rec.prev_hash is not None, record_hash=rec.record_hash, receipt=rec.receipt,
                    leaf=rec.leaf_index)
        out.append(crypto.canonical_json(line) + b"\n")
    return out


def records_of(lines: list[bytes]) -> list[bytes]:
    """The record lines of an export (not the policy-document, disclosure or manifest lines)."""
    return [x for x in lines if x.startswith(b'{"confirmed":')]


def test_fast_lines_equal_the_slow_canonical_lines(tenant: Tenant) -> None:
    engine = tenant.client.app.state.services.engine
    tenant.record(email="d@example.com")  # through the API: disclosures, evidence
    tenant.record("strictly_necessary", "acknowledged", email="d@example.com")  # with disclosures
    tenant.record("analytics", decision="denied", email="d@example.com")
    generate_ledger(engine, tenant.id, 700)
    s = tenant.client.app.state.services
    tlog.run_once(s.engine, s.settings, s.signer, wait=True)  # leaves for the first 703, not the last
    tenant.record(decision="withdrawn", email="d@example.com")
    body = records_of(tenant.get("/v1/exports/consents").content.splitlines(keepends=True))
    assert body == expected_lines(engine, tenant.id)
    assert b'"leaf":702,' in body[-2] and b'"leaf":703,' in body[-1]  # the last: stored, not in the tree yet
    assert any(b'"disclosures_sha256":"' in x for x in body) and b'"linked":true' in body[-1]


def test_stored_lines_equal_lines_built_from_columns(tenant: Tenant) -> None:
    """Exports join each record's stored line pieces (``export_line``); a record without them
    (written by other means) makes the export build every line from the columns instead. Both
    ways give the same body, for a whole export and for filtered ones (where ``linked`` is
    computed per export)."""
    engine = tenant.client.app.state.services.engine
    tenant.record("strictly_necessary", "acknowledged", email="s@example.com")  # with disclosures
    generate_ledger(engine, tenant.id, 300)
    tenant.record(decision="withdrawn", email="s@example.com")
    gone = tenant.record(email="erased@example.com")["subject"]
    assert tenant.delete(f"/v1/subjects/{gone}").status_code == 200  # appends an erasure record
    mid = tenant.get("/v1/exports/consents").content.splitlines()[150]
    at = orjson.loads(mid)["recorded_at"]
    queries = [{}, {"purpose": "analytics"}, {"from": at}, {"to": at, "purpose": "marketing_email"}]

    def bodies() -> list[list[bytes]]:
        out = []
        for q in queries:
            r = tenant.get("/v1/exports/consents", params=q)
            assert r.status_code == 200, r.text
            out.append(r.content.splitlines()[:-1])  # without the manifest (its id and time differ)
        return out

    stored = bodies()
    assert len(records_of(stored[0])) == 304 and all(len(b) > 0 for b in stored)
    assert any(b'"linked":false' in x for x in stored[2]) and any(b'"linked":true' in x for x in stored[2])
    with engine.begin() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM consent_record WHERE tenant_id = :t AND "
                                    "export_line IS NULL"), {"t": tenant.id}).scalar_one() == 0
        conn.execute(sa.text("UPDATE consent_record SET export_line = NULL WHERE id = :i"),
                     {"i": orjson.loads(mid)["id"]})
    assert bodies() == stored


@pytest.fixture(scope="module")
def pool():
    with verify.receipt_pool(2) as p:
        yield p


def test_receipts_checked_in_workers_name_the_same_first_bad_line(tenant: Tenant, tmp_path, pool, monkeypatch) -> None:
    """With receipts checked in batches by worker processes, the line reported is still the
    first bad one, and a receipt problem on a line comes before a later (or same-line chain)
    problem found by the walk."""
    monkeypatch.setattr(verify, "RECEIPT_BATCH", 16)
    engine = tenant.client.app.state.services.engine
    generate_ledger(engine, tenant.id, 120)
    lines = tenant.get("/v1/exports/consents").content.splitlines(keepends=True)
    keys = crypto.KeySet(tenant.client.get("/.well-known/jwks.json").json())
    report = verify.verify_jsonl(lines, keys, pool=pool)
    assert report.records == 120 and report.receipts == 120

    def first_bad(new: list[bytes]) -> tuple[int | None, str]:
        with pytest.raises(verify.VerifyError) as exc:
            verify.verify_jsonl(new, keys, pool=pool)
        return exc.value.line, exc.value.message

    def with_receipt(i: int, receipt: str) -> bytes:  # a line whose receipt is replaced (content intact)
        obj = orjson.loads(lines[i])
        obj["receipt"] = receipt
        return orjson.dumps(obj, option=SORT)

    other = orjson.loads(lines[5])["receipt"]
    forged = other[:-6] + ("A" if other[-6] != "A" else "B") + other[-5:]
    bad = list(lines)
    bad[40] = with_receipt(40, other)  # line 41: a valid receipt, for another record
    bad[90] = with_receipt(90, forged)
    assert first_bad(bad) == (41, "receipt names another record, hash or tenant")
    bad = list(lines)
    bad[90] = with_receipt(90, forged)  # line 91: signature broken...
    assert first_bad(bad)[0] == 91 and "receipt does not verify" in first_bad(bad)[1]
    bad = list(lines)
    bad[30] = with_receipt(30, other)  # ...a receipt problem before a line removed further on
    del bad[100]
    assert first_bad(bad)[0] == 31
    bad = list(lines)
    del bad[100]  # alone, the removed line is named (receipts before it are fine)
    assert first_bad(bad) == (101, first_bad(bad)[1]) and "removed" in first_bad(bad)[1]
    assert first_bad(lines[:-1])[0] == len(lines)  # truncated: every receipt checked first


def test_an_export_abandoned_midway_leaves_the_database_usable(tenant: Tenant) -> None:
    """A client that goes away mid-export closes the stream: the query is stopped (PostgreSQL:
    cancelled), its connection goes back to the pool clean, and the next export is whole."""
    services = tenant.client.app.state.services
    engine = services.engine
    generate_ledger(engine, tenant.id, 3000)
    flt = exports.ExportFilter(tenant.id)
    kw = {"signer": services.signer, "issuer": "test"}
    for _ in range(3):  # more times than the pool would survive leaked connections on SQLite
        body = exports.stream_export(engine, flt, "jsonl", export_id=exports.new_export_id(), chunk=50, **kw)
        assert next(body).count(b"\n") == 50
        body.close()
    tenant.record(email="after@example.com")  # the ledger takes writes
    whole = b"".join(exports.stream_export(engine, flt, "jsonl", export_id=exports.new_export_id(), **kw))
    lines = whole.splitlines()
    assert len(records_of(lines)) == 3001 and b"manifest" in lines[-1]  # every record, then the manifest


def test_record_rows_are_stored_whole_on_postgresql(tenant: Tenant, backend: str) -> None:
    """Migration 0011: a record row of a few KB (a receipt alone is ~1 KB) stays in the table
    instead of having its largest values moved out of line into the TOAST table, which an
    export would then fetch one by one. Without the setting PostgreSQL moves values out of any
    row above ~2 KB (about half of the bench ledger's rows)."""
    if backend != "postgresql":
        pytest.skip("a PostgreSQL storage setting")
    engine = tenant.client.app.state.services.engine

    def toasted() -> int:
        with engine.connect() as conn:
            toast = conn.execute(sa.text("SELECT reltoastrelid::regclass::text FROM pg_class "
                                         "WHERE oid = 'consent_record'::regclass")).scalar_one()
            return int(conn.execute(sa.text(f"SELECT count(*) FROM {toast}")).scalar_one())

    before = toasted()
    # Random hex (hardly compressible) evidence: a row of ~3.5 KB, above the default threshold.
    rid = tenant.record(email="whole@example.com",
                        evidence={"user_agent": secrets.token_hex(500), "form": secrets.token_hex(500)})["id"]
    with engine.connect() as conn:
        size = conn.execute(sa.text("SELECT octet_length(export_line) + octet_length(receipt) + "
                                    "octet_length(evidence::text) FROM consent_record WHERE id = :i"),
                            {"i": rid}).scalar_one()
        options = conn.execute(sa.text("SELECT reloptions FROM pg_class WHERE oid = 'consent_record'::regclass"))
        assert "toast_tuple_target=8160" in options.scalar_one()
    assert 3000 < size < 8000
    assert toasted() == before
