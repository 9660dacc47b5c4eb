"""GET /v1/check on its batched executor (consent/ledger/batch_reads.py) against its per-request one.

The same requests go to the service as it runs and to one whose batched reader is switched off
(every check on ``checks.check_rows``), on the same database: every answer, error or not, must
be the same, and the reader must actually have answered the well-formed ones. Batched reads
(one statement for many checks, on both databases) are checked against one-at-a-time answers
with many tenants, keys and subjects in one batch.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import sqlite3
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from urllib.parse import parse_qsl, urlencode

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from consent import crypto
from consent.ledger import batch_reads, checks, statements
from consent.store import db, models
from consent.web.http import query_pairs

from .helpers import ADMIN, Tenant, make_tenant


def reader_of(client: TestClient) -> batch_reads.Reader:
    reader = client.app.state.services.check_reader  # type: ignore[attr-defined]
    assert reader is not None, "the batched reader runs for file and server databases"
    return reader  # type: ignore[no-any-return]


def reader_for(engine: Any) -> batch_reads.Reader:
    """The batched reader of the engine's database."""
    reader = batch_reads.open_reader(engine)
    assert reader is not None
    return reader


def same_answer(fast: TestClient, route: TestClient, headers: dict[str, str], params: Any) -> tuple[int, Any]:
    a = fast.get("/v1/check", params=params, headers=headers)
    b = route.get("/v1/check", params=params, headers=headers)
    body_a, body_b = a.json(), b.json()
    for body in (body_a, body_b):
        body.pop("request_id", None)  # problem bodies name their own request
    assert (a.status_code, body_a) == (b.status_code, body_b), params
    assert a.headers["content-type"] == b.headers["content-type"]
    assert a.headers["x-request-id"] and a.headers["x-content-type-options"] == "nosniff"
    return a.status_code, body_a


def test_batched_reads_answer_exactly_as_per_request(client: TestClient, route_client: TestClient) -> None:
    t = make_tenant(client)
    t.record("marketing_email", "granted", email="old@example.com")  # under v1 ...
    t.publish("v2", material=True, purposes=["strictly_necessary", "analytics", "product_updates"])
    t.publish("v3", material=True, purposes=["strictly_necessary", "marketing_email"])  # ... stale now
    t.record(email="Ada@Example.com")
    t.record("analytics", "denied", anonymous_id="anon-1")
    t.record("analytics", "granted", user_id="u-7")
    t.record("analytics", "withdrawn", user_id="u-7")
    t.record("product_updates", "granted", email="bob@example.com")  # double opt-in: pending
    sub = t.record("marketing_email", "granted", email="cy@example.com")["subject"]
    reader = reader_of(client)
    before = reader.answered
    fine = [
        {"purpose": "marketing_email", "email": " ADA@example.com "},
        {"purpose": "marketing_email", "email": "old@example.com"},
        {"purpose": "marketing_email", "subject": sub},
        {"purpose": "marketing_email", "subject": "email:cy@example.com"},
        {"purpose": "analytics", "anonymous_id": "anon-1"},
        {"purpose": "analytics", "subject": "anon:anon-1"},
        {"purpose": "analytics", "subject": "u-7"},
        {"purpose": "analytics", "subject": "user:u-7"},
        {"purpose": "product_updates", "email": "bob@example.com"},
        {"purpose": "marketing_email", "email": "nobody@example.com"},
        {"purpose": "marketing_email", "subject": "sub_000000000000000000000000"},
        {"purpose": "marketing_email", "email": "", "subject": sub},  # an empty one is absent
    ]
    statuses = []
    for params in fine:
        code, body = same_answer(client, route_client, t.h, params)
        assert code == 200, body
        statuses.append(body["status"])
    assert statuses == ["granted", "stale", "granted", "granted", "denied", "denied", "withdrawn", "withdrawn",
                        "pending_confirmation", "none", "none", "granted"]
    assert reader.answered - before == len(fine)

    before = reader.answered
    refused = [
        {"purpose": "nope", "email": "ada@example.com"},  # unknown purpose, known subject
        {"purpose": "nope", "email": "nobody@example.com"},
        {"email": "ada@example.com"},
        {"purpose": "", "email": "ada@example.com"},
        {"purpose": "marketing_email"},
        {"purpose": "marketing_email", "email": "ada@example.com", "anonymous_id": "anon-1"},
        {"purpose": "marketing_email", "emial": "ada@example.com"},
        {"purpose": "marketing_email", "email": "a" * 321},
        {"purpose": "marketing_email", "email": "ada\x00@example.com"},
        {"purpose": "marketing_email", "email": "ada@example.com", "at": "not a time"},
    ]
    for params in refused:
        code, body = same_answer(client, route_client, t.h, params)
        assert code == 422 and body["type"].endswith("validation_failed"), (params, body)
    # as of a time: from the ledger, never by the reader
    code, body = same_answer(client, route_client, t.h, {"purpose": "marketing_email", "email": "ada@example.com",
                                                         "at": datetime.now(UTC).isoformat()})
    assert code == 200 and body["status"] == "granted"
    assert reader.answered == before + 2  # only the two unknown purposes, found by the statement


def test_keys_are_checked_on_every_call(client: TestClient, route_client: TestClient) -> None:
    t = make_tenant(client)
    t.record(email="ada@example.com")
    params = {"purpose": "marketing_email", "email": "ada@example.com"}
    assert same_answer(client, route_client, t.h, params)[0] == 200  # the key is now cached
    for headers, code in [({}, 401), ({"Authorization": "Basic abc"}, 401),
                          ({"Authorization": "Bearer sk_unknown"}, 401),
                          ({"Authorization": f"Bearer {t.publishable_key}"}, 403),
                          ({"Authorization": f"Bearer {t.secret_key}x"}, 401)]:
        assert same_answer(client, route_client, headers, params)[0] == code
    old = t.h
    r = t.post("/v1/keys/rotate", json={"kind": "secret", "leaked": True})
    assert r.status_code == 200, r.text
    # revoked in another "process" (the second app): the very next check refuses the cached key
    assert client.get("/v1/check", params=params, headers=old).status_code == 401
    t.secret_key = r.json()["secret_key"]
    assert same_answer(client, route_client, t.h, params)[1]["status"] == "granted"


def test_a_subject_id_of_another_tenant_is_not_seen(client: TestClient, route_client: TestClient) -> None:
    a, b = make_tenant(client), make_tenant(client)
    sub = a.record(email="ada@example.com")["subject"]
    code, body = same_answer(client, route_client, b.h, {"purpose": "marketing_email", "subject": sub})
    assert code == 200 and body["status"] == "none" and body["subject"] is None


def test_a_known_subject_without_a_decision_is_named_now_and_as_of_now(client: TestClient,
                                                                       route_client: TestClient) -> None:
    """A subject the tenant knows, with no decision on the purpose asked: the answer names it,
    the current one and the as-of one alike (an unknown identifier names nobody)."""
    t = make_tenant(client)
    sub = t.record("analytics", "granted", email="ada@example.com")["subject"]
    at = datetime.now(UTC).isoformat()
    for params, named in (({"email": "ada@example.com"}, sub), ({"subject": sub}, sub),
                          ({"subject": "email:ada@example.com"}, sub), ({"email": "nobody@example.com"}, None),
                          ({"subject": "sub_000000000000000000000000"}, None)):
        now = same_answer(client, route_client, t.h, {"purpose": "marketing_email", **params})[1]
        then = same_answer(client, route_client, t.h, {"purpose": "marketing_email", "at": at, **params})[1]
        assert now == then, params
        assert now["status"] == "none" and now["subject"] == named and now["receipt"] is None, now


def test_a_missing_or_stale_receipt_copy_is_not_answered(client: TestClient, route_client: TestClient,
                                                          db_url: str) -> None:
    """consent_state's copy of the record's id and receipt is used only while its receipt_seq is
    the state's record_seq: a row from before migration 0009 (no copy) or one moved by older
    code (the copy of an earlier record) is answered from the record itself, as the route does."""
    t = make_tenant(client)
    first = t.record(email="ada@example.com")
    t.record(email="bob@example.com")
    latest = t.record("marketing_email", "withdrawn", email="ada@example.com")
    engine = db.create_db_engine(db_url)
    try:
        with engine.begin() as conn:
            copy = conn.exec_driver_sql(
                f"SELECT receipt_seq, record_seq, record_id, receipt FROM consent_state "
                f"WHERE subject_id = '{latest['subject']}' AND purpose = 'marketing_email'").one()
            assert copy[0] == copy[1] and (copy[2], copy[3]) == (latest["id"], latest["receipt"])
            # older code moved the state to the newest record but left the first record's copy
            conn.exec_driver_sql(
                f"UPDATE consent_state SET receipt_seq = record_seq - 1, record_id = '{first['id']}', "
                f"receipt = '{first['receipt']}' WHERE subject_id = '{latest['subject']}'")
            conn.exec_driver_sql(  # no copy at all
                "UPDATE consent_state SET receipt_seq = NULL, record_id = NULL, receipt = NULL "
                "WHERE subject_id <> '" + latest["subject"] + "' AND tenant_id = '" + t.id + "'")
    finally:
        engine.dispose()
    reader = reader_of(client)
    before = reader.answered
    for email, record in (("ada@example.com", latest), ("bob@example.com", None)):
        code, body = same_answer(client, route_client, t.h, {"purpose": "marketing_email", "email": email})
        assert code == 200 and body["receipt"] and body["record_id"]
        if record is not None:
            assert (body["status"], body["record_id"], body["receipt"]) == ("withdrawn", record["id"],
                                                                             record["receipt"])
    assert reader.answered == before + 2, "the reader answered both"


def test_admin_rotation_and_foreign_keys(client: TestClient) -> None:
    t = make_tenant(client)
    params = {"purpose": "marketing_email", "email": "ada@example.com"}
    assert t.check(email="ada@example.com")["status"] == "none"
    r = client.post(f"/v1/tenants/{t.id}/keys/rotate", json={"kind": "both", "leaked": True}, headers=ADMIN)
    assert r.status_code == 200
    assert t.get("/v1/check", params=params).status_code == 401
    assert client.get("/v1/check", params=params, headers=ADMIN).status_code == 403


def test_batched_reads_match_one_at_a_time(client: TestClient, db_url: str) -> None:
    """Many checks at once (one statement for a batch) give each caller its own answer."""
    rng = random.Random(7)
    tenants: list[Tenant] = [make_tenant(client) for _ in range(3)]
    hash_keys = {}
    subjects: list[tuple[Tenant, str, str]] = []  # tenant, kind, value
    for n, t in enumerate(tenants):
        for i in range(12):
            email = f"user{i}@t{n}.example"
            decision = rng.choice(["granted", "denied", "withdrawn"])
            sub = t.record(rng.choice(["marketing_email", "analytics"]), decision, email=email)["subject"]
            subjects += [(t, "email", email), (t, "id", sub)]
        subjects.append((t, "email", "unknown@nowhere.example"))
    engine = db.create_db_engine(db_url)
    try:
        with engine.connect() as conn:
            for t in tenants:
                hash_keys[t.id] = crypto.open_secret(conn, conn.exec_driver_sql(
                    f"SELECT hash_key FROM tenant WHERE id = '{t.id}'").scalar_one(), "tenant.hash_key")
        items = []
        for t, kind, value in subjects * 3:
            digest = hashlib.sha256(t.secret_key.encode()).hexdigest()
            key = value if kind == "id" else crypto.keyed_hash(hash_keys[t.id], kind, value)
            items.append((digest, t.id, kind, key, rng.choice(["marketing_email", "analytics", "nope"])))
        # values that JSON must escape travel intact (the batch is one JSON parameter)
        odd = 'no"pe\\ \u00e9\u2028{[,'
        items += [(digest, t.id, "id", odd, "marketing_email"), (digest, t.id, "email", odd, odd),
                  (digest, t.id, "id", odd, "analytics")]
        rng.shuffle(items)

        async def run() -> tuple[list[Any], list[Any]]:
            reader = reader_for(engine)
            try:
                together = await asyncio.gather(*[reader.check(item) for item in items])
                # batched: SQLite answers everything submitted in one turn with one statement;
                # PostgreSQL's idle connections each take everything waiting
                sqlite = isinstance(reader, batch_reads.SqliteReader)
                assert 0 < reader.statements <= (1 if sqlite else len(items) // 10), reader.statements
                one_by_one = [await reader.check(item) for item in items]
            finally:
                await reader.close()
            return together, one_by_one

        batched, single = asyncio.run(run())
    finally:
        engine.dispose()
    assert [tuple(r) for r in batched] == [tuple(r) for r in single]
    known = [r for r in single if r[3] is not None]
    assert len(known) > len(items) // 5 and all(r[0] for r in single)  # every key valid, many hits
    assert {bool(r[1]) for r in single} == {True, False}  # "nope" is an unknown purpose
    for item, row in zip(items, single):
        if odd in item:
            assert row[0] and row[3] is None and bool(row[1]) == (item[4] != odd), (item, row)
    # and each agrees with the route's own rule
    for (_, tid, _, _, purpose), row in zip(items, single):
        if row[3] is None:
            continue
        answer = checks.check_answer(purpose, row)
        assert answer["status"] == row[3] and answer["allowed"] == (row[3] == "granted")


def test_sqlite_reader_declines_database_errors_and_reconnects(tmp_path) -> None:
    """A database error is every waiting check's answer (the route logs, counts and answers it
    per request); the next check reconnects."""
    path = tmp_path / "ledger.db"
    path.write_bytes(b"this is not a database" * 300)
    reader = batch_reads.SqliteReader(str(path), batch_reads.sqlite_now)
    item = ("0" * 64, "ten_x", "id", "sub_x", "marketing_email")

    async def run() -> None:
        try:
            with pytest.raises(sqlite3.DatabaseError):
                await reader.check(item)
            several = await asyncio.gather(*[reader.check(item) for _ in range(6)], return_exceptions=True)
            assert all(isinstance(r, sqlite3.DatabaseError) for r in several), several  # a whole batch
            assert reader.batches >= 2
            path.unlink()
            db.migrate(f"sqlite:///{path}")
            batches = reader.batches
            row = await reader.check(item)  # an empty ledger: no such key, no such purpose
            assert tuple(row) == (0, 0, None, None, None, None, None, None, None, None)
            assert reader.batches == batches + 1
        finally:
            await reader.close()
        with pytest.raises(RuntimeError):  # closed
            await reader.check(item)

    asyncio.run(run())


def test_sqlite_check_input_is_bound_as_text() -> None:
    """Bound as bytes, the input would be a BLOB, which SQLite 3.45 and later read as binary
    JSONB (not the text JSON the statement sends): it must reach SQLite as text."""
    items = [("0" * 64, "ten_x", "email", "h1", "p"), ("0" * 64, "ten_x", "id", "sub_x", "p"),
             ("0" * 64, "ten_x", "email", "h2", "p")]
    inputs, order = statements.check_input_sqlite(items)
    assert sqlite3.connect(":memory:").execute("SELECT typeof(?)", (inputs,)).fetchone()[0] == "text"
    assert sorted(n for _, _, n in order) == [0, 1, 2]  # every check answered once
    assert [(g, i) for g, i, _ in order] == [(0, 0), (0, 1), (1, 0)]  # grouped by key, tenant, kind, purpose


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.text(alphabet="ab=&%+;2Fx0\u00e9 ", max_size=6),
                          st.text(alphabet="ab=&%+;2Fx0\u00e9 ", max_size=6)), max_size=4),
       st.text(alphabet="ab=&%+;2F0\u00e9", max_size=12))
def test_query_pairs_are_what_starlette_reads(pairs: list[tuple[str, str]], junk: str) -> None:
    """The check reads the query string exactly as Starlette (parse_qsl) does."""
    for qs in ("&".join(f"{a}={b}" for a, b in pairs), junk, urlencode(pairs)):
        assert query_pairs(qs) == parse_qsl(qs, keep_blank_values=True)


def test_sqlite_time_is_how_sqlalchemy_stores_it(tmp_path) -> None:
    """The check statement compares ``effective_at`` with a bound text on SQLite: same format."""
    import sqlalchemy as sa

    from consent.store.models import UTCDateTime

    engine = sa.create_engine(f"sqlite:///{tmp_path / 't.db'}")
    table = sa.Table("t", sa.MetaData(), sa.Column("at", UTCDateTime()))
    table.create(engine)
    for at in (datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC),
               datetime(7, 8, 9, 10, 11, 12, 999999, tzinfo=UTC), datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC),
               datetime(2026, 6, 1, 1, 2, 3, 4, tzinfo=timezone(timedelta(hours=-7))), datetime.now(UTC)):
        with engine.begin() as conn:
            conn.execute(table.delete())
            conn.execute(table.insert(), {"at": at})
            stored = conn.exec_driver_sql("SELECT at FROM t").scalar_one()
        assert stored == models.sqlite_time(at)
    engine.dispose()


def test_sqlite_now_is_sqlite_time_of_the_clock(monkeypatch) -> None:
    """The reader's ``now`` (date part formatted once a second) is ``sqlite_time`` of the clock."""
    for t in (1_700_000_000.0, 1_700_000_000.5, 1_700_000_001.125, 1_700_000_001.25, 4_102_444_799.75, 86_400.0):
        monkeypatch.setattr(batch_reads.time, "time", lambda t=t: t)
        assert batch_reads.sqlite_now() == models.sqlite_time(datetime.fromtimestamp(t, UTC)), t
    monkeypatch.undo()
    before = models.sqlite_time(models.utcnow())
    assert before <= batch_reads.sqlite_now() <= models.sqlite_time(models.utcnow())
