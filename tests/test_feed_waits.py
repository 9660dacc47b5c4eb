"""Change-feed long-polls are woken by commits (this process: an in-process event; other
processes: PostgreSQL LISTEN/NOTIFY), not by polling the database; concurrent waits per tenant
are capped with a clear problem."""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

import httpx
import sqlalchemy as sa
from starlette.testclient import TestClient

from consent.web.app import create_app

from .helpers import make_tenant
from .live import LiveServer


def test_an_idle_wait_does_not_poll_the_database(client, tenant) -> None:
    engine = client.app.state.services.engine
    statements = []

    def listen(*a: object, **k: object) -> None:
        statements.append(1)

    cursor = tenant.get("/v1/events").json()["next_cursor"]
    sa.event.listen(engine, "before_cursor_execute", listen)
    try:
        assert tenant.get("/v1/events", params={"after": cursor}).status_code == 200
        one_read = len(statements)
        statements.clear()
        start = time.monotonic()
        r = tenant.get("/v1/events", params={"after": cursor, "wait": 2})
        took = time.monotonic() - start
    finally:
        sa.event.remove(engine, "before_cursor_execute", listen)
    assert r.status_code == 200 and r.json()["items"] == [] and took >= 1.9
    print(f"statements during a 2 s idle wait: {len(statements)} (a plain read: {one_read})")
    # the first read and one at the deadline, nothing in between
    assert len(statements) <= one_read + 2, (len(statements), one_read)


def test_a_commit_wakes_a_wait_at_once(client, tenant) -> None:
    cursor = tenant.get("/v1/events").json()["next_cursor"]
    got: dict = {}

    def wait() -> None:
        start = time.monotonic()
        got["r"] = tenant.get("/v1/events", params={"after": cursor, "wait": 20})
        got["took"] = time.monotonic() - start

    t = threading.Thread(target=wait)
    t.start()
    time.sleep(0.5)
    tenant.record(email="wake@example.com")
    t.join(10)
    assert got["r"].status_code == 200 and len(got["r"].json()["items"]) == 1
    assert got["took"] < 2, got["took"]


def test_concurrent_waits_per_tenant_are_capped(settings) -> None:
    s = dataclasses.replace(settings, feed_max_waits_per_tenant=2)
    with TestClient(create_app(s)) as c:
        t = make_tenant(c)
        results: list[int] = []
        threads = [threading.Thread(target=lambda: results.append(
            t.get("/v1/events", params={"wait": 2}).status_code)) for _ in range(2)]
        for th in threads:
            th.start()
        time.sleep(0.5)
        r = t.get("/v1/events", params={"wait": 2})
        assert r.status_code == 429 and r.json()["code"] == "too_many_waits", r.text
        assert r.headers["retry-after"] == "1"
        assert t.get("/v1/events").status_code == 200  # a plain read is never refused
        for th in threads:
            th.join(10)
        assert results == [200, 200]


def test_a_commit_in_another_process_wakes_a_wait(db_url: str, backend: str, tmp_path: Path) -> None:
    if backend != "postgresql":
        return  # SQLite: one process per database file in production; in-process events suffice
    with LiveServer(db_url, tmp_path, CONSENT_LOG_LEVEL="warning") as a, \
            LiveServer(db_url, tmp_path, CONSENT_LOG_LEVEL="warning") as b, \
            httpx.Client(base_url=a.base, timeout=30) as ha, httpx.Client(base_url=b.base, timeout=30) as hb:
        t = make_tenant(ha)  # type: ignore[arg-type]
        cursor = t.get("/v1/events").json()["next_cursor"]
        got: dict = {}

        def wait() -> None:
            start = time.monotonic()
            got["r"] = ha.get("/v1/events", params={"after": cursor, "wait": 20}, headers=t.h)
            got["took"] = time.monotonic() - start

        th = threading.Thread(target=wait)
        th.start()
        time.sleep(1.0)
        r = hb.post("/v1/consents", headers=t.h, json={
            "subject": {"email": "x@example.com"}, "purpose": "marketing_email", "decision": "granted"})
        assert r.status_code == 201, r.text
        th.join(25)
    print(f"cross-process wake: {got['took']:.2f} s")
    assert len(got["r"].json()["items"]) == 1 and got["took"] < 2.5, got["took"]
