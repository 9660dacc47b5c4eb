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
from typing import Any, ClassVar
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
<meta name="viewport" content="width=device-width,initial-scale=1">
<script src="{api}/snippet.js" data-key="{key}" {extra} async></script></head>
<body><h1>A customer's site</h1><p>Content <a href="#top">link</a></p>
<a href="#" data-consent-open>Privacy choices</a></body></html>"""


class PageHandler(BaseHTTPRequestHandler):
    """Serves /page?key=&lang=&token= : a page of the tenant's site embedding the snippet, and
    any page a test registers in ``pages`` (path -> (html, headers))."""

    api = ""
    pages: ClassVar[dict[str, tuple[str, dict[str, str]]]] = {}

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        url = urlparse(self.path)
        if url.path in self.pages:
            text, headers = self.pages[url.path]
            data = text.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        if url.path == "/favicon.ico":  # asked by the browser itself; a 404 would be a console error
            self.send_response(204)
            self.end_headers()
            return
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
           "CONSENT_DEMO": "true", "CONSENT_MIGRATE_ON_START": "false", "CONSENT_ISSUER": f"http://127.0.0.1:{port}",
           "CONSENT_WEBHOOK_ALLOW_PRIVATE": "true"}  # the dashboard's webhook page registers a local receiver
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "consent.web.app:create_app", "--factory", "--host", "127.0.0.1",
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
    time.sleep(0.2)
    assert page.evaluate("(k) => localStorage.getItem('cns_q_' + k)", t.publishable_key) is None  # nothing sent
    assert page.evaluate("localStorage.getItem('cns_aid')") is None  # no identifier before a choice
    page.keyboard.press("Shift+Tab")  # focus went back to the banner's preferences button
    tab_to(page, "[data-cns=reject]")
    settled(page, t)
    aid = anon_id(page)
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
    context.set_offline(True)
    tab_to(page, "[data-cns=accept]")
    page.wait_for_function("(k) => JSON.parse(localStorage.getItem('cns_q_' + k) || '[]').length === 1",
                           arg=t.publishable_key)
    aid = anon_id(page)
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
    aid = "a_foreign_page"
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


# --- the banner a site owner would choose ----------------------------------------------------

STUB = (ROOT / "client-snippet" / "src" / "stub.js").read_text()
SCREENS = ROOT / "screens"
BODY = "<h1>A customer's site</h1><p>Content <a href='#top'>link</a></p>"


def serve(live: Live, path: str, head: str, body: str = BODY, csp: str | None = None, lang: str = "en") -> str:
    """Register a page of the tenant's site; returns its URL."""
    page = (f'<!doctype html><html lang="{lang}"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width,initial-scale=1"><title>Shop</title>{head}</head>'
            f"<body>{body}</body></html>")
    PageHandler.pages[path] = (page, {"Content-Security-Policy": csp} if csp else {})
    return live.page_origin + path


def tag(live: Live, t: Tenant, extra: str = "") -> str:
    return f'<script src="{live.api}/snippet.js" data-key="{t.publishable_key}" {extra} async></script>'


def watch(page: Any) -> list[str]:
    """Console errors, page errors and CSP violations seen by the page."""
    problems: list[str] = []
    page.on("console", lambda m: m.type == "error" and "favicon" not in m.text and problems.append(m.text))
    page.on("pageerror", lambda e: problems.append(str(e)))
    return problems


def styled(page: Any) -> dict[str, str]:
    return dict(page.evaluate("""() => { const b = document.querySelector('[data-cns=accept]'),
        s = getComputedStyle(b), r = getComputedStyle(document.getElementById('cns-banner'));
        return {bg: s.backgroundColor, pos: r.position, minh: s.minHeight, panel: r.backgroundColor}; }"""))


def test_static_csp_page_without_nonce_is_styled(live: Live, context: Any) -> None:
    """`script-src 'self' <svc>; style-src 'self' <svc>`, no nonce: the banner is fully styled."""
    sqlite_only(live)
    t = live.tenant()
    csp = (f"default-src 'self'; script-src 'self' {live.api}; style-src 'self' {live.api}; "
           f"connect-src 'self' {live.api}; img-src 'self'")
    url = serve(live, "/csp-static", tag(live, t, integrity_attr(live)), csp=csp)
    page = context.new_page()
    problems = watch(page)
    page.goto(url)
    page.wait_for_selector("#cns-banner", state="visible")
    s = styled(page)
    assert s == {"bg": "rgb(11, 87, 208)", "pos": "fixed", "minh": "44px", "panel": "rgb(255, 255, 255)"}
    assert page.evaluate("document.querySelectorAll('style').length") == 0  # nothing injected
    tab_to(page, "[data-cns=reject]")
    settled(page, t)
    assert state(t, anon_id(page), "analytics")["status"] == "denied"
    assert problems == []


def integrity_attr(live: Live) -> str:
    sri = httpx.get(live.api + "/snippet.js", headers={"Accept-Encoding": "identity"}).content
    import base64
    import hashlib
    return f'integrity="sha384-{base64.b64encode(hashlib.sha384(sri).digest()).decode()}" crossorigin="anonymous"'


def test_nonce_csp_page_with_the_inline_stub(live: Live, context: Any) -> None:
    """A nonce-based strict CSP: the documented stub runs inline with the nonce, sets Google
    Consent Mode defaults before anything else, queues a call made before the snippet loads,
    and the snippet (by nonce) replays it."""
    sqlite_only(live)
    t = live.tenant()
    nonce = "n0nce-for-this-test"
    csp = (f"default-src 'self'; script-src 'nonce-{nonce}' 'strict-dynamic'; style-src 'nonce-{nonce}'; "
           f"connect-src {live.api}")
    head = (f'<script nonce="{nonce}">{STUB}\nConsent.on("change", function (m) {{ window.seen = m; }});\n'
            f'window.early = Consent.get("analytics");\ngtag("config", "G-TEST");</script>'
            f'<script nonce="{nonce}" src="{live.api}/snippet.js" data-key="{t.publishable_key}" data-gcm="1" '
            'async></script>')
    url = serve(live, "/csp-nonce", head, csp=csp)
    page = context.new_page()
    problems = watch(page)
    page.goto(url)
    page.wait_for_selector("#cns-banner", state="visible")
    assert page.evaluate("window.early") == "unknown"
    layer = page.evaluate("dataLayer.map(a => Array.from(a))")
    assert layer[0][:2] == ["consent", "default"] and layer[0][2]["analytics_storage"] == "denied"
    assert layer[0][2]["wait_for_update"] == 500 and layer[0][2]["security_storage"] == "granted"
    assert layer[1][:2] == ["config", "G-TEST"]  # the defaults came first
    assert styled(page)["bg"] == "rgb(11, 87, 208)"
    tab_to(page, "[data-cns=accept]")
    settled(page, t)
    assert page.evaluate("window.seen.analytics") == "granted"  # the queued listener was replayed
    update = page.evaluate("dataLayer.map(a => Array.from(a)).filter(a => a[1] == 'update').pop()")
    assert update[2]["analytics_storage"] == "granted"
    assert problems == []


def test_stub_resolves_unknown_when_the_service_is_down(live: Live, context: Any) -> None:
    sqlite_only(live)
    head = (f"<script>{STUB}\nwindow.got = []; Consent.ready.then(function (v) {{ window.got.push(v, "
            'Consent.get("analytics")); });</script>'
            '<script src="http://127.0.0.1:9/snippet.js" data-key="pk_down_down_down" async></script>')
    page = context.new_page()
    page.goto(serve(live, "/down", head))
    page.wait_for_function("window.got.length == 2", timeout=8000)
    assert page.evaluate("window.got") == ["unknown", "unknown"]


def test_focus_moves_in_one_tab_to_accept_escape_keeps_the_question(live: Live, context: Any) -> None:
    sqlite_only(live)
    t = live.tenant()
    page = context.new_page()
    page.goto(live.page_url(t))
    page.wait_for_selector("#cns-banner", state="visible")
    assert page.evaluate("document.activeElement.id") == "cns-banner"  # focus moved in
    assert page.get_attribute("#cns-banner", "role") == "dialog"
    assert page.evaluate("document.getElementById(document.getElementById('cns-banner')"
                         ".getAttribute('aria-labelledby')).textContent") == "Your privacy choices"
    page.keyboard.press("Escape")
    assert page.locator("#cns-banner").is_visible()  # Escape does not dismiss an unanswered question
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.dataset.cns") == "accept"  # one Tab
    page.keyboard.press("Enter")
    settled(page, t)
    assert state(t, anon_id(page), "analytics")["status"] == "granted"


def test_preference_centre_switches_table_and_trap(live: Live, context: Any) -> None:
    sqlite_only(live)
    t = live.tenant()
    t.put("/v1/cookies/_ga", json={"provider": "Google", "purpose": "analytics", "lifetime": 63072000})
    t.publish("v2", purposes=["strictly_necessary", "marketing_email", "analytics", "product_updates"])
    page = context.new_page()
    page.goto(live.page_url(t))
    page.wait_for_selector("#cns-banner", state="visible")
    page.click("[data-cns=prefs]")
    page.wait_for_selector("#cns-prefs", state="visible")
    assert page.evaluate("document.activeElement.id") == "cns-prefs"
    assert page.get_attribute("#cns-prefs", "aria-modal") == "true"
    switches = page.evaluate("""[...document.querySelectorAll('#cns-prefs [role=switch]')].map(i =>
        [i.dataset.cnsPurpose, i.checked, i.disabled, i.closest('label').textContent])""")
    assert switches[0] == ["strictly_necessary", True, True, "NecessaryAlways on"]  # shown and announced
    assert all(not on and not off for _, on, off, _ in switches[1:])
    rows = page.evaluate("""[...document.querySelectorAll('#cns-prefs .cns-i')].map(i =>
        [...i.querySelectorAll('tr')].map(r => [...r.cells].map(c => c.textContent).join(' ')))""")
    assert rows[0][1] == "sessionKeeps you signed in acme.test until sign-out"
    assert rows[2] == ["Cookie Provider Lifetime", "_ga Google 2 years"]  # per purpose, in words
    assert [page.inner_text(f"#cns-prefs [data-cns={k}]") for k in ("accept", "reject", "save")] == [
        "Accept all", "Reject all", "Save choices"]
    assert page.get_attribute("#cns-prefs [data-cns=close]", "aria-label") == "Close"
    for _ in range(25):  # focus stays inside the centre
        page.keyboard.press("Tab")
        assert page.evaluate("!!document.activeElement.closest('#cns-prefs')")
    page.keyboard.press("Shift+Tab")
    assert page.evaluate("!!document.activeElement.closest('#cns-prefs')")
    page.click("#cns-prefs [data-cns=close]")  # closing records nothing, the banner is back
    assert page.locator("#cns-prefs").count() == 0 and page.locator("#cns-banner").is_visible()
    page.click("[data-cns=prefs]")
    page.click("input[data-cns-purpose=analytics]")
    page.click("#cns-prefs [data-cns=save]")
    settled(page, t)
    aid = anon_id(page)
    assert state(t, aid, "analytics")["status"] == "granted"
    assert state(t, aid, "marketing_email")["status"] == "denied"
    page.evaluate("Consent.open()")
    page.click("#cns-prefs [data-cns=reject]")  # Reject all inside the centre
    settled(page, t)
    assert state(t, aid, "analytics")["status"] == "denied"


def test_gpc_notice_shown_and_accept_all_keeps_gpc_denials(live: Live, browser: Any) -> None:
    sqlite_only(live)
    t = live.tenant()
    ctx = browser.new_context(extra_http_headers={"Sec-GPC": "1"})
    ctx.add_init_script(GPC_ON)
    try:
        page = ctx.new_page()
        page.goto(live.page_url(t, lang="fr"))
        page.wait_for_selector("#cns-banner", state="visible")
        assert page.inner_text("#cns-banner .cns-g") == "Signal de préférence de refus respecté"
        page.click("[data-cns=accept]")
        settled(page, t)
        aid = anon_id(page)
        assert state(t, aid, "analytics")["status"] == "denied"  # GPC keeps it denied
        assert state(t, aid, "product_updates")["status"] == "pending_confirmation"
    finally:
        ctx.close()


def test_rtl_language_from_data_lang_and_browser(live: Live, browser: Any) -> None:
    sqlite_only(live)
    t = live.tenant()
    ctx = browser.new_context(locale="ja-JP")
    try:
        page = ctx.new_page()
        page.goto(serve(live, "/ar", tag(live, t, 'data-lang="ar"'), '<div dir="rtl"><input id="site"></div>', lang=""))
        page.wait_for_selector("#cns-banner", state="visible")
        assert page.get_attribute("#cns-banner", "dir") == "rtl"
        page.click("[data-cns=prefs]")
        # the centre's switches are mirrored; the page's own inputs under dir=rtl are left alone
        assert page.evaluate("""() => [getComputedStyle(document.getElementById('site')).transform,
            getComputedStyle(document.querySelector('#cns-prefs input')).transform]""") == ["none", "matrix(-1, 0, 0, 1, 0, 0)"]
        page.keyboard.press("Escape")
        assert page.inner_text("[data-cns=accept]") == "قبول الكل"
        box = page.evaluate("""(() => { const r = document.querySelector('[data-cns=accept]').getBoundingClientRect(),
            j = document.querySelector('[data-cns=reject]').getBoundingClientRect(); return [r.left, j.left]; })()""")
        assert box[0] > box[1]  # mirrored: the first action sits on the right
        page = ctx.new_page()  # no data-lang, no <html lang>: the browser's language
        page.goto(serve(live, "/nolang", tag(live, t), lang=""))
        page.wait_for_selector("#cns-banner", state="visible")
        assert page.inner_text("[data-cns=reject]") == "すべて拒否"
    finally:
        ctx.close()


def test_theme_brand_dark_and_bar_from_the_tenant(live: Live, browser: Any) -> None:
    sqlite_only(live)
    t = live.tenant()
    r = t.put("/v1/tenant/snippet", json={"theme": {"brand": "#1a7f37", "layout": "bar", "radius": 0},
                                          "texts": {"en": {"title": "Acme and your data"}}})
    assert r.status_code == 200
    ctx = browser.new_context(color_scheme="dark")
    try:
        page = ctx.new_page()
        page.goto(live.page_url(t))
        page.wait_for_selector("#cns-banner", state="visible")
        s = styled(page)
        assert s["bg"] == "rgb(26, 127, 55)" and s["panel"] == "rgb(34, 34, 34)"  # brand; dark by the OS
        assert page.inner_text("#cns-bt") == "Acme and your data"
        width = page.evaluate("document.getElementById('cns-banner').getBoundingClientRect().width")
        assert width == page.viewport_size["width"]  # bar layout: full width
        t.put("/v1/tenant/snippet", json={"theme": {"mode": "light"}})
        page.evaluate("localStorage.clear()")
        page.reload()
        page.wait_for_selector("#cns-banner", state="visible")
        assert styled(page)["panel"] == "rgb(255, 255, 255)"  # explicit light wins over the OS
    finally:
        ctx.close()


def test_blocking_category_iframes_spa_and_cookie_wipe(live: Live, context: Any) -> None:
    sqlite_only(live)
    t = live.tenant()
    t.put("/v1/cookies/_ga", json={"provider": "Google", "purpose": "analytics", "lifetime": 63072000})
    t.put("/v1/cookies/_ga_*", json={"provider": "Google", "purpose": "analytics", "lifetime": 63072000})
    t.publish("v2", purposes=["strictly_necessary", "marketing_email", "analytics", "product_updates"])
    body = (BODY + '<script type="text/plain" data-category="analytics">window.ran = (window.ran || 0) + 1;'
            'document.cookie = "_ga=1;path=/"; document.cookie = "_ga_ABC=2;path=/";</script>'
            '<iframe data-consent="marketing_email" data-src="/frame" title="video"></iframe>')
    PageHandler.pages["/frame"] = ("<p>framed</p>", {})
    page = context.new_page()
    page.goto(serve(live, "/blocking", tag(live, t), body))
    page.wait_for_selector("#cns-banner", state="visible")
    assert page.evaluate("window.ran") is None
    assert page.evaluate("document.querySelector('iframe').hidden && !document.querySelector('iframe').src")
    assert page.locator("[data-cns=load]").count() == 1
    # a single-page app adds a blocked script later: held back too
    page.evaluate("""() => { const s = document.createElement('script'); s.type = 'text/plain';
        s.dataset.consent = 'analytics'; s.text = 'window.late = 1'; document.body.append(s); }""")
    page.click("[data-cns=load]")  # click-to-load grants that purpose only
    settled(page, t)
    aid = anon_id(page)
    assert state(t, aid, "marketing_email")["status"] == "granted"
    page.wait_for_function("document.querySelector('iframe').src.endsWith('/frame')")
    assert page.locator("[data-cns=load]").count() == 0
    assert page.evaluate("window.ran") is None
    page.click("[data-cns=accept]")
    settled(page, t)
    page.wait_for_function("window.ran === 1 && window.late === 1")
    assert "_ga=1" in page.evaluate("document.cookie")
    page.evaluate("Consent.open()")
    page.click("input[data-cns-purpose=analytics]")  # withdraw analytics
    page.click("#cns-prefs [data-cns=save]")
    settled(page, t)
    assert state(t, aid, "analytics")["status"] == "denied"
    jar = page.evaluate("document.cookie")
    assert "_ga=" not in jar and "_ga_ABC" not in jar and "consent_aid" in jar


def test_refusal_cooldown_unless_material(live: Live, context: Any) -> None:
    sqlite_only(live)
    t = live.tenant()
    page = context.new_page()
    page.goto(live.page_url(t))
    page.wait_for_selector("#cns-banner", state="visible")
    page.click("[data-cns=reject]")
    settled(page, t)
    purposes = ["strictly_necessary", "marketing_email", "analytics", "product_updates"]
    t.put("/v1/purposes/chat", json={"kind": "consent", "title": "Chat"})
    t.publish("v2", purposes=[*purposes, "chat"])  # not material: a new purpose only
    page.reload()
    page.evaluate("Consent.ready")
    assert page.locator("#cns-banner").count() == 0  # refused recently: not asked again
    assert page.evaluate("Consent.get('chat')") is None
    page.evaluate("(k) => localStorage.setItem(k, Date.now() - 183 * 864e5)",
                  "cns_r_" + t.id)  # the default 6 months have passed
    page.reload()
    page.wait_for_selector("#cns-banner", state="visible")
    page.click("[data-cns=reject]")
    settled(page, t)
    t.put("/v1/tenant/snippet", json={"refusal_cooldown_days": 365})
    t.publish("v3", material=True, purposes=[*purposes, "chat"])
    page.reload()
    page.wait_for_selector("#cns-banner", state="visible")  # a material version asks again at once
    # ... for the acknowledged notice; the refusals stay refusals, in the page as on the server
    assert page.evaluate("Consent.get('marketing_email')") == "denied"
    assert state(t, anon_id(page), "marketing_email")["status"] == "denied"


def test_returning_visitor_decided_before_any_network(live: Live, context: Any) -> None:
    sqlite_only(live)
    t = live.tenant()
    page = context.new_page()
    page.goto(live.page_url(t))
    page.wait_for_selector("#cns-banner", state="visible")
    page.click("[data-cns=accept]")
    settled(page, t)
    seen: list[str] = []
    page.on("request", lambda r: seen.append(r.method + " " + r.url))
    page.route("**/v1/snippet/config*", lambda route: None)  # the config never answers
    page.reload()
    page.wait_for_function("window.Consent && Consent.get('analytics') === 'granted'")
    assert page.locator("#cns-banner").count() == 0
    assert not any(u.startswith("OPTIONS") for u in seen)  # no CORS preflight on a page view


def test_screenshots(live: Live, browser: Any) -> None:
    """Banner and centre on desktop and phone, light, dark and RTL, into screens/ (not committed),
    for a person to look at; each must show the banner within the viewport."""
    sqlite_only(live)
    t = live.tenant()
    t.put("/v1/cookies/_ga", json={"provider": "Google", "purpose": "analytics", "lifetime": 63072000,
                                   "description": "Distinguishes visitors."})
    t.publish("v2", purposes=["strictly_necessary", "marketing_email", "analytics", "product_updates"])
    SCREENS.mkdir(exist_ok=True)
    devices = {"desktop": {"viewport": {"width": 1280, "height": 800}},
               "phone": {"viewport": {"width": 390, "height": 844}, "is_mobile": True, "has_touch": True,
                         "device_scale_factor": 2}}
    for device, opts in devices.items():
        for look, scheme, lang in (("light", "light", "en"), ("dark", "dark", "en"), ("rtl", "light", "ar")):
            ctx = browser.new_context(color_scheme=scheme, **opts)
            try:
                page = ctx.new_page()
                page.goto(live.page_url(t, lang=lang))
                page.wait_for_selector("#cns-banner", state="visible")
                box = page.evaluate("document.getElementById('cns-banner').getBoundingClientRect().toJSON()")
                assert box["bottom"] <= opts["viewport"]["height"] and box["left"] >= 0  # type: ignore[index]
                page.screenshot(path=str(SCREENS / f"{device}-{look}-banner.png"))
                page.click("[data-cns=prefs]")
                page.wait_for_selector("#cns-prefs", state="visible")
                page.click("#cns-prefs details:not(:empty) summary >> nth=-1")
                page.screenshot(path=str(SCREENS / f"{device}-{look}-centre.png"))
            finally:
                ctx.close()


# --- the per-tenant script and Microsoft's consent signals ------------------------------------

def test_per_tenant_script_shows_the_banner_without_a_config_request(live: Live, context: Any) -> None:
    """/v1/snippet/{key}.js carries the config: one request to the banner, the choice recorded
    with the key it carries; a page in another language still asks for its own config."""
    sqlite_only(live)
    t = live.tenant()
    head = f'<script src="{live.api}/v1/snippet/{t.publishable_key}.js" async></script>'
    page = context.new_page()
    problems = watch(page)
    seen: list[str] = []
    page.on("request", lambda r: seen.append(r.method + " " + r.url))
    page.goto(serve(live, "/tenant-script", head))
    page.wait_for_selector("#cns-banner", state="visible")
    assert page.inner_text("[data-cns=accept]") == "Accept all"
    assert not any("/v1/snippet/config" in u for u in seen), seen
    tab_to(page, "[data-cns=accept]")
    settled(page, t)
    assert state(t, anon_id(page), "analytics")["status"] == "granted"
    assert not any(u.startswith("OPTIONS") for u in seen)
    assert problems == []
    other = context.browser.new_context()  # a first visit to a German page
    try:
        german = other.new_page()
        seen.clear()
        german.on("request", lambda r: seen.append(r.method + " " + r.url))
        german.goto(serve(live, "/tenant-script-de", head, lang="de"))
        german.wait_for_selector("#cns-banner", state="visible")
        assert german.inner_text("[data-cns=reject]") == "Alle ablehnen"
        assert [u for u in seen if "/v1/snippet/config" in u and "lang=de" in u], seen
    finally:
        other.close()


SIGNALS = """<script>window.uetq = window.uetq || []; window.uetq.push("consent", "default", {ad_storage: "denied"});
window.calls = []; window.clarity = function () { window.calls.push(Array.from(arguments)); };</script>"""


def ms_signals(page: Any) -> tuple[list[Any], list[Any]]:
    """UET's queue as [command, mode, value] triples, and the calls Clarity received."""
    q = page.evaluate("window.uetq")
    return [q[i:i + 3] for i in range(0, len(q), 3)], page.evaluate("window.calls")


def test_microsoft_uet_and_clarity_follow_accept_reject_and_withdrawal(live: Live, context: Any) -> None:
    """data-uet="1" pushes UET's ad_storage and data-clarity="1" calls Clarity's consentv2 with
    the answers: on load, after Accept all, after Reject all and after a withdrawal."""
    sqlite_only(live)
    t = live.tenant()
    url = serve(live, "/ms-signals", SIGNALS + tag(live, t, 'data-uet="1" data-clarity="1"'))
    denied = {"ad_Storage": "denied", "analytics_Storage": "denied"}
    page = context.new_page()
    page.goto(url)
    page.wait_for_selector("#cns-banner", state="visible")
    uet, clarity = ms_signals(page)
    assert uet[0] == ["consent", "default", {"ad_storage": "denied"}]  # the page's own default came first
    assert uet[-1] == ["consent", "update", {"ad_storage": "denied"}]  # undecided: denied
    assert clarity[-1] == ["consentv2", denied]
    page.click("[data-cns=accept]")
    settled(page, t)
    uet, clarity = ms_signals(page)
    assert uet[-1] == ["consent", "update", {"ad_storage": "granted"}]  # marketing_email is granted
    assert clarity[-1] == ["consentv2", {"ad_Storage": "granted", "analytics_Storage": "granted"}]
    # withdrawal: marketing off in the centre
    page.evaluate("Consent.open()")
    page.click("input[data-cns-purpose=marketing_email]")
    page.click("#cns-prefs [data-cns=save]")
    settled(page, t)
    uet, clarity = ms_signals(page)
    assert uet[-1] == ["consent", "update", {"ad_storage": "denied"}]
    assert clarity[-1] == ["consentv2", {"ad_Storage": "denied", "analytics_Storage": "granted"}]
    assert state(t, anon_id(page), "marketing_email")["status"] == "denied"  # the grant is taken back
    # a returning visitor's answers reach them on load, before any network
    page.reload()
    page.wait_for_function("window.calls.length > 0")
    assert ms_signals(page)[1][0] == ["consentv2", {"ad_Storage": "denied", "analytics_Storage": "granted"}]
    # Reject all, another visitor
    other = context.browser.new_context()
    try:
        p2 = other.new_page()
        p2.goto(url)
        p2.wait_for_selector("#cns-banner", state="visible")
        p2.click("[data-cns=reject]")
        settled(p2, t)
        uet, clarity = ms_signals(p2)
        assert uet[-1] == ["consent", "update", {"ad_storage": "denied"}] and clarity[-1] == ["consentv2", denied]
        assert p2.evaluate("Consent.get('analytics')") == "denied"
    finally:
        other.close()
    # without the attributes nothing is sent to either
    plain = context.new_page()
    plain.goto(serve(live, "/ms-none", SIGNALS + tag(live, t)))
    plain.wait_for_function("window.Consent && Consent.ready")
    plain.evaluate("Consent.ready")
    assert ms_signals(plain) == ([["consent", "default", {"ad_storage": "denied"}]], [])
