"""CONSENT_TRUSTED_PROXIES: X-Forwarded-For is believed only from the proxies it names, for the
per-IP rate limit and for the IP kept as evidence; from anyone else it is ignored."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from starlette.testclient import TestClient

from consent.settings import Settings
from consent.web.app import create_app

from .conftest import settings_for
from .helpers import make_tenant

ORIGIN = "http://127.0.0.1:8000"
PROXY = "10.1.2.3"
_ADDRESSES = iter(random.sample(range(1, 255 * 255), 400))  # fresh buckets for every run's addresses


def visitor() -> str:
    n = next(_ADDRESSES)
    return f"203.0.{n // 255}.{n % 255}"


def stranger() -> str:
    n = next(_ADDRESSES)
    return f"198.51.{n // 255}.{n % 255}"


def app_for(db_url: str, peer: str, **overrides: Any) -> TestClient:
    settings = settings_for(db_url, trusted_proxies=("10.0.0.0/8",), **overrides)
    return TestClient(create_app(settings), client=(peer, 40000))


def choose(c: TestClient, pk: str, anon: str, forwarded: str) -> Any:
    body = json.dumps({"anonymous_id": anon, "choices": [{"purpose": "analytics", "decision": "granted"}]})
    return c.post("/v1/snippet/consents", params={"key": pk}, content=body,
                  headers={"Origin": ORIGIN, "Content-Type": "text/plain", "X-Forwarded-For": forwarded})


def test_evidence_ip_comes_from_trusted_proxies_only(db_url: str) -> None:
    peer = stranger()
    with app_for(db_url, PROXY) as via_proxy, app_for(db_url, peer) as direct:
        t = make_tenant(via_proxy, store_full_ip=True)
        ip = visitor()
        anon = f"a_p{random.randint(0, 10**9)}"
        assert choose(via_proxy, t.publishable_key, anon, f"{ip}, {PROXY}").status_code == 201
        assert choose(direct, t.publishable_key, anon + "x", "192.0.2.66").status_code == 201
        ips = {}
        for a in (anon, anon + "x"):
            records = t.get(f"/v1/subjects/anon:{a}/export").json()["records"]
            ips[a] = records[0]["evidence"]["ip"]
        assert ips == {anon: ip, anon + "x": peer}  # the stranger's header is not believed


def test_rate_limit_counts_the_visitor_behind_a_trusted_proxy(db_url: str) -> None:
    with app_for(db_url, PROXY, rate_limit_ip_per_minute=3) as via_proxy, \
            app_for(db_url, stranger(), rate_limit_ip_per_minute=3) as direct:
        t = make_tenant(via_proxy)
        config = {"key": t.publishable_key}
        # four visitors behind the proxy: each has a budget of its own
        for _ in range(4):
            r = via_proxy.get("/v1/snippet/config", params=config, headers={"Origin": ORIGIN,
                                                                           "X-Forwarded-For": visitor()})
            assert r.status_code == 200, r.text
        one = visitor()
        codes = [via_proxy.get("/v1/snippet/config", params=config,
                               headers={"Origin": ORIGIN, "X-Forwarded-For": one}).status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429]
        # a client that is not a trusted proxy cannot dodge its limit by inventing addresses
        codes = [direct.get("/v1/snippet/config", params=config,
                            headers={"Origin": ORIGIN, "X-Forwarded-For": visitor()}).status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429]


def test_setting_is_parsed_and_checked() -> None:
    base = {"CONSENT_DATABASE_URL": "sqlite://"}
    assert Settings.from_env(base).trusted_proxies == ("127.0.0.1",)
    got = Settings.from_env({**base, "CONSENT_TRUSTED_PROXIES": "10.0.0.0/8, 192.168.1.4,::1"}).trusted_proxies
    assert got == ("10.0.0.0/8", "192.168.1.4", "::1")
    assert Settings.from_env({**base, "CONSENT_TRUSTED_PROXIES": ""}).trusted_proxies == ()
    with pytest.raises(ValueError, match="CONSENT_TRUSTED_PROXIES"):
        Settings.from_env({**base, "CONSENT_TRUSTED_PROXIES": "proxy.local"})
