"""Email links: RFC 8058 one-click unsubscribe and double-opt-in confirmation, through HTTP,
on SQLite and PostgreSQL."""

from __future__ import annotations

import time

import pytest
import sqlalchemy as sa

from consent import crypto
from consent.errors import BadToken
from consent.store import db

from .helpers import Tenant, make_tenant

FORM = {"Content-Type": "application/x-www-form-urlencoded"}
JSON = {"Accept": "application/json"}
BROWSER = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}


def links(t: Tenant, purpose: str = "marketing_email", **subject: str) -> dict:
    r = t.post("/v1/email-links", json={"subject": subject or {"email": "ada@example.com"}, "purpose": purpose})
    assert r.status_code == 200, r.text
    return dict(r.json())


def path_of(url: str) -> str:
    assert url.startswith("http://testserver/")
    return url[len("http://testserver"):]


def events_of(t: Tenant) -> list[dict]:
    r = t.get("/v1/events", params={"limit": 1000})
    assert r.status_code == 200, r.text
    return list(r.json()["items"])


def token_secrets(db_url: str, tenant_id: str) -> list[str]:
    engine = db.create_db_engine(db_url)
    try:
        with engine.connect() as conn:
            first = conn.execute(sa.text("SELECT token_secret FROM tenant WHERE id = :t"), {"t": tenant_id}).scalar_one()
            more = conn.execute(sa.text("SELECT secret FROM email_link_secret WHERE tenant_id = :t ORDER BY created_at"),
                                {"t": tenant_id}).scalars().all()
            first = crypto.open_secret(conn, first, "tenant.token_secret")
            more = [crypto.open_secret(conn, m, "email_link_secret.secret") for m in more]
    finally:
        engine.dispose()
    return [first, *more]


def test_links_and_exact_headers(tenant: Tenant) -> None:
    tenant.record(email="ada@example.com")
    out = links(tenant, email="Ada@Example.com")
    url = out["unsubscribe_url"]
    assert url.startswith("http://testserver/u/")
    assert out["headers"] == {"List-Unsubscribe": f"<{url}>", "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"}
    assert out["confirm_url"] is None and out["confirm_expires_at"] is None
    assert out["subject"] == tenant.check(email="ada@example.com")["subject"]
    assert "ada" not in url.lower()  # the token carries our subject id, never the address
    d = links(tenant, "product_updates", email="ada@example.com")
    assert d["confirm_url"].startswith("http://testserver/c/") and d["confirm_expires_at"]
    # bad input
    r = tenant.post("/v1/email-links", json={"subject": {"email": "x@example.com"}, "purpose": "nope"})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "purpose"
    r = tenant.post("/v1/email-links", json={"subject": {"email": "x@example.com"}, "purpose": "strictly_necessary"})
    assert r.status_code == 422
    assert tenant.client.post("/v1/email-links", json={"subject": {"email": "a@b.co"}, "purpose": "analytics"}).status_code == 401


def test_one_click_exactly_as_a_mail_provider_sends_it(client, tenant: Tenant) -> None:
    tenant.record(email="ada@example.com")
    out = links(tenant, email="ada@example.com")
    path = path_of(out["unsubscribe_url"])
    # GET (a mail scanner, or the person) changes nothing and shows a page with one POST button
    for _ in range(2):
        r = client.get(path, headers=BROWSER)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert '<form method="post">' in r.text and 'value="One-Click"' in r.text
        assert r.headers["cache-control"] == "no-store"
    assert tenant.check(email="ada@example.com")["status"] == "granted"
    before = len(events_of(tenant))
    # RFC 8058: POST, no cookies, no auth, form-encoded body "List-Unsubscribe=One-Click"
    r = client.post(path, content=b"List-Unsubscribe=One-Click", headers={**FORM, "User-Agent": "Gmail-Unsub/1"})
    assert r.status_code == 200 and r.json()["status"] == "withdrawn", r.text
    c = tenant.check(email="ada@example.com")
    assert c["status"] == "withdrawn" and c["allowed"] is False
    evs = events_of(tenant)
    assert len(evs) == before + 1 and evs[-1]["type"] == "consent.withdrawn"
    assert evs[-1]["data"]["source"] == "email_link" and evs[-1]["data"]["identifiers"]["email"] == "ada@example.com"
    # idempotent: the same link again (provider retry, or the person) adds nothing
    r2 = client.post(path, content=b"List-Unsubscribe=One-Click", headers={**FORM, **JSON})
    assert r2.status_code == 200 and r2.json()["already"] is True
    assert r2.json()["record_id"] == evs[-1]["data"]["record_id"]
    assert len(events_of(tenant)) == before + 1
    # an old link still works after the person subscribes again
    tenant.record(email="ada@example.com")
    r3 = client.post(path, content=b"List-Unsubscribe=One-Click", headers={**FORM, **JSON})
    assert r3.status_code == 200 and r3.json()["already"] is False
    assert tenant.check(email="ada@example.com")["status"] == "withdrawn"
    assert len(events_of(tenant)) == before + 3
    # the page's own form (and multipart, as some providers send) work too, on a new link
    tenant.record(email="ada@example.com")
    path2 = path_of(links(tenant, email="ada@example.com")["unsubscribe_url"])
    r = client.post(path2, files={"List-Unsubscribe": (None, "One-Click")}, headers=JSON)
    assert r.status_code == 200 and r.json()["already"] is False
    assert tenant.check(email="ada@example.com")["status"] == "withdrawn"


def test_evidence_is_kept(client, tenant: Tenant, db_url: str) -> None:
    tenant.record(email="ev@example.com")
    path = path_of(links(tenant, email="ev@example.com")["unsubscribe_url"])
    r = client.post(path, content=b"List-Unsubscribe=One-Click", headers={**FORM, **JSON, "User-Agent": "MP/2"})
    rid = r.json()["record_id"]
    engine = sa.create_engine(db_url)
    with engine.connect() as conn:
        row = conn.execute(sa.text("SELECT source, evidence FROM consent_record WHERE id = :i"), {"i": rid}).one()
    engine.dispose()
    import json

    evidence = row.evidence if isinstance(row.evidence, dict) else json.loads(row.evidence)
    assert row.source == "email_link"
    assert evidence["method"] == "rfc8058_one_click" and evidence["user_agent"] == "MP/2" and evidence["link_id"]


def test_an_unknown_address_can_unsubscribe(client, tenant: Tenant) -> None:
    path = path_of(links(tenant, email="new@example.com")["unsubscribe_url"])
    assert client.post(path, content=b"List-Unsubscribe=One-Click", headers=FORM).status_code == 200
    assert tenant.check(email="new@example.com")["status"] == "withdrawn"


@pytest.mark.parametrize("mangle", ["flip", "truncate", "garbage", "long", "empty_payload"])
def test_tampered_tokens_get_a_clear_400(client, tenant: Tenant, mangle: str) -> None:
    tenant.record(email="t@example.com")
    token = path_of(links(tenant, email="t@example.com")["unsubscribe_url"])[3:]
    bad = {"flip": token[:-3] + ("AAA" if not token.endswith("AAA") else "BBB"),
           "truncate": token[: len(token) // 2],
           "garbage": "not-a-token",
           "long": "x" * 1500,
           "empty_payload": "." * 5}[mangle]
    for method in ("GET", "POST"):
        r = client.request(method, f"/u/{bad}", content=b"List-Unsubscribe=One-Click", headers={**FORM, **BROWSER})
        assert r.status_code == 400, (method, r.text)
        assert r.headers["content-type"].startswith("text/html") and "not valid" in r.text
        assert "<form" not in r.text
        for accept in (JSON, {}):  # a JSON caller, or a mail provider sending no Accept
            r = client.request(method, f"/u/{bad}", headers=accept)
            assert r.status_code == 400 and r.headers["content-type"] == "application/problem+json"
            assert r.json()["code"] == "bad_token"
    assert tenant.check(email="t@example.com")["status"] == "granted"


def test_foreign_and_cross_use_tokens(client, tenant: Tenant, db_url: str) -> None:
    other = make_tenant(client)
    tenant.record(email="f@example.com")
    token = path_of(links(tenant, email="f@example.com")["unsubscribe_url"])[3:]
    payload = crypto.peek_token(token)
    # a token claiming the other tenant, signed with this tenant's secret
    forged = crypto.serializer(token_secrets(db_url, tenant.id), "unsubscribe").dumps({**payload, "t": other.id})
    assert client.post(f"/u/{forged}", headers=JSON).status_code == 400
    # signed with a secret we never issued
    forged = crypto.serializer(["f" * 64], "unsubscribe").dumps(payload)
    assert client.post(f"/u/{forged}", headers=JSON).json()["code"] == "bad_token"
    # an unsubscribe token is not a confirm token, and the other way round
    assert client.post(f"/c/{token}", headers=JSON).status_code == 400
    tenant.record("product_updates", email="f@example.com")
    ctok = path_of(links(tenant, "product_updates", email="f@example.com")["confirm_url"])[3:]
    assert client.post(f"/u/{ctok}", headers=JSON).status_code == 400
    assert tenant.check(email="f@example.com")["status"] == "granted"
    assert tenant.check("product_updates", email="f@example.com")["status"] == "pending_confirmation"


def test_secret_rotation_keeps_old_links_valid(client, tenant: Tenant, db_url: str) -> None:
    tenant.record(email="r@example.com")
    old = path_of(links(tenant, email="r@example.com")["unsubscribe_url"])
    r = tenant.post("/v1/email-links/secrets/rotate")
    assert r.status_code == 200 and r.json() == {"secrets": 2}
    new = path_of(links(tenant, email="r@example.com")["unsubscribe_url"])
    secrets = token_secrets(db_url, tenant.id)
    with pytest.raises(BadToken):  # the new link is signed with the new secret only
        crypto.loads_token(crypto.serializer(secrets[:1], "unsubscribe"), new[3:])
    assert client.get(old).status_code == 200
    assert client.post(old, content=b"List-Unsubscribe=One-Click", headers=FORM).status_code == 200
    assert client.post(new, content=b"List-Unsubscribe=One-Click", headers=FORM).status_code == 200
    assert tenant.check(email="r@example.com")["status"] == "withdrawn"


def test_double_opt_in_confirm(client, tenant: Tenant) -> None:
    rec = tenant.record("product_updates", email="d@example.com")
    assert rec["status"] == "pending_confirmation"
    out = links(tenant, "product_updates", email="d@example.com")
    path = path_of(out["confirm_url"])
    r = client.get(path, headers=BROWSER)
    assert r.status_code == 200 and '<form method="post">' in r.text
    assert tenant.check("product_updates", email="d@example.com")["status"] == "pending_confirmation"
    r = client.post(path, headers={**FORM, **BROWSER})
    assert r.status_code == 200 and "confirmed" in r.text
    c = tenant.check("product_updates", email="d@example.com")
    assert c["status"] == "granted" and c["allowed"] is True
    evs = events_of(tenant)
    assert evs[-1]["type"] == "consent.granted" and evs[-1]["data"]["status"] == "granted"
    assert evs[-1]["data"]["source"] == "email_link"
    r = client.post(path, headers=JSON)  # the same link again: nothing new
    assert r.status_code == 200 and r.json()["already"] is True and len(events_of(tenant)) == len(evs)
    r = client.get(path, headers=BROWSER)  # the page now says so, with no button
    assert r.status_code == 409 and "already confirmed" in r.text and "<form" not in r.text
    # a fresh confirm link after confirmation: already confirmed, nothing recorded
    again = path_of(links(tenant, "product_updates", email="d@example.com")["confirm_url"])
    r = client.post(again, headers=JSON)
    assert r.status_code == 409 and r.json()["code"] == "already_confirmed"
    # unsubscribe works for double-opt-in purposes too; afterwards a confirm link cannot re-grant
    pending = links(tenant, "product_updates", email="d@example.com")
    client.post(path_of(pending["unsubscribe_url"]), content=b"List-Unsubscribe=One-Click", headers=FORM)
    r = client.post(path_of(pending["confirm_url"]), headers=JSON)
    assert r.status_code == 409 and r.json()["code"] == "nothing_to_confirm"
    assert tenant.check("product_updates", email="d@example.com")["status"] == "withdrawn"


def test_expired_confirm_link(client, tenant: Tenant, db_url: str) -> None:
    tenant.record("product_updates", email="x@example.com")
    out = links(tenant, "product_updates", email="x@example.com")
    payload = crypto.peek_token(path_of(out["confirm_url"])[3:])
    assert payload["e"] - time.time() == pytest.approx(7 * 86400, abs=5)
    expired = crypto.serializer(token_secrets(db_url, tenant.id), "confirm").dumps({**payload, "e": int(time.time()) - 60})
    r = client.get(f"/c/{expired}", headers=BROWSER)
    assert r.status_code == 410 and "expired" in r.text and "<form" not in r.text
    r = client.post(f"/c/{expired}", headers=JSON)
    assert r.status_code == 410 and r.json()["code"] == "token_expired"
    assert tenant.check("product_updates", email="x@example.com")["status"] == "pending_confirmation"
    r = tenant.post("/v1/email-links", json={"subject": {"email": "x@example.com"}, "purpose": "product_updates",
                                             "confirm_days": 0})
    assert r.status_code == 422


def test_link_body_too_large(client, tenant: Tenant) -> None:
    path = path_of(links(tenant, email="big@example.com")["unsubscribe_url"])
    r = client.post(path, content=b"x" * 20000, headers={**FORM, **JSON})
    assert r.status_code == 413 and r.json()["code"] == "payload_too_large"


def test_concurrent_clicks_record_once(client, tenant: Tenant) -> None:
    from concurrent.futures import ThreadPoolExecutor

    tenant.record(email="cc@example.com")
    path = path_of(links(tenant, email="cc@example.com")["unsubscribe_url"])
    before = len(events_of(tenant))
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda _: client.post(path, content=b"List-Unsubscribe=One-Click",
                                                      headers={**FORM, **JSON}), range(6)))
    assert all(r.status_code == 200 for r in results), [r.text for r in results]
    assert sum(not r.json()["already"] for r in results) == 1
    assert len({r.json()["record_id"] for r in results}) == 1
    assert len(events_of(tenant)) == before + 1


def test_links_of_an_erased_person_are_gone(client, tenant: Tenant) -> None:
    """Used or unused, unsubscribe or confirm, GET or POST: 410 link_gone, and nothing recorded."""
    tenant.record(email="gone@example.com")
    tenant.record("product_updates", email="gone@example.com")
    used = path_of(links(tenant, email="gone@example.com")["unsubscribe_url"])
    assert client.post(used, data={"List-Unsubscribe": "One-Click"}, headers=FORM).status_code == 200
    fresh = path_of(links(tenant, email="gone@example.com")["unsubscribe_url"])
    confirm = path_of(links(tenant, "product_updates", email="gone@example.com")["confirm_url"])
    subject = tenant.check(email="gone@example.com")["subject"]
    assert tenant.delete(f"/v1/subjects/{subject}").status_code == 200
    before = len(events_of(tenant))
    for path in (used, fresh, confirm):
        for method in ("get", "post"):
            for headers in (JSON, BROWSER):
                r = getattr(client, method)(path, headers=headers)
                assert r.status_code == 410, (path, method, r.text)
                if headers is JSON:
                    assert r.headers["content-type"] == "application/problem+json"
                    assert r.json()["code"] == "link_gone"
        r = client.post(path, data={"List-Unsubscribe": "One-Click"}, headers=FORM)
        assert r.status_code == 410
    assert len(events_of(tenant)) == before
    export = tenant.get(f"/v1/subjects/{subject}/export").json()
    assert [r["decision"] for r in export["records"]][-1] == "erased"
