"""Snippet size and speed: gzip/brotli size of client-snippet/dist/snippet.js, and the time
from navigation start to the banner being visible in headless Chromium, against a live local
service (uvicorn on 127.0.0.1, SQLite in a temp dir) and a page on another local origin.

    .venv/bin/python bench/snippet_bench.py [--runs 15] [--chromium /usr/bin/chromium]

"cold": a fresh browser context per run (no cache: snippet.js, config, banner).
"warm": a reload in the same context without answering (snippet.js from the HTTP cache,
config revalidated with If-None-Match -> 304). Prints numbers; asserts nothing.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
DIST = ROOT / "client-snippet" / "dist" / "snippet.js"
ADMIN = "adm_bench_token_0123456789"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
# performance.now() counts from navigation start; record it at the first frame after the banner exists
PROBE = """new MutationObserver((_, o) => { if (document.getElementById('cns-banner')) { o.disconnect();
  requestAnimationFrame(() => { window.__banner = performance.now(); }); } })
  .observe(document, {childList: true, subtree: true});"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def brotli_size(data: bytes) -> str:
    try:
        import brotli  # type: ignore[import-not-found]

        return f"{len(brotli.compress(data, quality=11))} B"
    except ImportError:
        pass
    node = shutil.which("node")
    if node:
        script = ("const z=require('zlib');let b=[];process.stdin.on('data',d=>b.push(d))"
                  ".on('end',()=>console.log(z.brotliCompressSync(Buffer.concat(b)).length))")
        out = subprocess.run([node, "-e", script], input=data, capture_output=True, timeout=30, check=False)
        if out.returncode == 0:
            return f"{out.stdout.decode().strip()} B (node zlib)"
    return "n/a (no brotli module or node)"


def sizes() -> None:
    raw = DIST.read_bytes()
    print(f"snippet.js: raw {len(raw)} B, gzip -9 {len(gzip.compress(raw, 9))} B, brotli {brotli_size(raw)}")
    print(f"  sha256 {hashlib.sha256(raw).hexdigest()[:16]}…  (budget: 4096 B gzip)")


def setup_tenant(api: str, page_origin: str) -> str:
    h = {"Authorization": f"Bearer {ADMIN}"}
    with httpx.Client(base_url=api, timeout=10) as c:
        r = c.post("/v1/tenants", headers=h, json={"name": "Bench", "allowed_origins": [page_origin], "notice_days": 0})
        r.raise_for_status()
        keys = r.json()["keys"]
        sk = {"Authorization": f"Bearer {keys['secret_key']}"}
        for key, spec in {"strictly_necessary": {"kind": "notice", "legal_basis": "legitimate_interest"},
                          "marketing_email": {"kind": "consent", "gpc": True}, "analytics": {"kind": "consent"}}.items():
            c.put(f"/v1/purposes/{key}", headers=sk, json={**spec, "title": key}).raise_for_status()
        c.put("/v1/cookies/session", headers=sk, json={"provider": "bench.test", "purpose": "strictly_necessary",
                                                       "http_only": True, "lifetime": "session"}).raise_for_status()
        c.post("/v1/policies/privacy/versions", headers=sk, json={
            "version": "v1", "document_url": "https://bench.test/privacy", "document_sha256": "0" * 64,
            "purposes": ["strictly_necessary", "marketing_email", "analytics"]}).raise_for_status()
        return str(keys["publishable_key"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=15, help="runs per mode (1-100)")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    args = ap.parse_args()
    runs = max(1, min(args.runs, 100))
    sizes()

    from playwright.sync_api import sync_playwright

    tmp = tempfile.mkdtemp(prefix="snippet-bench-")
    port, page_port = free_port(), free_port()
    api, page_origin = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{page_port}"
    env = {**os.environ, "CONSENT_DATABASE_URL": f"sqlite:///{tmp}/bench.db", "CONSENT_ADMIN_TOKEN": ADMIN,
           "CONSENT_DEMO": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "consent.app:create_app", "--factory", "--host",
                             "127.0.0.1", "--port", str(port), "--log-level", "warning"], env=env, cwd=ROOT)
    pages: ThreadingHTTPServer | None = None
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(api + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    print("the service did not start", file=sys.stderr)
                    return 1
                time.sleep(0.1)
        key = setup_tenant(api, page_origin)
        page = (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Bench</title>'
                f'<script src="{api}/snippet.js" data-key="{key}" async></script></head>'
                f"<body><h1>Page</h1><p>{'Text. ' * 200}</p></body></html>").encode()

        class Page(BaseHTTPRequestHandler):
            def log_message(self, *a: Any) -> None:
                pass

            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(page)))
                self.end_headers()
                self.wfile.write(page)

        pages = ThreadingHTTPServer(("127.0.0.1", page_port), Page)
        threading.Thread(target=pages.serve_forever, daemon=True).start()
        cold: list[float] = []
        warm: list[float] = []
        dcl: list[float] = []
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=ARGS)
            for i in range(runs + 1):  # the first run warms up the service and Chromium; not counted
                ctx = browser.new_context()
                ctx.set_default_timeout(10_000)
                ctx.add_init_script(PROBE)
                tab = ctx.new_page()
                tab.goto(page_origin + "/")
                tab.wait_for_function("window.__banner !== undefined")
                if i:
                    cold.append(tab.evaluate("window.__banner"))
                    dcl.append(tab.evaluate("performance.getEntriesByType('navigation')[0].domContentLoadedEventEnd"))
                    tab.reload()
                    tab.wait_for_function("window.__banner !== undefined")
                    warm.append(tab.evaluate("window.__banner"))
                ctx.close()
            browser.close()

        def line(name: str, xs: list[float]) -> str:
            xs = sorted(xs)
            p90 = xs[min(len(xs) - 1, round(0.9 * (len(xs) - 1)))]
            return f"{name:<34} median {statistics.median(xs):7.1f} ms   p90 {p90:7.1f} ms   min {xs[0]:7.1f} ms"

        print(f"navigation -> banner visible, headless Chromium, {runs} runs each, loopback:")
        print(line("cold (new context)", cold))
        print(line("warm (reload, 304 config)", warm))
        print(line("for scale: DOMContentLoaded (cold)", dcl))
        return 0
    finally:
        if pages is not None:
            pages.shutdown()
            pages.server_close()
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
