"""Tenants change their own settings (PATCH /v1/tenant, the admin's PATCH /v1/tenants/{id},
`consent tenants update`), every change lands in an audit trail readable over the API, key
rotation keeps the old key working for a grace period on every path that takes a key, and
closing a tenant stops all its keys at once."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from starlette.testclient import TestClient

from consent.cli import main
from consent.store import db
from consent.store.models import ApiKey, utcnow
from consent.web.app import create_app

from .conftest import settings_for
from .helpers import ADMIN, Tenant, make_tenant

ORIGIN = "http://127.0.0.1:8000"


@pytest.fixture(scope="module")
def route_client(db_url: str) -> Iterator[TestClient]:
    """The same service with every fast path off: each request goes through its route."""
    with TestClient(create_app(settings_for(db_url))) as c:
        yield c


def patch(t: Tenant, body: dict[str, Any], **kw: Any) -> Any:
    return t.client.patch("/v1/tenant", json=body, headers={**t.h, **kw.pop("headers", {})}, **kw)


def audit(t: Tenant, **params: Any) -> dict[str, Any]:
    r = t.get("/v1/tenant/audit", params=params)
    assert r.status_code == 200, r.text
    return dict(r.json())


def test_patch_changes_settings_and_audits_them(tenant: Tenant) -> None:
    before = tenant.get("/v1/tenant").json()
    r = patch(tenant, {"name": "Acme GmbH", "allowed_origins": ["HTTPS://WWW.Acme.test:443", "http://localhost:8080",
                                                                "https://www.acme.test"],
                       "notice_days": 14, "default_lang": "de", "store_full_ip": True, "store_user_agent": False})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["name"] == "Acme GmbH" and body["notice_days"] == 14 and body["default_lang"] == "de"
    # normalised as browsers send Origin: lowercase, no default port, duplicates dropped
    assert body["allowed_origins"] == ["https://www.acme.test", "http://localhost:8080"]
    assert body["store_full_ip"] is True and body["store_user_agent"] is False
    assert tenant.get("/v1/tenant").json()["allowed_origins"] == body["allowed_origins"]
    entry = audit(tenant)["items"][0]
    key_id = next(k["id"] for k in body["keys"] if k["kind"] == "secret")
    assert entry["actor"] == key_id and entry["action"] == "settings.update"
    assert entry["before"] == {k: before[k] for k in entry["after"]}
    assert entry["after"]["allowed_origins"] == body["allowed_origins"] and entry["after"]["notice_days"] == 14
    # the same values again change nothing and add no entry
    n = len(audit(tenant)["items"])
    assert patch(tenant, {"notice_days": 14}).status_code == 200
    assert len(audit(tenant)["items"]) == n


@pytest.mark.parametrize("body, field", [
    ({"allowed_origins": ["https://acme.test/"]}, "allowed_origins"),
    ({"allowed_origins": ["https://acme.test/shop"]}, "allowed_origins"),
    ({"allowed_origins": ["acme.test"]}, "allowed_origins"),
    ({"allowed_origins": ["ftp://acme.test"]}, "allowed_origins"),
    ({"allowed_origins": ["https://user@acme.test"]}, "allowed_origins"),
    ({"allowed_origins": "https://acme.test"}, "allowed_origins"),
    ({"notice_days": True}, "notice_days"),
    ({"notice_days": "14"}, "notice_days"),
    ({"notice_days": 14.0}, "notice_days"),
    ({"notice_days": -1}, "notice_days"),
    ({"store_full_ip": "yes"}, "store_full_ip"),
    ({"store_user_agent": 1}, "store_user_agent"),
    ({"default_lang": "english!"}, "default_lang"),
    ({"name": ""}, "name"),
    ({"name": None}, "body"),
    ({"hash_key": "x"}, "hash_key"),
    ({}, "body"),
])
def test_patch_is_strict_and_changes_nothing_when_refused(tenant: Tenant, body: dict[str, Any], field: str) -> None:
    before = tenant.get("/v1/tenant").json()
    n = len(audit(tenant)["items"])
    r = patch(tenant, body)
    assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json", r.text
    problem = r.json()
    assert problem["code"] == "validation_failed"
    assert any(e["field"].split(".")[0] == field for e in problem["errors"]), problem
    assert tenant.get("/v1/tenant").json() == before
    assert len(audit(tenant)["items"]) == n


def test_trailing_slash_message_says_what_to_remove(tenant: Tenant) -> None:
    r = patch(tenant, {"allowed_origins": ["https://acme.test/"]})
    assert "trailing slash" in r.json()["detail"]


def test_new_origin_works_at_once_on_both_snippet_paths(client: TestClient, route_client: TestClient) -> None:
    t = make_tenant(client)
    new = "https://staging.acme.test"
    params = {"key": t.publishable_key}
    for c in (client, route_client):
        assert c.get("/v1/snippet/config", params=params, headers={"Origin": new}).status_code == 403
    assert client.get("/v1/snippet/config", params=params, headers={"Origin": ORIGIN}).status_code == 200
    assert patch(t, {"allowed_origins": [ORIGIN, new]}).status_code == 200
    for c in (client, route_client):
        r = c.get("/v1/snippet/config", params=params, headers={"Origin": new})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == new
    assert patch(t, {"allowed_origins": [new]}).status_code == 200  # and removing one counts at once
    for c in (client, route_client):
        assert c.get("/v1/snippet/config", params=params, headers={"Origin": ORIGIN}).status_code == 403


def test_admin_patch_and_audit(client: TestClient, tenant: Tenant) -> None:
    r = client.patch(f"/v1/tenants/{tenant.id}", json={"notice_days": 45}, headers=ADMIN)
    assert r.status_code == 200 and r.json()["notice_days"] == 45
    assert client.patch(f"/v1/tenants/{tenant.id}", json={"notice_days": 45}, headers=tenant.h).status_code == 403
    assert client.patch("/v1/tenants/ten_missing", json={"notice_days": 1}, headers=ADMIN).status_code == 404
    got = client.get(f"/v1/tenants/{tenant.id}", headers=ADMIN).json()
    assert got["notice_days"] == 45 and {k["kind"] for k in got["keys"]} == {"secret", "publishable"}
    entries = client.get(f"/v1/tenants/{tenant.id}/audit", headers=ADMIN).json()["items"]
    assert entries[0]["actor"] == "admin" and entries[0]["before"] == {"notice_days": 0}
    assert audit(tenant)["items"][0] == entries[0]


def test_audit_trail_is_paginated_and_per_tenant(client: TestClient) -> None:
    t, other = make_tenant(client, catalog=False), make_tenant(client, catalog=False)
    for days in range(1, 8):
        assert patch(t, {"notice_days": days}).status_code == 200
    patch(other, {"name": "Other"})
    seen, cursor = [], None
    while True:
        page = audit(t, limit=3, **({"cursor": cursor} if cursor else {}))
        seen += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert [e["after"]["notice_days"] for e in seen] == [7, 6, 5, 4, 3, 2, 1]
    assert len({e["id"] for e in seen}) == 7
    assert t.get("/v1/tenant/audit", params={"cursor": "abc"}).status_code == 422
    assert all(e["after"].get("name") != "Other" for e in seen)


def test_cli_updates_and_refuses_in_one_line(tenant: Tenant, settings: Any, capsys: Any, monkeypatch: Any) -> None:
    monkeypatch.setattr(main.Settings, "from_env", classmethod(lambda cls, *a, **k: settings))
    assert main.main(["tenants", "update", "--tenant", tenant.id, "--origin", "https://Shop.acme.test",
                     "--no-store-user-agent", "--default-lang", "fr"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["allowed_origins"] == ["https://shop.acme.test"] and shown["store_user_agent"] is False
    assert tenant.get("/v1/tenant").json()["default_lang"] == "fr"
    assert audit(tenant)["items"][0]["actor"] == "cli"
    assert main.main(["tenants", "update", "--tenant", tenant.id, "--origin", "https://acme.test/"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --origin: remove the trailing slash"), err
    assert main.main(["tenants", "update", "--tenant", "ten_nope", "--name", "x"]) == 2
    assert "not found" in capsys.readouterr().err
    assert tenant.get("/v1/tenant").json()["allowed_origins"] == ["https://shop.acme.test"]


# --- rotation with overlap -------------------------------------------------------------

def expire(db_url: str, key_id_prefix: str, kind: str, tenant_id: str) -> None:
    """Time passes: the old key's grace period ends (its expiry moves one second into the past)."""
    engine = db.create_db_engine(db_url)
    try:
        with db.transaction(engine, write=True) as session:
            key = session.execute(sa.select(ApiKey).where(
                ApiKey.tenant_id == tenant_id, ApiKey.kind == kind,
                ApiKey.prefix == key_id_prefix, ApiKey.revoked_at.is_not(None))).scalar_one()  # type: ignore[union-attr]
            key.revoked_at = utcnow() - timedelta(seconds=1)
    finally:
        engine.dispose()


def every_path(client: TestClient, route_client: TestClient, sk: str, pk: str, n: int) -> dict[str, int]:
    """The status each path that takes a key gives: checks, records, snippet config and consents,
    through two apps (``client``, ``route_client``), each with its own key cache."""
    sk_h, params = {"Authorization": f"Bearer {sk}"}, {"purpose": "marketing_email", "email": "ada@example.com"}
    out = {}
    for name, c in (("fast", client), ("route", route_client)):
        out[f"check_{name}"] = c.get("/v1/check", params=params, headers=sk_h).status_code
        body = {"subject": {"email": f"r{n}{name}@example.com"}, "purpose": "analytics", "decision": "granted"}
        out[f"record_{name}"] = c.post("/v1/consents", json=body, headers=sk_h).status_code
        out[f"config_{name}"] = c.get("/v1/snippet/config", params={"key": pk},
                                      headers={"Origin": ORIGIN}).status_code
        raw = json.dumps({"anonymous_id": f"a_v{n}{name}", "choices": [{"purpose": "analytics",
                                                                     "decision": "granted"}]})
        out[f"snippet_{name}"] = c.post("/v1/snippet/consents", params={"key": pk}, content=raw,
                                        headers={"Origin": ORIGIN, "Content-Type": "text/plain"}).status_code
    return out


def test_rotation_keeps_old_keys_for_their_grace_period(client: TestClient, route_client: TestClient,
                                                        db_url: str) -> None:
    t = make_tenant(client)
    t.record(email="ada@example.com")
    old_sk, old_pk = t.secret_key, t.publishable_key
    assert set(every_path(client, route_client, old_sk, old_pk, 0).values()) <= {200, 201}  # caches warm
    fast_before = client.app.state.services.check_reader.answered  # type: ignore[attr-defined]
    r = t.post("/v1/keys/rotate", json={"kind": "both"})
    assert r.status_code == 200, r.text
    new_sk, new_pk = r.json()["secret_key"], r.json()["publishable_key"]
    now = utcnow()
    old = {k["kind"]: k for k in r.json()["keys"] if k["expires_at"] is not None}
    assert set(old) == {"secret", "publishable"}
    from consent.web.http import parse_time

    sk_left = parse_time("x", old["secret"]["expires_at"]) - now
    pk_left = parse_time("x", old["publishable"]["expires_at"]) - now
    assert timedelta(hours=23) < sk_left <= timedelta(hours=24)
    assert timedelta(days=6, hours=23) < pk_left <= timedelta(days=7)
    shown = {(k["kind"], k["prefix"]): k["expires_at"] for k in client.get(
        "/v1/tenant", headers={"Authorization": f"Bearer {new_sk}"}).json()["keys"]}
    assert shown[("secret", old_sk[:7])] == old["secret"]["expires_at"] and shown[("secret", new_sk[:7])] is None
    # inside the grace period: old and new keys work on every path
    for n, (sk, pk) in enumerate(((old_sk, old_pk), (new_sk, new_pk)), 1):
        got = every_path(client, route_client, sk, pk, n)
        assert set(got.values()) <= {200, 201}, got
    assert client.app.state.services.check_reader.answered > fast_before  # type: ignore[attr-defined]
    # after it: the old keys are refused everywhere (the fast check still has the key cached)
    expire(db_url, old_sk[:7], "secret", t.id)
    expire(db_url, old_pk[:7], "publishable", t.id)
    got = every_path(client, route_client, old_sk, old_pk, 3)
    assert set(got.values()) == {401}, got
    got = every_path(client, route_client, new_sk, new_pk, 4)
    assert set(got.values()) <= {200, 201}, got
    assert {k["prefix"] for k in client.get("/v1/tenant", headers={"Authorization": f"Bearer {new_sk}"})
            .json()["keys"]} == {new_sk[:7], new_pk[:7]}


def test_leaked_and_zero_grace_revoke_at_once(client: TestClient, route_client: TestClient) -> None:
    t = make_tenant(client)
    old_sk, old_pk = t.secret_key, t.publishable_key
    r = t.post("/v1/keys/rotate", json={"kind": "both", "leaked": True})
    assert r.status_code == 200
    assert set(every_path(client, route_client, old_sk, old_pk, 5).values()) == {401}
    t.secret_key = r.json()["secret_key"]
    assert [k["expires_at"] for k in r.json()["keys"]] == [None, None]
    entry = audit(t)["items"][0]
    assert entry["action"] == "keys.rotate" and entry["after"]["leaked"] is True
    assert "sk_" not in json.dumps(entry) or all(len(p) <= 7 for p in [i["prefix"] for i in entry["after"]["issued"]])
    # grace 0 on a secret key only: the old secret key stops, the publishable key is untouched
    old_sk = t.secret_key
    r = t.post("/v1/keys/rotate", json={"kind": "secret", "secret_grace_hours": 0})
    assert r.status_code == 200 and r.json()["publishable_key"] is None
    assert client.get("/v1/tenant", headers={"Authorization": f"Bearer {old_sk}"}).status_code == 401
    # a second rotation never lengthens an old key's grace period
    t.secret_key = r.json()["secret_key"]
    first = t.post("/v1/keys/rotate", json={"kind": "publishable", "publishable_grace_days": 1}).json()
    t.post("/v1/keys/rotate", json={"kind": "publishable", "publishable_grace_days": 30})
    keys = {k["prefix"]: k["expires_at"] for k in t.get("/v1/tenant").json()["keys"]}
    exp = next(k["expires_at"] for k in first["keys"] if k["expires_at"])
    assert exp in keys.values()


@pytest.mark.parametrize("body", [
    {"kind": "both", "leaked": True, "secret_grace_hours": 2},
    {"leaked": "true"},
    {"secret_grace_hours": True},
    {"publishable_grace_days": "7"},
    {"publishable_grace_days": 91},
    {"secret_grace_hours": -1},
])
def test_rotation_body_is_strict(tenant: Tenant, body: dict[str, Any]) -> None:
    r = tenant.post("/v1/keys/rotate", json=body)
    assert r.status_code == 422 and r.json()["code"] == "validation_failed", r.text
    assert tenant.get("/v1/tenant").status_code == 200  # nothing rotated


def test_cli_rotation_leaked_and_grace(tenant: Tenant, settings: Any, capsys: Any, monkeypatch: Any) -> None:
    monkeypatch.setattr(main.Settings, "from_env", classmethod(lambda cls, *a, **k: settings))
    old = tenant.secret_key
    assert main.main(["keys", "rotate", "--tenant", tenant.id, "--kind", "secret"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert tenant.get("/v1/tenant").status_code == 200  # still in its grace period
    tenant.secret_key = out["secret_key"]
    assert main.main(["keys", "rotate", "--tenant", tenant.id, "--kind", "secret", "--leaked"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in (old, tenant.secret_key):
        assert tenant.client.get("/v1/tenant", headers={"Authorization": f"Bearer {key}"}).status_code == 401
    tenant.secret_key = out["secret_key"]
    assert tenant.get("/v1/tenant").status_code == 200


# --- closing a tenant ------------------------------------------------------------------

def test_closing_a_tenant_revokes_all_its_keys(client: TestClient, route_client: TestClient) -> None:
    t = make_tenant(client)
    t.record(email="ada@example.com")
    old_sk, old_pk = t.secret_key, t.publishable_key
    r = t.post("/v1/keys/rotate", json={"kind": "both"})  # old keys in their grace period ...
    new_sk, new_pk = r.json()["secret_key"], r.json()["publishable_key"]
    assert set(every_path(client, route_client, old_sk, old_pk, 6).values()) <= {200, 201}
    r = client.post(f"/v1/tenants/{t.id}/close", headers=ADMIN)
    assert r.status_code == 200, r.text
    for sk, pk, n in ((old_sk, old_pk, 7), (new_sk, new_pk, 8)):  # ... and the new ones: all stop
        got = every_path(client, route_client, sk, pk, n)
        assert set(got.values()) == {401}, got
    got = client.get(f"/v1/tenants/{t.id}", headers=ADMIN).json()
    assert got["keys"] == []
    r = client.post(f"/v1/tenants/{t.id}/keys/rotate", json={"kind": "both"}, headers=ADMIN)
    assert r.status_code == 409 and r.json()["code"] == "tenant_closed"
    entry = client.get(f"/v1/tenants/{t.id}/audit", headers=ADMIN).json()["items"][0]
    assert entry["action"] == "tenant.close" and entry["after"]["keys_revoked"] == 4


def test_evidence_and_language_settings_apply_at_once(client: TestClient, route_client: TestClient) -> None:
    t = make_tenant(client)
    evidence = {"ip": "203.0.113.77", "user_agent": "UA/1"}

    def recorded(c: TestClient, email: str) -> dict[str, Any]:
        body = {"subject": {"email": email}, "purpose": "analytics", "decision": "granted", "evidence": evidence}
        r = c.post("/v1/consents", json=body, headers=t.h)
        assert r.status_code == 201, r.text
        rec = t.get(f"/v1/subjects/email:{email}/export").json()["records"][-1]
        return dict(rec["evidence"])

    for n, c in enumerate((client, route_client)):  # the fast record path (PostgreSQL) and the route
        assert recorded(c, f"before{n}@example.com") == {"ip": "203.0.113.0", "user_agent": "UA/1"}
    assert patch(t, {"store_full_ip": True, "store_user_agent": False}).status_code == 200
    for n, c in enumerate((client, route_client)):
        assert recorded(c, f"after{n}@example.com") == {"ip": "203.0.113.77"}
    params = {"key": t.publishable_key}
    assert client.get("/v1/snippet/config", params=params, headers={"Origin": ORIGIN}).json()["lang"] == "en"
    assert patch(t, {"default_lang": "de"}).status_code == 200
    for c in (client, route_client):
        assert c.get("/v1/snippet/config", params=params, headers={"Origin": ORIGIN}).json()["lang"] == "de"


def test_retention_changes_are_audited(tenant: Tenant) -> None:
    assert tenant.put("/v1/tenant/retention", json={"evidence_retention_days": 30}).status_code == 200
    entry = audit(tenant)["items"][0]
    assert entry["action"] == "retention.update" and entry["before"] == {"evidence_retention_days": None}
    assert entry["after"] == {"evidence_retention_days": 30} and entry["actor"].startswith("key_")
    n = len(audit(tenant)["items"])
    assert tenant.put("/v1/tenant/retention", json={"evidence_retention_days": 30}).status_code == 200
    assert len(audit(tenant)["items"]) == n  # nothing changed, nothing added
