"""The snippet against vanilla-cookieconsent 3 and Osano's cookieconsent, in one run, with budgets.

    .venv/bin/python bench/snippet_bench.py [--runs 15] [--chromium /usr/bin/chromium]

- Sizes: JS + CSS gzip of each banner's code (ours carries its stylesheet); the config our
  snippet fetches, or the per-tenant script carries (texts, purposes, cookies), is reported
  separately as data.
- Our variants: the per-tenant script (/v1/snippet/{key}.js, the config inside: one request),
  the generic /snippet.js with the config preloaded (two requests in parallel), and without
  the preload (two in a row).
- Time to banner: navigation start to the first frame with the banner in the DOM (the time
  requestAnimationFrame gives that frame: work a banner's script forces before it, such as
  the layout that moving focus needs, counts; the frame's own style, layout and paint do
  not; the same for every banner), in a fresh browser context per visit (cold caches), on a
  throttled phone profile (CDP: 4x CPU slowdown, 150 ms latency per request, 1.6 Mbit/s
  down, 750 kbit/s up; Lighthouse's mobile profile).
  The service runs on 127.0.0.1 (uvicorn, SQLite in a temp dir), the site's pages on a second
  origin, the competitors' files (from npm, gzipped) on a third, as a CDN would serve them.
  Visits alternate between the banners so drift hits all alike. Medians of ``--runs``.
- Accessibility: the dialog's role and name, focus moved in, Tabs to the first action, Enter
  works, focus kept in the preference centre, axe-core (npm) serious/critical violations.

Budgets (exit 1 if one fails): code <= 4,096 B gzip; the per-tenant script's median time
<= 0.75 x vanilla's; our accessibility at least vanilla's on every line. The npm packages are installed on first use
into bench/.cache/npm (gitignored).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
DIST = ROOT / "client-snippet" / "dist" / "snippet.js"
NPM = ROOT / "bench" / ".cache" / "npm"
PACKAGES = ("vanilla-cookieconsent@3.1.0", "cookieconsent@3.1.1", "axe-core@4.14.1")
ADMIN = "adm_bench_token_0123456789"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
BUDGET_BYTES = 4096
BUDGET_RATIO = 0.75
PHONE = {"latency": 150, "downloadThroughput": 1.6e6 / 8, "uploadThroughput": 750e3 / 8, "offline": False}
# hideFromBots: false, or vanilla hides its banner from headless Chromium.
# performance.now() counts from navigation start; record it at the first frame after the banner exists
PROBE = """((sel) => new MutationObserver((_, o) => { if (document.querySelector(sel)) { o.disconnect();
  requestAnimationFrame(() => { window.__banner = performance.now(); }); } })
  .observe(document, {childList: true, subtree: true}))(%s);"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def gz(data: bytes) -> int:
    return len(gzip.compress(data, 9))


def npm_files() -> dict[str, Path]:
    if not (NPM / "node_modules" / "axe-core").exists():
        NPM.mkdir(parents=True, exist_ok=True)
        subprocess.run(["npm", "install", "--no-save", "--no-audit", "--no-fund", "--prefix", str(NPM),
                        *PACKAGES], check=True, capture_output=True, timeout=300)
    m = NPM / "node_modules"
    return {
        "vanilla.js": m / "vanilla-cookieconsent" / "dist" / "cookieconsent.umd.js",
        "vanilla.css": m / "vanilla-cookieconsent" / "dist" / "cookieconsent.css",
        "osano.js": m / "cookieconsent" / "build" / "cookieconsent.min.js",
        "osano.css": m / "cookieconsent" / "build" / "cookieconsent.min.css",
        "axe.js": m / "axe-core" / "axe.min.js",
    }


def setup_tenant(api: str, page_origin: str) -> str:
    h = {"Authorization": f"Bearer {ADMIN}"}
    with httpx.Client(base_url=api, timeout=10) as c:
        r = c.post("/v1/tenants", headers=h, json={"name": "Bench", "allowed_origins": [page_origin], "notice_days": 0})
        r.raise_for_status()
        keys = r.json()["keys"]
        sk = {"Authorization": f"Bearer {keys['secret_key']}"}
        for key, spec in {"strictly_necessary": {"kind": "notice", "legal_basis": "legitimate_interest",
                                                 "title": "Necessary"},
                          "marketing_email": {"kind": "consent", "gpc": True, "title": "Marketing email"},
                          "analytics": {"kind": "consent", "title": "Analytics"}}.items():
            c.put(f"/v1/purposes/{key}", headers=sk, json={**spec, "description": "What it does."}).raise_for_status()
        c.put("/v1/cookies/session", headers=sk, json={"provider": "bench.test", "purpose": "strictly_necessary",
                                                       "http_only": True, "lifetime": "session"}).raise_for_status()
        c.put("/v1/cookies/_ga", headers=sk, json={"provider": "Google", "purpose": "analytics",
                                                   "lifetime": 63072000}).raise_for_status()
        c.post("/v1/policies/privacy/versions", headers=sk, json={
            "version": "v1", "document_url": "https://bench.test/privacy", "document_sha256": "0" * 64,
            "purposes": ["strictly_necessary", "marketing_email", "analytics"]}).raise_for_status()
        return str(keys["publishable_key"])


TEXT = f"<h1>Page</h1><p>{'Text. ' * 200}</p>"
VANILLA_RUN = """CookieConsent.run({hideFromBots: false, categories: {necessary: {enabled: true, readOnly: true}, analytics: {}},
 language: {default: 'en', translations: {en: {
  consentModal: {title: 'Your privacy choices', description: 'We use cookies for: Necessary, Analytics.',
    acceptAllBtn: 'Accept all', acceptNecessaryBtn: 'Reject all', showPreferencesBtn: 'Preferences'},
  preferencesModal: {title: 'Preferences', acceptAllBtn: 'Accept all', acceptNecessaryBtn: 'Reject all',
    savePreferencesBtn: 'Save choices', closeIconLabel: 'Close', sections: [
    {title: 'Necessary', description: 'Keeps you signed in.', linkedCategory: 'necessary'},
    {title: 'Analytics', description: 'Usage statistics.', linkedCategory: 'analytics'}]}}}}});"""
OSANO_RUN = """cookieconsent.initialise({type: 'opt-in', content: {message: 'We use cookies for: Necessary, Analytics.',
 allow: 'Accept all', deny: 'Reject all', link: 'Privacy policy', href: 'https://bench.test/privacy'}});"""


def pages(api: str, cdn: str, key: str) -> dict[str, tuple[str, str]]:
    """name -> (html, the banner's selector)."""
    head = '<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" ' \
           'content="width=device-width,initial-scale=1"><title>Bench</title>'
    cfg = f"{api}/v1/snippet/config?key={key}&amp;lang=en"
    return {
        "snippet, per-tenant script": ((f'{head}<script src="{api}/v1/snippet/{key}.js" async></script>'
                                       f"</head><body>{TEXT}</body></html>"), "#cns-banner"),
        "snippet, preload": ((f'{head}<link rel="preload" as="fetch" crossorigin href="{cfg}">'
                    f'<script src="{api}/snippet.js" data-key="{key}" data-lang="en" async></script>'
                    f"</head><body>{TEXT}</body></html>"), "#cns-banner"),
        "snippet, no preload": ((f'{head}<script src="{api}/snippet.js" data-key="{key}" async></script>'
                                f"</head><body>{TEXT}</body></html>"), "#cns-banner"),
        "vanilla-cookieconsent 3": ((f'{head}<link rel="stylesheet" href="{cdn}/vanilla.css">'
                                    f'<script defer src="{cdn}/vanilla.js"></script>'
                                    f"<script>addEventListener('DOMContentLoaded', () => {{ {VANILLA_RUN} }});"
                                    f"</script></head><body>{TEXT}</body></html>"), "#cc-main .cm"),
        "Osano cookieconsent": ((f'{head}<link rel="stylesheet" href="{cdn}/osano.css">'
                                f'<script defer src="{cdn}/osano.js"></script>'
                                f"<script>addEventListener('DOMContentLoaded', () => {{ {OSANO_RUN} }});"
                                f"</script></head><body>{TEXT}</body></html>"), ".cc-window"),
    }


def serve(files: dict[str, tuple[bytes, str]]) -> tuple[ThreadingHTTPServer, str]:
    """A static origin: path -> (gzipped body, content type)."""

    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a: Any) -> None:
            pass

        def do_GET(self) -> None:
            found = files.get(self.path.split("?")[0])
            if found is None:
                self.send_error(404)
                return
            body, ctype = found
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "public, max-age=86400")
            self.send_header("Access-Control-Allow-Origin", "*")
            self.end_headers()
            self.wfile.write(body)

    port = free_port()
    server = ThreadingHTTPServer(("127.0.0.1", port), H)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{port}"


def throttle(ctx: Any, tab: Any) -> None:
    cdp = ctx.new_cdp_session(tab)
    cdp.send("Network.enable")
    cdp.send("Network.emulateNetworkConditions", PHONE)
    cdp.send("Emulation.setCPUThrottlingRate", {"rate": 4})


def visit(browser: Any, url: str, selector: str) -> float:
    ctx = browser.new_context()
    try:
        ctx.set_default_timeout(30_000)
        ctx.add_init_script(PROBE % json.dumps(selector))
        tab = ctx.new_page()
        throttle(ctx, tab)
        tab.goto(url)
        tab.wait_for_function("window.__banner !== undefined")
        return float(tab.evaluate("window.__banner"))
    finally:
        ctx.close()


A11Y = {
    "snippet, per-tenant script": {"dialog": "#cns-banner", "open": "[data-cns=prefs]", "centre": "#cns-prefs"},
    "vanilla-cookieconsent 3": {"dialog": "#cc-main .cm", "open": "[data-role=show]", "centre": "#cc-main .pm"},
}


def accessibility(browser: Any, url: str, sel: dict[str, str], axe: Path) -> dict[str, Any]:
    """What a keyboard and screen-reader user meets, unthrottled."""
    ctx = browser.new_context()
    out: dict[str, Any] = {}
    try:
        ctx.set_default_timeout(15_000)
        tab = ctx.new_page()
        tab.goto(url)
        tab.wait_for_selector(sel["dialog"], state="visible")
        time.sleep(0.5)  # any opening animation and focus move
        out["dialog role + name"] = tab.evaluate("""(s) => { const d = document.querySelector(s);
            const n = d.closest('[role=dialog],[role=alertdialog]') || d.querySelector('[role=dialog],[role=alertdialog]');
            return !!n && !!(n.getAttribute('aria-label') || n.getAttribute('aria-labelledby')); }""", sel["dialog"])
        out["focus moved in"] = tab.evaluate("(s) => !!document.activeElement.closest(s)", sel["dialog"])
        tabs = 0
        for tabs in range(1, 20):
            tab.keyboard.press("Tab")
            if tab.evaluate("(s) => document.activeElement.tagName == 'BUTTON' && !!document.activeElement"
                            ".closest(s)", sel["dialog"]):
                break
        out["Tabs to first action"] = tabs
        axe_result = tab.evaluate(axe.read_text() + "\n;axe.run(document, {resultTypes: ['violations']})"
                                  ".then(r => r.violations.filter(v => v.impact == 'serious' || v.impact == "
                                  "'critical').map(v => v.id))")
        out["axe serious/critical"] = len(axe_result)
        out["axe ids"] = axe_result
        tab.keyboard.press("Enter")
        time.sleep(0.5)
        out["Enter works"] = not tab.evaluate("(s) => { const d = document.querySelector(s); return !!d && "
                                              "d.getBoundingClientRect().height > 0 && getComputedStyle(d)"
                                              ".visibility != 'hidden' }", sel["dialog"])
        tab.evaluate("localStorage.clear(); document.cookie.split(';').forEach(c => document.cookie = "
                     "c.split('=')[0] + '=;max-age=0;path=/')")
        tab.reload()
        tab.wait_for_selector(sel["dialog"], state="visible")
        tab.click(sel["open"])
        tab.wait_for_selector(sel["centre"], state="visible")
        time.sleep(0.5)
        kept = True
        for _ in range(30):
            tab.keyboard.press("Tab")
            kept = kept and tab.evaluate("(s) => !!document.activeElement.closest(s)", sel["centre"])
        out["focus kept in centre"] = kept
    finally:
        ctx.close()
    return out


def start_service(tmp: str, port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "CONSENT_DATABASE_URL": f"sqlite:///{tmp}/bench.db", "CONSENT_ADMIN_TOKEN": ADMIN,
           "CONSENT_DEMO": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "consent.web.app:create_app", "--factory", "--host",
                             "127.0.0.1", "--port", str(port), "--log-level", "warning"], env=env, cwd=ROOT)
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the service did not start") from None
            time.sleep(0.1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=15, help="visits per banner (1-100)")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    args = ap.parse_args()
    runs = max(1, min(args.runs, 100))
    files = npm_files()

    from playwright.sync_api import sync_playwright

    tmp = tempfile.mkdtemp(prefix="snippet-bench-")
    port = free_port()
    api = f"http://127.0.0.1:{port}"
    proc = start_service(tmp, port)
    servers: list[ThreadingHTTPServer] = []
    try:
        cdn, cdn_url = serve({f"/{n}": (gzip.compress(p.read_bytes(), 9), "text/css" if n.endswith("css")
                                        else "text/javascript") for n, p in files.items() if n != "axe.js"})
        servers.append(cdn)
        site: dict[str, tuple[bytes, str]] = {}
        site_server, site_url = serve(site)
        servers.append(site_server)
        key = setup_tenant(api, site_url)
        config = httpx.get(f"{api}/v1/snippet/config", params={"key": key, "lang": "en"}).content
        bundle = httpx.get(f"{api}/v1/snippet/{key}.js", headers={"Accept-Encoding": "identity"}).content
        sizes = {
            "snippet": gz(DIST.read_bytes()),
            "vanilla-cookieconsent 3": gz(files["vanilla.js"].read_bytes()) + gz(files["vanilla.css"].read_bytes()),
            "Osano cookieconsent": gz(files["osano.js"].read_bytes()) + gz(files["osano.css"].read_bytes()),
        }
        urls: dict[str, tuple[str, str]] = {}
        for i, (name, (html, sel)) in enumerate(pages(api, cdn_url, key).items()):
            site[f"/{i}"] = (gzip.compress(html.encode()), "text/html; charset=utf-8")
            urls[name] = (f"{site_url}/{i}", sel)
        times: dict[str, list[float]] = {n: [] for n in urls}
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=ARGS)
            for name, (url, sel) in urls.items():  # warm-up: the service, Chromium and the OS caches
                visit(browser, url, sel)
            for _ in range(runs):
                for name, (url, sel) in urls.items():
                    times[name].append(visit(browser, url, sel))
            a11y = {name: accessibility(browser, urls[name][0], A11Y[name], files["axe.js"]) for name in A11Y}
            browser.close()
    finally:
        for s in servers:
            s.shutdown()
            s.server_close()
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)

    med = {n: statistics.median(xs) for n, xs in times.items()}
    vanilla = med["vanilla-cookieconsent 3"]
    print(f"Throttled phone (4x CPU, 150 ms per request, 1.6/0.75 Mbit/s), {runs} cold visits each, medians:\n")
    print("| | JS + CSS gzip | time to banner | vs vanilla |")
    print("|---|---|---|---|")
    for name in urls:
        size = sizes.get(name.split(",")[0], sizes["snippet"])
        print(f"| {name} | {size:,} B | {med[name]:.0f} ms | {med[name] / vanilla:.2f}x |")
    print(f"\nsnippet config (texts, purposes, cookies; data, not code): {len(config):,} B, {gz(config):,} B gzip")
    print(f"per-tenant script (code + config): {len(bundle):,} B, {gz(bundle):,} B gzip")
    print("\n| accessibility | " + " | ".join(a11y) + " |\n|---|" + "---|" * len(a11y))
    for line in ("dialog role + name", "focus moved in", "Tabs to first action", "Enter works",
                 "focus kept in centre", "axe serious/critical"):
        print(f"| {line} | " + " | ".join(str(a[line]) for a in a11y.values()) + " |")
    for name, a in a11y.items():
        if a["axe ids"]:
            print(f"axe, {name}: {', '.join(a['axe ids'])}")

    ours, theirs = a11y["snippet, per-tenant script"], a11y["vanilla-cookieconsent 3"]
    fastest = med["snippet, per-tenant script"]
    checks: list[tuple[str, bool]] = [
        (f"code <= {BUDGET_BYTES:,} B gzip ({sizes['snippet']:,} B)", sizes["snippet"] <= BUDGET_BYTES),
        (f"time to banner <= {BUDGET_RATIO} x vanilla ({fastest / vanilla:.2f}x, per-tenant script)",
         fastest <= BUDGET_RATIO * vanilla),
    ]
    at_least: dict[str, Callable[[Any, Any], bool]] = {
        "dialog role + name": lambda a, b: a or not b, "focus moved in": lambda a, b: a or not b,
        "Tabs to first action": lambda a, b: a <= b, "Enter works": lambda a, b: a or not b,
        "focus kept in centre": lambda a, b: a or not b, "axe serious/critical": lambda a, b: a == 0,
    }
    for line, ok in at_least.items():
        checks.append((f"accessibility as vanilla: {line}", ok(ours[line], theirs[line])))
    print()
    for text, ok in checks:
        print(("PASS  " if ok else "FAIL  ") + text)
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
