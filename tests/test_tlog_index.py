"""Leaf indexes taken in the record's own transaction (events.next_leaf, the group commit's claim):
every receipt names its record's index, the proof fetched by that index verifies with the
test-only RFC 9162 verifier (tests/rfc9162.py), and concurrent writers (threads through the
app, and on PostgreSQL several batched writers at once) get distinct, gap-free indexes in
commit order. SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import base64
import threading
from typing import Any

import jwt
import sqlalchemy as sa
from starlette.testclient import TestClient

from consent.audit import tlog
from consent.ledger import batch_reads, batch_writes
from consent.ledger.schemas import ConsentIn
from consent.store import db

from . import rfc9162
from .helpers import Tenant, make_tenant
from .test_batch_writes import key_of


def claims(receipt: str) -> dict[str, Any]:
    return jwt.decode(receipt, options={"verify_signature": False})


def records(engine: sa.Engine, tenant_id: str) -> list[Any]:
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT id, leaf_index, receipt FROM consent_record WHERE tenant_id = :t "
                                    "ORDER BY leaf_index"), {"t": tenant_id}).all()


def test_concurrent_records_get_distinct_gap_free_indexes_in_commit_order(client: TestClient, backend: str,
                                                                          db_url: str) -> None:
    t = make_tenant(client)
    services = client.app.state.services  # type: ignore[attr-defined]
    emails = [f"c{n}@example.com" for n in range(16)]
    for e in emails:  # known subjects: the next records of them take PostgreSQL's batched path
        t.record("analytics", "denied", email=e)
    errors: list[BaseException] = []
    engine = db.create_db_engine(db_url)

    def through_the_app(k: int) -> None:
        try:
            for i in range(6):
                t.record("analytics", ("granted", "denied")[i % 2], email=emails[(k * 6 + i) % len(emails)])
                t.record(email=f"new{k}-{i}@example.com")  # a new subject: the route
        except BaseException as exc:  # noqa: BLE001 (reported below, in the test thread)
            errors.append(exc)

    async def batched() -> list[Any]:
        # Two writers racing for the counter row, as two service processes do.
        writers = [batch_writes.Writer(batch_reads.pg_connect_args(engine), services, connections=2)
                   for _ in range(2)]
        key = key_of(t, db_url)
        try:
            calls = [w.record(*key, ConsentIn.model_validate(
                {"subject": {"email": emails[(n * 5 + k) % len(emails)]}, "purpose": "marketing_email",
                 "decision": "granted"}), None) for k, w in enumerate(writers) for n in range(12)]
            return await asyncio.gather(*calls, return_exceptions=True)
        finally:
            for w in writers:
                await w.close()

    def fast() -> None:
        try:
            results = asyncio.run(batched())
            assert all(isinstance(x, (tuple, batch_writes.PerRequest)) for x in results), results
            assert sum(isinstance(x, tuple) for x in results) >= 12
        except BaseException as exc:  # noqa: BLE001 (reported below, in the test thread)
            errors.append(exc)

    threads = [threading.Thread(target=through_the_app, args=(k,)) for k in range(4)]
    if backend == "postgresql":
        threads.append(threading.Thread(target=fast))
    try:
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert not errors, errors
        rows = records(engine, t.id)
        assert [r.leaf_index for r in rows] == list(range(len(rows)))  # distinct and gap-free
        assert all(claims(r.receipt)["tlog_index"] == r.leaf_index for r in rows)
        with engine.connect() as conn:  # the change feed's positions are commit order (events.py)
            by_position = conn.execute(sa.text(
                "SELECT r.leaf_index FROM event e JOIN consent_record r ON r.id = e.record_id "
                "WHERE e.tenant_id = :t ORDER BY e.position"), {"t": t.id}).scalars().all()
        assert len(by_position) == len(rows) and by_position == sorted(by_position)
    finally:
        engine.dispose()
    tlog.run_once(services.engine, services.settings, services.signer, wait=True)
    note = client.get(f"/v1/tlog/{t.id}/checkpoint").text
    vkey = client.get("/v1/tlog/key").text.splitlines()[0]
    _, size, root = rfc9162.open_checkpoint(note, vkey)
    assert size == len(rows)
    for r in rows[:: max(1, len(rows) // 7)]:
        c = claims(r.receipt)
        for params in ({"leaf_index": c["tlog_index"]}, {"jti": c["jti"]}):
            p = client.get(f"/v1/tlog/{t.id}/proof/inclusion", params=params)
            assert p.status_code == 200, p.text
            body = p.json()
            assert (body["leaf_index"], body["record_id"], body["record_hash"]) == (c["tlog_index"], r.id,
                                                                                    c["record_hash"])
            path = [base64.b64decode(h) for h in body["hashes"]]
            assert rfc9162.verify_inclusion(c["record_hash"].encode(), c["tlog_index"], size, path, root)


def test_a_replayed_or_lost_idempotent_record_leaves_no_gap(tenant: Tenant, db_url: str) -> None:
    """A retry with the same Idempotency-Key gets the first receipt (same index); the next
    record takes the next index."""
    h = {**tenant.h, "Idempotency-Key": "k-1"}
    body = {"subject": {"email": "idem@example.com"}, "purpose": "marketing_email", "decision": "granted"}
    first = tenant.client.post("/v1/consents", headers=h, json=body)
    again = tenant.client.post("/v1/consents", headers=h, json=body)
    assert first.status_code == 201 and again.status_code in (200, 201), again.text
    assert again.json()["receipt"] == first.json()["receipt"]
    nxt = tenant.record(email="other@example.com")
    assert [claims(x["receipt"])["tlog_index"] for x in (first.json(), nxt)] == [0, 1]


def test_notices_and_concurrent_records_share_one_gap_free_log(client: TestClient, db_url: str) -> None:
    """A notices call records many subjects in one transaction (it locks them first, in id
    order, so it takes the counter row after every subject row as the other writers do) while
    records of the same subjects arrive: every call answers, and every record, notices
    included, has its own index in the receipt, gap-free."""
    from datetime import UTC, datetime, timedelta

    t = make_tenant(client)
    emails = [f"m{i}@example.com" for i in range(30)]
    for e in emails:
        t.record(email=e)
    t.publish("v2", material=True, purposes=["marketing_email"],
              effective_at=(datetime.now(UTC) + timedelta(days=30)).isoformat())
    codes: list[int] = []

    def notify() -> None:
        codes.append(t.post("/v1/policies/privacy/versions/v2/notices", json={"limit": 5000}).status_code)

    def record(part: list[str]) -> None:
        for e in part:
            codes.append(t.post("/v1/consents", json={"subject": {"email": e}, "purpose": "analytics",
                                                      "decision": "granted"}).status_code)

    threads = [threading.Thread(target=notify), threading.Thread(target=record, args=(emails[::-1],)),
               threading.Thread(target=record, args=(emails[::2],))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert sorted(set(codes)) == [200, 201], codes
    engine = db.create_db_engine(db_url)
    try:
        rows = records(engine, t.id)
    finally:
        engine.dispose()
    assert [r.leaf_index for r in rows] == list(range(len(rows))) == list(range(30 + 30 + 45))
    assert all(claims(r.receipt)["tlog_index"] == r.leaf_index for r in rows)
