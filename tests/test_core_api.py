"""The v1 core through the HTTP API, on SQLite and PostgreSQL."""

from __future__ import annotations

import jwt
import pytest

from .helpers import ADMIN, Tenant, make_tenant


def test_tenant_creation_needs_admin(client, tenant: Tenant) -> None:
    body = {"name": "X"}
    assert client.post("/v1/tenants", json=body).status_code == 401
    assert client.post("/v1/tenants", json=body, headers={"Authorization": "Bearer nope"}).status_code == 401
    r = client.post("/v1/tenants", json=body, headers=tenant.h)
    assert r.status_code == 403 and r.json()["code"] == "wrong_key_type"
    r = client.post("/v1/tenants", json=body, headers=ADMIN)
    assert r.status_code == 201
    keys = r.json()["keys"]
    assert keys["secret_key"].startswith("sk_") and keys["publishable_key"].startswith("pk_")


def test_keys_are_typed_and_rotatable(client, tenant: Tenant) -> None:
    pk = {"Authorization": f"Bearer {tenant.publishable_key}"}
    r = client.get("/v1/check", params={"purpose": "marketing_email", "email": "a@b.c"}, headers=pk)
    assert r.status_code == 403 and r.json()["code"] == "wrong_key_type"
    r = client.get("/v1/check", params={"purpose": "marketing_email", "email": "a@b.c"}, headers=ADMIN)
    assert r.status_code == 403
    r = tenant.post("/v1/keys/rotate", json={"kind": "secret", "leaked": True})
    assert r.status_code == 200
    new = r.json()["secret_key"]
    assert new != tenant.secret_key and r.json()["publishable_key"] is None
    assert tenant.get("/v1/tenant").status_code == 401  # a leaked key is revoked at once
    tenant.secret_key = new
    assert tenant.get("/v1/tenant").json()["id"] == tenant.id
    r = client.post(f"/v1/tenants/{tenant.id}/keys/rotate", json={"kind": "publishable"}, headers=ADMIN)
    assert r.status_code == 200 and r.json()["publishable_key"].startswith("pk_")


def test_record_check_and_receipt(client, tenant: Tenant) -> None:
    rec = tenant.record(email="Ada@Example.com", evidence={"ip": "203.0.113.77", "user_agent": "UA/1"})
    assert rec["status"] == "granted" and rec["prev_hash"] is None and len(rec["record_hash"]) == 64
    c = tenant.check(email="ada@example.com")
    assert c["allowed"] is True and c["status"] == "granted" and c["policy_version"] == "v1"
    assert c["record_id"] == rec["id"] and c["receipt"] == rec["receipt"]
    jwks = client.get("/.well-known/jwks.json").json()
    header = jwt.get_unverified_header(rec["receipt"])
    assert header["alg"] == "EdDSA"
    key = next(k for k in jwks["keys"] if k["kid"] == header["kid"])
    assert "d" not in key  # public half only
    claims = jwt.decode(rec["receipt"], jwt.PyJWK(key), algorithms=["EdDSA"], audience=tenant.id)
    assert claims["tenant"] == tenant.id and claims["record_hash"] == rec["record_hash"]
    assert claims["policy"]["version"] == "v1" and claims["policy"]["sha256"]
    assert claims["purposes"][0] == {"purpose": "marketing_email", "status": "granted",
                                     "legal_basis": "consent", "kind": "consent"}
    for k in ("iss", "aud", "sub", "jti", "iat", "recorded_at", "source", "record_id"):
        assert k in claims
    # the chain links the subject's records
    rec2 = tenant.record(decision="withdrawn", email="ada@example.com")
    assert rec2["prev_hash"] == rec["record_hash"]
    c = tenant.check(email="ada@example.com")
    assert c["allowed"] is False and c["status"] == "withdrawn"


def test_unknown_subject_and_purpose(tenant: Tenant) -> None:
    assert tenant.check(email="nobody@example.com") == {
        "allowed": False, "status": "none", "purpose": "marketing_email", "subject": None,
        "policy_version": None, "record_id": None, "receipt": None, "gpc": False}
    r = tenant.get("/v1/check", params={"purpose": "nope", "email": "a@b.c"})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "purpose"
    r = tenant.get("/v1/check", params={"purpose": "marketing_email"})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "subject"


def test_decision_rules(tenant: Tenant) -> None:
    r = tenant.post("/v1/consents", json={"subject": {"user_id": "u1"}, "purpose": "nope", "decision": "granted"})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "purpose"
    r = tenant.post("/v1/consents", json={"subject": {"user_id": "u1"}, "purpose": "marketing_email",
                                          "decision": "acknowledged"})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "decision"
    r = tenant.post("/v1/consents", json={"subject": {"user_id": "u1"}, "purpose": "marketing_email",
                                          "decision": "granted", "policy_version": "v9"})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "policy_version"
    # a withdrawal is always accepted, even naming no version
    tenant.record(decision="withdrawn", user_id="u1")
    assert tenant.check(subject="u1")["status"] == "withdrawn"


def test_acknowledgement_keeps_disclosure_snapshot(tenant: Tenant) -> None:
    rec = tenant.record("strictly_necessary", "acknowledged", user_id="u7")
    assert rec["status"] == "acknowledged"
    r = tenant.get("/v1/subjects/u7/consents")
    assert r.status_code == 200
    states = {s["purpose"]: s for s in r.json()["purposes"]}
    assert states["strictly_necessary"]["status"] == "acknowledged"
    assert states["marketing_email"]["status"] == "none"
    # the snapshot survives a later change of the disclosure
    tenant.put("/v1/cookies/session", json={"provider": "changed", "purpose": "strictly_necessary",
                                            "lifetime": 3600})
    claims = jwt.decode(rec["receipt"], options={"verify_signature": False})
    assert claims["record_id"] == rec["id"]


def test_material_version_makes_earlier_decisions_stale(client) -> None:
    t = make_tenant(client)
    t.record(email="s@example.com")
    assert t.check(email="s@example.com")["status"] == "granted"
    t.publish("v2", material=True)  # notice_days is 0 for this tenant, effective now
    c = t.check(email="s@example.com")
    assert c["status"] == "stale" and c["allowed"] is False
    t.record(email="s@example.com", policy_version="v2")
    assert t.check(email="s@example.com")["status"] == "granted"
    # a non-material version changes nothing
    t.publish("v3", material=False)
    assert t.check(email="s@example.com")["status"] == "granted"


def test_material_version_respects_notice_period(client) -> None:
    t = make_tenant(client, notice_days=30)
    r = t.post("/v1/policies/privacy/versions", json={
        "version": "v2", "document_url": "https://acme.test/p", "document_sha256": "0" * 64,
        "material": True, "purposes": ["marketing_email"], "effective_at": "2020-01-01T00:00:00Z"})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "effective_at"
    v = t.publish("v2", material=True)  # default: effective after the notice period
    t.record(email="n@example.com")
    assert t.check(email="n@example.com")["status"] == "granted"  # not in effect yet
    assert v["effective_at"] > v["published_at"]
    # versions are immutable: the same label again is a conflict
    t.publish("v2", expect=409)
    r = t.get("/v1/policies/privacy/versions", params={"limit": 1})
    assert r.json()["items"][0]["version"] == "v2" and r.json()["next_cursor"]
    r2 = t.get("/v1/policies/privacy/versions", params={"limit": 1, "cursor": r.json()["next_cursor"]})
    assert r2.json()["items"][0]["version"] == "v1" and r2.json()["next_cursor"] is None


def test_double_opt_in_grant_is_pending(tenant: Tenant) -> None:
    rec = tenant.record("product_updates", email="d@example.com")
    assert rec["status"] == "pending_confirmation"
    c = tenant.check("product_updates", email="d@example.com")
    assert c["status"] == "pending_confirmation" and c["allowed"] is False


def test_idempotency(tenant: Tenant) -> None:
    body = {"subject": {"email": "i@example.com"}, "purpose": "marketing_email", "decision": "granted"}
    h = {"Idempotency-Key": "abc-1"}
    r1 = tenant.post("/v1/consents", json=body, headers=h)
    r2 = tenant.post("/v1/consents", json=body, headers=h)
    assert (r1.status_code, r2.status_code) == (201, 200)
    assert r1.json()["id"] == r2.json()["id"]
    r3 = tenant.post("/v1/consents", json={**body, "decision": "denied"}, headers=h)
    assert r3.status_code == 409 and r3.json()["code"] == "idempotency_conflict"
    assert tenant.check(email="i@example.com")["status"] == "granted"


def test_tenants_are_isolated(client, tenant: Tenant) -> None:
    other = make_tenant(client)
    tenant.record(email="iso@example.com")
    assert other.check(email="iso@example.com")["status"] == "none"
    sid = tenant.check(email="iso@example.com")["subject"]
    assert other.get(f"/v1/subjects/{sid}/consents").status_code == 404
    assert other.check(subject=sid)["status"] == "none"


def test_bulk_check(tenant: Tenant) -> None:
    tenant.record(email="b1@example.com")
    tenant.record(email="b2@example.com", decision="denied")
    emails = ["b1@example.com", "B2@example.com", "zz@example.com"] + [f"x{i}@e.com" for i in range(200)]
    r = tenant.post("/v1/check", json={"purpose": "marketing_email", "emails": emails})
    assert r.status_code == 200
    out = r.json()
    assert out["count"] == len(emails) and out["allowed_count"] == 1
    assert [x["status"] for x in out["results"][:3]] == ["granted", "denied", "none"]
    assert out["results"][1]["id"] == "B2@example.com"
    r = tenant.post("/v1/check", json={"purpose": "marketing_email"})
    assert r.status_code == 422


def test_ip_truncated_unless_tenant_opts_in(client, db_url) -> None:
    import sqlalchemy as sa

    t = make_tenant(client)
    full = make_tenant(client, store_full_ip=True)
    a = t.record(email="ip@example.com", evidence={"ip": "198.51.100.23"})
    b = full.record(email="ip@example.com", evidence={"ip": "198.51.100.23"})
    engine = sa.create_engine(db_url)
    with engine.connect() as conn:
        rows = dict(conn.execute(sa.text("SELECT id, evidence FROM consent_record WHERE id IN (:a, :b)"),
                                 {"a": a["id"], "b": b["id"]}).all())
        emails = conn.execute(sa.text("SELECT count(*) FROM consent_record WHERE CAST(evidence AS TEXT) LIKE '%ip@example%'")).scalar()
    engine.dispose()
    import json as _json

    ev = {k: (_json.loads(v) if isinstance(v, str) else v) for k, v in rows.items()}
    assert ev[a["id"]]["ip"] == "198.51.100.0"
    assert ev[b["id"]]["ip"] == "198.51.100.23"
    assert emails == 0


@pytest.mark.parametrize("payload,ctype,status,code", [
    (b"{", "application/json", 400, "malformed_json"),
    (b"{}", "text/html", 415, "unsupported_media_type"),
    (b"[]", "application/json", 422, "validation_failed"),
    (b'{"subject":{"email":"not-an-email"},"purpose":"marketing_email","decision":"granted"}',
     "application/json", 422, "validation_failed"),
])
def test_bad_input_is_problem_json(tenant: Tenant, payload, ctype, status, code) -> None:
    r = tenant.post("/v1/consents", content=payload, headers={"Content-Type": ctype})
    assert r.status_code == status
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body["code"] == code and body["status"] == status and body["detail"] and body["type"]


def test_body_too_large(tenant: Tenant) -> None:
    big = b'{"purpose":"marketing_email","emails":["' + b"a" * (17 * 1024 * 1024) + b'"]}'
    r = tenant.post("/v1/check", content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["code"] == "payload_too_large"


def test_health_and_openapi(client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json()["checks"]["migration"] == r.json()["checks"]["head"]
    spec = client.get("/openapi.json").json()
    paths = {(p, m) for p, ops in spec["paths"].items() for m in ops}
    for route in client.app.routes:
        if getattr(route.endpoint, "meta", None) is not None:
            for m in route.methods - {"HEAD"}:
                assert (route.path, m.lower()) in paths
    assert ("/v1/consents", "post") in paths and ("/v1/check", "post") in paths
