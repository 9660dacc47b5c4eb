"""Integration numbers, printed (never asserted): record writes per second through two live
service processes (every write also allocates a change-feed position and outbox rows), for one
tenant (the per-tenant counter serialises commits) and spread over four tenants; and the
withdrawal -> webhook latency with the default and a short poll interval.

    CONSENT_BENCH_DB=postgresql+psycopg://postgres@127.0.0.1:5432/bench python bench/integrations.py

The database is wiped and migrated first. Loopback only; bounded in time.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import sqlalchemy as sa

from consent.store import db
from tests.conftest import free_port
from tests.helpers import ADMIN_TOKEN, make_tenant
from tests.receiver import Receiver

SECONDS = float(os.environ.get("CONSENT_BENCH_SECONDS", "8"))
THREADS = int(os.environ.get("CONSENT_BENCH_THREADS", "8"))


def reset(url: str) -> None:
    """Empty the benchmark's own database (CONSENT_BENCH_DB names it) and migrate it."""
    if url.startswith("postgresql"):
        engine = sa.create_engine(url)
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP SCHEMA IF EXISTS public CASCADE")
            conn.exec_driver_sql("CREATE SCHEMA public")
        engine.dispose()
    db.migrate(url)


def serve(url: str, port: int, poll: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "CONSENT_DATABASE_URL": url, "CONSENT_ADMIN_TOKEN": ADMIN_TOKEN, "CONSENT_DEMO": "false",
           "CONSENT_MIGRATE_ON_START": "false", "CONSENT_WEBHOOK_POLL_SECONDS": poll,
           "CONSENT_RATE_LIMIT_PER_MINUTE": "100000000"}
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "consent.web.app:create_app", "--factory", "--port",
                             str(port), "--log-level", "warning"], cwd=ROOT, env=env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    raise SystemExit("server did not start")


def writes(bases: list[str], keys: list[str]) -> float:
    count = [0]
    lock = threading.Lock()
    stop = time.monotonic() + SECONDS

    def run(i: int) -> None:
        key = keys[i % len(keys)]
        with httpx.Client(base_url=bases[i % len(bases)], headers={"Authorization": f"Bearer {key}"}) as c:
            n = 0
            while time.monotonic() < stop:
                r = c.post("/v1/consents", json={"subject": {"email": f"b{i}-{n % 500}@example.com"},
                                                 "purpose": "marketing_email",
                                                 "decision": "granted" if n % 2 else "withdrawn"})
                assert r.status_code == 201, r.text
                n += 1
            with lock:
                count[0] += n

    threads = [threading.Thread(target=run, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return count[0] / SECONDS


def latency(base: str, key: str, receiver: Receiver, n: int = 15) -> list[float]:
    out = []
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}) as c:
        for i in range(n):
            have = len(receiver.requests)
            start = time.monotonic()
            c.post("/v1/consents", json={"subject": {"email": f"lat{i}@example.com"}, "purpose": "marketing_email",
                                         "decision": "withdrawn"})
            receiver.wait_for(have + 1, timeout=15)
            out.append((time.monotonic() - start) * 1000)
            time.sleep(0.3)
    return out


def main() -> None:
    url = os.environ.get("CONSENT_BENCH_DB") or f"sqlite:///{ROOT / 'consent-data' / 'bench.db'}"
    if url.startswith("sqlite"):
        Path(url.split("///", 1)[1]).unlink(missing_ok=True)
    for poll in ("1.0", "0.1"):
        reset(url)
        ports = [free_port(), free_port()]
        procs = [serve(url, p, poll) for p in ports]
        bases = [f"http://127.0.0.1:{p}" for p in ports]
        receiver = Receiver().start()
        try:
            with httpx.Client(base_url=bases[0]) as admin:
                tenants = [make_tenant(admin) for _ in range(4)]  # type: ignore[arg-type]
            if poll == "1.0":
                one = writes(bases, [tenants[0].secret_key])
                four = writes(bases, [t.secret_key for t in tenants])
                print(f"{url.split(':')[0]}: 2 processes x {THREADS} threads, {SECONDS:.0f}s: "
                      f"{one:.0f} records/s (one tenant), {four:.0f} records/s (four tenants)")
            with httpx.Client(base_url=bases[0], headers=tenants[1].h) as c:
                c.post("/v1/webhooks", json={"url": receiver.url}).raise_for_status()
            ms = latency(bases[0], tenants[1].secret_key, receiver)
            print(f"withdrawal -> webhook, poll {poll}s: p50 {statistics.median(ms):.0f} ms, max {max(ms):.0f} ms")
        finally:
            receiver.stop()
            for p in procs:
                p.terminate()
                p.wait(timeout=20)


if __name__ == "__main__":
    main()
