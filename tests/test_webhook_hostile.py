"""Webhook receivers that try to hurt the service: answers that bomb (gzip and plain), trickle,
hang or redirect. Each attempt reads at most 64 KiB raw, ends by one total deadline (shorter
than the claim lease), and one endpoint's slowness never delays another's deliveries."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from consent.integrations import webhooks

from .helpers import Tenant, make_tenant
from .live import LiveServer
from .receiver import Receiver, gzip_bomb


@pytest.fixture
def hostile() -> Iterator[dict[str, Receiver]]:
    rs: dict[str, Receiver] = {}

    def start(mode: str, **kw: object) -> Receiver:
        rs[mode] = Receiver(mode=mode, **kw).start()  # type: ignore[arg-type]
        return rs[mode]

    yield start  # type: ignore[misc]
    for r in rs.values():
        r.stop()


def register(t: Tenant, url: str) -> str:
    r = t.post("/v1/webhooks", json={"url": url})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def attempts(t: Tenant, wid: str) -> list[dict]:
    items = t.get(f"/v1/webhooks/{wid}/deliveries").json()["items"]
    return [a for d in items for a in d["log"]]


def test_trickling_receiver_ends_at_the_total_deadline_and_is_disabled(client, tenant: Tenant, settings,
                                                                      hostile) -> None:
    trickle = hostile("trickle", pace=0.2)  # a byte every 0.2 s: no single read ever times out
    s = dataclasses.replace(settings, webhook_timeout_seconds=1.0, webhook_disable_after=2,
                            webhook_backoff_seconds=0.01, webhook_backoff_max_seconds=0.01)
    wid = register(tenant, trickle.url)
    tenant.record(email="trickle@example.com")
    engine = client.app.state.services.engine
    for _ in range(2):
        start = time.monotonic()
        webhooks.deliver_once(engine, s)
        took = time.monotonic() - start
        assert took < s.webhook_timeout_seconds + 0.5 < webhooks.lease_seconds(s), took
        time.sleep(0.02)
    log = attempts(tenant, wid)
    assert len(log) == 2 and all(a["error"].startswith("timeout") for a in log), log
    ep = tenant.get(f"/v1/webhooks/{wid}").json()
    assert ep["enabled"] is False and ep["disabled_reason"] == "2 failed attempts in a row"


def test_redirect_is_a_failure_not_followed(client, tenant: Tenant, settings, hostile) -> None:
    target = Receiver().start()
    try:
        redirect = hostile("redirect", location=target.url)
        wid = register(tenant, redirect.url)
        tenant.record(email="redirect@example.com")
        webhooks.deliver_once(client.app.state.services.engine, settings)
        [a] = attempts(tenant, wid)
        assert a["status_code"] == 302 and a["error"] == "HTTP 302"
        assert target.hits == 0
    finally:
        target.stop()


def test_bombs_are_read_only_up_to_the_limit(client, tenant: Tenant, settings, hostile) -> None:
    gz = hostile("gzip_bomb", bomb_bytes=64 * 1024 * 1024)
    plain = hostile("plain_bomb", bomb_bytes=256 * 1024 * 1024)
    ids = [register(tenant, gz.url), register(tenant, plain.url)]
    tenant.record(email="bomb@example.com")
    webhooks.deliver_once(client.app.state.services.engine, settings)
    for wid in ids:
        [a] = attempts(tenant, wid)
        assert a["status_code"] == 200 and a["error"] is None, a
    # the plain bomb's sender stops once we close: far less than its 256 MiB was ever sent
    time.sleep(0.2)
    assert plain.sent_bytes < 32 * 1024 * 1024, plain.sent_bytes


def test_a_hanging_endpoint_never_delays_another_tenants_delivery(settings, hostile) -> None:
    from starlette.testclient import TestClient

    from consent.web.app import create_app

    hang = hostile("hang")
    healthy = Receiver().start()
    s = dataclasses.replace(settings, webhook_worker=True, webhook_poll_seconds=5.0,
                            webhook_timeout_seconds=4.0)
    try:
        with TestClient(create_app(s)) as c:
            slow_tenant, other = make_tenant(c), make_tenant(c)
            register(slow_tenant, hang.url)
            register(other, healthy.url)
            slow_tenant.record(email="slow@example.com")
            time.sleep(0.5)  # the hanging attempt is in flight
            start = time.monotonic()
            other.record(email="other@example.com")
            got = healthy.wait_for(1, timeout=6)
            delay = time.monotonic() - start
            print(f"other tenant's delivery delay behind a hanging receiver: {delay * 1000:.0f} ms")
            assert len(got) == 1 and delay < 1.5, delay
            hang.release.set()
    finally:
        healthy.stop()


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_bombs_do_not_raise_the_server_rss(db_url: str, tmp_path: Path, hostile) -> None:
    """The real ``consent serve`` process delivers to a gzip bomb (about 0.6 MB inflating to
    640 MiB) and a 400 MiB plain body; its RSS stays within a few MiB."""
    gzip_bomb(640 * 1024 * 1024)  # made before the clock starts (15 s on a busy 2-core machine)
    gz = hostile("gzip_bomb", bomb_bytes=640 * 1024 * 1024)
    plain = hostile("plain_bomb", bomb_bytes=400 * 1024 * 1024)
    with LiveServer(db_url, tmp_path, CONSENT_WEBHOOK_WORKER="true", CONSENT_WEBHOOK_ALLOW_PRIVATE="true",
                    CONSENT_WEBHOOK_POLL_SECONDS="0.2", CONSENT_LOG_LEVEL="warning") as srv:
        assert srv.proc is not None
        with httpx.Client(base_url=srv.base, timeout=30) as h:
            t = make_tenant(h)  # type: ignore[arg-type]
            ids = [register(t, r.url) for r in (gz, plain)]
            before = rss_mib(srv.proc.pid)
            for i in range(3):
                t.record(email=f"b{i}@example.com")
            deadline = time.monotonic() + 30
            done = 0
            while time.monotonic() < deadline:
                logs = [t.get(f"/v1/webhooks/{w}/deliveries").json()["items"] for w in ids]
                done = sum(1 for items in logs for d in items if d["status"] == "delivered")
                if done == 6:
                    break
                time.sleep(0.2)
            after = rss_mib(srv.proc.pid)
    print(f"server RSS before {before:.0f} MiB, after 3 gzip + 3 plain bombs {after:.0f} MiB")
    assert done == 6
    assert after - before < 40, (before, after)


def test_two_processes_never_send_an_event_twice_to_a_trickling_receiver(db_url: str, backend: str,
                                                                          tmp_path: Path, hostile) -> None:
    """Two ``consent serve`` processes on one PostgreSQL: an attempt ends at its deadline, so the
    claim lease (deadline + 30 s) never expires under an open attempt and no event goes out twice."""
    if backend != "postgresql":
        pytest.skip("two processes claiming deliveries: PostgreSQL's SKIP LOCKED")
    trickle = hostile("trickle", pace=0.5)
    env = {"CONSENT_WEBHOOK_WORKER": "true", "CONSENT_WEBHOOK_ALLOW_PRIVATE": "true",
           "CONSENT_WEBHOOK_TIMEOUT_SECONDS": "1", "CONSENT_WEBHOOK_BACKOFF_SECONDS": "600",
           "CONSENT_WEBHOOK_POLL_SECONDS": "0.5", "CONSENT_LOG_LEVEL": "warning"}
    with LiveServer(db_url, tmp_path, **env) as a, LiveServer(db_url, tmp_path, **env), \
            httpx.Client(base_url=a.base, timeout=30) as h:
        t = make_tenant(h)  # type: ignore[arg-type]
        register(t, trickle.url)
        t.record(email="lease@example.com")  # one event: one process attempts it, the other is free
        time.sleep(webhooks.LEASE_EXTRA + 4)  # past the lease of the first attempt
    ids = [r.headers["webhook-id"] for r in trickle.requests]
    print(f"trickling receiver: {len(ids)} requests for {len(set(ids))} events")
    assert len(ids) == len(set(ids)) == 1, ids
