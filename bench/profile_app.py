"""CPU cost per request of one route, in process (no network, no load generator): the number
to watch while optimising on a busy machine. Optionally under cProfile.

    .venv/bin/python bench/profile_app.py check|record|bulk|snippet|snippet304 [--backend sqlite|postgresql] [--n 2000] [--concurrency 1] [--profile] [--db-cpu]

Uses the cached ledger of `bench/run.py --quick` (run that once first), or with
`--ledger full` the one of `bench/run.py`.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import pstats
import random
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from consent.logs import configure
from consent.settings import Settings
from consent.web.app import create_app

LAST_HEADERS: dict[str, str] = {}  # of the last response


async def call(app: Any, method: str, path: str, query: str, headers: dict[str, str], body: bytes = b"") -> tuple[int, bytes]:
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": query.encode(),
             "root_path": "", "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]
             + ([(b"content-length", str(len(body)).encode())] if body else []),
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    sent = False
    status = 0
    chunks: list[bytes] = []
    LAST_HEADERS.clear()

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(msg: dict[str, Any]) -> None:
        nonlocal status
        if msg["type"] == "http.response.start":
            status = msg["status"]
            LAST_HEADERS.update({k.decode(): v.decode() for k, v in msg.get("headers", [])})
        elif msg["type"] == "http.response.body":
            chunks.append(msg.get("body", b""))

    await app(scope, receive, send)
    return status, b"".join(chunks)


def postgres_cpu() -> float:
    """Seconds of CPU used so far by this machine's running PostgreSQL processes (backends
    and background workers): read from /proc, so only for a server on this machine."""
    import os

    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        name, rest = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
        if name.startswith("postgres"):
            total += int(rest[11]) + int(rest[12])  # utime + stime
    return total / tick


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("route", choices=["check", "record", "bulk", "snippet", "snippet304"])
    p.add_argument("--backend", default="sqlite")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--log-level", default="warning", help="info: with the JSON access log (default of the service)")
    p.add_argument("--statements", action="store_true", help="print the statements of one request")
    p.add_argument("--sync", action="store_true",
                   help="run threadpool work on the calling thread, so cProfile sees the handler")
    p.add_argument("--sort", default="cumulative", choices=["cumulative", "tottime"])
    p.add_argument("--ledger", default="quick", choices=["quick", "full"], help="which cached ledger of bench/run.py")
    p.add_argument("--concurrency", type=int, default=1,
                   help="requests in flight at once (the fast paths batch them, as under load)")
    p.add_argument("--db-cpu", action="store_true",
                   help="also the CPU of this machine's PostgreSQL processes per request (local server only)")
    args = p.parse_args()
    if args.sync or args.profile:
        import consent.web.http

        async def direct(fn: Any, *a: Any) -> Any:
            return fn(*a)

        consent.web.http.run_in_threadpool = direct  # type: ignore[assignment]
    meta = json.loads((HERE / ".cache" / f"ledger-{args.ledger}.json").read_text())[args.backend]
    settings = Settings.from_env({**os.environ, "CONSENT_DATABASE_URL": meta["url"], "CONSENT_DEMO": "false",
                                  "CONSENT_MIGRATE_ON_START": "false", "CONSENT_LOG_LEVEL": args.log_level,
                                  "CONSENT_RATE_LIMIT_PER_MINUTE": "100000000",  # as bench/run.py
                                  "CONSENT_RATE_LIMIT_IP_PER_MINUTE": "100000000"})
    configure(args.log_level)  # as `consent serve` does (the access log goes to stderr)
    app = create_app(settings)
    auth = {"authorization": f"Bearer {meta['secret_key']}"}
    n = args.n if args.route != "bulk" else max(1, args.n // 1000)
    public = {"authorization": f"Bearer {meta['publishable_key']}"}
    etag: dict[str, str] = {}  # snippet304: the If-None-Match header, once the ETag is known

    def make() -> tuple[str, str, str, dict[str, str], bytes]:
        i = random.randrange(meta["subjects"])
        if args.route == "check":
            return "GET", "/v1/check", f"purpose=marketing_email&email=user{i}%40bench.example", auth, b""
        if args.route.startswith("snippet"):
            return "GET", "/v1/snippet/config", "", {**public, **etag}, b""
        if args.route == "record":
            body = json.dumps({"subject": {"email": f"user{i}@bench.example"}, "purpose": "analytics",
                               "decision": random.choice(["granted", "denied"])}).encode()
            return "POST", "/v1/consents", "", {**auth, "content-type": "application/json"}, body
        body = json.dumps({"purpose": "marketing_email",
                           "emails": [f"user{j}@bench.example" for j in range(100_000)]}).encode()
        return "POST", "/v1/check", "", {**auth, "content-type": "application/json"}, body

    async with app.router.lifespan_context(app):
        for _ in range(20):
            status, out = await call(app, *make())
            assert status in (200, 201, 304), out[:300]
            if args.route == "snippet304":
                etag["if-none-match"] = LAST_HEADERS["etag"]
        if args.statements:  # what one request sends to the database, BEGIN/COMMIT included
            import sqlalchemy as sa

            sent: list[str] = []
            engine = app.state.services.engine
            hooks = {"before_cursor_execute": lambda *a: sent.append(" ".join(a[2].split())[:110]),
                     "begin": lambda *a: sent.append("BEGIN"), "commit": lambda *a: sent.append("COMMIT"),
                     "rollback": lambda *a: sent.append("ROLLBACK")}
            for name, fn in hooks.items():
                sa.event.listen(engine, name, fn)
            await call(app, *make())
            for name, fn in hooks.items():
                sa.event.remove(engine, name, fn)
            print(f"{len(sent)} statements:")
            for line in sent:
                print("  " + line)
        prof = cProfile.Profile() if args.profile else None
        db_cpu = postgres_cpu() if args.db_cpu else 0.0
        wall, cpu = time.perf_counter(), time.process_time()
        if prof:
            prof.enable()
        c = max(1, args.concurrency)
        n = max(1, n // c) * c
        for _ in range(n // c):
            if c == 1:
                await call(app, *make())
            else:
                await asyncio.gather(*[call(app, *make()) for _ in range(c)])
        if prof:
            prof.disable()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        db_cpu = postgres_cpu() - db_cpu if args.db_cpu else 0.0
    print(f"{args.route} on {args.backend}: {cpu / n * 1e6:,.0f} us CPU and {wall / n * 1e6:,.0f} us wall per request"
          + (f", {db_cpu / n * 1e6:,.0f} us CPU in PostgreSQL" if args.db_cpu else ""))
    if prof:
        pstats.Stats(prof).sort_stats(args.sort).print_stats(40)


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main())
