"""Change feed and policy-change notices through HTTP, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime, timedelta

from .helpers import Tenant, make_tenant


def feed(t: Tenant, **params: object) -> dict:
    r = t.get("/v1/events", params=params)
    assert r.status_code == 200, r.text
    return dict(r.json())


def test_feed_order_cursor_and_pages(client, tenant: Tenant) -> None:
    ids = [tenant.record(email=f"f{i}@example.com", decision="granted" if i % 2 else "denied")["id"] for i in range(7)]
    page = feed(tenant, limit=3)
    assert [e["position"] for e in page["items"]] == [1, 2, 3] and page["has_more"] is True
    assert page["next_cursor"] == "3"
    seen = [e["data"]["record_id"] for e in page["items"]]
    while page["has_more"]:
        page = feed(tenant, after=page["next_cursor"], limit=3)
        seen += [e["data"]["record_id"] for e in page["items"]]
    assert seen == ids
    last = feed(tenant, after=page["next_cursor"])
    assert last["items"] == [] and last["next_cursor"] == page["next_cursor"] and last["has_more"] is False
    first = feed(tenant, limit=1)["items"][0]
    assert first["type"] == "consent.denied" and first["id"].startswith("evt_")
    assert first["data"]["identifiers"] == {"email": "f0@example.com"}
    assert first["data"]["status"] == "denied" and first["data"]["policy"] == {"key": "privacy", "version": "v1"}
    # another tenant sees none of it
    assert feed(make_tenant(client))["items"] == []


def test_feed_input_errors(client, tenant: Tenant) -> None:
    for params in ({"after": "abc"}, {"after": "-1"}, {"limit": "0"}, {"limit": "5000"}, {"wait": "31"}):
        r = tenant.get("/v1/events", params=params)
        assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json", params
    r = tenant.get("/v1/events", params={"after": "999999", "wait": "30"})  # a cursor we never issued
    assert r.status_code == 400 and r.json()["code"] == "bad_cursor"
    assert client.get("/v1/events").status_code == 401
    pk = {"Authorization": f"Bearer {tenant.publishable_key}"}
    assert client.get("/v1/events", headers=pk).status_code == 403


def test_long_poll_returns_when_a_record_arrives(client, tenant: Tenant) -> None:
    tenant.record(email="lp@example.com")
    cursor = feed(tenant)["next_cursor"]
    start = time.monotonic()
    empty = feed(tenant, after=cursor, wait=1)
    assert empty["items"] == [] and 0.9 <= time.monotonic() - start < 5

    def later() -> None:
        time.sleep(0.5)
        tenant.record(email="lp@example.com", decision="withdrawn")

    writer = threading.Thread(target=later)
    start = time.monotonic()
    writer.start()
    got = feed(tenant, after=cursor, wait=10)
    elapsed = time.monotonic() - start
    writer.join()
    assert [e["type"] for e in got["items"]] == ["consent.withdrawn"]
    assert elapsed < 5


def test_notices_for_a_material_version(client) -> None:
    t = make_tenant(client)
    for i in range(3):
        t.record(email=f"n{i}@example.com")
    t.record("analytics", "denied", email="n0@example.com")
    t.record(decision="withdrawn", user_id="out")  # a decision under v1 too: told as well
    t.record("analytics", user_id="other-purpose-only")
    effective = (datetime.now(UTC) + timedelta(days=30)).isoformat()
    t.publish("v2", material=True, purposes=["marketing_email"], effective_at=effective)
    r = t.get("/v1/policies/privacy/versions/v2/notices")
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(x) for x in r.text.splitlines()]
    assert sorted(x.get("email") or x["user_id"] for x in lines) == [
        "n0@example.com", "n1@example.com", "n2@example.com", "out"]
    assert all(x["notified"] is False and x["reachable"] for x in lines)
    assert all([p["purpose"] for p in x["purposes"]] == ["marketing_email"] for x in lines)
    # record the notices in two calls
    r = t.post("/v1/policies/privacy/versions/v2/notices", json={"limit": 2, "evidence": {"channel": "email", "notice_for_version": "x"}})
    assert r.status_code == 200 and r.json()["notified"] == 2 and r.json()["more"] is True
    r = t.post("/v1/policies/privacy/versions/v2/notices", json={})
    assert r.json()["notified"] == 2 and r.json()["more"] is False
    assert t.post("/v1/policies/privacy/versions/v2/notices", json={}).json()["notified"] == 0
    lines = [json.loads(x) for x in t.get("/v1/policies/privacy/versions/v2/notices").text.splitlines()]
    assert len(lines) == 4 and all(x["notified"] and x["purposes"][0]["notified_at"] for x in lines)
    assert t.get("/v1/policies/privacy/versions/v2/notices", params={"pending": "true"}).text == ""
    # being told changes no consent: still granted (v2 is not in effect yet)
    assert t.check(email="n1@example.com")["status"] == "granted"
    evs = [e for e in feed(t, limit=1000)["items"] if e["type"] == "consent.notified"]
    assert len(evs) == 4 and {e["data"]["policy"]["version"] for e in evs} == {"v2"}
    assert all(e["data"]["status"] == "notified" for e in evs)
    # the proof: each notice is a hash-chained record dated before the version takes effect
    sid = next(x["subject"] for x in lines if x.get("email") == "n1@example.com")
    state = t.get(f"/v1/subjects/{sid}/consents").json()
    assert {p["purpose"]: p["status"] for p in state["purposes"]}["marketing_email"] == "granted"
    # errors
    assert t.get("/v1/policies/privacy/versions/v9/notices").status_code == 404
    assert t.post("/v1/policies/privacy/versions/v9/notices", json={}).status_code == 404
    assert t.post("/v1/policies/privacy/versions/v2/notices", json={"limit": 0}).status_code == 422
    assert t.get("/v1/policies/BAD!/versions/v2/notices").status_code == 422
    assert client.get("/v1/policies/privacy/versions/v2/notices").status_code == 401


def test_notified_can_be_recorded_through_the_api_without_changing_state(tenant: Tenant) -> None:
    tenant.record(email="api@example.com")
    rec = tenant.record(decision="notified", email="api@example.com", policy_version="v1")
    assert rec["status"] == "notified"
    assert tenant.check(email="api@example.com")["status"] == "granted"
    now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    assert tenant.check(email="api@example.com", at=now)["status"] == "granted"  # as-of skips notices too


def test_records_from_before_the_feed_are_backfilled(tmp_path) -> None:
    """A ledger written before the feed's revision: upgrading puts every record in the feed."""
    import sqlalchemy as sa
    from alembic.script import ScriptDirectory

    from consent.store import db
    from tests.test_migrations_data import fill

    url = f"sqlite:///{tmp_path / 'old.db'}"
    before = ScriptDirectory.from_config(db.alembic_config(url)).get_revision("0002").down_revision
    db.migrate(url, str(before))
    tenant_id = fill(url, "old")  # four records, written while the feed tables do not exist
    db.migrate(url)
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT e.position, e.type, r.decision FROM event e JOIN consent_record r ON r.id = e.record_id "
            "WHERE e.tenant_id = :t ORDER BY e.position"), {"t": tenant_id}).all()
        last = conn.execute(sa.text("SELECT last_position FROM event_counter WHERE tenant_id = :t"),
                            {"t": tenant_id}).scalar()
    engine.dispose()
    assert [r.position for r in rows] == [1, 2, 3, 4] and last == 4
    assert [r.type for r in rows] == [f"consent.{r.decision}" for r in rows]
    assert [r.decision for r in rows] == ["granted", "withdrawn", "granted", "denied"]
