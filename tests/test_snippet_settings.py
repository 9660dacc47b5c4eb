"""The tenant's snippet settings (texts, theme, refusal cooldown) through HTTP, on SQLite and
PostgreSQL: versioned writes, validation, and the config (route and fast path) serving every
change at once; built-in texts in every shipped language; cookie lifetimes in words."""

from __future__ import annotations

from typing import Any

import pytest

from consent.integrations.snippet_texts import TEXT_KEYS, TEXTS, human_lifetime
from consent.web import api_snippet

from .helpers import Tenant

ORIGIN = "http://127.0.0.1:8000"
LANGS = ("en", "de", "fr", "es", "it", "nl", "pt", "pl", "sv", "ja", "hi", "ar")


def config(t: Tenant, **params: Any) -> Any:
    headers = params.pop("headers", {})
    return t.client.get("/v1/snippet/config", params={"key": t.publishable_key, **params},
                        headers={"Origin": ORIGIN, **headers})


def test_defaults_then_versions_are_kept(tenant: Tenant) -> None:
    r = tenant.get("/v1/tenant/snippet")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["version"] == 0 and body["texts"] == {} and body["refusal_cooldown_days"] == 182
    assert body["theme"] == {"mode": "auto", "layout": "box", "brand": "#0b57d0", "radius": 8, "font": None}
    assert set(LANGS) <= set(body["languages"])
    first = tenant.put("/v1/tenant/snippet", json={"texts": {"en": {"title": "Cookies at Acme"}}})
    assert first.status_code == 200 and first.json()["version"] == 1
    second = tenant.put("/v1/tenant/snippet", json={
        "texts": {"en": {"title": "Your choices at Acme"}, "DA-dk": {"title": "Dine valg"}},
        "theme": {"mode": "dark", "layout": "bar", "brand": "#7a1fa2", "radius": 0, "font": "Georgia, serif"},
        "refusal_cooldown_days": 30})
    assert second.status_code == 200 and second.json()["version"] == 2
    assert second.json()["texts"]["da"] == {"title": "Dine valg"}  # under the primary subtag, lower-case
    current = tenant.get("/v1/tenant/snippet").json()
    assert current["version"] == 2 and current["theme"]["layout"] == "bar"
    older = tenant.get("/v1/tenant/snippet", params={"version": 1}).json()
    assert older["version"] == 1 and older["texts"] == {"en": {"title": "Cookies at Acme"}}
    assert tenant.get("/v1/tenant/snippet", params={"version": 0}).json()["texts"] == {}
    missing = tenant.get("/v1/tenant/snippet", params={"version": 9})
    assert missing.status_code == 404 and missing.json()["code"] == "not_found"
    for bad_version in (-1, 2**31, "x"):
        bad = tenant.get("/v1/tenant/snippet", params={"version": bad_version})
        assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "version"


def test_publishable_key_cannot_read_or_write(tenant: Tenant) -> None:
    h = {"Authorization": f"Bearer {tenant.publishable_key}"}
    assert tenant.client.get("/v1/tenant/snippet", headers=h).status_code == 403
    assert tenant.client.put("/v1/tenant/snippet", headers=h, json={}).status_code == 403
    assert tenant.client.get("/v1/tenant/snippet").status_code == 401


@pytest.mark.parametrize("body, field", [
    ({"texts": {"en": {"nope": "x"}}}, "texts"),
    ({"texts": {"en": {"title": ""}}}, "texts"),
    ({"texts": {"en": {"title": "x" * 2001}}}, "texts"),
    ({"texts": {"not a lang": {"title": "x"}}}, "texts"),
    ({"theme": {"brand": "#ffff00"}}, "theme"),  # white text on yellow: unreadable
    ({"theme": {"brand": "red"}}, "theme.brand"),
    ({"theme": {"font": "x;}body{display:none"}}, "theme.font"),
    ({"theme": {"layout": "modal"}}, "theme.layout"),
    ({"refusal_cooldown_days": -1}, "refusal_cooldown_days"),
    ({"refusal_cooldown_days": False}, "refusal_cooldown_days"),
    ({"theme": {"radius": "8"}}, "theme.radius"),
    ({"extra": 1}, "extra"),
])
def test_bad_settings_are_422_and_store_nothing(tenant: Tenant, body: dict[str, Any], field: str) -> None:
    r = tenant.put("/v1/tenant/snippet", json=body)
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["code"] == "validation_failed"
    assert any(e["field"].startswith(field) for e in r.json()["errors"]), r.json()
    assert tenant.get("/v1/tenant/snippet").json()["version"] == 0


def test_config_serves_the_tenant_words_and_moves_its_etag(tenant: Tenant) -> None:
    before = config(tenant)
    assert before.status_code == 200
    b = before.json()
    # the default body names the purposes this version actually asks about; no fixed claim
    assert b["texts"]["body"].startswith("We use cookies and similar technologies for: Necessary, Marketing email")
    assert "one cookie" not in b["texts"]["body"]
    assert b["dir"] == "ltr" and b["settings_version"] == 0 and b["cooldown_days"] == 182
    assert b["cookies"][0]["lifetime_text"] == "until sign-out"
    r = tenant.put("/v1/tenant/snippet", json={
        "texts": {"en": {"title": "Acme and your data", "body": "Acme uses: {purposes}."}},
        "theme": {"brand": "#1a7f37", "layout": "bar"}, "refusal_cooldown_days": 90})
    assert r.status_code == 200
    after = config(tenant, headers={"If-None-Match": before.headers["etag"]})
    assert after.status_code == 200 and after.headers["etag"] != before.headers["etag"]
    a = after.json()
    assert a["texts"]["title"] == "Acme and your data"
    assert a["texts"]["body"] == "Acme uses: Necessary, Marketing email, Analytics, Product updates."
    assert a["texts"]["accept_all"] == "Accept all"  # not overridden: built-in
    assert a["theme"]["brand"] == "#1a7f37" and a["cooldown_days"] == 90 and a["settings_version"] == 1
    # another language keeps its built-in words until the tenant writes its own
    assert config(tenant, lang="de").json()["texts"]["title"] == "Ihre Datenschutz-Einstellungen"


def test_the_cached_config_serves_the_settings_as_built(tenant: Tenant) -> None:
    api_snippet._CONFIGS.clear()
    cold = config(tenant, lang="da")
    warm = config(tenant, lang="da")  # from the cache (same stamp)
    assert warm.content == cold.content
    assert cold.json()["lang"] == "en"  # no Danish texts yet
    tenant.put("/v1/tenant/snippet", json={"texts": {"da": {"title": "Dine valg"}}})
    route = config(tenant, lang="da-DK")  # the stamp moved: built again
    fast = config(tenant, lang="da-DK")
    assert route.content == fast.content and route.headers["etag"] == fast.headers["etag"]
    d = fast.json()
    assert d["lang"] == "da" and d["texts"]["title"] == "Dine valg"
    assert d["texts"]["accept_all"] == "Accept all"  # a language only the tenant wrote: English beneath


@pytest.mark.parametrize("lang", LANGS)
def test_every_shipped_language_is_complete(tenant: Tenant, lang: str) -> None:
    assert set(TEXTS[lang]) == set(TEXT_KEYS)
    assert "{purposes}" in TEXTS[lang]["body"]
    c = config(tenant, lang=lang).json()
    assert c["lang"] == lang and c["dir"] == ("rtl" if lang == "ar" else "ltr")
    assert "Necessary" in c["texts"]["body"] and "{purposes}" not in c["texts"]["body"]
    assert ("Necessary، Marketing email" if lang == "ar" else "Necessary、Marketing email" if lang == "ja"
            else "Necessary, Marketing email") in c["texts"]["body"]


def test_lifetimes_in_words(tenant: Tenant) -> None:
    assert human_lifetime(63072000, "en", "x") == "2 years"
    assert human_lifetime("63072000", "de", "x") == "2 Jahre"
    assert human_lifetime(31536000, "en", "x") == "1 year"
    assert human_lifetime(86400 * 30, "fr", "x") == "1 mois"
    assert human_lifetime(86400 * 5, "pl", "x") == "5 dni"
    assert human_lifetime(3600 * 2, "pl", "x") == "2 godziny"
    assert human_lifetime(3600 * 5, "pl", "x") == "5 godzin"
    assert human_lifetime(86400 * 365 * 2, "ja", "x") == "2年"
    assert human_lifetime(86400 * 3, "ar", "x") == "3 أيام"
    assert human_lifetime(90, "en", "x") == "2 minutes"
    assert human_lifetime("session", "en", "until sign-out") == "until sign-out"
    r = tenant.put("/v1/cookies/_ga", json={"provider": "Google", "purpose": "analytics", "lifetime": 63072000})
    assert r.status_code == 201, r.text
    tenant.publish("v2", purposes=["strictly_necessary", "marketing_email", "analytics", "product_updates"])
    cookies = {c["name"]: c for c in config(tenant, lang="de").json()["cookies"]}
    assert cookies["_ga"]["lifetime_text"] == "2 Jahre" and cookies["_ga"]["lifetime"] == 63072000
    assert cookies["session"]["lifetime_text"] == "bis zur Abmeldung"


def test_config_is_compressed_and_varies_on_encoding(tenant: Tenant) -> None:
    for _ in range(2):  # the route, then the fast path
        packed = config(tenant, headers={"Accept-Encoding": "gzip"})
        plain = config(tenant, headers={"Accept-Encoding": "identity"})
        assert packed.headers["content-encoding"] == "gzip" and "content-encoding" not in plain.headers
        assert packed.json() == plain.json() and packed.headers["etag"] == plain.headers["etag"]
        assert int(packed.headers["content-length"]) < len(plain.content) / 2
        assert packed.headers["vary"] == plain.headers["vary"] == "Origin, Accept-Encoding"
