"""Shared test helpers: build a tenant and its catalog through the public API."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from starlette.testclient import TestClient

ADMIN_TOKEN = "adm_test_token_0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
DOC_SHA = hashlib.sha256(b"policy text").hexdigest()


@dataclass
class Tenant:
    client: TestClient
    id: str
    secret_key: str
    publishable_key: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def h(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.secret_key}"}

    def get(self, path: str, **kw: Any) -> Any:
        return self.client.get(path, headers={**self.h, **kw.pop("headers", {})}, **kw)

    def post(self, path: str, **kw: Any) -> Any:
        return self.client.post(path, headers={**self.h, **kw.pop("headers", {})}, **kw)

    def put(self, path: str, **kw: Any) -> Any:
        return self.client.put(path, headers={**self.h, **kw.pop("headers", {})}, **kw)

    def delete(self, path: str, **kw: Any) -> Any:
        return self.client.delete(path, headers={**self.h, **kw.pop("headers", {})}, **kw)

    def record(self, purpose: str = "marketing_email", decision: str = "granted", *, expect: int = 201,
               **subject: Any) -> dict[str, Any]:
        body: dict[str, Any] = {"subject": subject or {"email": "ada@example.com"}, "purpose": purpose,
                                "decision": decision}
        for k in ("policy_version", "source", "evidence", "policy", "recorded_at"):
            if k in body["subject"]:
                body[k] = body["subject"].pop(k)
        r = self.post("/v1/consents", json=body)
        assert r.status_code == expect, r.text
        return dict(r.json())

    def check(self, purpose: str = "marketing_email", **who: str) -> dict[str, Any]:
        r = self.get("/v1/check", params={"purpose": purpose, **who})
        assert r.status_code == 200, r.text
        return dict(r.json())

    def publish(self, version: str, *, material: bool = False, purposes: list[str] | None = None,
                expect: int = 201, **kw: Any) -> dict[str, Any]:
        body = {"version": version, "document_url": f"https://acme.test/privacy/{version}",
                "document_sha256": DOC_SHA, "material": material,
                "purposes": purposes or ["strictly_necessary", "marketing_email", "analytics"], **kw}
        r = self.post("/v1/policies/privacy/versions", json=body)
        assert r.status_code == expect, r.text
        return dict(r.json())


def make_tenant(client: TestClient, *, catalog: bool = True, notice_days: int = 0,
                origins: list[str] | None = None, **extra: Any) -> Tenant:
    r = client.post("/v1/tenants", headers=ADMIN, json={
        "name": "Acme", "allowed_origins": origins or ["http://127.0.0.1:8000"],
        "notice_days": notice_days, **extra})
    assert r.status_code == 201, r.text
    body = r.json()
    t = Tenant(client, body["id"], body["keys"]["secret_key"], body["keys"]["publishable_key"])
    if catalog:
        setup_catalog(t)
    return t


def setup_catalog(t: Tenant) -> None:
    for key, spec in {
        "strictly_necessary": {"kind": "notice", "legal_basis": "legitimate_interest", "title": "Necessary"},
        "marketing_email": {"kind": "consent", "gpc": True, "title": "Marketing email"},
        "analytics": {"kind": "consent", "gpc": True, "title": "Analytics"},
        "product_updates": {"kind": "consent", "double_opt_in": True, "title": "Product updates"},
    }.items():
        r = t.put(f"/v1/purposes/{key}", json=spec)
        assert r.status_code == 201, r.text
    r = t.put("/v1/cookies/session", json={"provider": "acme.test", "purpose": "strictly_necessary",
                                           "http_only": True, "secure": True, "same_site": "Lax",
                                           "lifetime": "session", "description": "Keeps you signed in"})
    assert r.status_code == 201, r.text
    t.publish("v1", purposes=["strictly_necessary", "marketing_email", "analytics", "product_updates"])


def pg_schema_url(base_url: str, schema: str) -> str:
    """A URL on the same PostgreSQL database whose default schema is ``schema``, emptied first:
    tests that migrate up and down, or start their own server, never touch the shared schema."""
    import sqlalchemy as sa

    assert schema.isidentifier() and schema != "public"
    engine = sa.create_engine(base_url)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
            conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    finally:
        engine.dispose()
    sep = "&" if "?" in base_url else "?"
    return f"{base_url}{sep}options=-csearch_path%3D{schema}"
