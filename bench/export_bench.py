"""Streaming export benchmark: a million-record ledger through a live server, with the
server's RSS sampled while it streams (it must stay flat) and records/s printed.

    .venv/bin/python bench/export_bench.py                      # 1,000,000 records, SQLite
    .venv/bin/python bench/export_bench.py --records 200000 --database-url postgresql+psycopg://...
    .venv/bin/python bench/export_bench.py --verify             # also time `consent verify`
    .venv/bin/python bench/export_bench.py --data-dir /tmp/eb --reuse   # keep / reuse the ledger

Rows are generated with real hashes, chains and signed receipts, with bulk inserts in
parallel worker processes (not through the API). PostgreSQL databases are wiped first, unless
``--reuse`` finds the ledger of an earlier run there (a tenant "Bench" with exactly --records
records): then its keys are rotated through the admin route and generation is skipped.
Everything is bounded by ``--timeout``; the server and the verifier are separate processes
whose peak RSS (VmHWM / ru_maxrss) is printed next to records/s.
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

from ledger import reset  # bench/ledger.py

from consent.store import db
from tests.ledger_factory import generate_ledger

ADMIN = "adm_bench_token_0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (a measure that other load on the machine
    does not inflate much, unlike wall time)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kb(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _work(args: tuple[str, str, int, int]) -> int:
    url, tenant_id, n, _seed = args
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
    p.add_argument("--data-dir", help="where the SQLite ledger and the export file go (default: a temp dir)")
    p.add_argument("--reuse", action="store_true", help="reuse the ledger of an earlier run when it matches")
    args = p.parse_args()
    tmp = Path(args.data_dir or tempfile.mkdtemp(prefix="export-bench-"))
    tmp.mkdir(parents=True, exist_ok=True)
    url = args.database_url or f"sqlite:///{tmp / 'consent.db'}"
    reuse_id = existing_ledger(url, args.records) if args.reuse else None
    if reuse_id is None:
        reset(url)  # an empty database, migrated
    else:
        db.migrate(url)
    port = free_port()
    env = {**os.environ, "CONSENT_DATABASE_URL": url, "CONSENT_ADMIN_TOKEN": ADMIN, "CONSENT_DEMO": "false",
           "CONSENT_LOG_LEVEL": "warning"}
    server = subprocess.Popen([sys.executable, "-m", "uvicorn", "consent.web.app:create_app", "--factory",
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
        if reuse_id is not None:
            r = httpx.post(f"{base}/v1/tenants/{reuse_id}/keys/rotate", headers=admin, json={"kind": "secret"})
            r.raise_for_status()
            key = {"Authorization": f"Bearer {r.json()['secret_key']}"}
            print(f"reusing the ledger of {args.records:,} records in {url.split('@')[-1]}")
        else:
            key = make_ledger(base, admin, url, args.records, args.workers)
        export_and_verify(base, key, server.pid, tmp, args)
    finally:
        server.terminate()
        server.wait(timeout=30)
    return 0


def existing_ledger(url: str, records: int) -> str | None:
    """The id of the bench tenant of an earlier run when it holds exactly ``records`` records."""
    import sqlalchemy as sa

    if url.startswith("sqlite") and not Path(url.split("///", 1)[-1]).exists():
        return None
    eng = sa.create_engine(url)
    try:
        with eng.connect() as conn:
            row = conn.execute(sa.text(
                "SELECT t.id, (SELECT count(*) FROM consent_record r WHERE r.tenant_id = t.id) "
                "FROM tenant t WHERE t.name = 'Bench'")).first()
    except sa.exc.DBAPIError:
        return None
    finally:
        eng.dispose()
    return str(row[0]) if row is not None and row[1] == records else None


def analyze(url: str) -> None:
    """Table statistics, as a live database has them (autovacuum): without them PostgreSQL may
    plan a bulk-loaded ledger as if it were empty."""
    import sqlalchemy as sa

    eng = sa.create_engine(url)
    try:
        with eng.begin() as conn:
            conn.exec_driver_sql("ANALYZE")
    finally:
        eng.dispose()


def make_ledger(base: str, admin: dict[str, str], url: str, records: int, workers: int) -> dict[str, str]:
    t = httpx.post(f"{base}/v1/tenants", headers=admin, json={"name": "Bench", "notice_days": 0}).json()
    key = {"Authorization": f"Bearer {t['keys']['secret_key']}"}
    for purpose in ("marketing_email", "analytics"):
        httpx.put(f"{base}/v1/purposes/{purpose}", headers=key, json={"kind": "consent"}).raise_for_status()
    httpx.post(f"{base}/v1/policies/privacy/versions", headers=key, json={
        "version": "v1", "document_url": "https://bench.test/p", "document_sha256": "0" * 64,
        "purposes": ["marketing_email", "analytics"]}).raise_for_status()

    t0 = time.perf_counter()
    per = -(-records // workers)
    jobs = [(url, t["id"], min(per, records - i * per), i) for i in range(workers)]
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        made = sum(pool.map(_work, [j for j in jobs if j[2] > 0]))
    gen_s = time.perf_counter() - t0
    print(f"generated {made:,} records in {gen_s:.1f}s ({made / gen_s:,.0f}/s, {workers} workers)")
    analyze(url)
    return key


def export_and_verify(base: str, key: dict[str, str], server_pid: int, tmp: Path, args: argparse.Namespace) -> None:
    rss_before = rss_kb(server_pid)
    samples: list[tuple[int, int]] = []
    lines = 0
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.5):
            samples.append((lines, rss_kb(server_pid)))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out = tmp / "export.jsonl"
    cpu0 = cpu_seconds(server_pid)
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
    server_cpu = cpu_seconds(server_pid) - cpu0
    done.set()
    sampler.join()
    records = lines - 1
    peak = rss_kb(server_pid, "VmHWM")
    print(f"exported {records:,} records ({out.stat().st_size / 1e6:,.0f} MB) in {export_s:.1f}s: "
          f"{records / export_s:,.0f} records/s")
    print(f"server CPU {server_cpu:.1f}s ({server_cpu / max(records, 1) * 1e6:.1f} us/record); "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"server RSS before export {rss_before / 1024:.0f} MiB, peak (VmHWM) {peak / 1024:.0f} MiB")
    for frac in (0.1, 0.25, 0.5, 0.75, 1.0):
        at = [s for s in samples if s[0] >= frac * records * 0.999]
        if at:
            print(f"  RSS at {at[0][0]:>9,} lines: {at[0][1] / 1024:.0f} MiB")
    if args.verify:
        (tmp / "jwks.json").write_bytes(httpx.get(f"{base}/.well-known/jwks.json").content)
        t0 = time.perf_counter()
        with open(tmp / "verify.err", "wb") as err:
            proc = subprocess.Popen([sys.executable, "-m", "consent.cli.main", "verify", str(out), "--jwks",
                                     str(tmp / "jwks.json")], stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT)
            killer = threading.Timer(args.timeout, proc.kill)
            killer.start()
            _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS
            killer.cancel()
        verify_s = time.perf_counter() - t0
        code = os.waitstatus_to_exitcode(status)
        result = "ok" if code == 0 else f"FAILED ({code}): {(tmp / 'verify.err').read_text().strip()}"
        print(f"consent verify: {result} in {verify_s:.1f}s ({records / verify_s:,.0f} records/s), "
              f"peak RSS {usage.ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    sys.exit(main())
