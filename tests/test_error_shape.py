"""One error shape across every error path. The walk covers every route of the app's routes
table (so routes added later are covered without editing this file): every 4xx is RFC 9457
problem+json with type/title/status/code/detail (422 with per-field ``errors``), and no
input produces a 5xx."""

from __future__ import annotations

import base64
import re
from typing import Any

import httpx
import pytest
from starlette.routing import Mount, Route
from starlette.testclient import TestClient

from .helpers import ADMIN_TOKEN, DOC_SHA, Tenant, make_tenant

PARAM = re.compile(r"\{([^}:]+)(:[^}]+)?\}")


def assert_problem(r: httpx.Response, where: str) -> dict[str, Any]:
    assert r.status_code < 500, f"{where}: {r.status_code} {r.text[:300]}"
    if r.status_code < 400:
        return {}
    assert r.headers["content-type"] == "application/problem+json", f"{where}: {r.headers['content-type']}"
    body = r.json()
    for k in ("type", "title", "status", "code", "detail"):
        assert body.get(k), f"{where}: problem lacks {k}: {body}"
    assert body["status"] == r.status_code and body["type"].endswith(body["code"]), where
    if r.status_code == 422:
        errors = body.get("errors")
        assert errors and all(e.get("field") and e.get("message") for e in errors), f"{where}: {body}"
    if r.status_code == 401:
        assert r.headers.get("www-authenticate", "").startswith("Bearer"), where
    return dict(body)


def concrete(path: str) -> str:
    return PARAM.sub("x", path)


def endpoints(app: Any) -> list[tuple[str, str, Any]]:
    """(method, concrete path, meta or None) for every route of the app."""
    out = []
    for route in app.routes:
        if isinstance(route, Route):
            for method in sorted((route.methods or {"GET"}) - {"HEAD"}):
                out.append((method, concrete(route.path), getattr(route.endpoint, "meta", None)))
        elif isinstance(route, Mount):
            out.append(("GET", concrete(route.path).rstrip("/") + "/no-such-file", None))
    assert len(out) >= 15  # the walk really sees the routes table
    return out


def key_for(meta: Any, t: Tenant) -> dict[str, str]:
    auth = getattr(meta, "auth", None)
    token = {"admin": ADMIN_TOKEN, "secret": t.secret_key, "publishable": t.publishable_key}.get(auth)
    headers = {"Origin": "http://127.0.0.1:8000"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return headers


def test_every_route_without_or_with_a_junk_key(client: TestClient) -> None:
    for method, path, meta in endpoints(client.app):
        auth = getattr(meta, "auth", None)
        for headers in ({}, {"Authorization": "Bearer junk-key-0123456789"}, {"Authorization": "Basic Zm9vOmJhcg=="},
                        {"Authorization": "Bearer " + "k" * 5000}):
            where = f"{method} {path} {list(headers.values())[:1]}"
            kw: dict[str, Any] = {"json": {}} if getattr(meta, "body", None) is not None else {}
            r = client.request(method, path, headers=headers, **kw)
            body = assert_problem(r, where)
            if auth in ("admin", "secret"):
                # 401 first, whatever the body or query: an anonymous caller learns nothing more
                assert r.status_code == 401 and body["code"] == "unauthorized", where
            elif auth == "publishable":
                assert r.status_code in (401, 403), where


def test_every_body_route_refuses_bad_bodies(client: TestClient) -> None:
    for method, path, meta in endpoints(client.app):
        if getattr(meta, "body", None) is None:
            continue
        t = make_tenant(client, catalog=False)  # some routes (key rotation) act on an empty body
        h = key_for(meta, t)
        r = client.request(method, path, headers=h)  # no body, no content type at all
        assert_problem(r, f"{method} {path} (no body)")
        assert r.status_code in (400, 415, 422), f"{method} {path} (no body): {r.status_code}"
        cases: list[tuple[str, bytes, str, int | None]] = [  # the last may act (e.g. rotate keys)
            ("malformed", b'{"a": ', "application/json", 400),
            ("NaN", b'{"a": NaN}', "application/json", 400),
            ("nested", b"[" * 5000 + b"]" * 5000, "application/json", 400),
            ("wrong type", b"{}", "application/xml", 415),
            ("array", b"[]", "application/json", 422),
            ("null", b"null", "application/json", 422),
            ("NUL", b'{"a": "\\u0000"}', "application/json", 422),
            ("empty object", b"{}", "application/json", None),  # 422, or 2xx when all fields default
        ]
        for name, content, ctype, expected in cases:
            where = f"{method} {path} ({name})"
            r = client.request(method, path, content=content, headers={**h, "Content-Type": ctype})
            body = assert_problem(r, where)
            if expected is not None:
                assert r.status_code == expected, f"{where}: {r.status_code} {body}"
            else:
                # 422, 2xx when every field has a default, 404 when the path names nothing
                assert r.status_code in (404, 422) or r.status_code < 300, f"{where}: {r.status_code} {body}"


def test_every_route_survives_odd_query_values(client: TestClient) -> None:
    for method, path, meta in endpoints(client.app):
        t = make_tenant(client, catalog=False)
        h = key_for(meta, t)
        names = [q.name for q in getattr(meta, "query", ())] + ["unknown"]
        for value in ("", "-1", "0", "1e3", "99999999999999999999999", "x" * 5000, "\x00", "\u00e9\u20ac",
                      "2026-13-45T99:00:00Z", "0001-01-01T00:00:00+01:00", "email:", "sub_"):
            params = {n: value for n in names}
            kw: dict[str, Any] = {"json": {}} if getattr(meta, "body", None) is not None else {}
            if method in ("POST", "PUT", "DELETE", "PATCH") and not kw:
                continue  # actions without a body: exercised by the other walks
            r = client.request(method, path, params=params, headers=h, **kw)
            assert_problem(r, f"{method} {path} ?{value[:20]!r}")


def test_unknown_route_and_wrong_method(client: TestClient) -> None:
    r = client.get("/v1/no-such-thing")
    assert r.status_code == 404 and assert_problem(r, "404")["code"] == "not_found"
    r = client.delete("/v1/consents")
    assert r.status_code == 405 and assert_problem(r, "405")["code"] == "method_not_allowed"
    r = client.patch("/healthz")
    assert r.status_code == 405 and assert_problem(r, "405")["code"] == "method_not_allowed"


def test_problem_carries_instance_and_request_id(tenant: Tenant) -> None:
    r = tenant.get("/v1/check", params={"purpose": "marketing_email"}, headers={"X-Request-ID": "abc-123"})
    body = assert_problem(r, "check")
    assert body["instance"] == "/v1/check" and body["request_id"] == "abc-123"
    assert r.headers["x-request-id"] == "abc-123"


# Inputs that once reached the database (PostgreSQL refuses NUL in text, SQLite overflows on
# huge integers, Python on year 0) or that would have corrupted the ledger's order.
EVIL = [
    ("GET", "/v1/subjects/sub_%00/consents", None, 422),
    ("GET", "/v1/subjects/" + "x" * 5000 + "/consents", None, 404),
    ("GET", "/v1/subjects/email:/consents", None, 404),
    ("GET", "/v1/subjects/sub_" + "y" * 500 + "/consents", None, 404),
    ("GET", "/v1/subjects/%F0%9F%98%80/consents", None, 404),
    ("GET", "/v1/check?purpose=%00&email=a@b.c", None, 422),
    ("GET", "/v1/check?purpose=marketing_email&subject=sub_%00", None, 422),
    ("GET", "/v1/check?purpose=marketing_email&email=a@b.c&subject=u1", None, 422),
    ("GET", "/v1/policies/privacy/versions?cursor=" + base64.urlsafe_b64encode(b"9" * 30).decode(), None, 400),
    ("GET", "/v1/policies/privacy/versions?cursor=LTE", None, 400),  # "-1"
    ("GET", "/v1/policies/privacy/versions?limit=100000000000000000000", None, 422),
    ("POST", "/v1/consents", {"subject": {"user_id": "a\x00"}, "purpose": "marketing_email",
                              "decision": "granted"}, 422),
    ("POST", "/v1/consents", {"subject": {"user_id": "a"}, "purpose": "marketing_email", "decision": "granted",
                              "policy_version": "v\x00"}, 422),
    ("POST", "/v1/consents", {"subject": {"user_id": "a"}, "purpose": "marketing_email", "decision": "granted",
                              "evidence": {"note": "\x00"}}, 422),
    ("POST", "/v1/consents", {"subject": {"user_id": "a"}, "purpose": "marketing_email", "decision": "granted",
                              "source": "import", "recorded_at": "0001-01-01T00:00:00+01:00"}, 422),
    ("POST", "/v1/consents", {"subject": {"user_id": "a"}, "purpose": "marketing_email", "decision": "granted",
                              "source": "import", "recorded_at": "9999-12-31T23:59:59-01:00"}, 422),
    ("POST", "/v1/consents", {"subject": {"user_id": "a"}, "purpose": "marketing_email", "decision": "granted",
                              "source": "import", "recorded_at": "2999-01-01T00:00:00Z"}, 422),
    ("POST", "/v1/check", {"purpose": "marketing_email", "subjects": ["sub_\x00"]}, 422),
    ("PUT", "/v1/purposes/p1", {"title": "\x00"}, 422),
    ("PUT", "/v1/purposes/" + "p" * 65, {}, 422),
    ("PUT", "/v1/cookies/c1", {"provider": "\x00", "purpose": "marketing_email"}, 422),
    ("POST", "/v1/policies/privacy/versions", {"version": "z", "document_url": "https://a.test/\x00",
                                               "document_sha256": DOC_SHA, "purposes": ["marketing_email"]}, 422),
    ("POST", "/v1/policies/privacy/versions", {"version": "z", "document_url": "https://a.test/",
                                               "document_sha256": DOC_SHA, "purposes": ["strictly_necessary"],
                                               "cookies": ["session", "session"]}, 422),
    ("POST", "/v1/policies/privacy/versions", {"version": "z", "document_url": "https://a.test/",
                                               "document_sha256": DOC_SHA, "purposes": ["marketing_email"],
                                               "cookies": ["session"]}, 422),
    ("POST", "/v1/policies/privacy/versions", {"version": "z", "document_url": "https://a.test/",
                                               "document_sha256": DOC_SHA, "purposes": ["marketing_email"],
                                               "effective_at": "0001-01-01T00:00:00+01:00"}, 422),
]


@pytest.mark.parametrize("method,path,body,status", EVIL, ids=[f"{m} {p[:50]}" for m, p, _, _ in EVIL])
def test_odd_inputs_are_clear_4xx(tenant: Tenant, method: str, path: str, body: Any, status: int) -> None:
    kw: dict[str, Any] = {"json": body} if body is not None else {}
    r = tenant.client.request(method, path, headers=tenant.h, **kw)
    problem = assert_problem(r, f"{method} {path}")
    assert r.status_code == status, problem


def test_idempotency_key_limits(tenant: Tenant) -> None:
    body = {"subject": {"user_id": "idem"}, "purpose": "marketing_email", "decision": "granted"}
    for key in ("k" * 201, "k" * 50_000, "tab\there"):
        r = tenant.post("/v1/consents", json=body, headers={"Idempotency-Key": key})
        assert r.status_code == 422 and assert_problem(r, key[:10])["errors"][0]["field"] == "Idempotency-Key"
    assert tenant.post("/v1/consents", json=body, headers={"Idempotency-Key": "k" * 200}).status_code == 201


def test_purpose_kind_is_fixed_once_published(tenant: Tenant) -> None:
    r = tenant.put("/v1/purposes/marketing_email", json={"kind": "notice"})
    assert r.status_code == 409 and assert_problem(r, "kind change")["code"] == "conflict"
    r = tenant.put("/v1/purposes/marketing_email", json={"kind": "consent", "double_opt_in": True})
    assert r.status_code == 200  # other attributes may change; decisions keep what applied when made
    assert tenant.record(user_id="late-doi")["status"] == "pending_confirmation"
