"""Webhook targets (SSRF): internal addresses in every spelling, cloud metadata, credentials
and plain http are refused at registration (422 naming ``url``) and again at delivery, and a
delivery connects to the address it checked, so a DNS answer that changes (rebinding) is never
used. ``CONSENT_WEBHOOK_ALLOW_PRIVATE`` (set by the other tests) lifts the address rules."""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from starlette.testclient import TestClient

from consent.integrations import webhooks
from consent.web.app import create_app

from .helpers import Tenant, make_tenant
from .receiver import Receiver

INTERNAL = [
    "https://127.0.0.1/h", "https://localhost/h", "https://127.1/h", "https://2130706433/h",
    "https://0x7f000001/h", "https://0177.0.0.1/h", "https://[::1]/h", "https://[::ffff:127.0.0.1]/h",
    "https://0.0.0.0/h", "https://[::]/h", "https://10.1.2.3/h", "https://172.16.0.1/h",
    "https://192.168.1.1/h", "https://169.254.169.254/latest/meta-data/", "https://[fe80::1]/h",
    "https://[fd00:ec2::254]/h", "https://224.0.0.1/h", "https://[ff02::1]/h", "https://100.64.0.1/h",
    "https://metadata.google.internal/computeMetadata/v1/", "https://[64:ff9b::a9fe:a9fe]/h",
    "https://[2002:7f00:1::]/h",
]


@pytest.fixture(scope="module")
def strict(settings) -> Iterator[TestClient]:
    s = dataclasses.replace(settings, webhook_allow_private=False)
    with TestClient(create_app(s)) as c:
        yield c


@pytest.mark.parametrize("url", INTERNAL + [
    "https://user:pass@93.184.216.34/h", "https://user@93.184.216.34/h", "http://93.184.216.34/h",
    "https://no-such-host.invalid/h"])
def test_registration_refuses_internal_targets(strict: TestClient, url: str) -> None:
    t = make_tenant(strict, catalog=False)
    r = t.post("/v1/webhooks", json={"url": url})
    assert r.status_code == 422, (url, r.text)
    body = r.json()
    assert body["code"] == "validation_failed" and body["errors"][0]["field"] == "url", body
    assert t.get("/v1/webhooks").json()["items"] == []


def test_public_https_target_is_accepted(strict: TestClient) -> None:
    t = make_tenant(strict, catalog=False)
    r = t.post("/v1/webhooks", json={"url": "https://93.184.216.34:8443/hooks"})
    assert r.status_code == 201, r.text


@pytest.mark.parametrize("url", INTERNAL)
def test_address_rules(url: str) -> None:
    with pytest.raises(webhooks.UnsafeTarget):
        webhooks.resolve_target(url, allow_private=False)


def test_delivery_refuses_an_internal_target(client, tenant: Tenant, settings) -> None:
    """Registered while private targets were allowed (or a name that now resolves inside):
    the delivery checks again and never connects."""
    receiver = Receiver().start()
    try:
        r = tenant.post("/v1/webhooks", json={"url": receiver.url})
        assert r.status_code == 201
        tenant.record(email="ssrf@example.com")
        webhooks.deliver_once(client.app.state.services.engine,
                              dataclasses.replace(settings, webhook_allow_private=False))
        [d] = tenant.get(f"/v1/webhooks/{r.json()['id']}/deliveries").json()["items"]
        assert receiver.hits == 0
        assert d["log"][0]["error"].startswith("refused target"), d
    finally:
        receiver.stop()


def test_delivery_connects_to_the_address_it_checked(client, tenant: Tenant, settings,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A name whose first answer is the receiver and every later answer elsewhere (rebinding):
    the request reaches the first, checked address, with the name in Host."""
    receiver = Receiver().start()
    real = socket.getaddrinfo
    answers: list[str] = []

    def rebinding(host: Any, *a: Any, **kw: Any) -> Any:
        if host != "hook.rebind.test":
            return real(host, *a, **kw)
        ip = "127.0.0.1" if not answers else "203.0.113.9"
        answers.append(ip)
        return real(ip, *a, **kw)

    try:
        port = receiver.url.split(":")[2].split("/")[0]
        url = f"http://hook.rebind.test:{port}{receiver.path}"
        monkeypatch.setattr(socket, "getaddrinfo", rebinding)
        r = tenant.post("/v1/webhooks", json={"url": url})
        assert r.status_code == 201, r.text
        answers.clear()
        tenant.record(email="rebind@example.com")
        webhooks.deliver_once(client.app.state.services.engine,
                              dataclasses.replace(settings, webhook_timeout_seconds=2.0))
        got = receiver.wait_for(1, timeout=3)
        assert len(got) == 1 and answers == ["127.0.0.1"], answers
        assert got[0].headers["host"] == f"hook.rebind.test:{port}"
    finally:
        receiver.stop()
