"""Secrets never leak: a full scenario on a live server at debug log level, then its logs
and every error body are searched for keys, tokens, private key material and raw emails."""

from __future__ import annotations

import re

import httpx
import pytest

from .helpers import ADMIN, ADMIN_TOKEN, make_tenant
from .live import LiveServer

EMAILS = ["Leaky.Person@example.com", "second.secret@example.org"]


@pytest.mark.slow
def test_no_secrets_in_logs_or_error_bodies(db_url, tmp_path) -> None:
    server = LiveServer(db_url, tmp_path, CONSENT_LOG_LEVEL="debug").start()
    errors: list[httpx.Response] = []
    secrets: list[str] = [ADMIN_TOKEN]
    try:
        c = httpx.Client(base_url=server.base, timeout=10)
        t = make_tenant(c)  # type: ignore[arg-type]
        secrets += [t.secret_key, t.publishable_key]

        def keep(r: httpx.Response) -> httpx.Response:
            if r.status_code >= 400:
                errors.append(r)
            return r

        for email in EMAILS:
            t.record(email=email)
            keep(t.get("/v1/check", params={"purpose": "marketing_email", "email": email}))
            keep(t.get(f"/v1/subjects/email:{email}/consents"))
            keep(t.get("/v1/check", params={"purpose": "nope", "email": email}))          # 422
            keep(t.get(f"/v1/subjects/email:nobody-{email}/consents"))                  # 404
            keep(t.post("/v1/consents", json={"subject": {"email": email}, "purpose": "nope",
                                              "decision": "granted"}))                  # 422
            keep(t.post("/v1/consents", json={"subject": {"email": email, "bogus": email}}))  # 422
            keep(t.post("/v1/consents", content=f'{{"subject": {{"email": "{email}"', 
                        headers={"Content-Type": "application/json"}))                  # 400
        keep(c.get("/v1/tenant", headers={"Authorization": f"Bearer {t.secret_key}x"}))  # 401
        keep(c.get("/v1/tenant", headers={"Authorization": f"Bearer {t.publishable_key}"}))  # 403
        keep(c.get("/v1/tenant", headers=ADMIN))                                         # 403
        keep(c.post("/v1/tenants", json={"name": "x"}, headers={"Authorization": f"Bearer {t.secret_key}"}))
        keep(c.get(f"/v1/snippet/config?key={t.publishable_key}"))                       # 404 today
        keep(c.get(f"/u/{t.secret_key}"))                                                # 404 today
        old = t.secret_key
        r = t.post("/v1/keys/rotate", json={"kind": "both", "leaked": True})
        assert r.status_code == 200
        secrets += [r.json()["secret_key"], r.json()["publishable_key"]]
        keep(c.get("/v1/tenant", headers={"Authorization": f"Bearer {old}"}))           # revoked: 401
    finally:
        server.stop()
    log = server.log()
    assert '"logger":"consent.access"' in log and len(log.splitlines()) > 20  # we did capture the logs
    assert len(errors) >= 15 and all(e.headers["content-type"] == "application/problem+json" for e in errors)
    bodies = "\n".join(e.text for e in errors)
    for where, text in (("logs", log), ("error bodies", bodies)):
        for s in secrets:
            assert s not in text, f"a key appears in the {where}"
        for email in EMAILS:
            for form in (email, email.lower(), email.split("@")[0].lower()):
                assert form not in text, f"an email address appears in the {where}"
        assert "PRIVATE KEY" not in text and not re.search(r"\b(sk|pk)_[A-Za-z0-9_-]{20,}", text), where
        assert not re.search(r"adm_[A-Za-z0-9_]{8,}", text), where


def test_problem_bodies_do_not_echo_paths(client) -> None:
    t = make_tenant(client)
    r = t.get("/v1/subjects/email:echo.me@example.com/consents")
    assert r.status_code == 404 and "echo.me" not in r.text
    assert r.json()["instance"] == "/v1/subjects/{subject}/consents"
    r = client.get("/no/such/route/echo.me@example.com")
    assert r.status_code == 404 and "echo.me" not in r.text
