"""Server time of every dashboard page on the benchmark ledger (default 100,000 subjects,
~500,000 records), on SQLite and PostgreSQL.

    .venv/bin/python bench/dashboard_bench.py [--subjects 100000] [--runs 20] [--backend sqlite,postgresql]

The ledger is made by ``bench/ledger.py`` (cached: bench/.cache/dashboard-<N>.db, and a
PostgreSQL database ``consent_dashbench_<N>`` this script creates; ``--drop`` removes it). Each
page is requested ``runs`` times in-process (Starlette's TestClient: no network, so the time is
the server's plus a few hundred microseconds of client); the report gives the median and the
worst per page. The bar is 200 ms.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

import sqlalchemy as sa
from starlette.testclient import TestClient

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import ledger

from consent.settings import Settings
from consent.store import db
from consent.store.models import TABLES
from consent.web.app import create_app

PG_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432"
BAR_MS = 200.0
# Explicit actions, timed too but not page views: the overview's refresh computes the aggregate
# that page views then read (also run after a view finds it older than its maximum age).
ACTIONS = ("overview refresh",)


def pg_database(name: str, *, drop: bool = False) -> str:
    engine = sa.create_engine(f"{PG_SERVER}/postgres", isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        exists = conn.execute(sa.text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}).first()
        if drop and exists:
            conn.exec_driver_sql(f'DROP DATABASE "{name}" WITH (FORCE)')
        elif not exists and not drop:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    engine.dispose()
    return f"{PG_SERVER}/{name}"


def ledgers(subjects: int, backends: list[str]) -> dict[str, dict]:
    cache = HERE / ".cache"
    cache.mkdir(exist_ok=True)
    urls = {"sqlite": f"sqlite:///{cache / f'dashboard-{subjects}.db'}",
            "postgresql": f"{PG_SERVER}/consent_dashbench_{subjects}"}
    meta_file = cache / f"dashboard-{subjects}.json"
    metas = json.loads(meta_file.read_text()) if meta_file.exists() else {}
    missing = [b for b in backends if b not in metas]
    if missing:
        if "postgresql" in missing:
            pg_database(f"consent_dashbench_{subjects}")
        t = time.monotonic()
        print(f"building the ledger ({subjects:,} subjects) on {', '.join(missing)} ...", flush=True)
        built = ledger.build([urls[b] for b in missing], subjects)
        for b in missing:
            metas[b] = {**built[urls[b]], "url": urls[b]}
        meta_file.write_text(json.dumps(metas, default=str))
        print(f"  built in {time.monotonic() - t:.0f} s", flush=True)
    for b in backends:
        db.migrate(metas[b]["url"])
        engine = db.create_db_engine(metas[b]["url"])
        TABLES.create_all(engine)  # tables of the current models a cached ledger lacks (only those)
        engine.dispose()
        ledger.vacuum(metas[b]["url"])
    return metas


def measure(url: str, meta: dict, runs: int) -> dict[str, list[float]]:
    settings = Settings.from_env({"CONSENT_DATABASE_URL": url, "CONSENT_DEMO": "false",
                                  "CONSENT_WEBHOOK_WORKER": "false", "CONSENT_ISSUER": ledger.ISSUER})
    times: dict[str, list[float]] = {}
    with TestClient(create_app(settings)) as c:
        r = c.get("/dashboard/sign-in")
        token = re.search(r'name="csrf" value="([^"]+)"', r.text).group(1)  # type: ignore[union-attr]
        r = c.post("/dashboard/sign-in", data={"csrf": token, "key": meta["secret_key"]}, follow_redirects=False)
        assert r.status_code == 303, r.text
        email = ledger.email_of(meta["subjects"] // 2)
        r = c.get("/dashboard/people", params={"kind": "email", "q": email}, follow_redirects=False)
        assert r.status_code == 303, r.text
        person = r.headers["location"]
        page = c.get(person).text
        csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
        receipt = re.search(r'aria-label="Receipt of [^"]+">([^<]+)<', page).group(1)  # type: ignore[union-attr]
        pages = {
            "overview": lambda: c.get("/dashboard"),
            "overview refresh": lambda: c.post("/dashboard/refresh", data={"csrf": csrf}, follow_redirects=False),
            "policies": lambda: c.get("/dashboard/policies"),
            "exports": lambda: c.get("/dashboard/exports"),
            "webhooks": lambda: c.get("/dashboard/webhooks"),
            "settings": lambda: c.get("/dashboard/settings"),
            "banner": lambda: c.get("/dashboard/banner"),
            "banner preview config": lambda: c.get("/dashboard/banner/preview/v1/snippet/config"),
            "search": lambda: c.get("/dashboard/people", params={"kind": "email", "q": email}, follow_redirects=False),
            "person": lambda: c.get(person),
            "export.json": lambda: c.get(person + "/export.json"),
            "export.md": lambda: c.get(person + "/export.md"),
            "verify (form)": lambda: c.get("/dashboard/verify"),
            "verify (receipt)": lambda: c.post("/dashboard/verify", data={"csrf": csrf, "receipt": receipt}),
            "audit": lambda: c.get("/dashboard/audit"),
            "users": lambda: c.get("/dashboard/users"),
            "landing": lambda: c.get("/"),
            "docs": lambda: c.get("/docs"),
        }
        for name, call in pages.items():
            call()  # warm: templates compiled, caches filled
            samples = []
            for _ in range(runs):
                t = time.perf_counter()
                r = call()
                samples.append((time.perf_counter() - t) * 1000)
                assert r.status_code in (200, 303), (name, r.status_code, r.text[:300])
            times[name] = samples
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subjects", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--backend", default="sqlite,postgresql")
    ap.add_argument("--drop", action="store_true", help="drop this script's PostgreSQL database and exit")
    args = ap.parse_args()
    if args.drop:
        pg_database(f"consent_dashbench_{args.subjects}", drop=True)
        meta_file = HERE / ".cache" / f"dashboard-{args.subjects}.json"
        if meta_file.exists():  # the next run builds the PostgreSQL ledger again
            metas = json.loads(meta_file.read_text())
            metas.pop("postgresql", None)
            meta_file.write_text(json.dumps(metas, default=str))
        return
    backends = [b.strip() for b in args.backend.split(",") if b.strip()]
    metas = ledgers(args.subjects, backends)
    worst = 0.0
    for b in backends:
        meta = metas[b]
        print(f"\n{b}: {meta['subjects']:,} subjects, {meta['records']:,} records, {args.runs} runs per page")
        print(f"  {'page':<18} {'median ms':>10} {'max ms':>10}")
        for name, samples in measure(meta["url"], meta, args.runs).items():
            med, top = statistics.median(samples), max(samples)
            if name not in ACTIONS:
                worst = max(worst, med)
            over = "  OVER" if med > BAR_MS and name not in ACTIONS else ""
            print(f"  {name:<18} {med:>10.1f} {top:>10.1f}{over}{'  (an action, not a page view)' if name in ACTIONS else ''}")
    print(f"\nslowest median {worst:.1f} ms (bar {BAR_MS:.0f} ms)")


if __name__ == "__main__":
    main()
