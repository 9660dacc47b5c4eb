"""Isolation matrix: every route of the routes table (so routes added later are covered
automatically) crossed with every wrong credential gives the right status, and no answer
ever carries another tenant's data."""

from __future__ import annotations

import re
from typing import Any

import pytest
from starlette.routing import Route

from .helpers import ADMIN_TOKEN, Tenant, make_tenant

VICTIM_EMAIL = "victim.isolation@example.com"
PATH_VALUES = {"key": "marketing_email", "policy": "privacy", "name": "session", "purpose": "marketing_email"}


def auth_routes(app: Any) -> list[tuple[Route, str, str]]:
    out = []
    for r in app.routes:
        meta = getattr(r, "endpoint", None) and getattr(r.endpoint, "meta", None)
        if isinstance(r, Route) and meta is not None and meta.auth:
            for m in sorted((r.methods or set()) - {"HEAD"}):
                out.append((r, m, meta.auth))
    return out


@pytest.fixture(scope="module")
def world(client) -> dict[str, Any]:
    victim = make_tenant(client)
    rec = victim.record(email=VICTIM_EMAIL)
    other = make_tenant(client)
    other.record(email="someone.else@example.com")
    revoked = make_tenant(client, catalog=False)
    old_sk, old_pk = revoked.secret_key, revoked.publishable_key
    r = revoked.post("/v1/keys/rotate", json={"kind": "both", "leaked": True})
    assert r.status_code == 200
    markers = [victim.id, rec["subject"], rec["id"], rec["record_hash"], VICTIM_EMAIL, rec["receipt"][:40]]
    return {"victim": victim, "other": other, "rec": rec, "old_sk": old_sk, "old_pk": old_pk,
            "markers": markers}


def request(client: Any, route: Route, method: str, world: dict[str, Any], headers: dict[str, str]) -> Any:
    victim: Tenant = world["victim"]
    values = {**PATH_VALUES, "subject": world["rec"]["subject"], "tenant_id": victim.id}
    path = re.sub(r"{(\w+)(:\w+)?}", lambda m: values.get(m.group(1), "x"), route.path)
    params = {"purpose": "marketing_email", "email": VICTIM_EMAIL}
    meta = route.endpoint.meta  # type: ignore[attr-defined]
    kw: dict[str, Any] = {"headers": headers, "params": params if meta.query else None}
    if meta.body is not None:
        kw["content"] = b"{}"
        kw["headers"] = {**headers, "Content-Type": "application/json"}
    return client.request(method, path, **kw)


CASES = ["no key", "malformed key", "bearer garbage", "revoked key", "other tenant's secret key",
         "publishable key", "admin token"]


def credentials(case: str, world: dict[str, Any], auth: str) -> dict[str, str]:
    victim: Tenant = world["victim"]
    token = {
        "no key": None, "malformed key": None, "bearer garbage": "sk_" + "A" * 43,
        "revoked key": world["old_pk"] if auth == "publishable" else world["old_sk"],
        "other tenant's secret key": world["other"].secret_key,
        "publishable key": victim.publishable_key, "admin token": ADMIN_TOKEN,
    }[case]
    if case == "malformed key":
        return {"Authorization": "Basic dXNlcjpwYXNz"}
    return {"Authorization": f"Bearer {token}"} if token else {}


def expected(case: str, auth: str) -> set[int] | None:
    """The statuses allowed for this credential on a route needing ``auth`` (None: any non-5xx)."""
    if case in ("no key", "malformed key", "bearer garbage", "revoked key"):
        return {401}
    if case == "other tenant's secret key":
        return None if auth == "secret" else {403}
    if case == "publishable key":
        return None if auth == "publishable" else {403}
    if case == "admin token":
        return None if auth == "admin" else {403}
    raise AssertionError(case)


def test_other_tenant_sees_nothing_of_victim(client, world) -> None:
    """The positive half: the victim sees its record, the other tenant gets 404 / status none."""
    victim, other = world["victim"], world["other"]
    sub = world["rec"]["subject"]
    assert victim.get(f"/v1/subjects/{sub}/consents").status_code == 200
    assert other.get(f"/v1/subjects/{sub}/consents").status_code == 404
    assert other.get(f"/v1/subjects/email:{VICTIM_EMAIL}/consents").status_code == 404
    assert other.check(email=VICTIM_EMAIL)["status"] == "none"
    assert victim.check(email=VICTIM_EMAIL)["status"] == "granted"
    r = other.post("/v1/check", json={"purpose": "marketing_email", "emails": [VICTIM_EMAIL]})
    assert r.status_code == 200 and VICTIM_EMAIL not in r.text or r.json()["allowed_count"] == 0


@pytest.mark.parametrize("case", CASES)
def test_isolation_matrix(client, world, case: str) -> None:
    routes = auth_routes(client.app)
    assert len(routes) >= 10  # the walk found the API
    checked = 0
    for route, method, auth in routes:
        r = request(client, route, method, world, credentials(case, world, auth))
        what = f"{case}: {method} {route.path} ({auth}) -> {r.status_code} {r.text[:200]}"
        allowed = expected(case, auth)
        assert r.status_code < 500, what
        if allowed is not None:
            assert r.status_code in allowed, what
            assert r.headers["content-type"] == "application/problem+json", what
            if r.status_code == 401:
                assert r.headers.get("www-authenticate", "").startswith("Bearer"), what
        if case != "publishable key" or auth != "publishable":  # the victim's own pk may see its config
            for marker in world["markers"]:
                if case == "admin token" and auth == "admin" and marker == world["victim"].id:
                    continue  # the admin may name any tenant (e.g. rotate its keys)
                assert marker not in r.text, f"{what}: leaked {marker}"
        checked += 1
        keys = r.json() if r.status_code == 200 and "secret_key" in r.text else {}
        owner = world["other"] if case == "other tenant's secret key" else world["victim"]
        owner.secret_key = keys.get("secret_key") or owner.secret_key  # a rotation route ran: follow it
        owner.publishable_key = keys.get("publishable_key") or owner.publishable_key
    assert checked == len(routes)


