"""POST /v1/consents on its group-commit executor (consent/ledger/batch_writes.py, PostgreSQL) against
its per-request one (recorder.record_decision), on SQLite and PostgreSQL.

The same decisions go through the service as it runs and through one whose group-commit writer
is switched off, on the same database: the rows written, the answers, the change feed and the
outbox must be the same, chains must stay linear when both executors and concurrent writers
append to one subject, and every request the group commit does not take must get the same
answer. On SQLite both apps write per request (there is no group commit), so the same tests
check the one route there.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import uuid
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest
import sqlalchemy as sa
from starlette.testclient import TestClient

from consent import crypto
from consent.errors import ValidationFailed
from consent.ledger import batch_reads, batch_writes, recorder
from consent.ledger.schemas import ConsentIn
from consent.store import db

from .helpers import Tenant, make_tenant


class Taken:
    """How many records the app's group commit wrote (PostgreSQL); on SQLite there is none and
    every record is written per request, so it expects none there."""

    def __init__(self, client: TestClient, backend: str) -> None:
        self.writer = client.app.state.services.record_writer  # type: ignore[attr-defined]
        self.group = backend == "postgresql"
        assert (self.writer is not None) == self.group, "group commit runs on PostgreSQL only"
        self.before = self.count()

    def count(self) -> int:
        return self.writer.recorded if self.writer is not None else 0

    def since(self, expected_on_postgresql: int) -> bool:
        """Whether it wrote that many since it was made (none on SQLite)."""
        return self.count() - self.before == (expected_on_postgresql if self.group else 0)


def group_writer(backend: str) -> None:
    if backend != "postgresql":
        pytest.skip("the group-commit writer itself is PostgreSQL only")


def key_of(t: Tenant, db_url: str) -> tuple[str, str, str]:
    """(tenant id, hash key, key digest): what the route hands the writer for ``t``'s secret key."""
    engine = db.create_db_engine(db_url)
    try:
        with engine.connect() as conn:
            hash_key = crypto.open_secret(conn, conn.exec_driver_sql(
                f"SELECT hash_key FROM tenant WHERE id = '{t.id}'").scalar_one(), "tenant.hash_key")
    finally:
        engine.dispose()
    return t.id, hash_key, crypto.hash_token(t.secret_key)


def rows(db_url: str, sql: str, **params: Any) -> list[dict[str, Any]]:
    engine = db.create_db_engine(db_url)
    try:
        with engine.connect() as conn:
            out = [dict(r._mapping) for r in conn.execute(sa.text(sql), params)]
    finally:
        engine.dispose()
    for row in out:  # SQLite gives JSON columns as text
        for k in JSON_COLUMNS & row.keys():
            if isinstance(row[k], str):
                row[k] = json.loads(row[k])
    return out


def as_route(t: Tenant, route: TestClient) -> Tenant:
    return Tenant(route, t.id, t.secret_key, t.publishable_key)


JSON_COLUMNS = {"evidence", "disclosures", "data"}
VOLATILE = {"id", "seq", "record_hash", "prev_hash", "receipt", "recorded_at", "request_sha256", "subject_id",
            "record_seq", "record_id", "created_at", "position", "subject", "next_attempt_at", "event_id",
            "event_position", "export_line", "receipt_seq", "leaf_index"}


def stable(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k not in VOLATILE}


def test_both_paths_write_the_same_rows(client: TestClient, route_client: TestClient, backend: str,
                                        db_url: str) -> None:
    t = make_tenant(client)
    hook = t.post("/v1/webhooks", json={"url": "http://127.0.0.1:9/hook", "event_types": ["consent.*"]})
    assert hook.status_code == 201, hook.text
    r = as_route(t, route_client)
    for who in ("fast@example.com", "route@example.com"):  # the first record of a subject: per request
        t.record("analytics", "denied", email=who)
    taken = Taken(client, backend)
    evidence = {"ip": "203.0.113.77", "user_agent": "UA/1", "form": "footer"}
    fast = t.record("product_updates", "granted", email="FAST@example.com", evidence=dict(evidence))
    slow = r.record("product_updates", "granted", email="route@example.com", evidence=dict(evidence))
    assert taken.since(1), "the group commit took the record"
    assert stable(fast) == stable(slow) and fast["status"] == "pending_confirmation"
    assert fast["prev_hash"] and fast["receipt"].count(".") == 2
    a, b = (rows(db_url, "SELECT * FROM consent_record WHERE id = :i", i=x["id"])[0] for x in (fast, slow))
    assert stable(a) == stable(b) and a["evidence"]["ip"] == "203.0.113.0" and a["evidence"]["form"] == "footer"
    for row in (a, b):  # each path stores the export line of what it wrote
        pseudonym = rows(db_url, "SELECT pseudonym FROM subject WHERE id = :s", s=row["subject_id"])[0]["pseudonym"]
        sealed = SimpleNamespace(**row)
        if isinstance(sealed.recorded_at, str):  # SQLite's text, as SQLAlchemy's model types would read it
            sealed.recorded_at = datetime.fromisoformat(sealed.recorded_at).replace(tzinfo=UTC)
            sealed.confirmed, sealed.gpc = bool(sealed.confirmed), sealed.gpc and bool(sealed.gpc)
        recorder.seal_record(sealed, pseudonym)  # type: ignore[arg-type]
        assert sealed.record_hash == row["record_hash"] and bytes(row["export_line"]) == sealed.export_line
    sa_, sb = (rows(db_url, "SELECT * FROM consent_state WHERE subject_id = :s AND purpose = 'product_updates'",
                    s=x["subject"])[0] for x in (fast, slow))
    assert stable(sa_) == stable(sb) and sa_["record_seq"] == a["seq"]
    for state, record in ((sa_, a), (sb, b)):  # both paths leave the check's copy of the record's receipt
        assert (state["receipt_seq"], state["record_id"], state["receipt"]) == (record["seq"], record["id"],
                                                                                record["receipt"])
    ea, eb = (rows(db_url, "SELECT * FROM event WHERE record_id = :i", i=x["id"])[0] for x in (fast, slow))
    assert stable(ea) == stable(eb) | {"data": ea["data"]}
    assert {k: v for k, v in ea["data"].items() if k not in ("record_id", "subject", "recorded_at", "record_hash")} \
        == {k: v for k, v in eb["data"].items() if k not in ("record_id", "subject", "recorded_at", "record_hash")}
    da, db_ = (rows(db_url, "SELECT * FROM webhook_delivery WHERE event_id = :e", e=x["id"]) for x in (ea, eb))
    assert len(da) == len(db_) == 1 and stable(da[0]) == stable(db_[0]) and da[0]["event_position"] == ea["position"]
    feed = t.get("/v1/events", params={"after": 0, "limit": 100}).json()["items"]
    assert [e["position"] for e in feed] == list(range(1, len(feed) + 1))  # gap-free across both paths
    assert t.check("product_updates", email="fast@example.com")["record_id"] == fast["id"]


def test_paths_alternate_on_one_chain(client: TestClient, route_client: TestClient, backend: str,
                                      db_url: str) -> None:
    t = make_tenant(client)
    r = as_route(t, route_client)
    first = t.record("marketing_email", "granted", user_id="u-1")
    taken = Taken(client, backend)
    made = [first]
    for n in range(6):
        side = t if n % 2 else r
        made.append(side.record("marketing_email", ["denied", "granted"][n % 2], user_id="u-1"))
    assert taken.since(3)
    for prev, rec in itertools.pairwise(made):
        assert rec["prev_hash"] == prev["record_hash"]
    chain = rows(db_url, "SELECT prev_hash, record_hash FROM consent_record WHERE subject_id = :s ORDER BY seq",
                 s=first["subject"])
    assert [c["record_hash"] for c in chain] == [m["record_hash"] for m in made]
    assert t.check(subject="u-1")["status"] == "granted"


def test_what_the_group_commit_leaves_to_the_per_request_writer(client: TestClient, route_client: TestClient,
                                                                backend: str) -> None:
    t = make_tenant(client)
    r = as_route(t, route_client)
    t.record(email="ada@example.com")
    r.record(email="bea@example.com")
    t.publish("v2", purposes=["strictly_necessary", "marketing_email", "analytics"])
    taken = Taken(client, backend)
    cases: list[tuple[dict[str, Any], dict[str, str], int]] = [
        ({"subject": {"email": "new@example.com"}, "purpose": "marketing_email", "decision": "granted"}, {}, 201),
        ({"subject": {"email": "ada@example.com", "user_id": "u-9"}, "purpose": "analytics",
          "decision": "granted"}, {}, 201),
        ({"subject": {"email": "ada@example.com"}, "purpose": "marketing_email", "decision": "granted",
          "policy_version": "v1"}, {}, 201),
        ({"subject": {"email": "ada@example.com"}, "purpose": "strictly_necessary",
          "decision": "acknowledged"}, {}, 201),
        ({"subject": {"email": "ada@example.com"}, "purpose": "nope", "decision": "granted"}, {}, 422),
        ({"subject": {"email": "ada@example.com"}, "purpose": "strictly_necessary", "decision": "granted"}, {}, 422),
        ({"subject": {"email": "not-an-email"}, "purpose": "analytics", "decision": "granted"}, {}, 422),
        ({"subject": {"email": "ada@example.com"}, "purpose": "analytics", "decision": "maybe"}, {}, 422),
        ({"subject": {"email": "ada@example.com"}, "purpose": "analytics", "decision": "granted",
          "extra": 1}, {}, 422),
        ({"subject": {"email": "ada@example.com"}, "purpose": "analytics", "decision": "granted"},
         {"Authorization": f"Bearer {t.publishable_key}"}, 403),
        ({"subject": {"email": "ada@example.com"}, "purpose": "analytics", "decision": "granted"},
         {"Authorization": "Bearer sk_nope"}, 401),
        ({"subject": {"email": "ada@example.com"}, "purpose": "analytics", "decision": "granted"},
         {"Content-Type": "text/plain"}, 415),
    ]
    for body, headers, code in cases:
        got = t.post("/v1/consents", json=body, headers=headers)
        assert got.status_code == code, (body, got.text)
        if code >= 400:
            want = r.post("/v1/consents", json=body, headers=headers)
            assert want.status_code == code
            assert {k: v for k, v in got.json().items() if k != "request_id"} == \
                {k: v for k, v in want.json().items() if k != "request_id"}
    malformed = t.post("/v1/consents", content=b'{"subject": ', headers={"Content-Type": "application/json"})
    assert malformed.status_code == 400
    assert taken.since(0), "none of these was written by the group commit"


def test_idempotency_keys(client: TestClient, backend: str) -> None:
    t = make_tenant(client)
    t.record(email="ada@example.com")
    body = {"subject": {"email": "ada@example.com"}, "purpose": "analytics", "decision": "granted"}
    key = {"Idempotency-Key": str(uuid.uuid4())}
    taken = Taken(client, backend)
    first = t.post("/v1/consents", json=body, headers=key)
    assert first.status_code == 201 and taken.since(1)
    again = t.post("/v1/consents", json=body, headers=key)
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]  # replayed per request
    other = t.post("/v1/consents", json={**body, "decision": "denied"}, headers=key)
    assert other.status_code == 409
    assert t.post("/v1/consents", json=body, headers={"Idempotency-Key": "x" * 201}).status_code == 422
    assert taken.since(1)


def test_a_revoked_key_stops_at_once(client: TestClient, backend: str) -> None:
    t = make_tenant(client)
    t.record(email="ada@example.com")
    t.record("analytics", email="ada@example.com")  # the key is in the process's cache now
    old = t.h
    new = t.post("/v1/keys/rotate", json={"kind": "secret", "leaked": True}).json()["secret_key"]
    body = {"subject": {"email": "ada@example.com"}, "purpose": "analytics", "decision": "denied"}
    assert client.post("/v1/consents", json=body, headers=old).status_code == 401
    assert client.post("/v1/consents", json=body, headers={"Authorization": f"Bearer {new}"}).status_code == 201


def test_concurrent_writers_of_one_subject_keep_one_chain(client: TestClient, backend: str, db_url: str) -> None:
    """Many records of one subject at once on one writer: each either lands on the head it read
    or reads again (or hands the request to the per-request writer); never a fork."""
    group_writer(backend)
    t = make_tenant(client)
    sub = t.record(email="ada@example.com")["subject"]
    services = client.app.state.services  # type: ignore[attr-defined]
    key = key_of(t, db_url)
    engine = db.create_db_engine(db_url)

    async def run() -> list[Any]:
        # Several connections race for the one head here, as several processes do in production
        # (a process has one connection: batch_writes.CONNECTIONS).
        writer = batch_writes.Writer(batch_reads.pg_connect_args(engine), services, connections=4)
        spec = ConsentIn.model_validate({"subject": {"email": "ada@example.com"}, "purpose": "analytics",
                                         "decision": "granted"})
        try:
            return await asyncio.gather(*[writer.record(*key, spec, None) for _ in range(24)],
                                        return_exceptions=True)
        finally:
            await writer.close()

    try:
        results = asyncio.run(run())
    finally:
        engine.dispose()
    landed = [x for x in results if isinstance(x, tuple)]
    assert all(isinstance(x, (tuple, batch_writes.PerRequest)) for x in results), results
    assert len(landed) >= 4
    chain = rows(db_url, "SELECT prev_hash, record_hash FROM consent_record WHERE subject_id = :s ORDER BY seq", s=sub)
    assert len(chain) == 1 + len(landed)
    prev = None
    for link in chain:
        assert link["prev_hash"] == prev
        prev = link["record_hash"]
    head = rows(db_url, "SELECT head_hash FROM subject WHERE id = :s", s=sub)[0]["head_hash"]
    assert head == prev
    feed = t.get("/v1/events", params={"after": 0, "limit": 100}).json()["items"]
    assert [e["position"] for e in feed] == list(range(1, len(chain) + 1))


def test_concurrent_records_are_written_in_batches(client: TestClient, backend: str, db_url: str) -> None:
    """Records that wait together are read and written together (group commit): fewer write
    statements than records, and every row exactly as one-at-a-time writes make them: one
    record and head move per subject, gap-free feed positions, one outbox row per event, a
    subject named twice (email and user id) still one linear chain, an Idempotency-Key twin
    recorded once, a refused record leaving the rest of its batch alone."""
    group_writer(backend)
    t = make_tenant(client)
    hook = t.post("/v1/webhooks", json={"url": "http://127.0.0.1:9/hook", "event_types": ["consent.*"]})
    assert hook.status_code == 201, hook.text
    emails = [f"b{n}@example.com" for n in range(40)]
    for e in emails:
        t.record("analytics", "denied", email=e)
    t.record("analytics", "denied", email="twice@example.com", user_id="u-twice")
    services = client.app.state.services  # type: ignore[attr-defined]
    engine = db.create_db_engine(db_url)
    feed_before = len(t.get("/v1/events", params={"after": 0, "limit": 1000}).json()["items"])
    key = key_of(t, db_url)
    ikey = str(uuid.uuid4())

    def spec(purpose: str = "analytics", **subject: str) -> ConsentIn:
        return ConsentIn.model_validate({"subject": subject, "purpose": purpose, "decision": "granted"})

    async def run() -> tuple[list[Any], int]:
        writer = batch_writes.open_writer(engine, services)
        assert writer is not None
        await writer.record(*key, spec(email=emails[0]), None)  # the connection is open: one batch
        try:
            calls = [writer.record(*key, spec(email=e), None) for e in emails[1:]]
            calls += [writer.record(*key, spec(email="twice@example.com"), None),
                      writer.record(*key, spec(user_id="u-twice"), None),
                      writer.record(*key, spec(email=emails[0]), ikey),
                      writer.record(*key, spec(email=emails[0]), ikey),
                      writer.record(*key, spec("no_such_purpose", email=emails[1]), None)]
            return await asyncio.gather(*calls, return_exceptions=True), writer.batches
        finally:
            await writer.close()

    try:
        results, batches = asyncio.run(run())
    finally:
        engine.dispose()
    assert all(isinstance(x, tuple) for x in results[:-3]), results[:-3]  # the 39 others and both of "twice"
    twins = results[-3:-1]  # the twin: once; the other replays per request
    assert sum(isinstance(x, tuple) for x in twins) == 1 and any(isinstance(x, batch_writes.PerRequest) for x in twins)
    assert isinstance(results[-1], ValidationFailed)  # unknown purpose: raised where found (422)
    written = len(emails) + 2
    assert 1 < batches < written, batches
    chains = rows(db_url, "SELECT r.subject_id, r.prev_hash, r.record_hash, s.head_hash FROM consent_record r "
                          "JOIN subject s ON s.id = r.subject_id WHERE r.tenant_id = :t ORDER BY r.seq", t=t.id)
    by_subject: dict[str, list[dict[str, Any]]] = {}
    for link in chains:
        by_subject.setdefault(link["subject_id"], []).append(link)
    for links in by_subject.values():
        prev = None
        for link in links:
            assert link["prev_hash"] == prev
            prev = link["record_hash"]
        assert links[-1]["head_hash"] == prev
    assert sorted(len(v) for v in by_subject.values()) == [2] * (len(emails) - 1) + [3, 3]
    assert len(rows(db_url, "SELECT 1 FROM consent_record WHERE idempotency_key = :k", k=ikey)) == 1
    feed = t.get("/v1/events", params={"after": 0, "limit": 1000}).json()["items"]
    assert [e["position"] for e in feed] == list(range(1, len(feed) + 1))
    assert len(feed) == feed_before + written + 1 == len(chains)
    outbox = rows(db_url, "SELECT d.event_position, e.record_id FROM webhook_delivery d JOIN event e "
                          "ON e.id = d.event_id AND e.position = d.event_position WHERE d.tenant_id = :t", t=t.id)
    assert len(outbox) == len(chains) and len({o["record_id"] for o in outbox}) == len(chains)
    state = rows(db_url, "SELECT s.decision, s.record_seq, r.seq FROM consent_state s JOIN consent_record r "
                         "ON r.subject_id = s.subject_id AND r.purpose = s.purpose WHERE s.tenant_id = :t "
                         "AND s.purpose = 'analytics' AND r.seq = (SELECT max(seq) FROM consent_record x "
                         "WHERE x.subject_id = s.subject_id AND x.purpose = s.purpose)", t=t.id)
    assert len(state) == len(by_subject) and all(s["record_seq"] == s["seq"] and s["decision"] == "granted"
                                                 for s in state)
    assert t.check("analytics", subject="u-twice")["status"] == "granted"
