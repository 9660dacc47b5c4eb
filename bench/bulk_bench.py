"""The bulk check on ledgers of 100,000 and 1,000,000 subjects, SQLite and PostgreSQL, through
a live `consent serve`, with the query plans.

    .venv/bin/python bench/bulk_bench.py                                  # both sizes, both backends
    .venv/bin/python bench/bulk_bench.py --subjects 1000000 --backends postgresql --runs 7

Each cell starts the service as a user does (`consent serve --workers 1`, its defaults, access
log on) and times POST /v1/check with 100,000 emails: a warm-up call, then ``--runs`` calls;
the median counts. The addresses are distinct subjects drawn from the whole ledger, in random
order (bench/run.py ``bulk_emails``). Baseline, measured right before each cell: bare Starlette
at its best settings (httptools, uvloop, no access log) parsing the same body with orjson and
answering the same-shaped list. Then the plans: the bulk check run in process, and its
statement again in the same transaction, under EXPLAIN (ANALYZE, BUFFERS) on PostgreSQL and
EXPLAIN QUERY PLAN (with its time) on SQLite.

Ledgers: 100,000 subjects is bench/run.py's full ledger (bench/.cache/ledger-full.db, database
bench_perf); 1,000,000 subjects (one record each, bench/run.py ``MILLION``) is made once into
bench/.cache/ledger-1m.db and the database bench_perf_1m (about 10 GB for both, 7 minutes on 2
cores). PostgreSQL needs CONSENT_SECRET_KEYS, as `consent serve` does. The whole run stops
after ``--limit`` seconds, ledger generation included.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import run  # bench/run.py

PROFILES = {p.subjects: p for p in (run.QUICK, run.FULL, run.MILLION)}
PURPOSE = "marketing_email"


# --- the baseline: bare Starlette, the same body in and the same shape out -------------------

async def _echo(request: Request) -> Response:
    emails = orjson.loads(await request.body())["emails"]
    results = [{"id": e, "allowed": False, "status": "none"} for e in emails]
    return Response(orjson.dumps({"purpose": PURPOSE, "count": len(results), "allowed_count": 0,
                                  "results": results}), media_type="application/json")


async def _ok(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


echo_app = Starlette(routes=[Route("/", _ok), Route("/echo", _echo, methods=["POST"])])


def echo_seconds(body: bytes, runs: int, tmp: Path) -> float:
    port = run.free_port()
    cmd = [sys.executable, "-m", "uvicorn", "bulk_bench:echo_app", "--host", "127.0.0.1", "--port", str(port),
           "--http", "httptools", "--loop", "uvloop", "--no-access-log", "--log-level", "warning"]
    server = run.Server(cmd, port, 1, {}, HERE, "/", tmp / f"echo-{port}.log")
    try:
        times, _ = run.time_posts(server.base + "/echo", body, {}, runs)
    finally:
        server.stop()
    return statistics.median(times)


# --- the plans ------------------------------------------------------------------------------

_KEYS = re.compile(r"'\{[^']{100,}\}'")  # the keys' array in a plan line


def plan(kind: str, meta: dict[str, Any], emails: list[str]) -> str:
    """The bulk check run in process on the ledger (``checks.bulk_check``, as the route calls
    it), then its bulk statement again in the same transaction (same settings) under EXPLAIN:
    on PostgreSQL as a prepared statement, so that the plan shown is the one the settings choose
    (generic or custom), with the same parameters."""
    import psycopg
    import sqlalchemy as sa

    from consent.ledger import checks, statements
    from consent.ledger.tenants import TenantRef
    from consent.store import db

    engine = db.create_db_engine(meta["url"])
    sent: list[tuple[str, Any]] = []
    bulk = list(statements.BULK.values())

    def capture(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
        if any(getattr(context.compiled, "statement", None) is b for b in bulk):
            sent.append((statement, parameters))

    try:
        with db.transaction(engine) as s:
            sa.event.listen(engine, "before_cursor_execute", capture)
            t = time.perf_counter()
            checks.bulk_check(s, TenantRef(meta["tenant_id"], meta["hash_key"]), purpose=PURPOSE,
                              emails=emails, subjects=None)
            whole = time.perf_counter() - t
            sa.event.remove(engine, "before_cursor_execute", capture)
            statement, params = sent[0]
            cursor = s.connection().connection.driver_connection.cursor()  # type: ignore[union-attr]
            head = f"{len(sent)} bulk statement(s); bulk_check in process {whole:.2f} s\n"
            if kind == "postgresql":
                names: list[str] = []
                numbered = re.sub(r"%\((\w+)\)s", lambda m: f"${_number(names, m.group(1))}", statement)
                cursor.execute(f"PREPARE bulk_plan AS {numbered}")
                types = cursor.execute("SELECT parameter_types::text[] FROM pg_prepared_statements "
                                       "WHERE name = 'bulk_plan'").fetchone()[0]
                cursor = psycopg.ClientCursor(cursor.connection)  # EXPLAIN takes no bound parameters
                cursor.execute(f"EXPLAIN (ANALYZE, BUFFERS) EXECUTE bulk_plan({', '.join(f'%s::{t}' for t in types)})",
                               [params[n] for n in names])
                lines = [_KEYS.sub("'{...}'", r[0]) for r in cursor.fetchall()]
                cursor.execute("DEALLOCATE bulk_plan")
                return head + "\n".join(lines)
            cursor.execute("EXPLAIN QUERY PLAN " + statement, params)
            rows = cursor.fetchall()
            t = time.perf_counter()
            cursor.execute(statement, params).fetchall()
            took = time.perf_counter() - t
            return head + "\n".join(f"{r[0]:>3} {r[1]:>3} {r[3]}" for r in rows) + f"\n(the statement: {took:.3f} s)"
    finally:
        engine.dispose()


def _number(names: list[str], name: str) -> int:
    """The position of a named parameter in a $n statement (first use numbers it)."""
    if name not in names:
        names.append(name)
    return names.index(name) + 1


# --- the run --------------------------------------------------------------------------------

def _stop(signum: int, frame: Any) -> None:
    raise SystemExit(f"stopped by signal {signum} (--limit reached?)")  # servers stop in their finally blocks


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--subjects", default="100000,1000000",
                   help=f"comma list of ledger sizes, from {', '.join(map(str, PROFILES))}")
    p.add_argument("--backends", default="sqlite,postgresql")
    p.add_argument("--runs", type=int, default=5, help="timed calls per cell, after one warm-up call")
    p.add_argument("--workers", type=int, default=1, help="consent serve --workers")
    p.add_argument("--no-plans", action="store_true")
    p.add_argument("--rebuild", action="store_true", help="generate the ledgers again")
    p.add_argument("--limit", type=int, default=3600, help="seconds before the whole run stops")
    args = p.parse_args(argv)
    sizes = [int(x) for x in args.subjects.split(",") if x.strip()]
    if unknown := set(sizes) - set(PROFILES):
        p.error(f"no ledger of {unknown} subjects")
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    signal.signal(signal.SIGTERM, _stop)
    timer = threading.Timer(args.limit, lambda: os.kill(os.getpid(), signal.SIGTERM))
    timer.daemon = True
    timer.start()
    rows: list[tuple[int, str, float, float, list[float]]] = []
    plans: list[tuple[int, str, str]] = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for size in sizes:
            profile = dataclasses.replace(PROFILES[size], bulk_calls=args.runs)
            metas = run.ledgers(profile, args.rebuild)
            emails = run.bulk_emails(size)
            body = orjson.dumps({"purpose": PURPOSE, "emails": emails})
            for kind in backends:
                echo = echo_seconds(body, args.runs, tmp)
                run.log(f"{size:,} subjects, {kind}: echo baseline {echo:.3f} s; consent serve ...")
                try:  # a failing cell must not lose the cells measured before it
                    results = run.bench_service(kind, args.workers, metas[kind], profile, tmp, tests=("bulk",))
                except Exception as exc:  # noqa: BLE001 (reported in the table)
                    run.log(f"  failed: {type(exc).__name__}: {exc}"[:300])
                    rows.append((size, kind, float("nan"), echo, []))
                    continue
                cell = next(r for r in results if "seconds" in r.values)
                rows.append((size, kind, cell.values["seconds"], echo, cell.values["times"]))
                run.log(f"  {cell.note}")
                if not args.no_plans:
                    plans.append((size, kind, plan(kind, metas[kind], emails)))
    print(f"POST /v1/check with {run.BULK_EMAILS:,} emails, `consent serve --workers {args.workers}` "
          f"(median of {args.runs} calls after a warm-up); baseline: bare Starlette echoing the same body\n")
    print("| subjects | backend | seconds (median) | calls | echo baseline | x baseline | <= 1 s |")
    print("|---|---|---|---|---|---|---|")
    for size, kind, sec, echo, times in rows:
        calls = " ".join(f"{t:.2f}" for t in times)
        print(f"| {size:,} | {kind} | {sec:.3f} | {calls or 'failed'} | {echo:.3f} | {sec / echo:.1f} | "
              f"{'PASS' if sec <= 1 else 'FAIL'} |")
    for size, kind, text in plans:
        print(f"\n## plan: {size:,} subjects, {kind}\n\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
