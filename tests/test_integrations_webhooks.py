"""Webhooks: registration, the transactional outbox, signed delivery to a real local receiver,
retries with backoff, disabling, and the delivery log. Delivery passes run synchronously
(``deliver_once``) so nothing here depends on a background loop's timing."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from consent.integrations import webhooks
from consent.integrations.consumer import WebhookError, verify_webhook

from .helpers import Tenant, make_tenant
from .receiver import Receiver


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver().start()
    yield r
    r.stop()


@pytest.fixture
def fast(settings):
    return dataclasses.replace(settings, webhook_backoff_seconds=0.05, webhook_backoff_max_seconds=0.2,
                               webhook_timeout_seconds=2.0)


def register(t: Tenant, url: str, **kw: object) -> dict:
    r = t.post("/v1/webhooks", json={"url": url, **kw})
    assert r.status_code == 201, r.text
    return dict(r.json())


def drain(client, settings, until, timeout: float = 10.0) -> None:
    """Run delivery passes until ``until()`` holds."""
    engine = client.app.state.services.engine
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, "deliveries did not settle"
        webhooks.deliver_once(engine, settings)
        time.sleep(0.02)


def log_of(t: Tenant, wid: str) -> list[dict]:
    r = t.get(f"/v1/webhooks/{wid}/deliveries")
    assert r.status_code == 200, r.text
    return list(r.json()["items"])


def test_register_list_delete(client, tenant: Tenant, receiver: Receiver) -> None:
    wh = register(tenant, receiver.url, event_types=["consent.withdrawn"], description="mailer")
    assert wh["secret"].startswith("whsec_") and wh["enabled"] is True
    assert wh["event_types"] == ["consent.withdrawn"]
    items = tenant.get("/v1/webhooks").json()["items"]
    assert [w["id"] for w in items] == [wh["id"]] and "secret" not in items[0]
    assert tenant.get(f"/v1/webhooks/{wh['id']}").json()["url"] == receiver.url
    other = make_tenant(client)
    assert other.get(f"/v1/webhooks/{wh['id']}").status_code == 404
    assert other.delete(f"/v1/webhooks/{wh['id']}").status_code == 404
    assert tenant.delete(f"/v1/webhooks/{wh['id']}").status_code == 204
    assert tenant.get("/v1/webhooks").json()["items"] == []
    assert tenant.get(f"/v1/webhooks/{wh['id']}").status_code == 404


@pytest.mark.parametrize("body", [
    {"url": "ftp://example.com/hook"},
    {"url": "javascript:alert(1)"},
    {"url": "file:///etc/passwd"},
    {"url": "http://"},
    {"url": "not a url"},
    {"url": "https://example.com/h", "event_types": ["consent.exploded"]},
    {"url": "https://example.com/h", "event_types": []},
    {"url": "https://example.com/h", "extra": 1},
])
def test_bad_webhook_registrations(tenant: Tenant, body: dict) -> None:
    r = tenant.post("/v1/webhooks", json=body)
    assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json"


def test_signed_delivery_to_a_healthy_receiver(client, tenant: Tenant, receiver: Receiver, fast) -> None:
    wh = register(tenant, receiver.url)
    tenant.record(email="w@example.com")
    rec = tenant.record(email="w@example.com", decision="withdrawn")
    drain(client, fast, lambda: len(receiver.requests) >= 2)
    got = receiver.wait_for(2)
    assert len(got) == 2
    bodies = [verify_webhook(wh["secret"], r.headers, r.body) for r in got]
    by_type = {b["type"]: b for b in bodies}
    w = by_type["consent.withdrawn"]
    assert w["data"]["record_id"] == rec["id"] and w["data"]["identifiers"] == {"email": "w@example.com"}
    assert w["data"]["purpose"] == "marketing_email" and w["data"]["status"] == "withdrawn"
    req = next(r for r in got if r.json()["type"] == "consent.withdrawn")
    assert req.headers["webhook-id"] == w["data"]["event_id"] and req.headers["webhook-signature"].startswith("v1,")
    with pytest.raises(WebhookError):
        verify_webhook("whsec_" + "A" * 32, req.headers, req.body)
    log = log_of(tenant, wh["id"])
    assert [d["status"] for d in log] == ["delivered", "delivered"]
    assert log[0]["log"][0]["status_code"] == 204 and log[0]["attempts"] == 1
    # nothing left to do, and nothing is sent twice
    webhooks.deliver_once(client.app.state.services.engine, fast)
    assert len(receiver.requests) == 2


def test_event_type_filter(client, tenant: Tenant, receiver: Receiver, fast) -> None:
    register(tenant, receiver.url, event_types=["consent.withdrawn"])
    tenant.record(email="ft@example.com")
    tenant.record(email="ft@example.com", decision="withdrawn")
    drain(client, fast, lambda: len(receiver.requests) >= 1)
    webhooks.deliver_once(client.app.state.services.engine, fast)
    assert [r.json()["type"] for r in receiver.requests] == ["consent.withdrawn"]


def test_fails_first_then_recovers(client, tenant: Tenant, fast) -> None:
    flaky = Receiver(fail_first=2).start()
    try:
        wh = register(tenant, flaky.url)
        tenant.record(email="flaky@example.com", decision="withdrawn")
        drain(client, fast, lambda: len(flaky.requests) >= 1)
    finally:
        flaky.stop()
    assert flaky.hits == 3 and len(flaky.requests) == 1
    [d] = log_of(tenant, wh["id"])
    assert d["status"] == "delivered" and d["attempts"] == 3
    assert [a["status_code"] for a in d["log"]] == [500, 500, 204]
    assert d["log"][0]["error"] == "HTTP 500"
    assert tenant.get(f"/v1/webhooks/{wh['id']}").json()["consecutive_failures"] == 0
    # each retry carries the same webhook-id (receivers dedupe on it) and a fresh valid signature
    verify_webhook(wh["secret"], flaky.requests[0].headers, flaky.requests[0].body)


def test_backoff_grows_with_jitter(fast) -> None:
    s = dataclasses.replace(fast, webhook_backoff_seconds=1.0, webhook_backoff_max_seconds=60.0)
    for n, base in ((1, 1.0), (2, 2.0), (3, 4.0), (8, 60.0)):
        delays = {webhooks.backoff(s, n) for _ in range(20)}
        assert all(base * 0.5 <= d <= base for d in delays) and len(delays) > 1


def test_disabled_after_repeated_failure_and_reenabled(client, tenant: Tenant, fast) -> None:
    down = Receiver(fail_always=True).start()
    s = dataclasses.replace(fast, webhook_disable_after=3)
    try:
        wh = register(tenant, down.url)
        tenant.record(email="down@example.com", decision="withdrawn")
        drain(client, s, lambda: not tenant.get(f"/v1/webhooks/{wh['id']}").json()["enabled"])
        ep = tenant.get(f"/v1/webhooks/{wh['id']}").json()
        assert ep["disabled_reason"] == "3 failed attempts in a row" and ep["disabled_at"]
        assert down.hits == 3
        # a disabled endpoint gets no attempts and no new outbox rows
        tenant.record(email="down@example.com")
        webhooks.deliver_once(client.app.state.services.engine, s)
        assert len(log_of(tenant, wh["id"])) == 1 and down.hits == 3
        # re-enabled: the pending delivery is retried and now succeeds
        down.fail_always = False
        r = tenant.post(f"/v1/webhooks/{wh['id']}/enable")
        assert r.status_code == 200 and r.json()["enabled"] is True
        drain(client, s, lambda: len(down.requests) >= 1)
    finally:
        down.stop()
    [d] = log_of(tenant, wh["id"])
    assert d["status"] == "delivered" and d["attempts"] == 4


def test_gives_up_after_the_retry_window(client, tenant: Tenant, fast) -> None:
    s = dataclasses.replace(fast, webhook_retry_seconds=0)
    wh = register(tenant, "http://127.0.0.1:9/nothing-listens-here")
    tenant.record(email="gu@example.com", decision="withdrawn")
    drain(client, s, lambda: log_of(tenant, wh["id"])[0]["status"] != "pending")
    [d] = log_of(tenant, wh["id"])
    assert d["status"] == "failed" and d["attempts"] == 1 and d["last_status_code"] is None
    assert "Connect" in d["log"][0]["error"]


def test_outbox_rows_are_written_with_the_record_only(client, tenant: Tenant, receiver: Receiver, db_url: str) -> None:
    wh = register(tenant, receiver.url)
    r = tenant.post("/v1/consents", json={"subject": {"email": "tx@example.com"}, "purpose": "nope",
                                          "decision": "granted"})
    assert r.status_code == 422  # rolled back: no event, no outbox row
    rec = tenant.record(email="tx@example.com")
    engine = sa.create_engine(db_url)
    with engine.connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT d.event_type, e.record_id FROM webhook_delivery d JOIN event e "
            "ON e.tenant_id = d.tenant_id AND e.position = d.event_position WHERE d.endpoint_id = :w"),
            {"w": wh["id"]}).all()
    engine.dispose()
    assert [(r.event_type, r.record_id) for r in rows] == [("consent.granted", rec["id"])]
    assert tenant.delete(f"/v1/webhooks/{wh['id']}").status_code == 204


def test_deleting_cancels_pending_deliveries(client, tenant: Tenant, receiver: Receiver, fast) -> None:
    wh = register(tenant, receiver.url)
    tenant.record(email="del@example.com")
    assert tenant.delete(f"/v1/webhooks/{wh['id']}").status_code == 204
    webhooks.deliver_once(client.app.state.services.engine, fast)
    assert receiver.requests == [] and receiver.hits == 0


def test_delivery_log_pagination(client, tenant: Tenant, receiver: Receiver, fast) -> None:
    wh = register(tenant, receiver.url)
    for i in range(5):
        tenant.record(email=f"pg{i}@example.com")
    r = tenant.get(f"/v1/webhooks/{wh['id']}/deliveries", params={"limit": 2})
    page = r.json()
    assert len(page["items"]) == 2 and page["next_cursor"]
    assert page["items"][0]["event_position"] > page["items"][1]["event_position"]
    rest = tenant.get(f"/v1/webhooks/{wh['id']}/deliveries", params={"limit": 10, "cursor": page["next_cursor"]}).json()
    assert len(rest["items"]) == 3 and rest["next_cursor"] is None
    assert tenant.get(f"/v1/webhooks/{wh['id']}/deliveries", params={"cursor": "!!"}).status_code == 400
    assert tenant.get("/v1/webhooks/wh_nope/deliveries").status_code == 404
    assert tenant.delete(f"/v1/webhooks/{wh['id']}").status_code == 204


def test_in_process_worker_starts_delivers_and_stops(settings, receiver: Receiver) -> None:
    from starlette.testclient import TestClient

    from consent.web.app import create_app

    s = dataclasses.replace(settings, webhook_worker=True, webhook_poll_seconds=5.0)
    with TestClient(create_app(s)) as c:
        t = make_tenant(c)
        register(t, receiver.url, event_types=["consent.withdrawn"])
        start = time.monotonic()
        t.record(email="worker@example.com", decision="withdrawn")
        got = receiver.wait_for(1, timeout=4)  # woken by the commit, not by the 5 s poll
        assert len(got) == 1 and time.monotonic() - start < 4
        assert got[0].json()["data"]["identifiers"] == {"email": "worker@example.com"}
    # the lifespan stopped the loop: later records wait in the outbox for a running worker
    assert webhooks.events._wakers == []
