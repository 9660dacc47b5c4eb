"""Streaming export benchmark: a million-record ledger through a live server, with the
server's RSS sampled while it streams (it must stay flat) and records/s printed.

    .venv/bin/python bench/export_bench.py                      # 1,000,000 records, SQLite
    .venv/bin/python bench/export_bench.py --records 200000 --database-url postgresql+psycopg://...
    .venv/bin/python bench/export_bench.py --verify             # also time `consent verify`

Rows are generated with real hashes, chains and signed receipts, with bulk inserts in
parallel worker processes (not through the API). PostgreSQL databases are wiped first.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from consent import db  # noqa: E402
from tests.ledger_factory import generate_ledger  # noqa: E402

ADMIN = "adm_bench_token_0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_kb(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _work(args: tuple[str, str, int, int]) -> int:
    url, tenant_id, n, seed = args
    engine = db.create_db_engine(url)
    try:
        return generate_ledger(engine, tenant_id, n, group=200)
    finally:
        engine.dispose()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=1_000_000)
    p.add_argument("--database-url", help="default: a fresh SQLite file in a temp directory")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="generator processes")
    p.add_argument("--verify", action="store_true", help="also run `consent verify` on the export")
    p.add_argument("--timeout", type=float, default=1800, help="give up after this many seconds")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="export-bench-"))
    url = args.database_url or f"sqlite:///{tmp / 'consent.db'}"
    if url.startswith("postgresql"):
        import sqlalchemy as sa

        eng = sa.create_engine(url)
        with eng.begin() as conn:
            conn.exec_driver_sql("DROP SCHEMA IF EXISTS public CASCADE")
            conn.exec_driver_sql("CREATE SCHEMA public")
        eng.dispose()
    db.migrate(url)
    port = free_port()
    env = {**os.environ, "CONSENT_DATABASE_URL": url, "CONSENT_ADMIN_TOKEN": ADMIN, "CONSENT_DEMO": "false",
           "CONSENT_LOG_LEVEL": "warning"}
    server = subprocess.Popen([sys.executable, "-m", "uvicorn", "consent.app:create_app", "--factory",
                               "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
                              env=env, cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        admin = {"Authorization": f"Bearer {ADMIN}"}
        t = httpx.post(f"{base}/v1/tenants", headers=admin, json={"name": "Bench", "notice_days": 0}).json()
        key = {"Authorization": f"Bearer {t['keys']['secret_key']}"}
        for purpose in ("marketing_email", "analytics"):
            httpx.put(f"{base}/v1/purposes/{purpose}", headers=key, json={"kind": "consent"}).raise_for_status()
        httpx.post(f"{base}/v1/policies/privacy/versions", headers=key, json={
            "version": "v1", "document_url": "https://bench.test/p", "document_sha256": "0" * 64,
            "purposes": ["marketing_email", "analytics"]}).raise_for_status()

        t0 = time.perf_counter()
        per = -(-args.records // args.workers)
        jobs = [(url, t["id"], min(per, args.records - i * per), i) for i in range(args.workers)]
        with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
            made = sum(pool.map(_work, [j for j in jobs if j[2] > 0]))
        gen_s = time.perf_counter() - t0
        print(f"generated {made:,} records in {gen_s:.1f}s ({made / gen_s:,.0f}/s, {args.workers} workers)")

        rss_before = rss_kb(server.pid)
        samples: list[tuple[int, int]] = []
        lines = 0
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.5):
                samples.append((lines, rss_kb(server.pid)))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        out = tmp / "export.jsonl"
        t0 = time.perf_counter()
        with httpx.stream("GET", f"{base}/v1/exports/consents", headers=key, timeout=args.timeout) as r, \
                open(out, "wb") as f:
            r.raise_for_status()
            for chunk in r.iter_raw():
                f.write(chunk)
                lines += chunk.count(b"\n")
                if time.perf_counter() - t0 > args.timeout:
                    raise SystemExit("export exceeded --timeout")
        export_s = time.perf_counter() - t0
        done.set()
        sampler.join()
        records = lines - 1
        peak = rss_kb(server.pid, "VmHWM")
        print(f"exported {records:,} records ({out.stat().st_size / 1e6:,.0f} MB) in {export_s:.1f}s: "
              f"{records / export_s:,.0f} records/s")
        print(f"server RSS before export {rss_before / 1024:.0f} MiB, peak (VmHWM) {peak / 1024:.0f} MiB")
        for frac in (0.1, 0.25, 0.5, 0.75, 1.0):
            at = [s for s in samples if s[0] >= frac * records * 0.999]
            if at:
                print(f"  RSS at {at[0][0]:>9,} lines: {at[0][1] / 1024:.0f} MiB")
        if args.verify:
            (tmp / "jwks.json").write_bytes(httpx.get(f"{base}/.well-known/jwks.json").content)
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "consent.cli", "verify", str(out), "--jwks",
                                   str(tmp / "jwks.json")], capture_output=True, text=True, cwd=ROOT)
            verify_s = time.perf_counter() - t0
            status = "ok" if proc.returncode == 0 else f"FAILED: {proc.stderr.strip()}"
            print(f"consent verify: {status} in {verify_s:.1f}s ({records / verify_s:,.0f} records/s)")
    finally:
        server.terminate()
        server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
