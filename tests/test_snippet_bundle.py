"""The per-tenant script ``GET /v1/snippet/{publishable_key}.js``, on SQLite and PostgreSQL: the
snippet with the tenant's config inside, its strong ETag moving with every change of what it
carries (the snippet build, a purpose, a cookie, a version, the texts, the tenant's default
language), 304s, gzip, and the errors."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from consent.web.app import create_app

from .conftest import settings_for
from .helpers import Tenant, make_tenant

ROOT = Path(__file__).resolve().parent.parent
DIST = ROOT / "client-snippet" / "dist" / "snippet.js"
TAIL = re.compile(rb'\(window,document,("pk_[^"]+"),(\{.*\})\);\n?$', re.DOTALL)


def script(t: Tenant, client: TestClient | None = None, key: str | None = None, **kw: Any) -> Any:
    return (client or t.client).get(f"/v1/snippet/{key or t.publishable_key}.js", **kw)


def embedded(r: Any) -> tuple[str, dict[str, Any]]:
    m = TAIL.search(r.content)
    assert m, r.content[-200:]
    return json.loads(m.group(1)), json.loads(m.group(2))


def test_script_carries_the_config_the_config_route_answers(tenant: Tenant) -> None:
    raw = DIST.read_bytes()
    for params in ({}, {"lang": "de"}, {"lang": "ar", "policy": "privacy"}):
        r = script(tenant, params=params)
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "text/javascript; charset=utf-8"
        assert r.headers["content-encoding"] == "gzip"  # httpx asks for it and decodes it
        assert r.headers["cache-control"] == "public, no-cache" and r.headers["vary"] == "Accept-Encoding"
        assert r.headers["access-control-allow-origin"] == "*"
        etag = r.headers["etag"]
        assert re.fullmatch(r'"[0-9a-f]{32}"', etag)  # strong
        key, cfg = embedded(r)
        assert key == tenant.publishable_key
        assert cfg == tenant.client.get("/v1/snippet/config", params={"key": key, **params}).json()
        head = raw[: raw.rfind(b"(window,document)")]
        assert r.content.startswith(head)  # the snippet itself, unchanged
        again = script(tenant, params=params, headers={"If-None-Match": etag})
        assert again.status_code == 304 and again.headers["etag"] == etag and not again.content
        plain = script(tenant, params=params, headers={"Accept-Encoding": "identity"})
        assert "content-encoding" not in plain.headers and plain.content == r.content
    assert embedded(script(tenant, params={"lang": "de"}))[1]["lang"] == "de"


def test_etag_moves_with_everything_the_script_carries(db_url: str, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch, tenant: Tenant) -> None:
    seen: list[str] = []

    def changed(**kw: Any) -> dict[str, Any]:
        r = script(tenant, **kw)
        assert r.status_code == 200, r.text
        etag = r.headers["etag"]
        assert etag not in seen, "the ETag did not move"
        if seen:  # the previous ETag is no longer current: a revalidation gets the new body
            assert script(tenant, headers={"If-None-Match": seen[-1]}, **kw).status_code == 200
        seen.append(etag)
        return embedded(r)[1]

    changed()
    assert script(tenant).headers["etag"] == seen[-1]  # stable while nothing changes
    with TestClient(create_app(settings_for(db_url))) as other:  # and the same in every process
        assert script(tenant, other).headers["etag"] == seen[-1]
    # a purpose edit
    assert tenant.put("/v1/purposes/analytics", json={"kind": "consent", "title": "Measurement"}).status_code == 200
    assert {p["key"]: p["title"] for p in changed()["purposes"]}["analytics"] == "Measurement"
    # a cookie disclosure reaches the script with the version that lists it
    r = tenant.put("/v1/cookies/_ga", json={"provider": "Google", "purpose": "analytics", "lifetime": 63072000})
    assert r.status_code in (200, 201), r.text
    tenant.publish("v2")
    cfg = changed()
    assert cfg["policy"]["version"] == "v2" and "_ga" in {c["name"] for c in cfg["cookies"]}
    # the tenant's texts and theme
    r = tenant.put("/v1/tenant/snippet", json={"texts": {"en": {"title": "Acme and your data"}}})
    assert r.status_code == 200, r.text
    assert changed()["texts"]["title"] == "Acme and your data"
    # the tenant's default language (the script without ?lang= is in it)
    assert tenant.client.patch("/v1/tenant", headers=tenant.h, json={"default_lang": "fr"}).status_code == 200
    assert changed()["lang"] == "fr"
    # ... also for a language the service has no texts for, which falls back to the default
    before = script(tenant, params={"lang": "xx"})
    assert embedded(before)[1]["lang"] == "fr"
    assert tenant.client.patch("/v1/tenant", headers=tenant.h, json={"default_lang": "de"}).status_code == 200
    after = script(tenant, params={"lang": "xx"})
    assert embedded(after)[1]["lang"] == "de" and after.headers["etag"] != before.headers["etag"]
    changed()
    # another snippet build (a deploy)
    custom = tmp_path / "snippet.js"
    custom.write_bytes(DIST.read_bytes().replace(b"cns-", b"cnz-", 1))
    monkeypatch.setenv("CONSENT_SNIPPET_PATH", str(custom))
    with TestClient(create_app(settings_for(db_url))) as deployed:
        r = script(tenant, deployed)
        assert r.status_code == 200 and r.headers["etag"] not in seen and b"cnz-" in r.content


def test_errors(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, client: TestClient,
                tenant: Tenant) -> None:
    r = client.get("/v1/snippet/pk_unknown_key_0123456789.js")
    assert r.status_code == 401 and r.headers["content-type"] == "application/problem+json"
    r = script(tenant, key=tenant.secret_key)
    assert r.status_code == 403 and r.json()["code"] == "wrong_key_type"
    assert tenant.secret_key not in r.text
    r = script(tenant, params={"lang": "x" * 36})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "lang"
    r = script(tenant, params={"policy": "terms"})
    assert r.status_code == 404 and r.json()["code"] == "no_policy_version"
    bare = make_tenant(client, catalog=False)
    assert script(bare).status_code == 404
    # a snippet build without the hook the config is passed to
    (tmp_path / "snippet.js").write_text("/* custom */")
    monkeypatch.setenv("CONSENT_SNIPPET_PATH", str(tmp_path / "snippet.js"))
    with TestClient(create_app(settings_for(db_url))) as c:
        r = script(tenant, c)
        assert r.status_code == 404 and r.json()["code"] == "snippet_missing"
