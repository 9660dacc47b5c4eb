"""Abuse limits and HTTP hardening: per-key and per-IP rate limits (shared through the
database, so across processes), body and bulk limits, oversized headers, security headers on
HTML, and cookie flags."""

from __future__ import annotations

import re
import socket
import time
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

from consent.ledger.cookies import set_cookie
from consent.store.db import create_db_engine, transaction
from consent.web import ratelimit
from consent.web.app import create_app
from consent.web.middleware import RequestContextMiddleware

from .conftest import settings_for
from .helpers import make_tenant
from .live import LiveServer


def fresh_window(margin: float = 4.0) -> None:
    """Start the test early in a rate-limit window so it cannot straddle two."""
    into = time.time() % ratelimit.WINDOW_SECONDS
    if into > ratelimit.WINDOW_SECONDS - margin:
        time.sleep(ratelimit.WINDOW_SECONDS - into + 0.05)


def limited_client(db_url: str, ip: str, **overrides: Any) -> TestClient:
    settings = settings_for(db_url, rate_limit_routes=("jwks", "check_one"), **overrides)
    return TestClient(create_app(settings), client=(ip, 40000))


def test_public_route_selection() -> None:
    """The one place that decides: snippet and unsubscribe routes by prefix, others by name."""
    snippet = Route("/v1/snippet/config", lambda r: None, name="snippet_config")
    unsub = Route("/u/{token}", lambda r: None, name="unsubscribe")
    check = Route("/v1/check", lambda r: None, name="check_one")
    assert ratelimit.is_limited(snippet) and ratelimit.is_limited(unsub)
    assert not ratelimit.is_limited(check) and ratelimit.is_limited(check, ["check_one"])
    guarded = ratelimit.guard([snippet, unsub, check])
    assert [getattr(r.endpoint, "rate_limited", False) for r in guarded] == [True, True, False]  # type: ignore[attr-defined]


def test_per_key_then_per_ip_limits(client, db_url) -> None:
    a, b = make_tenant(client), make_tenant(client)
    ip = f"10.{int(time.time()) % 250}.{id(a) % 250}.7"
    fresh_window()
    with limited_client(db_url, ip, rate_limit_per_minute=4, rate_limit_ip_per_minute=7) as c:
        q = {"purpose": "marketing_email", "email": "x@example.com"}
        codes = [c.get("/v1/check", params=q, headers=a.h).status_code for _ in range(5)]
        assert codes == [200, 200, 200, 200, 429]  # per key
        r = c.get("/v1/check", params=q, headers=a.h)
        assert r.status_code == 429 and r.headers["content-type"] == "application/problem+json"
        assert r.json()["code"] == "rate_limited" and 1 <= int(r.headers["retry-after"]) <= 60
        # another key from the same address: its own key budget, but the address has spent 4
        # of its 7 (the refused hits spent nothing)
        codes = [c.get("/v1/check", params=q, headers=b.h).status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429]
        assert c.get("/healthz").status_code == 200  # unlimited routes are untouched


def test_limit_is_shared_between_app_instances(client, db_url) -> None:
    """Two independent apps (own engines, as two processes would have) share one budget."""
    ip = f"10.{int(time.time()) % 250}.{(id(client) + 1) % 250}.8"
    fresh_window()
    with limited_client(db_url, ip, rate_limit_ip_per_minute=6) as c1, \
            limited_client(db_url, ip, rate_limit_ip_per_minute=6) as c2:
        codes = [(c1 if i % 2 else c2).get("/.well-known/jwks.json").status_code for i in range(9)]
        assert codes.count(200) == 6 and codes[6:] == [429, 429, 429]


def test_batched_counting_overshoot_is_bounded(client, db_url) -> None:
    """Limits of 40+/min are counted locally and written in batches (ratelimit.Limiter):
    two instances together admit the limit and at most 2 x (batch_size - 1) more."""
    ip = f"10.{int(time.time()) % 250}.{(id(client) + 2) % 250}.9"
    batch = ratelimit.batch_size(100)
    assert batch == 5
    fresh_window(margin=15)
    with limited_client(db_url, ip, rate_limit_ip_per_minute=100) as c1, \
            limited_client(db_url, ip, rate_limit_ip_per_minute=100) as c2:
        codes = [(c1 if i % 2 else c2).get("/.well-known/jwks.json").status_code for i in range(130)]
    passed = codes.count(200)
    assert 100 <= passed <= 100 + 2 * (batch - 1), passed
    assert set(codes[:100]) == {200} and set(codes[-20:]) == {429}, codes
    engine = create_db_engine(db_url)
    with transaction(engine) as db:  # what passed was written; refused hits spend nothing
        hits = db.execute(sa.select(ratelimit.TABLE.c.hits).where(
            ratelimit.TABLE.c.bucket == f"ip:{ip}")).scalars().all()
    engine.dispose()
    assert passed - 2 * (batch - 1) <= sum(hits) <= passed


@pytest.mark.slow
def test_limits_across_worker_processes_and_big_headers(db_url, tmp_path) -> None:
    fresh_window(margin=10)
    with LiveServer(db_url, tmp_path, workers=2, CONSENT_RATE_LIMIT_ROUTES="jwks",
                    CONSENT_RATE_LIMIT_IP_PER_MINUTE="12") as server:
        ip = f"10.77.{int(time.time()) % 250}.9"  # uvicorn trusts X-Forwarded-For from loopback
        codes = []
        for _ in range(18):
            with httpx.Client(timeout=5) as c:  # a new connection each time: both workers answer
                codes.append(c.get(server.base + "/.well-known/jwks.json",
                                   headers={"X-Forwarded-For": ip}).status_code)
        assert codes.count(200) == 12 and set(codes[12:]) == {429}, codes
        # a header block that keeps growing past 64 KiB (never finished) is refused and closed
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000)
            answer = s.recv(1000)
        assert re.match(rb"HTTP/1.1 (400|431)", answer), answer[:100]


def test_body_and_bulk_limits(client, db_url) -> None:
    t = make_tenant(client)
    with TestClient(create_app(settings_for(db_url, max_body_bytes=2000, max_bulk=3))) as c:
        big = {"subject": {"email": "a@example.com"}, "purpose": "analytics", "decision": "granted",
               "evidence": {"user_agent": "x" * 3000}}
        r = c.post("/v1/consents", json=big, headers=t.h)
        assert r.status_code == 413 and r.json()["code"] == "payload_too_large"

        def chunks() -> Any:  # no Content-Length: the limit holds while streaming
            for _ in range(10):
                yield b" " * 500

        r = c.post("/v1/consents", content=chunks(), headers={**t.h, "Content-Type": "application/json"})
        assert r.status_code == 413
        r = c.post("/v1/check", json={"purpose": "analytics", "emails": [f"{i}@x.io" for i in range(4)]}, headers=t.h)
        assert r.status_code == 422 and r.json()["errors"][0]["field"] == "emails"
        r = c.post("/v1/check", json={"purpose": "analytics", "emails": [f"{i}@x.io" for i in range(3)]}, headers=t.h)
        assert r.status_code == 200


def get_every_route(client: TestClient, t: Any) -> list[Any]:
    """GET every GET route of the table (path parameters filled with a plausible value)."""
    out = []
    for r in client.app.routes:  # type: ignore[attr-defined]
        if isinstance(r, Route) and "GET" in (r.methods or set()):
            path = re.sub(r"{(\w+)(:\w+)?}", "x", r.path)
            meta = getattr(r.endpoint, "meta", None)
            key = {"secret": t.secret_key, "publishable": t.publishable_key}.get(getattr(meta, "auth", None) or "")
            out.append(client.get(path, headers={"Authorization": f"Bearer {key}"} if key else {}))
    return out


def test_security_headers_and_cookie_flags_on_every_route(client) -> None:
    t = make_tenant(client)
    responses = get_every_route(client, t)
    assert len(responses) >= 8
    for r in responses:
        assert r.headers["x-content-type-options"] == "nosniff", r.url
        assert r.headers["referrer-policy"] == "no-referrer", r.url
        if r.headers.get("content-type", "").startswith("text/html"):
            assert "frame-ancestors 'none'" in r.headers["content-security-policy"], r.url
            assert "default-src 'none'" in r.headers["content-security-policy"], r.url
        for cookie in r.headers.get_list("set-cookie"):
            assert "httponly" in cookie.lower() and "samesite" in cookie.lower(), (r.url, cookie)


def tiny_app() -> Starlette:
    async def page(request: Request) -> Response:
        response = HTMLResponse("<p>hello</p>")
        set_cookie(response, request, "sid", "v1", max_age=60)
        return response

    return Starlette(routes=[Route("/page", page)], middleware=[RequestContextMiddleware.as_middleware()])


def test_html_pages_get_csp_and_cookies_get_flags() -> None:
    with TestClient(tiny_app()) as c:
        r = c.get("/page")
        csp = r.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp
        assert r.headers["x-frame-options"] == "DENY" and r.headers["x-content-type-options"] == "nosniff"
        cookie = r.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=lax" in cookie and "secure" not in cookie  # plain http
    with TestClient(tiny_app(), base_url="https://testserver") as c:
        cookie = c.get("/page").headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=lax" in cookie and "secure" in cookie


ORIGIN = "http://127.0.0.1:8000"


def test_a_flood_from_one_ip_never_refuses_another_visitor(client, db_url) -> None:
    """The publishable key is public: one address flooding the snippet routes with it spends
    only its own budget (per key and IP); other visitors' config and choices go through, and
    the flooder's refused requests do not keep its budget spent."""
    t = make_tenant(client)
    fresh_window(margin=8)
    base = f"10.{int(time.time()) % 250}.{id(t) % 250}"
    with limited_client(db_url, f"{base}.66", rate_limit_per_minute=30, rate_limit_ip_per_minute=60) as flood:
        params = {"key": t.publishable_key}
        codes = [flood.get("/v1/snippet/config", params=params, headers={"Origin": ORIGIN}).status_code
                 for _ in range(200)]
        assert codes.count(200) == 30 and codes[-1] == 429, codes
        r = flood.get("/v1/snippet/config", params=params, headers={"Origin": ORIGIN})
        # the page can read the 429 (CORS headers) and its Retry-After
        assert r.status_code == 429 and r.headers["access-control-allow-origin"] == ORIGIN
        assert "Retry-After" in r.headers["access-control-expose-headers"] and r.headers["retry-after"]
        refused_visitors = 0
        for n in range(20):  # twenty other visitors of the same site, each from its own address
            with limited_client(db_url, f"{base}.{100 + n}", rate_limit_per_minute=30,
                                rate_limit_ip_per_minute=60) as visitor:
                got = visitor.get("/v1/snippet/config", params=params, headers={"Origin": ORIGIN})
                choice = visitor.post("/v1/snippet/consents", params=params, headers={"Origin": ORIGIN},
                                      json={"anonymous_id": f"anon-{n}-{id(t)}",
                                            "choices": [{"purpose": "analytics", "decision": "granted"}]})
                refused_visitors += got.status_code == 429 or choice.status_code == 429
                assert got.status_code == 200 and choice.status_code in (200, 201), (got.text, choice.text)
        assert refused_visitors == 0
    engine = create_db_engine(db_url)
    with transaction(engine) as db:
        hits = db.execute(sa.select(sa.func.sum(ratelimit.TABLE.c.hits)).where(
            ratelimit.TABLE.c.bucket == f"ip:{base}.66")).scalar_one()
    engine.dispose()
    assert hits <= 31, hits  # the 171 refused requests spent nothing


def test_one_click_unsubscribes_are_limited_per_token_not_per_ip(client, db_url) -> None:
    """A mail provider sends many people's one-click unsubscribes from one address: each token
    has its own small budget, the address has none."""
    t = make_tenant(client)
    fresh_window(margin=10)
    ip = f"10.{int(time.time()) % 250}.{id(t) % 250}.25"
    paths = []
    for i in range(12):
        r = t.post("/v1/email-links", json={"subject": {"email": f"u{i}@example.com"},
                                            "purpose": "marketing_email"})
        assert r.status_code == 200, r.text
        paths.append("/u/" + r.json()["unsubscribe_url"].rsplit("/u/", 1)[1])
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    with limited_client(db_url, ip, rate_limit_ip_per_minute=5) as provider:
        codes = [provider.post(p, content=b"List-Unsubscribe=One-Click", headers=form).status_code
                 for p in paths]
        assert codes == [200] * 12, codes  # over the per-IP budget of 5: still every one
        replay = [provider.post(paths[0], content=b"List-Unsubscribe=One-Click", headers=form).status_code
                  for _ in range(ratelimit.UNSUBSCRIBE_PER_TOKEN + 2)]
        assert replay.count(429) >= 2, replay  # one token hammered is limited
    assert all(t.check(email=f"u{i}@example.com")["status"] == "withdrawn" for i in range(12))
