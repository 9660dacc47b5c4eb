"""The snippet in a real headless Chromium (Debian's /usr/bin/chromium via Playwright) against
a live uvicorn of the service on 127.0.0.1, embedded in a page served from another local
origin. The full set runs on SQLite; the core flow also runs on PostgreSQL.
Screenshots go to test-artifacts/ (gitignored)."""

from __future__ import annotations

import html
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import httpx
import jwt
import pytest

from .conftest import free_port
from .helpers import ADMIN_TOKEN, Tenant, make_tenant

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PAGE = """<!doctype html><html lang="{lang}"><head><meta charset="utf-8"><title>Shop</title>
<script src="{api}/snippet.js" data-key="{key}" {extra} async></script></head>
<body><h1>A customer's site</h1><p>Content <a href="#top">link</a></p>
<a href="#" data-consent-open>Privacy choices</a></body></html>"""


class PageHandler(BaseHTTPRequestHandler):
    """Serves /page?key=&lang=&token= : a page of the tenant's site embedding the snippet."""

    api = ""

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        url = urlparse(self.path)
        if url.path != "/page":
            self.send_error(404)
            return
        q = {k: v[0] for k, v in parse_qs(url.query).items()}
        extra = f'data-subject-token="{html.escape(q["token"])}"' if q.get("token") else ""
        body = PAGE.format(lang=html.escape(q.get("lang", "en")), api=self.api, key=html.escape(q.get("key", "")),
                           extra=extra).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class Live:
    """The running service, the page server and a client speaking to the service."""

    def __init__(self, backend: str, api: str, page_port: int):
        self.backend = backend
        self.api = api
        self.page_origin = f"http://127.0.0.1:{page_port}"
        self.foreign_origin = f"http://localhost:{page_port}"  # another origin, same page server
        self.http = httpx.Client(base_url=api, timeout=10)

    def tenant(self) -> Tenant:
        return make_tenant(self.http, origins=[self.page_origin, self.api])  # type: ignore[arg-type]

    def page_url(self, t: Tenant, *, foreign: bool = False, **q: str) -> str:
        base = self.foreign_origin if foreign else self.page_origin
        return f"{base}/page?" + "&".join(f"{k}={v}" for k, v in {"key": t.publishable_key, **q}.items())


@pytest.fixture(scope="module")
def live(backend: str, db_url: str) -> Iterator[Live]:
    port, page_port = free_port(), free_port()
    env = {**os.environ, "CONSENT_DATABASE_URL": db_url, "CONSENT_ADMIN_TOKEN": ADMIN_TOKEN,
           "CONSENT_DEMO": "true", "CONSENT_MIGRATE_ON_START": "false", "CONSENT_ISSUER": f"http://127.0.0.1:{port}"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "consent.app:create_app", "--factory", "--host", "127.0.0.1",
         "--port", str(port), "--log-level", "warning"], env=env, cwd=ROOT)
    api = f"http://127.0.0.1:{port}"
    PageHandler.api = api
    pages = ThreadingHTTPServer(("127.0.0.1", page_port), PageHandler)
    threading.Thread(target=pages.serve_forever, daemon=True).start()
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(api + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, "the service did not start"
            assert time.monotonic() < deadline, "the service did not answer within 30 s"
            time.sleep(0.1)
        live = Live(backend, api, page_port)
        yield live
        live.http.close()
    finally:
        pages.shutdown()
        pages.server_close()
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def context(browser: Any) -> Iterator[Any]:
    ctx = browser.new_context()
    ctx.set_default_timeout(10_000)
    yield ctx
    ctx.close()


def sqlite_only(live: Live) -> None:
    if live.backend != "sqlite":
        pytest.skip("runs on SQLite; the core browser flow also runs on PostgreSQL")


def tab_to(page: Any, target: str, limit: int = 15) -> None:
    """Keyboard only: Tab until the element matching ``target`` has focus, then Enter."""
    for _ in range(limit):
        page.keyboard.press("Tab")
        if page.evaluate("(s) => document.activeElement && document.activeElement.matches(s)", target):
            page.keyboard.press("Enter")
            return
    raise AssertionError(f"{target} not reachable by Tab")


def settled(page: Any, t: Tenant) -> None:
    """Wait until the snippet's outbox is empty (every POST answered)."""
    page.wait_for_function("(k) => !(localStorage.getItem('cns_q_' + k) || '[]').includes('choices')",
                           arg=t.publishable_key)


def anon_id(page: Any) -> str:
    return str(page.evaluate("JSON.parse(localStorage.getItem('cns_aid'))"))


def state(t: Tenant, anon: str, purpose: str) -> dict[str, Any]:
    return t.check(purpose, anonymous_id=anon)


def source_of(check: dict[str, Any]) -> str:
    return str(jwt.decode(check["receipt"], options={"verify_signature": False})["source"])


def test_keyboard_accept_reload_is_silent_material_version_reasks(live: Live, context: Any) -> None:
    t = live.tenant()
    page = context.new_page()
    page.goto(live.page_url(t))
    page.wait_for_selector("#cns-banner", state="visible")
    if live.backend == "sqlite":
        page.screenshot(path=str(ARTIFACTS / "banner.png"))
    tab_to(page, "[data-cns=accept]")
    settled(page, t)
    aid = anon_id(page)
    assert page.locator("#cns-banner").count() == 0
    first = {p: state(t, aid, p) for p in ("strictly_necessary", "marketing_email", "analytics", "product_updates")}
    assert {p: c["status"] for p, c in first.items()} == {
        "strictly_necessary": "acknowledged", "marketing_email": "granted", "analytics": "granted",
        "product_updates": "pending_confirmation"}  # double opt-in: confirmed by email later
    assert source_of(first["marketing_email"]) == "snippet"
    # a reload does not ask again and records nothing
    page.reload()
    page.evaluate("Consent.ready")
    assert page.locator("#cns-banner").count() == 0
    assert page.evaluate("Consent.get('marketing_email')") == "granted"
    assert state(t, aid, "marketing_email")["record_id"] == first["marketing_email"]["record_id"]
    # a material version takes effect (notice period 0 for this tenant): asked again
    t.publish("v2", material=True, purposes=["strictly_necessary", "marketing_email", "analytics", "product_updates"])
    assert state(t, aid, "marketing_email")["status"] == "stale"
    page.reload()
    page.wait_for_selector("#cns-banner", state="visible")
    assert page.evaluate("Consent.get('marketing_email')") is None
    tab_to(page, "[data-cns=reject]")
    settled(page, t)
    c = state(t, aid, "marketing_email")
    assert c["status"] == "denied" and c["policy_version"] == "v2"
    assert state(t, aid, "strictly_necessary")["policy_version"] == "v2"


def test_keyboard_preference_center_escape_and_reject(live: Live, context: Any) -> None:
    sqlite_only(live)
    t = live.tenant()
    page = context.new_page()
    page.goto(live.page_url(t, lang="de"))
    page.wait_for_selector("#cns-banner", state="visible")
    assert page.inner_text("[data-cns=reject]") == "Alle ablehnen"  # texts follow <html lang>
    tab_to(page, "[data-cns=prefs]")
    page.wait_for_selector("#cns-prefs", state="visible")
    assert page.evaluate("document.activeElement.closest('#cns-prefs') !== null")  # focus moved in
    assert page.evaluate("[...document.querySelectorAll('#cns-prefs input:not([disabled])')].every(i => !i.checked)")
    page.screenshot(path=str(ARTIFACTS / "preferences.png"))
    page.keyboard.press("Escape")  # closes, records nothing
    assert page.locator("#cns-prefs").count() == 0
    aid = anon_id(page)
    time.sleep(0.2)
    assert state(t, aid, "marketing_email")["status"] == "none"
    page.keyboard.press("Shift+Tab")  # focus went back to the banner's preferences button
    tab_to(page, "[data-cns=reject]")
    settled(page, t)
    assert state(t, aid, "marketing_email")["status"] == "denied"
    assert state(t, aid, "analytics")["status"] == "denied"
    assert state(t, aid, "strictly_necessary")["status"] == "acknowledged"


GPC_ON = "Object.defineProperty(Navigator.prototype, 'globalPrivacyControl', {get: () => true})"


def test_gpc_records_denied_once(live: Live, browser: Any) -> None:
    sqlite_only(live)
    t = live.tenant()
    ctx = browser.new_context(extra_http_headers={"Sec-GPC": "1"})
    ctx.set_default_timeout(10_000)
    ctx.add_init_script(GPC_ON)
    try:
        page = ctx.new_page()
        page.goto(live.page_url(t))
        page.evaluate("Consent.ready")
        settled(page, t)
        aid = anon_id(page)
        first = state(t, aid, "marketing_email")
        assert first["status"] == "denied" and source_of(first) == "gpc"
        assert source_of(state(t, aid, "analytics")) == "gpc"
        assert state(t, aid, "product_updates")["status"] == "none"  # not a GPC purpose: still asked
        assert page.locator("#cns-banner").is_visible()
        for _ in range(2):  # later page views do not record it again
            page.reload()
            page.evaluate("Consent.ready")
            settled(page, t)
        assert state(t, aid, "marketing_email")["record_id"] == first["record_id"]
        # the visitor may still opt in explicitly; that is kept on later page views
        page.evaluate("Consent.open()")
        page.check("input[data-cns-purpose=marketing_email]")
        page.click("[data-cns=save]")
        settled(page, t)
        page.reload()
        page.evaluate("Consent.ready")
        settled(page, t)
        c = state(t, aid, "marketing_email")
        assert c["status"] == "granted" and source_of(c) == "snippet"
    finally:
        ctx.close()


def test_gpc_wins_over_an_earlier_opt_in(live: Live, context: Any) -> None:
    sqlite_only(live)
    t = live.tenant()
    page = context.new_page()
    page.goto(live.page_url(t))
    page.wait_for_selector("#cns-banner", state="visible")
    tab_to(page, "[data-cns=accept]")
    settled(page, t)
    aid = anon_id(page)
    assert state(t, aid, "analytics")["status"] == "granted"
    context.add_init_script(GPC_ON)  # the visitor turns on Global Privacy Control
    page.reload()
    page.evaluate("Consent.ready")
    settled(page, t)
    c = state(t, aid, "analytics")
    assert c["status"] == "denied" and source_of(c) == "gpc"
    assert page.evaluate("Consent.get('analytics')") == "denied"
    assert state(t, aid, "product_updates")["status"] == "pending_confirmation"  # not a GPC purpose
    assert page.locator("#cns-banner").count() == 0


def test_offline_choice_arrives_after_reconnect(live: Live, context: Any) -> None:
    sqlite_only(live)
    t = live.tenant()
    page = context.new_page()
    page.goto(live.page_url(t))
    page.wait_for_selector("#cns-banner", state="visible")
    aid = anon_id(page)
    context.set_offline(True)
    tab_to(page, "[data-cns=accept]")
    page.wait_for_function("(k) => JSON.parse(localStorage.getItem('cns_q_' + k) || '[]').length === 1",
                           arg=t.publishable_key)
    time.sleep(0.3)
    assert state(t, aid, "marketing_email")["status"] == "none"
    context.set_offline(False)
    settled(page, t)  # the 'online' event flushes the outbox
    assert state(t, aid, "marketing_email")["status"] == "granted"


def test_foreign_origin_is_refused(live: Live, context: Any) -> None:
    sqlite_only(live)
    t = live.tenant()
    page = context.new_page()
    page.goto(live.page_url(t, foreign=True))
    page.evaluate("Consent.ready")  # the config request is refused: no banner
    assert page.locator("#cns-banner").count() == 0
    aid = anon_id(page)
    body = json.dumps({"anonymous_id": aid, "choices": [{"purpose": "marketing_email", "decision": "granted"}]})
    outcome = page.evaluate(
        """([url, body]) => fetch(url, {method: 'POST', body}).then(r => 'status ' + r.status, e => 'refused')""",
        [f"{live.api}/v1/snippet/consents?key={t.publishable_key}", body])
    assert outcome == "refused"  # 403 without CORS headers: the page cannot even read it
    assert state(t, aid, "marketing_email")["status"] == "none"


def test_demo_page_works_under_its_csp(live: Live, context: Any) -> None:
    sqlite_only(live)
    t = live.tenant()
    page = context.new_page()
    problems: list[str] = []
    page.on("console", lambda m: m.type == "error" and "favicon" not in m.location.get("url", "")
            and problems.append(m.text))
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.on("response", lambda r: r.status >= 400 and not r.url.endswith("/favicon.ico")
            and problems.append(f"{r.status} {r.url}"))
    page.goto(f"{live.api}/demo?key={t.publishable_key}")
    page.wait_for_selector("#cns-banner", state="visible")
    tab_to(page, "[data-cns=accept]")
    page.wait_for_function("document.getElementById('state').textContent.includes('granted')")
    settled(page, t)
    assert state(t, anon_id(page), "analytics")["status"] == "granted"
    assert problems == []
