"""The snippet's server side through HTTP, on SQLite and PostgreSQL: config (ETag, languages,
ask labels), CORS, recording choices (GPC, idempotency), subject tokens, linking, assets."""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import re
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from starlette.testclient import TestClient

from consent.web.app import create_app

from .conftest import settings_for
from .helpers import Tenant, make_tenant

ORIGIN = "http://127.0.0.1:8000"  # the helpers' default allowed origin (nothing listens there)
FOREIGN = "https://evil.example"
ROOT = Path(__file__).resolve().parent.parent
DIST = ROOT / "client-snippet" / "dist" / "snippet.js"


def config(t: Tenant, *, origin: str | None = ORIGIN, **params: str) -> Any:
    headers = {"Origin": origin} if origin else {}
    headers.update(params.pop("headers", {}))  # type: ignore[arg-type]
    return t.client.get("/v1/snippet/config", params={"key": t.publishable_key, **params}, headers=headers)


def submit(t: Tenant, choices: list[dict[str, Any]], *, origin: str | None = ORIGIN, anon: str | None = "a_visitor1",
           headers: dict[str, str] | None = None, raw: bytes | None = None, **extra: Any) -> Any:
    body: dict[str, Any] = {"choices": choices, **extra}
    if anon:
        body["anonymous_id"] = anon
    h = {"Content-Type": "text/plain;charset=UTF-8", **({"Origin": origin} if origin else {}), **(headers or {})}
    return t.client.post("/v1/snippet/consents", params={"key": t.publishable_key},
                         content=raw if raw is not None else json.dumps(body).encode(), headers=h)


def choice(purpose: str, decision: str, key: str | None = None) -> dict[str, Any]:
    c = {"purpose": purpose, "decision": decision}
    if key:
        c["idempotency_key"] = key
    return c


def claims(receipt: str) -> dict[str, Any]:
    return dict(jwt.decode(receipt, options={"verify_signature": False}))


def assert_cors(r: Any, origin: str = ORIGIN) -> None:
    assert r.headers.get("access-control-allow-origin") == origin, r.headers
    assert "Origin" in r.headers.get("vary", "")


def assert_no_cors(r: Any) -> None:
    assert "access-control-allow-origin" not in r.headers


# --- config --------------------------------------------------------------------------------

def test_config_shape_cors_and_etag(tenant: Tenant) -> None:
    r = config(tenant, lang="en")
    assert r.status_code == 200, r.text
    assert_cors(r)
    assert r.headers["access-control-expose-headers"] == "ETag"
    assert r.headers["cache-control"] == "no-cache"
    body = r.json()
    assert body["tenant"] == tenant.id and body["lang"] == "en"
    assert body["policy"]["key"] == "privacy" and body["policy"]["version"] == "v1"
    assert body["policy"]["url"].startswith("https://") and len(body["policy"]["sha256"]) == 64
    keys = [p["key"] for p in body["purposes"]]
    assert keys == ["strictly_necessary", "marketing_email", "analytics", "product_updates"]
    mk = body["purposes"][1]
    assert mk == {"key": "marketing_email", "kind": "consent", "legal_basis": "consent", "double_opt_in": False,
                  "gpc": True, "ask": "v1", "title": "Marketing email", "description": ""}
    assert body["cookies"][0]["name"] == "session" and body["cookies"][0]["http_only"] is True
    assert "translations" not in body["cookies"][0]
    for k in ("title", "body", "accept_all", "reject_all", "save", "settings", "close", "acknowledge",
              "cookies_heading", "gpc_notice", "policy", "session_lifetime"):
        assert body["texts"][k], k
    etag = r.headers["etag"]
    r2 = config(tenant, lang="en", headers={"If-None-Match": etag})
    assert r2.status_code == 304 and r2.content == b"" and r2.headers["etag"] == etag
    assert_cors(r2)
    assert config(tenant, lang="en", headers={"If-None-Match": '"other"'}).status_code == 200
    # Bearer works too; without an Origin (server-side caller) there are no CORS headers
    r3 = tenant.client.get("/v1/snippet/config", headers={"Authorization": f"Bearer {tenant.publishable_key}"})
    assert r3.status_code == 200 and r3.headers["etag"] == etag
    assert_no_cors(r3)


def test_config_languages(client: TestClient) -> None:
    t = make_tenant(client, default_lang="de")
    r = t.put("/v1/purposes/marketing_email", json={"kind": "consent", "gpc": True, "title": "Marketing email",
                                                    "translations": {"de": {"title": "Werbe-E-Mails"}}})
    assert r.status_code == 200
    de = config(t, lang="de-AT").json()
    assert de["lang"] == "de" and de["texts"]["accept_all"] == "Alle akzeptieren"
    assert de["purposes"][1]["title"] == "Werbe-E-Mails"
    assert de["purposes"][2]["title"] == "Analytics"  # no translation: the base title
    assert config(t, lang="fr").json()["lang"] == "fr"  # built-in French texts
    assert config(t, lang="tlh").json()["lang"] == "de"  # unsupported: the tenant's default
    assert config(t).json()["lang"] == "de"
    en = config(t, lang="en-GB").json()
    assert en["lang"] == "en" and en["purposes"][1]["title"] == "Marketing email"
    assert config(t, lang="de").headers["etag"] != config(t, lang="en").headers["etag"]
    r = config(t, lang="x" * 40)
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "lang"
    assert_cors(r)


def test_ask_label_changes_only_with_material_versions_or_new_purposes(tenant: Tenant) -> None:
    def asks() -> dict[str, str]:
        return {p["key"]: p["ask"] for p in config(tenant).json()["purposes"]}

    first = config(tenant).headers["etag"]
    tenant.publish("v2")  # not material: nobody is asked again
    assert config(tenant).json()["policy"]["version"] == "v2"
    assert set(asks().values()) == {"v1"} and config(tenant).headers["etag"] != first
    tenant.publish("v3", material=True, purposes=["strictly_necessary", "marketing_email"])
    tenant.publish("v4", purposes=["strictly_necessary", "marketing_email", "analytics", "product_updates"])
    assert asks() == {"strictly_necessary": "v3", "marketing_email": "v3", "analytics": "v1", "product_updates": "v1"}
    r = tenant.put("/v1/purposes/newsletter", json={"kind": "consent", "title": "Newsletter"})
    assert r.status_code == 201
    tenant.publish("v5", purposes=["strictly_necessary", "marketing_email", "newsletter"])
    assert asks() == {"strictly_necessary": "v3", "marketing_email": "v3", "newsletter": "v5"}


def test_config_errors_are_problems(client: TestClient, tenant: Tenant) -> None:
    r = client.get("/v1/snippet/config", headers={"Origin": ORIGIN})
    assert r.status_code == 401 and r.headers["content-type"] == "application/problem+json"
    r = client.get("/v1/snippet/config", params={"key": tenant.secret_key}, headers={"Origin": ORIGIN})
    assert r.status_code == 403 and r.json()["code"] == "wrong_key_type"
    r = config(tenant, origin=FOREIGN)
    assert r.status_code == 403 and r.json()["code"] == "origin_not_allowed"
    assert_no_cors(r)
    assert config(tenant, origin="null").status_code == 403
    bare = make_tenant(client, catalog=False)
    r = config(bare)
    assert r.status_code == 404 and r.json()["code"] == "no_policy_version"
    assert_cors(r)


def test_preflight(client: TestClient, tenant: Tenant) -> None:
    for path, method in (("/v1/snippet/config", "GET"), ("/v1/snippet/consents", "POST")):
        r = client.options(path, params={"key": tenant.publishable_key}, headers={
            "Origin": ORIGIN, "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": "if-none-match"})
        assert r.status_code == 204, r.text
        assert_cors(r)
        assert "If-None-Match" in r.headers["access-control-allow-headers"]
        assert r.headers["access-control-allow-methods"] == method
        r = client.options(path, params={"key": tenant.publishable_key},
                           headers={"Origin": FOREIGN, "Access-Control-Request-Method": method})
        assert r.status_code == 403 and r.json()["code"] == "origin_not_allowed"
        assert_no_cors(r)
        r = client.options(path, headers={"Origin": ORIGIN, "Access-Control-Request-Method": method})
        assert r.status_code == 401
        assert_no_cors(r)
        r = client.options(path, params={"key": tenant.secret_key},
                           headers={"Origin": ORIGIN, "Access-Control-Request-Method": method})
        assert r.status_code == 401


# --- recording -----------------------------------------------------------------------------

def test_submission_records_and_replays(tenant: Tenant) -> None:
    choices = [choice("strictly_necessary", "acknowledged", "k_ack_000001"),
               choice("marketing_email", "granted", "k_mkt_000001"),
               choice("analytics", "denied", "k_ana_000001")]
    r = submit(tenant, choices, policy_version="v1", gpc=False,
               headers={"User-Agent": "Browser/1.0", "Sec-GPC": "0"})
    assert r.status_code == 201, r.text
    assert_cors(r)
    out = r.json()
    assert out["subject_token"] == "none" and out["subject"].startswith("sub_")
    assert [(x["purpose"], x["status"], x["source"], x["created"]) for x in out["records"]] == [
        ("strictly_necessary", "acknowledged", "snippet", True), ("marketing_email", "granted", "snippet", True),
        ("analytics", "denied", "snippet", True)]
    c = tenant.check("marketing_email", anonymous_id="a_visitor1")
    assert c["allowed"] is True and c["policy_version"] == "v1"
    assert claims(c["receipt"])["source"] == "snippet"
    assert tenant.check("analytics", anonymous_id="a_visitor1")["status"] == "denied"
    # the same submission again (a retry after a lost response): no new records
    r2 = submit(tenant, choices, policy_version="v1", gpc=False)
    assert r2.status_code == 200 and not any(x["created"] for x in r2.json()["records"])
    assert [x["record_id"] for x in r2.json()["records"]] == [x["record_id"] for x in out["records"]]
    assert tenant.check("marketing_email", anonymous_id="a_visitor1")["record_id"] == out["records"][1]["record_id"]
    # JSON works too; without a version the one in effect is used
    r3 = tenant.client.post("/v1/snippet/consents", params={"key": tenant.publishable_key},
                            json={"anonymous_id": "a_visitor2", "choices": [choice("analytics", "granted")]},
                            headers={"Origin": ORIGIN})
    assert r3.status_code == 201 and tenant.check("analytics", anonymous_id="a_visitor2")["allowed"] is True


def test_foreign_or_missing_origin_is_refused(tenant: Tenant) -> None:
    for origin in (FOREIGN, None, "null", ORIGIN + ":1"):
        r = submit(tenant, [choice("marketing_email", "granted")], origin=origin, anon="a_foreign")
        assert r.status_code == 403 and r.json()["code"] == "origin_not_allowed", (origin, r.text)
        assert_no_cors(r)
    # refused before the body is looked at
    assert submit(tenant, [], origin=FOREIGN, raw=b"{nope").status_code == 403
    assert tenant.check("marketing_email", anonymous_id="a_foreign")["status"] == "none"


@pytest.mark.parametrize(("raw", "ctype", "status", "code"), [
    (b"{nope", "text/plain", 400, "malformed_json"),
    (b'{"anonymous_id": "a_x", "choices": []}', "text/plain", 422, "validation_failed"),
    (b'{"anonymous_id": "a x", "choices": [{"purpose": "analytics", "decision": "granted"}]}', "text/plain", 422,
     "validation_failed"),
    (b'{"choices": [{"purpose": "analytics", "decision": "granted"}]}', "text/plain", 422, "validation_failed"),
    (b'{"anonymous_id": "a_x", "choices": [{"purpose": "nope", "decision": "granted"}]}', "text/plain", 422,
     "validation_failed"),
    (b'{"anonymous_id": "a_x", "choices": [{"purpose": "strictly_necessary", "decision": "granted"}]}',
     "text/plain", 422, "validation_failed"),
    (b'{"anonymous_id": "a_x", "policy_version": "v9", "choices": [{"purpose": "analytics", "decision": "granted"}]}',
     "text/plain", 422, "validation_failed"),
    (b"<x/>", "application/xml", 415, "unsupported_media_type"),
    (b"x" * 70_000, "text/plain", 413, "payload_too_large"),
])
def test_bad_submissions_are_problems_with_cors(tenant: Tenant, raw: bytes, ctype: str, status: int, code: str) -> None:
    r = submit(tenant, [], raw=raw, headers={"Content-Type": ctype})
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json" and r.json()["code"] == code
    assert_cors(r)


def test_unknown_purpose_error_names_the_choice(tenant: Tenant) -> None:
    r = submit(tenant, [choice("analytics", "granted"), choice("nope", "granted")])
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "choices[1].purpose"
    assert tenant.check("analytics", anonymous_id="a_visitor1")["status"] == "none"  # all or nothing


def test_gpc_opt_out_recorded_once_per_version_and_wins(tenant: Tenant) -> None:
    anon = "a_gpc_visitor"
    r = submit(tenant, [choice("marketing_email", "granted", "k_gpc_grant_1")], anon=anon)
    assert r.status_code == 201
    # the signal arrives (body flag): it wins over the earlier opt-in, recorded with source gpc
    r = submit(tenant, [choice("marketing_email", "denied", "k_gpc_deny_1"), choice("product_updates", "denied")],
               anon=anon, gpc=True, policy_version="v1")
    assert r.status_code == 201
    recs = {x["purpose"]: x for x in r.json()["records"]}
    assert recs["marketing_email"]["source"] == "gpc" and recs["marketing_email"]["created"]
    assert recs["product_updates"]["source"] == "snippet"  # not a GPC purpose
    first = recs["marketing_email"]["record_id"]
    c = tenant.check("marketing_email", anonymous_id=anon)
    assert c["status"] == "denied" and claims(c["receipt"])["source"] == "gpc"
    # the next page views send it again (new idempotency keys): nothing new is recorded
    for i in range(2):
        r = submit(tenant, [choice("marketing_email", "denied", f"k_gpc_again_{i}")], anon=anon, gpc=True)
        assert r.status_code == 200 and r.json()["records"][0]["record_id"] == first
        assert r.json()["records"][0]["created"] is False
    # the Sec-GPC header counts as the signal too
    r = submit(tenant, [choice("analytics", "denied")], anon=anon, headers={"Sec-GPC": "1"})
    assert r.json()["records"][0]["source"] == "gpc"
    r = submit(tenant, [choice("analytics", "denied")], anon=anon, headers={"Sec-GPC": "1"})
    assert r.status_code == 200 and r.json()["records"][0]["created"] is False
    # a new policy version: recorded once more, for that version
    tenant.publish("v2")
    r = submit(tenant, [choice("marketing_email", "denied")], anon=anon, gpc=True, policy_version="v2")
    assert r.status_code == 201 and r.json()["records"][0]["record_id"] != first
    assert tenant.check("marketing_email", anonymous_id=anon)["policy_version"] == "v2"
    # an explicit opt-in under GPC is the visitor's own choice: recorded as such
    r = submit(tenant, [choice("marketing_email", "granted")], anon=anon, gpc=True)
    assert r.json()["records"][0]["source"] == "snippet"
    assert tenant.check("marketing_email", anonymous_id=anon)["allowed"] is True


# --- subject tokens ------------------------------------------------------------------------

def secret_of(t: Tenant) -> dict[str, Any]:
    r = t.get("/v1/subject-tokens/secret")
    assert r.status_code == 200, r.text
    return dict(r.json())


def offline_token(secret: dict[str, Any], sub: str, *, iat: int | None = None, ttl: int = 600, **extra: Any) -> str:
    now = int(time.time()) if iat is None else iat
    return jwt.encode({"sub": sub, "iat": now, "exp": now + ttl, **extra}, secret["secret"], algorithm="HS256",
                      headers={"kid": secret["kid"]})


def test_subject_token_records_for_the_user(client: TestClient, tenant: Tenant) -> None:
    s = secret_of(tenant)
    assert s["algorithm"] == "HS256" and s["max_age_seconds"] == 600 and s["audience"] == tenant.id
    assert secret_of(tenant)["kid"] == s["kid"]  # stable until rotated
    assert client.get("/v1/subject-tokens/secret",
                      headers={"Authorization": f"Bearer {tenant.publishable_key}"}).status_code == 403
    token = offline_token(s, "user-42", aud=tenant.id)
    r = submit(tenant, [choice("marketing_email", "granted")], anon="a_before_login", subject_token=token)
    assert r.status_code == 201 and r.json()["subject_token"] == "valid"
    assert tenant.check("marketing_email", subject="user-42")["allowed"] is True
    # the anonymous id was new, so it now names the same person
    assert tenant.check("marketing_email", anonymous_id="a_before_login")["subject"] == r.json()["subject"]
    # the mint route gives a token that works the same way
    m = tenant.post("/v1/subject-tokens", json={"user_id": "user-43", "ttl_seconds": 60})
    assert m.status_code == 201 and m.json()["kid"] == s["kid"]
    r = submit(tenant, [choice("analytics", "granted")], anon=None, subject_token=m.json()["token"])
    assert r.status_code == 201 and tenant.check("analytics", subject="user-43")["allowed"] is True
    assert tenant.post("/v1/subject-tokens", json={"user_id": "u", "ttl_seconds": 3600}).status_code == 422


def test_bad_subject_tokens(client: TestClient, tenant: Tenant) -> None:
    s = secret_of(tenant)
    other = make_tenant(client)
    cases = {
        "tampered": offline_token(s, "user-1").split(".")[0] + "." + base64.urlsafe_b64encode(
            json.dumps({"sub": "admin", "iat": int(time.time()), "exp": int(time.time()) + 60}).encode()
        ).decode().rstrip("=") + "." + offline_token(s, "user-1").split(".")[2],
        "other_tenant": offline_token(secret_of(other), "user-1"),
        "wrong_secret": offline_token({**s, "secret": "x" * 43}, "user-1"),
        "too_long_lived": offline_token(s, "user-1", ttl=3600),
        "future": offline_token(s, "user-1", iat=int(time.time()) + 3600),
        "wrong_audience": offline_token(s, "user-1", aud=other.id),
        "alg_none": jwt.encode({"sub": "user-1", "iat": int(time.time()), "exp": int(time.time()) + 60}, None,
                               algorithm="none", headers={"kid": s["kid"]}),
    }
    for name, token in cases.items():
        r = submit(tenant, [choice("analytics", "granted")], anon="a_tok", subject_token=token)
        assert r.status_code == 401 and r.json()["code"] == "subject_token_invalid", (name, r.text)
        assert_cors(r)
    r = submit(tenant, [choice("analytics", "granted")], anon="a_tok", subject_token="not-a-jwt")
    assert r.status_code == 400 and r.json()["code"] == "bad_token"
    assert tenant.check("analytics", anonymous_id="a_tok")["status"] == "none"
    assert tenant.check("analytics", subject="user-1")["status"] == "none"
    # expired: refused, with or without an anonymous id (never downgraded to it)
    expired = offline_token(s, "user-1", iat=int(time.time()) - 700)
    for anon in (None, "a_tok"):
        r = submit(tenant, [choice("analytics", "granted")], anon=anon, subject_token=expired)
        assert r.status_code == 401 and r.json()["code"] == "subject_token_expired", r.text
        assert_cors(r)
    assert tenant.check("analytics", anonymous_id="a_tok")["status"] == "none"
    assert tenant.check("analytics", subject="user-1")["status"] == "none"


def test_publishable_key_and_anonymous_id_cannot_change_a_signed_in_person(tenant: Tenant) -> None:
    """The key and the anonymous id are both readable by any script on the page: once the id
    is linked to a user, writing through it needs a valid subject token."""
    tenant.record("marketing_email", "denied", user_id="user-victim")
    link(tenant, "a_victim", "user-victim")
    for token in ({}, {"subject_token": offline_token(secret_of(tenant), "user-victim",
                                                      iat=int(time.time()) - 700)}):
        r = submit(tenant, [choice("marketing_email", "granted")], anon="a_victim", **token)
        assert r.status_code in (401, 403), r.text
        assert r.json()["code"] == ("subject_token_expired" if token else "subject_token_required")
        assert_cors(r)
    assert tenant.check("marketing_email", subject="user-victim")["status"] == "denied"
    # with a valid token the person changes their own choice
    r = submit(tenant, [choice("marketing_email", "granted")], anon="a_victim",
               subject_token=offline_token(secret_of(tenant), "user-victim"))
    assert r.status_code == 201, r.text
    assert tenant.check("marketing_email", subject="user-victim")["status"] == "granted"
    # an anonymous id nobody is signed in with still records anonymously
    assert submit(tenant, [choice("analytics", "granted")], anon="a_stranger").status_code == 201


def test_subject_token_secret_rotation(tenant: Tenant) -> None:
    s1 = secret_of(tenant)
    t1 = offline_token(s1, "user-r")
    r = tenant.post("/v1/subject-tokens/secret/rotate")
    assert r.status_code == 200 and r.json()["previous_kid"] == s1["kid"]
    s2 = r.json()
    assert secret_of(tenant)["kid"] == s2["kid"] != s1["kid"]
    for token in (t1, offline_token(s2, "user-r")):  # the old key still verifies
        assert submit(tenant, [choice("analytics", "granted")], subject_token=token).status_code in (200, 201)
    tenant.post("/v1/subject-tokens/secret/rotate")
    r = submit(tenant, [choice("analytics", "granted")], subject_token=t1)
    assert r.status_code == 401 and r.json()["code"] == "subject_token_invalid"


# --- linking -------------------------------------------------------------------------------

def link(t: Tenant, anon: str, user: str, expect: int = 200) -> dict[str, Any]:
    r = t.post("/v1/subject-links", json={"anonymous_id": anon, "user_id": user})
    assert r.status_code == expect, r.text
    return dict(r.json())


def test_link_rules(tenant: Tenant) -> None:
    # anonymous id unknown, user unknown: one new subject knows both
    assert link(tenant, "a_new", "user-new")["outcome"] == "created"
    # anonymous visitor chose, then signs up (user unknown): the user id joins that subject
    submit(tenant, [choice("marketing_email", "granted")], anon="a_l1")
    out = link(tenant, "a_l1", "user-l1")
    assert out["outcome"] == "attached" and out["carried_over"] == []
    assert tenant.check("marketing_email", subject="user-l1")["allowed"] is True
    assert link(tenant, "a_l1", "user-l1")["outcome"] == "already_linked"
    # that anonymous id now belongs to user-l1: another user cannot take it
    assert link(tenant, "a_l1", "user-other", expect=409)["code"] == "already_linked"
    # both known as different subjects: the newer decision per purpose wins, on the user's chain
    tenant.record("analytics", "granted", user_id="user-l2")
    tenant.record("marketing_email", "granted", user_id="user-l2")
    submit(tenant, [choice("analytics", "denied"), choice("strictly_necessary", "acknowledged")], anon="a_l2")
    tenant.record("marketing_email", "denied", user_id="user-l2")  # newer than anything anonymous
    out = link(tenant, "a_l2", "user-l2")
    assert out["outcome"] == "merged"
    assert sorted((c["purpose"], c["decision"]) for c in out["carried_over"]) == [
        ("analytics", "denied"), ("strictly_necessary", "acknowledged")]
    user = tenant.check("analytics", subject="user-l2")
    assert user["status"] == "denied" and claims(user["receipt"])["source"] == "snippet"
    assert tenant.check("marketing_email", subject="user-l2")["status"] == "denied"
    # the anonymous id now names the user's subject; the old records stay where they were
    assert tenant.check("analytics", anonymous_id="a_l2")["subject"] == out["subject"]
    r = tenant.get("/v1/subjects/user-l2/consents")
    assert r.status_code == 200
    assert {p["purpose"]: p["status"] for p in r.json()["purposes"]}["strictly_necessary"] == "acknowledged"
    r = tenant.post("/v1/subject-links", json={"anonymous_id": "a b", "user_id": "u"})
    assert r.status_code == 422


# --- public resources ----------------------------------------------------------------------

def test_gpc_json(client: TestClient) -> None:
    r = client.get("/.well-known/gpc.json")
    assert r.status_code == 200 and r.json()["gpc"] is True
    assert re.match(r"^\d{4}-\d{2}-\d{2}$", r.json()["lastUpdate"])


def test_snippet_js_is_served_cacheable(client: TestClient) -> None:
    raw = DIST.read_bytes()
    r = client.get("/snippet.js")
    assert r.status_code == 200 and r.content == raw  # (httpx decodes the gzip)
    assert r.headers["content-type"] == "text/javascript; charset=utf-8"
    assert r.headers["content-encoding"] == "gzip" and "max-age=86400" in r.headers["cache-control"]
    assert r.headers["access-control-allow-origin"] == "*"
    assert client.get("/snippet.js", headers={"If-None-Match": r.headers["etag"]}).status_code == 304
    plain = client.get("/snippet.js", headers={"Accept-Encoding": "identity"})
    assert "content-encoding" not in plain.headers and plain.content == raw


def test_snippet_size_budget_and_published_sri() -> None:
    raw = DIST.read_bytes()
    size = len(gzip.compress(raw, 9))
    assert size <= 4096, f"snippet is {size} B gzipped, over the 4096 B budget"
    assert b"eval(" not in raw and b"new Function" not in raw and b"innerHTML" not in raw
    sri = "sha384-" + base64.b64encode(hashlib.sha384(raw).digest()).decode()
    docs = (ROOT / "docs" / "snippet.md").read_text()
    assert sri in docs, f"docs/snippet.md must publish the current SRI hash {sri}"


def test_docs_publish_the_stub_and_its_csp_hash() -> None:
    stub = (ROOT / "client-snippet" / "src" / "stub.js").read_text()
    docs = (ROOT / "docs" / "snippet.md").read_text()
    assert f"<script>\n{stub}</script>" in docs
    digest = "sha256-" + base64.b64encode(hashlib.sha256(stub.encode()).digest()).decode()
    assert f"script-src '{digest}'" in docs


def test_demo_page(db_url: str, client: TestClient, tenant: Tenant) -> None:
    assert client.get("/demo").status_code == 404  # the test app runs with the demo off
    with TestClient(create_app(settings_for(db_url, demo=True))) as demo:
        r = demo.get("/demo", params={"key": tenant.publishable_key, "lang": "de"})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        csp = r.headers["content-security-policy"]
        assert "script-src 'self';" in csp and "connect-src 'self'" in csp and "unsafe-inline" not in csp
        nonce = re.search(r"'nonce-([^']+)'", csp).group(1)  # type: ignore[union-attr]
        page = r.text
        assert f'data-key="{tenant.publishable_key}"' in page and f'<style nonce="{nonce}">' in page
        assert '<html lang="de">' in page and "<script>" not in page and r.headers["x-frame-options"] == "DENY"
        assert 'integrity="sha384-' in page
        help_page = demo.get("/demo", params={"key": '"><script>alert(1)</script>'})
        assert help_page.status_code == 200 and "alert(1)" not in help_page.text
        assert demo.get("/demo/demo.js").headers["content-type"].startswith("text/javascript")


def test_concurrent_double_submission_records_once(tenant: Tenant) -> None:
    from concurrent.futures import ThreadPoolExecutor

    choices = [choice("marketing_email", "granted", "k_race_000001"), choice("analytics", "denied", "k_race_000002")]
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda _: submit(tenant, choices, anon="a_race"), range(6)))
    assert sorted(r.status_code for r in results) == [200] * 5 + [201], [r.text for r in results]
    ids = {tuple(x["record_id"] for x in r.json()["records"]) for r in results}
    assert len(ids) == 1
    assert tenant.check("marketing_email", anonymous_id="a_race")["record_id"] == next(iter(ids))[0]


def test_cached_config_follows_every_change(tenant: Tenant) -> None:
    """The per-process config cache (api_snippet.built_config) is keyed by a stamp query:
    a purpose edit, a new version and a scheduled version taking effect each show at once."""
    first = config(tenant)
    again = config(tenant, headers={"If-None-Match": first.headers["etag"]})
    assert again.status_code == 304 and again.headers["etag"] == first.headers["etag"]
    r = tenant.put("/v1/purposes/analytics", json={"kind": "consent", "title": "Measurement"})
    assert r.status_code == 200
    edited = config(tenant, headers={"If-None-Match": first.headers["etag"]})
    assert edited.status_code == 200 and edited.headers["etag"] != first.headers["etag"]
    assert {p["key"]: p["title"] for p in edited.json()["purposes"]}["analytics"] == "Measurement"
    soon = time.time() + 1.5
    at = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(soon)) + f".{int(soon % 1 * 1000):03d}Z"
    tenant.publish("v2", effective_at=at)
    assert config(tenant).json()["policy"]["version"] == "v1"  # not yet in effect
    time.sleep(max(0.0, soon - time.time()) + 0.2)
    later = config(tenant, headers={"If-None-Match": edited.headers["etag"]})
    assert later.status_code == 200 and later.json()["policy"]["version"] == "v2"


def test_a_cached_config_answers_exactly_as_a_fresh_one(tenant: Tenant) -> None:
    """The config route builds a config once per stamp and serves it from its cache after:
    both give the same status, body and headers, and errors never come from the cache."""
    from consent.web import api_snippet

    def twice(**kw: Any) -> tuple[Any, Any, int]:
        api_snippet._CONFIGS.clear()
        cold = config(tenant, **kw)  # built
        cached = len(api_snippet._CONFIGS)
        warm = config(tenant, **kw)  # from the cache, when it applies
        return cold, warm, cached

    etag = config(tenant).headers["etag"]
    bearer = {"Authorization": f"Bearer {tenant.publishable_key}"}
    cases: list[tuple[dict[str, Any], bool]] = [
        ({}, True), ({"lang": "de"}, True), ({"lang": "de-AT", "policy": "privacy"}, True),
        ({"origin": None}, True), ({"headers": {"If-None-Match": etag}}, True),
        ({"headers": {"If-None-Match": f'"x", W/{etag}'}}, True),
        ({"origin": FOREIGN}, False), ({"origin": "null"}, False), ({"lang": "x" * 36}, False),
        ({"policy": "nope"}, False), ({"key": "pk_unknown_key_0123456789"}, False),
        ({"key": tenant.secret_key}, False),
    ]
    for kw, fast in cases:
        cold, warm, cached = twice(**dict(kw))
        assert cached == (1 if fast else 0), kw
        assert cold.status_code == warm.status_code, kw
        if cold.status_code >= 400:  # problem bodies name their own request
            assert {**cold.json(), "request_id": ""} == {**warm.json(), "request_id": ""}, kw
        else:
            assert cold.content == warm.content, kw
        for h in ("etag", "cache-control", "access-control-allow-origin", "access-control-expose-headers", "vary",
                  "content-type"):
            assert cold.headers.get(h) == warm.headers.get(h), (kw, h)
    # a bearer key (no ?key=) works too; a malformed header is a 401
    r = tenant.client.get("/v1/snippet/config", headers=bearer)
    assert r.status_code == 200 and r.headers["etag"] == etag
    r = tenant.client.get("/v1/snippet/config", headers={"Authorization": "Basic abc"})
    assert r.status_code == 401
    # origins and keys are read on every request, never from the cache
    engine = tenant.client.app.state.services.engine
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE tenant SET allowed_origins = '[\"https://new.example\"]' "
                             f"WHERE id = '{tenant.id}'")
    assert config(tenant).status_code == 403
    assert config(tenant, origin="https://new.example").status_code == 200
    with engine.begin() as conn:
        conn.exec_driver_sql(f"UPDATE api_key SET revoked_at = '2026-01-01 00:00:00' WHERE tenant_id = '{tenant.id}'")
    assert config(tenant, origin="https://new.example").status_code == 401


def test_snippet_path_setting_serves_the_script_and_its_stylesheet(
        db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """CONSENT_SNIPPET_PATH may name the script anything; /snippet.css is the file beside it."""
    (tmp_path / "custom-build.js").write_text("/* custom */")
    (tmp_path / "snippet.css").write_text(".cns-ui{color:red}")
    monkeypatch.setenv("CONSENT_SNIPPET_PATH", str(tmp_path / "custom-build.js"))
    with TestClient(create_app(settings_for(db_url))) as c:
        js, css = c.get("/snippet.js"), c.get("/snippet.css")
        assert js.status_code == 200 and js.text == "/* custom */"
        assert css.status_code == 200 and css.text == ".cns-ui{color:red}"
        assert css.headers["content-type"].startswith("text/css") and css.headers["etag"]
        assert c.get("/snippet.css", headers={"If-None-Match": css.headers["etag"]}).status_code == 304
    (tmp_path / "snippet.css").unlink()
    with TestClient(create_app(settings_for(db_url))) as c:
        missing = c.get("/snippet.css")
        assert missing.status_code == 404 and missing.json()["code"] == "snippet_missing"
