"""The dashboard through HTTP on both backends: sign-in and its cookie, CSRF, sign-out, the
idle timeout, roles, the audit trail, every page's content, downloads, erasure, the verifier,
and that no page or download ever shows another tenant's data."""

from __future__ import annotations

import base64
import json
import re
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from starlette.testclient import TestClient

from consent.web.app import create_app

from .conftest import settings_for
from .helpers import ADMIN, DOC_SHA, Tenant, make_tenant

PASSWORD = "correct horse battery staple"


class Browser:
    """A browser of its own (its own cookie jar) on the shared app."""

    def __init__(self, client: TestClient, base_url: str = "http://testserver"):
        # a browser asks for HTML: error pages come as pages (other clients get problem+json)
        self.c = TestClient(client.app, base_url=base_url, headers={"Accept": "text/html,*/*;q=0.8"})

    def csrf(self, path: str) -> str:
        r = self.c.get(path)
        assert r.status_code == 200, r.text
        return re.search(r'name="csrf" value="([^"]+)"', r.text).group(1)  # type: ignore[union-attr]

    def sign_in(self, expect: int = 303, **fields: str) -> Any:
        r = self.c.post("/dashboard/sign-in", data={"csrf": self.csrf("/dashboard/sign-in"), **fields},
                        follow_redirects=False)
        assert r.status_code == expect, r.text
        return r

    def post(self, path: str, data: dict[str, Any] | None = None, *, form_page: str | None = None, **kw: Any) -> Any:
        token = self.csrf(form_page or path)
        return self.c.post(path, data={"csrf": token, **(data or {})}, follow_redirects=False, **kw)

    def get(self, path: str, **kw: Any) -> Any:
        return self.c.get(path, follow_redirects=False, **kw)


def signed_in(t: Tenant) -> Browser:
    b = Browser(t.client)
    b.sign_in(key=t.secret_key)
    return b


def test_pages_need_a_session_and_the_cookie_is_strict(tenant: Tenant) -> None:
    b = Browser(tenant.client)
    for path in ("/dashboard", "/dashboard/people", "/dashboard/verify", "/dashboard/audit", "/dashboard/users",
                 "/dashboard/people/sub_x"):
        r = b.get(path)
        assert r.status_code == 303 and r.headers["location"].startswith("/dashboard/sign-in?next="), path
    r = b.sign_in(key=tenant.secret_key, next="/dashboard/verify")
    assert r.headers["location"] == "/dashboard/verify"
    cookie = next(v for k, v in r.headers.multi_items() if k == "set-cookie" and v.startswith("consent_dashboard="))
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/dashboard" in cookie
    assert "Secure" not in cookie  # plain http here; see the https test
    assert b.get("/dashboard").status_code == 200
    # an open redirect is never followed
    assert Browser(tenant.client).sign_in(key=tenant.secret_key, next="//evil.example/").headers["location"] == "/dashboard"


def test_errors_are_pages_for_browsers_and_problems_for_other_clients(tenant: Tenant) -> None:
    b = signed_in(tenant)
    page = b.get("/dashboard/people/sub_nope")
    assert page.status_code == 404 and page.headers["content-type"].startswith("text/html")
    assert "subject not found" in page.text and "<h1>" in page.text
    api = TestClient(tenant.client.app)
    api.cookies = b.c.cookies
    r = api.get("/dashboard/people/sub_nope")
    assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json"
    assert r.json()["code"] == "not_found" and r.json()["instance"] == "/dashboard/people/{subject}"
    r = api.get("/dashboard/people", params={"kind": "nope", "q": "x"})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "kind"
    r = TestClient(tenant.client.app).post("/dashboard/sign-in", data={"key": tenant.secret_key})
    assert r.status_code == 403 and r.json()["code"] == "csrf_failed"


def test_cookie_is_secure_over_https(tenant: Tenant) -> None:
    b = Browser(tenant.client, base_url="https://testserver")
    r = b.sign_in(key=tenant.secret_key)
    cookie = next(v for k, v in r.headers.multi_items() if k == "set-cookie" and v.startswith("consent_dashboard="))
    assert "Secure" in cookie and "HttpOnly" in cookie


def test_bad_credentials_and_forged_forms_are_refused(tenant: Tenant) -> None:
    b = Browser(tenant.client)
    r = b.sign_in(expect=401, key="sk_" + "0" * 40)
    assert "not a live secret key" in r.text
    b.sign_in(expect=401, key=tenant.publishable_key)  # a publishable key is public: never a sign-in
    # a sign-in form token from another browser (login CSRF) is refused
    other = Browser(tenant.client)
    token = other.csrf("/dashboard/sign-in")
    r = b.c.post("/dashboard/sign-in", data={"csrf": token, "key": tenant.secret_key}, follow_redirects=False)
    assert r.status_code == 403
    # signed in, a form without the session's token, or posted from another origin, is refused
    b.sign_in(key=tenant.secret_key)
    r = b.c.post("/dashboard/sign-out", data={"csrf": "forged"}, follow_redirects=False)
    assert r.status_code == 403 and "csrf_failed" in r.text
    r = b.post("/dashboard/sign-out", form_page="/dashboard", headers={"Origin": "https://evil.example"})
    assert r.status_code == 403
    assert b.get("/dashboard").status_code == 200  # still signed in


def test_sign_out_ends_the_session_server_side(tenant: Tenant) -> None:
    b = signed_in(tenant)
    stolen = b.c.cookies.get("consent_dashboard")
    replay = Browser(tenant.client)
    replay.c.cookies.set("consent_dashboard", stolen, domain="testserver.local", path="/dashboard")
    assert replay.get("/dashboard").status_code == 200  # the same cookie elsewhere: the same session
    forged = Browser(tenant.client)
    forged.c.cookies.set("consent_dashboard", stolen[:-2] + ("xx" if stolen[-2:] != "xx" else "yy"),
                         domain="testserver.local", path="/dashboard")
    assert forged.get("/dashboard").status_code == 303  # a cookie we did not sign is ignored
    r = b.post("/dashboard/sign-out", form_page="/dashboard")
    assert r.status_code == 303 and r.headers["location"] == "/dashboard/sign-in?signed_out=1"
    assert b.get("/dashboard").status_code == 303
    assert replay.get("/dashboard").status_code == 303  # ended on the server, not only in this browser
    assert "sign_out" in signed_in(tenant).get("/dashboard/audit").text


def test_idle_timeout_and_revoked_key_end_sessions(tenant: Tenant, db_url: str) -> None:
    app = create_app(settings_for(db_url, dashboard_idle_seconds=1))
    with TestClient(app) as c:
        b = Browser(c)
        b.sign_in(key=tenant.secret_key)
        assert b.get("/dashboard").status_code == 200
        time.sleep(1.3)
        assert b.get("/dashboard").status_code == 303
    b = signed_in(tenant)
    assert b.get("/dashboard").status_code == 200
    # an ordinary rotation: the old key works for its grace period, here as on the API
    r = tenant.post("/v1/keys/rotate", json={"kind": "secret"})
    assert r.status_code == 200
    assert b.get("/dashboard").status_code == 200 and tenant.get("/v1/tenant").status_code == 200
    b = signed_in(tenant)
    r = tenant.post("/v1/keys/rotate", json={"kind": "secret", "leaked": True})
    assert r.status_code == 200
    assert b.get("/dashboard").status_code == 303  # a leaked key stops at once, its sessions too


def test_person_page_history_verification_and_downloads(tenant: Tenant) -> None:
    first = tenant.record(email="Grace@Example.com", user_id="u-grace", anonymous_id="anon-grace")
    tenant.record(decision="withdrawn", user_id="u-grace")
    tenant.record("analytics", "denied", email="grace@example.com")
    b = signed_in(tenant)
    for kind, q in (("email", "grace@example.com"), ("user", "u-grace"), ("anon", "anon-grace"),
                    ("subject", first["subject"])):
        r = b.get("/dashboard/people", params={"kind": kind, "q": q})
        assert r.status_code == 303 and r.headers["location"] == f"/dashboard/people/{first['subject']}", kind
    r = b.get("/dashboard/people", params={"kind": "email", "q": "nobody@example.com"})
    assert r.status_code == 404 and "subject not found" in r.text
    r = b.get(f"/dashboard/people/{first['subject']}")
    assert r.status_code == 200
    assert 'data-chain="verified"' in r.text and r.text.count('data-verified="yes"') == 3
    assert re.search(r'data-purpose="marketing_email">.*?data-status="withdrawn"', r.text, re.DOTALL)
    assert re.search(r'data-purpose="analytics">.*?data-status="denied"', r.text, re.DOTALL)
    assert first["receipt"] in r.text and "position 2 in the chain" in r.text
    js = b.get(f"/dashboard/people/{first['subject']}/export.json")
    assert js.status_code == 200 and js.headers["content-disposition"].startswith("attachment")
    assert js.json()["subject"] == first["subject"] and len(js.json()["records"]) == 3
    assert js.json()["records"] == tenant.get(f"/v1/subjects/{first['subject']}/export").json()["records"]
    md = b.get(f"/dashboard/people/{first['subject']}/export.md")
    assert md.headers["content-type"].startswith("text/markdown") and "grace@example.com" in md.text
    assert b.get(f"/dashboard/people/{first['subject']}/export.xml").status_code == 404


def test_erasure_needs_the_typed_confirmation_and_admin(tenant: Tenant) -> None:
    rec = tenant.record(email="erase.me@example.com")
    sub = rec["subject"]
    b = signed_in(tenant)
    page = f"/dashboard/people/{sub}"
    r = b.post(f"{page}/erase", {"confirm": "yes"}, form_page=page)
    assert r.status_code == 422 and sub in r.text
    assert tenant.get(f"/v1/subjects/{sub}/export").json()["erased_at"] is None
    # a read-only user cannot erase
    r = b.post("/dashboard/users", {"email": "viewer@example.com", "password": PASSWORD, "role": "read_only"})
    assert r.status_code == 303
    viewer = Browser(tenant.client)
    viewer.sign_in(tenant=tenant.id, email="viewer@example.com", password=PASSWORD)
    assert "Erasure needs the admin role" in viewer.get(page).text
    r = viewer.post(f"{page}/erase", {"confirm": sub}, form_page=page)
    assert r.status_code == 403 and "read_only_role" in r.text
    assert tenant.get(f"/v1/subjects/{sub}/export").json()["erased_at"] is None
    r = b.post(f"{page}/erase", {"confirm": sub}, form_page=page)
    assert r.status_code == 303
    after = tenant.get(f"/v1/subjects/{sub}/export").json()
    assert after["erased_at"] is not None and after["identifiers"] == []
    r = b.get(page)
    assert 'data-chain="verified"' in r.text and "erase.me@example.com" not in r.text
    assert b.get("/dashboard/people", params={"kind": "email", "q": "erase.me@example.com"}).status_code == 404


def test_users_sign_in_with_password(tenant: Tenant) -> None:
    admin = signed_in(tenant)
    r = admin.post("/dashboard/users", {"email": "short@example.com", "password": "short", "role": "admin"})
    assert r.status_code == 422 and "12 to 1000" in r.text
    r = admin.post("/dashboard/users", {"email": "Ops@Example.com", "password": PASSWORD, "role": "admin"})
    assert r.status_code == 303
    r = admin.post("/dashboard/users", {"email": "ops@example.com", "password": PASSWORD, "role": "admin"})
    assert r.status_code == 409
    b = Browser(tenant.client)
    assert "Wrong tenant" in b.sign_in(expect=401, tenant=tenant.id, email="ops@example.com", password="nope" * 4).text
    b.sign_in(expect=401, tenant="ten_nope", email="ops@example.com", password=PASSWORD)
    b.sign_in(tenant=tenant.id, email="ops@example.com", password=PASSWORD)
    assert "user:ops@example.com" in b.get("/dashboard").text
    trail = admin.get("/dashboard/audit").text
    assert "sign_in_failed" in trail and "create_user" in trail and "user:ops@example.com" in trail


def test_verifier_receipts_and_exports(tenant: Tenant) -> None:
    rec = tenant.record(email="verify@example.com")
    b = signed_in(tenant)
    r = b.post("/dashboard/verify", {"receipt": rec["receipt"]})
    assert r.status_code == 200 and 'data-result="verified"' in r.text and rec["record_hash"] in r.text
    head, payload, sig = rec["receipt"].split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["purposes"][0]["status"] = "withdrawn"  # a consumer "proving" something else
    forged_payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    r = b.post("/dashboard/verify", {"receipt": f"{head}.{forged_payload}.{sig}"})
    assert 'data-result="failed"' in r.text and "signature does not match" in r.text
    assert "not proven" in r.text and "marketing_email: withdrawn" in r.text  # shown, marked unproven
    r = b.post("/dashboard/verify", {"receipt": "not a receipt"})
    assert 'data-result="failed"' in r.text and "malformed token" in r.text
    export = tenant.get("/v1/exports/consents").content
    r = b.post("/dashboard/verify", files={"export": ("ledger.jsonl", export, "application/x-ndjson")})
    assert 'data-result="verified"' in r.text and "1 records of 1 subjects" in r.text
    tampered = export.replace(b'"granted"', b'"denied"', 1)
    r = b.post("/dashboard/verify", files={"export": ("ledger.jsonl", tampered, "application/x-ndjson")})
    assert 'data-result="failed"' in r.text and "line 1" in r.text and "record hash does not match" in r.text
    r = b.post("/dashboard/verify", files={"export": ("ledger.csv", tenant.get(
        "/v1/exports/consents", params={"format": "csv"}).content, "text/csv")})
    assert "needs its manifest" in r.text
    trail = b.get("/dashboard/audit").text
    assert "verify_receipt" in trail and "verify_export" in trail


def test_overview_counts_match_the_checks(tenant: Tenant) -> None:
    for i in range(3):
        tenant.record(email=f"g{i}@example.com")
    tenant.record(decision="denied", email="d@example.com")
    tenant.record(decision="withdrawn", email="w@example.com")
    tenant.record("product_updates", email="p@example.com")  # double opt-in: pending
    b = signed_in(tenant)
    html = b.get("/dashboard").text
    assert re.search(r'data-opt-in="marketing_email">60\.0 %', html), html
    tenant.publish("v2", material=True, purposes=["strictly_necessary", "marketing_email", "analytics"])
    assert b.post("/dashboard/refresh", form_page="/dashboard").status_code == 303
    html = b.get("/dashboard").text
    # every current grant of v1 is stale now: exactly what the checks answer
    statuses = [tenant.check(email=e)["status"] for e in
                ("g0@example.com", "g1@example.com", "g2@example.com", "d@example.com", "w@example.com")]
    assert "stale" in statuses and "granted" not in statuses
    assert re.search(r'data-opt-in="marketing_email">0\.0 %', html)
    row = re.search(r'<th scope="row">v1</th>(.*?)</tr>', html, re.DOTALL).group(1)  # type: ignore[union-attr]
    nums = [int(n) for n in re.findall(r'<td class="num">(\d+)</td>', row)]
    order = ("granted", "denied", "withdrawn", "stale", "pending_confirmation", "acknowledged")
    assert nums == [statuses.count(s) for s in order] + [5]
    assert "<svg" in html and 'role="img"' in html
    assert "Latest withdrawals" in html and "w@example.com" not in html  # subject ids, never identifiers


def test_overview_numbers_are_kept_until_refreshed(tenant: Tenant, db_url: str) -> None:
    tenant.record(email="one@example.com")
    b = signed_in(tenant)
    first = b.get("/dashboard").text
    stamp = re.search(r'data-computed-at="([^"]+)"', first).group(1)  # type: ignore[union-attr]
    assert re.search(r'data-opt-in="marketing_email">100\.0 %', first)
    tenant.record(decision="denied", email="two@example.com")
    kept = b.get("/dashboard").text
    assert f'data-computed-at="{stamp}"' in kept and re.search(r'data-opt-in="marketing_email">100\.0 %', kept)
    assert b.post("/dashboard/refresh", form_page="/dashboard").status_code == 303
    assert re.search(r'data-opt-in="marketing_email">50\.0 %', b.get("/dashboard").text)
    assert "refresh_overview" in b.get("/dashboard/audit").text
    # older than CONSENT_DASHBOARD_OVERVIEW_SECONDS: served, then recomputed after the answer
    tenant.record(decision="denied", email="three@example.com")
    with TestClient(create_app(settings_for(db_url, dashboard_overview_seconds=0))) as c:
        other = Browser(c)
        other.sign_in(key=tenant.secret_key)
        assert re.search(r'data-opt-in="marketing_email">50\.0 %', other.get("/dashboard").text)
        assert re.search(r'data-opt-in="marketing_email">33\.3 %', other.get("/dashboard").text)


def test_no_page_or_download_shows_another_tenants_data(client: TestClient) -> None:
    victim, other = make_tenant(client), make_tenant(client)
    rec = victim.record(email="victim.dash@example.com", user_id="victim-user")
    victim.record(decision="withdrawn", email="victim.dash@example.com")
    vb = signed_in(victim)
    vb.get(f"/dashboard/people/{rec['subject']}")  # leaves a trail entry naming the subject
    markers = [victim.id, rec["subject"], rec["id"], rec["record_hash"], "victim.dash@example.com", "victim-user"]
    b = signed_in(other)
    sub = rec["subject"]
    for path in (f"/dashboard/people/{sub}", f"/dashboard/people/{sub}/export.json",
                 f"/dashboard/people/{sub}/export.md"):
        r = b.get(path)
        assert r.status_code == 404, path
        assert not any(m in r.text for m in markers), path
    for kind, q in (("email", "victim.dash@example.com"), ("user", "victim-user"), ("subject", sub)):
        r = b.get("/dashboard/people", params={"kind": kind, "q": q})
        assert r.status_code == 404
    page = f"/dashboard/people/{sub}"
    r = b.post(f"{page}/erase", {"confirm": sub}, form_page="/dashboard")
    assert r.status_code == 404
    assert victim.get(f"/v1/subjects/{sub}/export").json()["erased_at"] is None
    for path in ("/dashboard", "/dashboard/audit", "/dashboard/users", "/dashboard/verify", "/dashboard/people"):
        r = b.get(path)
        assert r.status_code == 200
        assert not any(m in r.text for m in markers), path
    # the victim's own receipt verifies for anyone (public keys), but that shows only what was pasted
    r = b.post("/dashboard/verify", {"receipt": rec["receipt"]})
    assert 'data-result="verified"' in r.text


@pytest.mark.parametrize("path", ["/", "/docs", "/static/dashboard.css", "/static/swagger-ui-bundle.js", "/dashboard/sign-in"])
def test_public_pages_and_assets(client: TestClient, path: str) -> None:
    r = client.get(path)
    assert r.status_code == 200
    if path in ("/", "/docs", "/dashboard/sign-in"):
        assert r.headers["content-type"].startswith("text/html")
        assert "https://" not in re.sub(r'href="https://[^"]*"', "", r.text).split("<body")[0]  # no CDN
        csp = r.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "script-src 'self'" in csp


def _cell(html: str, version: str, attr: str) -> int:
    row = re.search(rf'<tr data-version="{version}">(.*?)</tr>', html, re.DOTALL).group(1)  # type: ignore[union-attr]
    return int(re.search(rf"<td class=\"num\" {attr}>(\d+)</td>", row).group(1))  # type: ignore[union-attr]


def test_policy_versions_with_notified_reconsented_and_stale(client: TestClient) -> None:
    told = make_tenant(client)
    for i in range(3):
        told.record(email=f"n{i}@example.com")
    soon = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    told.publish("v2", material=True, purposes=["marketing_email"], effective_at=soon)
    assert told.post("/v1/policies/privacy/versions/v2/notices", json={}).json()["notified"] == 3
    html = signed_in(told).get("/dashboard/policies").text
    assert (_cell(html, "v2", "data-notified"), _cell(html, "v2", "data-reconsented"),
            _cell(html, "v2", "data-stale")) == (3, 0, 0)
    assert "upcoming" in html
    t = make_tenant(client)
    for i in range(3):
        t.record(email=f"s{i}@example.com")
    t.publish("v2", material=True, purposes=["marketing_email"])
    t.record(email="s0@example.com")  # given again under v2
    html = signed_in(t).get("/dashboard/policies").text
    assert (_cell(html, "v2", "data-notified"), _cell(html, "v2", "data-reconsented"),
            _cell(html, "v2", "data-stale")) == (0, 1, 2)
    assert [t.check(email=f"s{i}@example.com")["status"] for i in range(3)] == ["granted", "stale", "stale"]


def test_publish_form_enforces_the_notice_period(client: TestClient) -> None:
    t = make_tenant(client, notice_days=30)
    b = signed_in(t)
    page = b.get("/dashboard/policies").text
    earliest = (datetime.now(UTC) + timedelta(days=30)).strftime("%Y-%m-%d")
    assert re.search(rf"data-earliest>{earliest}", page)
    form = {"policy": "privacy", "version": "v2", "document_url": "https://acme.test/privacy/v2",
            "document_sha256": DOC_SHA, "purposes": ["marketing_email", "analytics"], "material": "on",
            "effective_at": (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%S")}
    r = b.post("/dashboard/policies", form)
    assert r.status_code == 422 and "no sooner than 30 days" in r.text and 'value="v2"' in r.text
    assert [v["version"] for v in t.get("/v1/policies/privacy/versions").json()["items"]] == ["v1"]
    r = b.post("/dashboard/policies", {**form, "effective_at": ""})
    assert r.status_code == 303
    v2 = t.get("/v1/policies/privacy/versions").json()["items"][0]
    assert v2["version"] == "v2" and v2["material"] and v2["effective_at"].startswith(earliest)
    r = b.post("/dashboard/policies", {**form, "effective_at": ""})  # v2 again
    assert r.status_code == 409
    r = b.post("/dashboard/policies", {**form, "version": "v3", "material": "", "effective_at": "",
                                       "purposes": ["nope"]})
    assert r.status_code == 422 and "unknown purpose" in r.text
    r = b.post("/dashboard/policies", {**form, "version": "v3", "material": "", "effective_at": ""})
    assert r.status_code == 303
    assert "publish_version" in b.get("/dashboard/audit").text


def test_exports_page_download_manifest_and_isolation(client: TestClient) -> None:
    from consent import crypto
    from consent.audit import verify

    t, other = make_tenant(client), make_tenant(client)
    t.record(email="e1@example.com")
    t.record("analytics", "denied", email="e1@example.com")
    t.record(email="e2@example.com")
    b = signed_in(t)
    r = b.get("/dashboard/exports/download", params={"format": "jsonl", "purpose": "", "policy_version": "",
                                                     "from": "", "to": ""})
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-ndjson"
    keys = crypto.KeySet(client.get("/.well-known/jwks.json").json())
    report = verify.verify_jsonl(r.content.splitlines(keepends=True), keys)
    assert report.records == 3 and report.subjects == 2
    r = b.get("/dashboard/exports/download", params={"format": "csv", "purpose": "analytics"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    export_id = r.headers["consent-export-id"]
    manifest = b.get(f"/dashboard/exports/{export_id}/manifest").text.strip()
    assert manifest == t.get(f"/v1/exports/{export_id}/manifest").json()["manifest"]
    assert verify.verify_csv(r.content.splitlines(keepends=True), keys, manifest).records == 1
    page = b.get("/dashboard/exports").text
    assert page.count("data-export=") == 2 and "purpose=analytics" in page and "partial" in page
    r = b.get("/dashboard/exports/download", params={"format": "jsonl", "from": "2026-02-01T00:00",
                                                     "to": "2026-01-01T00:00"})
    assert r.status_code == 422 and "must be after from" in r.text
    assert b.get("/dashboard/exports/download", params={"format": "xml"}).status_code == 422
    ob = signed_in(other)
    assert ob.get(f"/dashboard/exports/{export_id}/manifest").status_code == 404
    assert export_id not in ob.get("/dashboard/exports").text
    mine = ob.get("/dashboard/exports/download", params={"format": "jsonl"})
    assert t.id not in mine.text and b"e1@example.com" not in mine.content
    assert "start_export" in b.get("/dashboard/audit").text


def test_webhooks_page_and_enable(client: TestClient) -> None:
    import sqlalchemy as sa

    from consent.store.models import WebhookEndpoint

    t, other = make_tenant(client), make_tenant(client)
    ep = t.post("/v1/webhooks", json={"url": "http://127.0.0.1:9/hook", "event_types": ["*"]}).json()
    t.record(email="hook@example.com")
    # what the delivery worker does after too many failures in a row
    with client.app.state.services.engine.begin() as conn:  # type: ignore[attr-defined]
        conn.execute(sa.update(WebhookEndpoint).where(WebhookEndpoint.id == ep["id"]).values(
            enabled=False, consecutive_failures=30, disabled_reason="30 failed attempts in a row"))
    b = signed_in(t)
    page = b.get("/dashboard/webhooks").text
    assert "http://127.0.0.1:9/hook" in page and "disabled" in page and "consent.granted" in page
    assert "Enable and retry pending deliveries" in page
    ob = signed_in(other)
    assert ob.post(f"/dashboard/webhooks/{ep['id']}/enable", form_page="/dashboard/webhooks").status_code == 404
    assert "127.0.0.1:9/hook" not in ob.get("/dashboard/webhooks").text
    assert t.get(f"/v1/webhooks/{ep['id']}").json()["enabled"] is False
    r = b.post(f"/dashboard/webhooks/{ep['id']}/enable", form_page="/dashboard/webhooks")
    assert r.status_code == 303
    assert t.get(f"/v1/webhooks/{ep['id']}").json()["enabled"] is True
    assert "enable_webhook" in b.get("/dashboard/audit").text


def test_settings_rotate_keys_keeps_the_session(tenant: Tenant) -> None:
    b = signed_in(tenant)
    page = b.get("/dashboard/settings").text
    assert tenant.id in page and tenant.secret_key[:7] in page and tenant.secret_key not in page
    r = b.post("/dashboard/settings/keys/rotate", {"kind": "publishable"}, form_page="/dashboard/settings")
    assert r.status_code == 200 and "works until" in r.text  # an ordinary rotation: the old key has a grace period
    r = b.post("/dashboard/settings/keys/rotate", {"kind": "secret"}, form_page="/dashboard/settings")
    assert r.status_code == 200 and r.headers["cache-control"] == "no-store"
    assert tenant.get("/v1/tenant").status_code == 200  # still works during its grace period
    r = b.post("/dashboard/settings/keys/rotate", {"kind": "secret", "leaked": "1"}, form_page="/dashboard/settings")
    assert r.status_code == 200
    new = re.search(r'data-new-key="secret">([^<]+)<', r.text).group(1)  # type: ignore[union-attr]
    assert tenant.get("/v1/tenant").status_code == 401  # a leaked key stops at once
    assert tenant.client.get("/v1/tenant", headers={"Authorization": f"Bearer {new}"}).status_code == 200
    assert b.get("/dashboard").status_code == 200  # still signed in, now under the new key
    # each rotation is one entry of the tenant audit trail, by this dashboard session's key
    trail = b.get("/dashboard/audit").text
    assert trail.count('data-action="keys.rotate"') == 3 and "rotate_keys" not in trail
    api = tenant.client.get("/v1/tenant/audit", headers={"Authorization": f"Bearer {new}"}).json()["items"]
    assert [e["action"] for e in api[:3]] == ["keys.rotate"] * 3
    assert api[0]["actor"].startswith("dashboard key:key_") and api[0]["after"]["leaked"] is True
    assert b.post("/dashboard/settings/keys/rotate", {"kind": "all"}, form_page="/dashboard/settings").status_code == 422


def test_sign_in_is_rate_limited_per_ip(tenant: Tenant, db_url: str) -> None:
    with TestClient(create_app(settings_for(db_url, rate_limit_ip_per_minute=3))) as c:
        b = Browser(c)
        statuses = []
        for _ in range(6):
            r = b.c.post("/dashboard/sign-in", data={"csrf": b.csrf("/dashboard/sign-in"), "key": "sk_guess"},
                         follow_redirects=False)
            statuses.append(r.status_code)
            if r.status_code == 429:
                assert r.headers["retry-after"] and r.json()["code"] == "rate_limited"
                break
        assert statuses[-1] == 429, statuses


def test_person_page_shows_a_quiet_edit_of_the_ledger(tenant: Tenant) -> None:
    import sqlalchemy as sa

    from consent.store.models import ConsentRecord

    first = tenant.record(email="edited@example.com")
    second = tenant.record(decision="withdrawn", email="edited@example.com")
    b = signed_in(tenant)
    assert 'data-chain="verified"' in b.get(f"/dashboard/people/{first['subject']}").text
    # someone with database access turns the withdrawal back into a grant, in place
    with tenant.client.app.state.services.engine.begin() as conn:  # type: ignore[attr-defined]
        conn.execute(sa.update(ConsentRecord).where(ConsentRecord.id == second["id"]).values(decision="granted"))
    html = b.get(f"/dashboard/people/{first['subject']}").text
    assert 'data-chain="failed"' in html
    rec = re.search(rf'data-record="{second["id"]}" data-verified="(\w+)">(.*?)</li>\s*</ul>', html, re.DOTALL)
    assert rec and rec.group(1) == "no" and "does NOT match its content" in rec.group(2)
    assert f'data-record="{first["id"]}" data-verified="yes"' in html


def test_cookie_secrets_rotate_newest_last(tenant: Tenant, db_url: str) -> None:
    def app_with(secrets: str) -> TestClient:
        return TestClient(create_app(settings_for(db_url, dashboard_secrets=tuple(secrets.split(",")))))

    with app_with("first-secret-0123456789") as c:
        b = Browser(c)
        b.sign_in(key=tenant.secret_key)
        cookie = b.c.cookies.get("consent_dashboard")
    for secrets, expect in (("first-secret-0123456789,second-secret-0123456789", 200),
                            ("second-secret-0123456789", 303)):
        with app_with(secrets) as c:
            b = Browser(c)
            b.c.cookies.set("consent_dashboard", cookie, domain="testserver.local", path="/dashboard")
            assert b.get("/dashboard").status_code == expect, secrets


SETTINGS_FORM = {"name": "Acme GmbH", "allowed_origins": "HTTPS://WWW.Acme.test:443\r\n\r\nhttp://localhost:8080\r\n",
                 "notice_days": "14", "default_lang": "de", "store_full_ip": "on"}  # user agent: unchecked
SETTINGS_API = {"name": "Acme GmbH", "allowed_origins": ["HTTPS://WWW.Acme.test:443", "http://localhost:8080"],
                "notice_days": 14, "default_lang": "de", "store_full_ip": True, "store_user_agent": False}


def _tenant_audit(t: Tenant, *, dashboard: bool = False) -> list[dict[str, Any]]:
    """The tenant audit trail over the API: its changes to settings and keys, or with
    ``dashboard`` only its dashboard sign-ins and actions."""
    r = t.get("/v1/tenant/audit")
    assert r.status_code == 200
    return [e for e in r.json()["items"] if e["action"].startswith("dashboard.") == dashboard]


def test_dashboard_sign_ins_and_actions_are_in_the_api_audit_trail(client: TestClient) -> None:
    t, other = make_tenant(client), make_tenant(client)
    rec = t.record(email="gone@example.com")
    sub = rec["subject"]
    b = signed_in(t)
    long_email = "a" * 80 + "@example.com"
    Browser(t.client).sign_in(expect=401, tenant=t.id, email=long_email, password="wrong" * 4)
    assert b.post(f"/dashboard/people/{sub}/erase", {"confirm": sub}, form_page=f"/dashboard/people/{sub}"
                  ).status_code == 303
    signed_in(other)
    key_id = next(k["id"] for k in t.get("/v1/tenant").json()["keys"] if k["kind"] == "secret")
    entries = _tenant_audit(t, dashboard=True)
    by_action = {e["action"]: e for e in entries}
    assert {"dashboard.sign_in", "dashboard.sign_in_failed", "dashboard.erase_subject"} <= set(by_action), entries
    sign_in, erase = by_action["dashboard.sign_in"], by_action["dashboard.erase_subject"]
    assert sign_in["actor"] == erase["actor"] == f"dashboard key:{key_id}"
    assert sign_in["after"] == {"detail": {"role": "admin"}} and sign_in["before"] == {}
    assert erase["after"]["target"] == sub and erase["after"]["detail"]["erased_now"] is True
    # the actor is cut to the column's 64 characters, never refused
    failed = by_action["dashboard.sign_in_failed"]
    assert failed["actor"] == f"dashboard user:{long_email}"[:64] and len(failed["actor"]) == 64
    assert [e["action"] for e in entries].index("dashboard.erase_subject") < [
        e["action"] for e in entries].index("dashboard.sign_in")  # newest first
    # the admin route serves the same entries; the other tenant's sign-in is in its trail only
    admin = client.get(f"/v1/tenants/{t.id}/audit", headers=ADMIN).json()["items"]
    assert [e for e in admin if e["action"].startswith("dashboard.")] == entries
    assert [e["action"] for e in _tenant_audit(other, dashboard=True)] == ["dashboard.sign_in"]


def test_settings_form_changes_settings_as_patch_does(client: TestClient) -> None:
    t, twin = make_tenant(client), make_tenant(client)
    b = signed_in(t)
    r = b.post("/dashboard/settings", SETTINGS_FORM, form_page="/dashboard/settings")
    assert r.status_code == 303 and r.headers["location"].startswith("/dashboard/settings?saved=")
    assert twin.client.patch("/v1/tenant", json=SETTINGS_API, headers=twin.h).status_code == 200
    got, want = t.get("/v1/tenant").json(), twin.get("/v1/tenant").json()
    for name in ("name", "allowed_origins", "notice_days", "default_lang", "store_full_ip", "store_user_agent"):
        assert got[name] == want[name], name
    assert got["allowed_origins"] == ["https://www.acme.test", "http://localhost:8080"]
    # the same audit entry as the API writes, the actor naming the dashboard session's key
    mine, theirs = _tenant_audit(t)[0], _tenant_audit(twin)[0]
    assert (mine["action"], mine["before"], mine["after"]) == (theirs["action"], theirs["before"], theirs["after"])
    key_id = next(k["id"] for k in got["keys"] if k["kind"] == "secret")
    assert mine["actor"] == f"dashboard key:{key_id}" and theirs["actor"] != mine["actor"]
    page = b.get(r.headers["location"]).text
    assert "6 settings changed" in page and 'value="Acme GmbH"' in page
    assert "https://www.acme.test\nhttp://localhost:8080</textarea>" in page
    # the same values again: nothing changes, nothing is audited
    assert b.post("/dashboard/settings", SETTINGS_FORM, form_page="/dashboard/settings").headers[
        "location"].startswith("/dashboard/settings?saved=0")
    assert len(_tenant_audit(t)) == 1
    # a dashboard user is named by email
    b.post("/dashboard/users", {"email": "ops@example.com", "password": PASSWORD, "role": "admin"})
    ops = Browser(t.client)
    ops.sign_in(tenant=t.id, email="ops@example.com", password=PASSWORD)
    assert ops.post("/dashboard/settings", {**SETTINGS_FORM, "notice_days": "30"},
                    form_page="/dashboard/settings").status_code == 303
    entry = _tenant_audit(t)[0]
    assert entry["actor"] == "dashboard user:ops@example.com"
    assert (entry["before"], entry["after"]) == ({"notice_days": 14}, {"notice_days": 30})


@pytest.mark.parametrize(("fields", "field", "says"), [
    ({"notice_days": "400"}, "notice_days", "less than or equal to 365"),
    ({"notice_days": "two weeks"}, "notice_days", "whole number of days"),
    ({"allowed_origins": "https://ok.example\nhttps://shop.example/"}, "allowed_origins", "trailing"),
    ({"allowed_origins": "shop.example"}, "allowed_origins", "origin"),
    ({"default_lang": "english!"}, "default_lang", "pattern"),
    ({"name": "  "}, "name", "at least 1 character"),
])
def test_settings_form_errors_show_next_to_the_field(tenant: Tenant, fields: dict[str, str], field: str,
                                                     says: str) -> None:
    before = tenant.get("/v1/tenant").json()
    b = signed_in(tenant)
    r = b.post("/dashboard/settings", {**SETTINGS_FORM, **fields}, form_page="/dashboard/settings")
    assert r.status_code == 422 and r.headers["content-type"].startswith("text/html")
    error = re.search(rf'<p class="problem" id="{field}-error">([^<]+)</p>', r.text)
    assert error and says.lower() in error.group(1).lower(), r.text
    assert re.search(rf'id="{field}"[^>]*aria-invalid="true"[^>]*aria-describedby="{field}-error', r.text)
    assert len(re.findall(r'class="problem" id="[a-z_]+-error"', r.text)) == 1  # only that field
    # what was typed is kept in the form; nothing was saved, nothing audited
    assert f'value="{SETTINGS_FORM["name"]}"' in r.text or field == "name"
    assert tenant.get("/v1/tenant").json() == before and _tenant_audit(tenant) == []
    # any other client gets the API's problem+json with the 422 details
    api = TestClient(tenant.client.app)
    api.cookies = b.c.cookies
    r = api.post("/dashboard/settings", data={"csrf": b.csrf("/dashboard/settings"), **SETTINGS_FORM, **fields})
    assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json"
    assert r.json()["code"] == "validation_failed" and r.json()["errors"][0]["field"].split(".")[0] == field


def test_settings_form_needs_admin_and_the_csrf_token(tenant: Tenant) -> None:
    admin = signed_in(tenant)
    r = admin.c.post("/dashboard/settings", data={"csrf": "forged", **SETTINGS_FORM}, follow_redirects=False)
    assert r.status_code == 403 and "csrf_failed" in r.text
    admin.post("/dashboard/users", {"email": "viewer@example.com", "password": PASSWORD, "role": "read_only"})
    viewer = Browser(tenant.client)
    viewer.sign_in(tenant=tenant.id, email="viewer@example.com", password=PASSWORD)
    page = viewer.get("/dashboard/settings").text
    assert 'action="/dashboard/settings"' not in page and "needs the admin role" in page
    r = viewer.post("/dashboard/settings", SETTINGS_FORM, form_page="/dashboard")
    assert r.status_code == 403 and "read_only_role" in r.text
    assert tenant.get("/v1/tenant").json()["name"] == "Acme" and _tenant_audit(tenant) == []


def test_audit_page_is_one_trail_newest_first_without_duplicates(client: TestClient) -> None:
    t, other = make_tenant(client), make_tenant(client)
    b = signed_in(t)  # sign_in (dashboard)
    assert t.client.patch("/v1/tenant", json={"notice_days": 3}, headers=t.h).status_code == 200
    b.get("/dashboard/people", params={"kind": "email", "q": "nobody@example.com"})  # search (dashboard)
    assert b.post("/dashboard/settings", {**SETTINGS_FORM, "name": "Renamed"},
                  form_page="/dashboard/settings").status_code == 303
    assert t.put("/v1/tenant/retention", json={"evidence_retention_days": 30}).status_code == 200
    b.post("/dashboard/settings/keys/rotate", {"kind": "publishable"}, form_page="/dashboard/settings")
    signed_in(other).post("/dashboard/settings", {**SETTINGS_FORM, "name": "Other Co"},
                          form_page="/dashboard/settings")
    html = b.get("/dashboard/audit").text
    rows = re.findall(r'<tr data-trail="(\w+)" data-action="([\w.]+)"><td>[^<]+</td><td>([^<]+)</td>', html)
    actions = [(src, action) for src, action, _ in rows]
    assert actions == [("tenant", "keys.rotate"), ("tenant", "retention.update"), ("tenant", "settings.update"),
                       ("dashboard", "dashboard.search"), ("tenant", "settings.update"),
                       ("dashboard", "dashboard.sign_in")], actions
    key_id = next(k["id"] for k in t.get("/v1/tenant").json()["keys"] if k["kind"] == "secret")
    assert [who for _, a, who in rows if a == "settings.update"] == [f"dashboard key:{key_id}", key_id]
    assert "name: <del>Acme</del> → <ins>Renamed</ins>" in html
    assert "notice_days: <del>0</del> → <ins>3</ins>" in html
    assert "evidence_retention_days: <del>None</del> → <ins>30</ins>" in html
    assert "Other Co" not in html and other.id not in html


def test_overview_chart_over_time_by_policy_version(tenant: Tenant) -> None:
    import sqlalchemy as sa

    from consent.store.models import DashboardRollup

    for i in range(3):
        tenant.record(email=f"v1-{i}@example.com")
    tenant.publish("v2", material=False, purposes=["strictly_necessary", "marketing_email", "analytics"])
    tenant.record(email="v2-a@example.com")
    tenant.record(decision="denied", email="v2-b@example.com")
    b = signed_in(tenant)
    html = b.get("/dashboard").text
    bars = re.findall(r'<rect [^>]*data-version="([^"]*)" data-n="(\d+)"', html)
    assert bars == [("v1", "3"), ("v2", "2")], bars  # one day, stacked oldest version first
    assert re.search(r'data-version-key="v1">.*?</li>\s*<li data-version-key="v2">', html, re.DOTALL)
    assert "Records per day, by policy version" in html and 'aria-labelledby="versions-title"' in html
    # read from the stored rollup: a page view does not count the ledger again
    tenant.record(email="v2-c@example.com")
    assert re.findall(r'data-version="v2" data-n="(\d+)"', b.get("/dashboard").text) == ["2"]
    assert b.post("/dashboard/refresh", form_page="/dashboard").status_code == 303
    assert re.findall(r'data-version="v2" data-n="(\d+)"', b.get("/dashboard").text) == ["3"]
    # a rollup stored before this series existed still renders (without it) until recomputed
    engine = tenant.client.app.state.services.engine  # type: ignore[attr-defined]
    with engine.begin() as conn:
        data = conn.execute(sa.select(DashboardRollup.data).where(DashboardRollup.tenant_id == tenant.id)).scalar_one()
        del data["per_day_versions"]
        conn.execute(sa.update(DashboardRollup).where(DashboardRollup.tenant_id == tenant.id).values(data=data))
    r = b.get("/dashboard")
    assert r.status_code == 200 and "data-version=" not in r.text and 'data-opt-in="marketing_email"' in r.text


def test_webhooks_retry_one_failed_delivery(client: TestClient) -> None:
    import sqlalchemy as sa

    from consent.integrations import webhooks
    from consent.store.models import WebhookAttempt, WebhookDelivery, WebhookEndpoint

    t, other = make_tenant(client), make_tenant(client)
    ep = t.post("/v1/webhooks", json={"url": "http://127.0.0.1:9/hook", "event_types": ["*"]}).json()
    t.record(email="one@example.com")
    t.record(email="two@example.com")
    engine = client.app.state.services.engine  # type: ignore[attr-defined]
    settings = client.app.state.services.settings  # type: ignore[attr-defined]
    items = t.get(f"/v1/webhooks/{ep['id']}/deliveries").json()["items"]
    failed, pending = items[0]["id"], items[1]["id"]
    with engine.begin() as conn:  # what the worker does when a delivery's retry window is over
        conn.execute(sa.update(WebhookDelivery).where(WebhookDelivery.id == failed).values(
            status="failed", attempts=12, last_error="connection refused",
            created_at=datetime.now(UTC) - timedelta(seconds=settings.webhook_retry_seconds + 60)))
    b = signed_in(t)
    page = b.get("/dashboard/webhooks").text
    assert f'data-retry="{failed}"' in page and f'data-retry="{pending}"' not in page
    path = f"/dashboard/webhooks/deliveries/{failed}/retry"
    assert signed_in(other).post(path, form_page="/dashboard/webhooks").status_code == 404
    r = b.post(path, form_page="/dashboard/webhooks")
    assert r.status_code == 303 and f"retried={failed}" in r.headers["location"]
    assert f"Delivery {failed} is due again" in b.get(r.headers["location"]).text
    api = TestClient(client.app)
    api.cookies = b.c.cookies
    r = api.post(path, data={"csrf": b.csrf("/dashboard/webhooks")})
    assert r.status_code == 409 and r.json()["code"] == "delivery_not_failed"
    assert b.post(f"/dashboard/webhooks/deliveries/{pending}/retry", form_page="/dashboard/webhooks").status_code == 409
    assert b.post("/dashboard/webhooks/deliveries/99999999/retry", form_page="/dashboard/webhooks").status_code == 404
    assert b.post("/dashboard/webhooks/deliveries/x1/retry", form_page="/dashboard/webhooks").status_code == 404
    # the worker makes exactly one more attempt: refused again, the delivery is failed again
    with engine.begin() as conn:
        conn.execute(sa.update(WebhookDelivery).where(WebhookDelivery.endpoint_id == ep["id"],
                                                      WebhookDelivery.id != failed).values(status="delivered"))
    assert webhooks.deliver_once(engine, settings) >= 1  # other tests' deliveries may be due too
    with engine.begin() as conn:
        row = conn.execute(sa.select(WebhookDelivery.status, WebhookDelivery.attempts)
                           .where(WebhookDelivery.id == failed)).one()
        tries = conn.execute(sa.select(sa.func.count()).select_from(WebhookAttempt)
                             .where(WebhookAttempt.delivery_id == failed)).scalar_one()
    assert (row.status, row.attempts, tries) == ("failed", 13, 1)
    # a disabled endpoint: enable it first (that retries what is pending)
    with engine.begin() as conn:
        conn.execute(sa.update(WebhookEndpoint).where(WebhookEndpoint.id == ep["id"]).values(enabled=False))
    r = api.post(path, data={"csrf": b.csrf("/dashboard/webhooks")})
    assert r.status_code == 409 and r.json()["code"] == "endpoint_disabled"
    assert "retry_delivery" in b.get("/dashboard/audit").text


def _banner_form(b: Browser, lang: str = "en") -> dict[str, str]:
    """The banner form's fields as the page fills them (inputs, textareas, selected options)."""
    html = b.get(f"/dashboard/banner?lang={lang}").text
    form = html[html.index('method="post" action="/dashboard/banner"'):]
    form = form[:form.index("</form>")]
    fields = {m.group(1): m.group(2) for m in re.finditer(r'<input[^>]* name="(\w+)" value="([^"]*)"', form)}
    fields |= {m.group(1): m.group(2) for m in re.finditer(r'<textarea[^>]* name="(\w+)"[^>]*>([^<]*)</textarea>', form)}
    for name, options in re.findall(r'<select[^>]* name="(\w+)"[^>]*>(.*?)</select>', form):
        fields[name] = re.search(r"<option selected>(\w+)</option>", options).group(1)  # type: ignore[union-attr]
    fields.pop("csrf")
    return {k: v.replace("&#39;", "'").replace("&amp;", "&") for k, v in fields.items()}


def test_banner_form_saves_one_language_through_the_snippet_settings(client: TestClient) -> None:
    t, other = make_tenant(client), make_tenant(client)
    b = signed_in(t)
    fields = _banner_form(b, "de")
    assert fields["text_title"] == "Ihre Datenschutz-Einstellungen" and fields["lang"] == "de"
    assert (fields["brand"], fields["layout"], fields["refusal_cooldown_days"]) == ("#0b57d0", "box", "182")
    r = b.post("/dashboard/banner", {**fields, "text_title": "Ihre Wahl bei Acme", "brand": "#7a1f5c",
                                     "layout": "bar", "refusal_cooldown_days": "30"}, form_page="/dashboard/banner")
    assert r.status_code == 303 and r.headers["location"] == "/dashboard/banner?lang=de&saved=1"
    # stored as PUT /v1/tenant/snippet stores it: only what differs from the built-in texts
    got = t.get("/v1/tenant/snippet").json()
    assert got["version"] == 1 and got["texts"] == {"de": {"title": "Ihre Wahl bei Acme"}}
    assert got["theme"]["brand"] == "#7a1f5c" and got["theme"]["layout"] == "bar"
    assert got["refusal_cooldown_days"] == 30
    page = b.get(r.headers["location"]).text
    assert "Saved as settings version 1" in page and 'value="Ihre Wahl bei Acme"' in page
    assert 'src="/dashboard/banner/preview?lang=de"' in page and "frame-src 'self'" in b.get(
        "/dashboard/banner").headers["content-security-policy"]
    # English keeps the built-in texts; saving it keeps the German ones
    en = _banner_form(b, "en")
    assert en["text_title"] == "Your privacy choices"
    assert b.post("/dashboard/banner", {**en, "text_accept_all": "Yes please"},
                  form_page="/dashboard/banner").status_code == 303
    got = t.get("/v1/tenant/snippet").json()
    assert got["version"] == 2
    assert got["texts"] == {"de": {"title": "Ihre Wahl bei Acme"}, "en": {"accept_all": "Yes please"}}
    # the preview's config is the snippet's config for this tenant, in the language asked for
    cfg = b.get("/dashboard/banner/preview/v1/snippet/config?lang=de").json()
    assert cfg == t.client.get(f"/v1/snippet/config?key={t.publishable_key}&lang=de").json()
    assert cfg["texts"]["title"] == "Ihre Wahl bei Acme" and cfg["theme"]["layout"] == "bar"
    preview = b.get("/dashboard/banner/preview?lang=de")
    assert preview.status_code == 200 and 'data-api="/dashboard/banner/preview"' in preview.text
    assert "frame-ancestors 'self'" in preview.headers["content-security-policy"]
    assert preview.headers["x-frame-options"] == "SAMEORIGIN"
    assert t.publishable_key not in preview.text and t.secret_key not in preview.text
    # each save is in the dashboard audit trail, by this session
    html = b.get("/dashboard/audit").text
    assert html.count('data-action="dashboard.save_banner"') == 2 and "version 2" in html
    # another tenant sees its own (built-in) settings and preview, never these
    o = signed_in(other)
    assert "Ihre Wahl bei Acme" not in o.get("/dashboard/banner?lang=de").text
    assert o.get("/dashboard/banner/preview/v1/snippet/config?lang=de").json()["texts"]["title"] == (
        "Ihre Datenschutz-Einstellungen")
    assert other.get("/v1/tenant/snippet").json()["version"] == 0
    o.post("/dashboard/banner", {**_banner_form(o, "de"), "text_title": "Other"}, form_page="/dashboard/banner")
    assert t.get("/v1/tenant/snippet").json()["texts"]["de"]["title"] == "Ihre Wahl bei Acme"
    # the page needs a session, like every dashboard page
    for path in ("/dashboard/banner", "/dashboard/banner/preview", "/dashboard/banner/preview/v1/snippet/config"):
        assert Browser(client).get(path).status_code == 303, path


@pytest.mark.parametrize(("fields", "field", "says"), [
    ({"brand": "#dddddd"}, "brand", "too light"),
    ({"brand": "blue"}, "brand", "pattern"),
    ({"radius": "30"}, "radius", "less than or equal to 24"),
    ({"radius": "round"}, "radius", "whole number"),
    ({"refusal_cooldown_days": "999"}, "refusal_cooldown_days", "less than or equal to 730"),
    ({"font": "x;y{}"}, "font", "pattern"),
    ({"layout": "modal"}, "layout", "input should be"),
    ({"text_title": "x" * 2001}, "text_title", "at most 2000"),
])
def test_banner_form_errors_show_next_to_the_field(tenant: Tenant, fields: dict[str, str], field: str,
                                                   says: str) -> None:
    b = signed_in(tenant)
    form = _banner_form(b)
    r = b.post("/dashboard/banner", {**form, "text_title": "Changed", **fields}, form_page="/dashboard/banner")
    assert r.status_code == 422 and r.headers["content-type"].startswith("text/html")
    error = re.search(rf'<p class="problem" id="{field}-error">([^<]+)</p>', r.text)
    assert error and says.lower() in error.group(1).lower(), r.text
    assert re.search(rf'id="{field}"[^>]*aria-invalid="true"[^>]*aria-describedby="{field}-error', r.text)
    assert len(re.findall(r'class="problem" id="[a-z_]+-error"', r.text)) == 1
    # nothing saved, nothing audited
    assert tenant.get("/v1/tenant/snippet").json()["version"] == 0
    assert 'data-action="dashboard.save_banner"' not in b.get("/dashboard/audit").text
    api = TestClient(tenant.client.app)
    api.cookies = b.c.cookies
    r = api.post("/dashboard/banner", data={"csrf": b.csrf("/dashboard/banner"), **form, **fields})
    assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json"
    assert r.json()["code"] == "validation_failed"


def test_banner_form_needs_admin_and_the_csrf_token(tenant: Tenant) -> None:
    admin = signed_in(tenant)
    form = _banner_form(admin)
    r = admin.c.post("/dashboard/banner", data={**form, "csrf": "forged", "text_title": "Forged"},
                     follow_redirects=False)
    assert r.status_code == 403 and "csrf_failed" in r.text
    admin.post("/dashboard/users", {"email": "viewer@example.com", "password": PASSWORD, "role": "read_only"})
    viewer = Browser(tenant.client)
    viewer.sign_in(tenant=tenant.id, email="viewer@example.com", password=PASSWORD)
    page = viewer.get("/dashboard/banner?lang=fr").text
    assert 'action="/dashboard/banner"' in page  # the language picker (a GET form)
    assert 'method="post" action="/dashboard/banner"' not in page and "needs the admin role" in page
    assert '<dd data-text="title">Vos choix de confidentialité</dd>' in page and "<iframe" in page
    r = viewer.post("/dashboard/banner", {**form, "text_title": "Viewer"}, form_page="/dashboard")
    assert r.status_code == 403 and "read_only_role" in r.text
    assert tenant.get("/v1/tenant/snippet").json()["version"] == 0
    assert viewer.get("/dashboard/banner?lang=xx").status_code == 422
