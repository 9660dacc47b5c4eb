"""Two live service processes (uvicorn) on one database, writing concurrently while the change
feed is read and both processes' webhook workers deliver to a real local receiver: every
event exactly once in the feed (no gaps, no repeats) and exactly once at the receiver."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from consent.integrations.consumer import verify_webhook

from .helpers import make_tenant
from .live import LiveServer
from .receiver import Receiver

WRITERS_PER_PROCESS = 3
RECORDS_PER_WRITER = 20


@pytest.fixture
def two_servers(db_url: str, tmp_path: Path) -> Iterator[list[str]]:
    """Two service processes on one database, each with its own webhook delivery loop."""
    env = {"CONSENT_WEBHOOK_WORKER": "true", "CONSENT_WEBHOOK_POLL_SECONDS": "10",
           "CONSENT_WEBHOOK_ALLOW_PRIVATE": "true",
           "CONSENT_WEBHOOK_BACKOFF_SECONDS": "0.1", "CONSENT_RATE_LIMIT_PER_MINUTE": "1000000",
           "CONSENT_LOG_LEVEL": "warning"}
    servers = [LiveServer(db_url, tmp_path, **env) for _ in range(2)]
    try:
        for server in servers:
            server.start()
        yield [server.base for server in servers]
    finally:
        for server in servers:
            server.stop()


def test_feed_and_webhooks_with_two_processes_writing(two_servers: list[str]) -> None:
    a, b = (httpx.Client(base_url=u, timeout=30) for u in two_servers)
    receiver = Receiver().start()
    try:
        t = make_tenant(a)  # type: ignore[arg-type]
        wh = t.post("/v1/webhooks", json={"url": receiver.url}).json()
        headers = t.h
        written: list[str] = []
        lock = threading.Lock()
        errors: list[str] = []

        def writer(base: str, w: int) -> None:
            with httpx.Client(base_url=base, timeout=30, headers=headers) as c:
                for i in range(RECORDS_PER_WRITER):
                    # a few shared subjects (chain locks contend) and many distinct ones
                    email = f"s{i % 4}@example.com" if i % 3 == 0 else f"w{w}-{i}@example.com"
                    r = c.post("/v1/consents", json={"subject": {"email": email}, "purpose": "marketing_email",
                                                     "decision": "withdrawn" if i % 2 else "granted"})
                    if r.status_code != 201:
                        errors.append(r.text)
                        continue
                    with lock:
                        written.append(r.json()["id"])

        seen: list[dict] = []
        total = 2 * WRITERS_PER_PROCESS * RECORDS_PER_WRITER
        done = threading.Event()

        def reader() -> None:
            cursor = "0"
            with httpx.Client(base_url=two_servers[1], timeout=30, headers=headers) as c:
                deadline = time.monotonic() + 60
                while len(seen) < total and time.monotonic() < deadline:
                    r = c.get("/v1/events", params={"after": cursor, "limit": 7, "wait": 2})
                    assert r.status_code == 200, r.text
                    page = r.json()
                    seen.extend(page["items"])
                    cursor = page["next_cursor"]
            done.set()

        threads = [threading.Thread(target=reader)]
        threads += [threading.Thread(target=writer, args=(base, w)) for base in two_servers
                    for w in range(WRITERS_PER_PROCESS)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=90)
        assert not errors, errors[:3]
        assert len(written) == total
        positions = [e["position"] for e in seen]
        assert positions == list(range(1, total + 1)), "gap or repeat in the change feed"
        assert sorted(e["data"]["record_id"] for e in seen) == sorted(written)
        # one more read from the other process: nothing new, same cursor
        again = b.get("/v1/events", params={"after": str(total)}, headers=headers).json()
        assert again["items"] == [] and again["next_cursor"] == str(total)

        # webhooks: every event reaches the receiver once, though both processes run a worker
        got = receiver.wait_for(total, timeout=30)
        time.sleep(0.5)  # would a duplicate still arrive?
        got = list(receiver.requests)
        ids = [r.headers["webhook-id"] for r in got]
        assert len(ids) == total and len(set(ids)) == total
        assert {verify_webhook(wh["secret"], r.headers, r.body)["data"]["record_id"] for r in got} == set(written)

        # a withdrawal reaches a healthy receiver within seconds: the process that committed it
        # wakes its delivery loop at once instead of waiting for the 10 s poll (the bound below is
        # loose on purpose: a loaded CI machine is slow, but nowhere near a poll interval)
        time.sleep(0.5)
        start = time.monotonic()
        r = a.post("/v1/consents", headers=headers, json={"subject": {"email": "late@example.com"},
                                                          "purpose": "marketing_email", "decision": "withdrawn"})
        assert r.status_code == 201
        assert len(receiver.wait_for(total + 1, timeout=10)) == total + 1
        latency = time.monotonic() - start
        print(f"withdrawal -> webhook latency: {latency * 1000:.0f} ms")
        assert latency < 8
    finally:
        receiver.stop()
        a.close()
        b.close()
