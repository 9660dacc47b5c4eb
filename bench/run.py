"""The benchmark: bare Starlette vs the service (SQLite, PostgreSQL; 1 and 2 workers), one run.

    .venv/bin/python bench/run.py            # full: 100,000 subjects / ~500,000 records
    .venv/bin/python bench/run.py --quick    # 10,000 subjects / ~50,000 records, short runs

The service runs as a user starts it, `consent serve` with its defaults (its uvicorn settings,
its JSON access log, written to a file); bare Starlette runs at the framework's best settings
(uvicorn with httptools, uvloop, no access log). Both listen on 127.0.0.1. PostgreSQL needs
CONSENT_SECRET_KEYS in the environment, as `consent serve` does. Load comes from `wrk`
(installed with apt-get if missing) and, for the bulk check and the export, from this process:
httpx for the bulk check, a plain socket reader for the export (then httpx again, for
comparison). Every run is bounded (wrk -d, socket and httpx timeouts). Prints one table and
writes bench/RESULTS.md. The generated ledgers are cached in bench/.cache (SQLite) and the PostgreSQL
databases bench_perf / bench_perf_quick (bench/bulk_bench.py's 1,000,000-subject ledger:
bench_perf_1m); --rebuild makes them again. See docs/bench.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

import ledger

from consent.store import db

PG_BASE = os.environ.get("BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432")
ADMIN_TOKEN = "adm_bench_0123456789abcdef"
# Bumped when rows the current code writes differ from a cached ledger's: 2 = consent_record
# rows whole on PostgreSQL (migration 0011 changes only rows written after it).
CACHE_VERSION = 2
HARD_LIMIT_S = 15 * 60  # the whole run stops here, whatever happens
DB_SUFFIX = os.environ.get("BENCH_DB_SUFFIX", "")  # own ledgers for runs from several checkouts at once


@dataclass
class Profile:
    name: str
    subjects: int
    warmup: int  # seconds (wrk takes whole seconds)
    duration: int
    bulk_calls: int
    history: bool = True  # ledger.build's shape: about 5 records per subject, else one

    @property
    def pg_db(self) -> str:
        return {"full": "bench_perf", "quick": "bench_perf_quick"}.get(self.name, f"bench_perf_{self.name}") + DB_SUFFIX


FULL = Profile("full", 100_000, 2, 8, 3)
QUICK = Profile("quick", 10_000, 1, 3, 2)
# The bulk check's large ledger (bench/bulk_bench.py): one record per subject, so that it fits
# on the disk and is made in minutes.
MILLION = Profile("1m", 1_000_000, 2, 8, 5, history=False)


@dataclass
class Result:
    config: str
    test: str
    c1: dict[str, float] | None = None
    c32: dict[str, float] | None = None
    note: str = ""
    values: dict[str, Any] = field(default_factory=dict)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- machine --------------------------------------------------------------------------------

def machine() -> dict[str, str]:
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = Path("/proc/meminfo").read_text().split()[1]
    pg = subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-Atc", "show server_version"],
                        capture_output=True, text=True, check=False).stdout.strip() or "?"
    import sqlalchemy
    import starlette
    import uvicorn

    return {
        "cpu": f"{cpu}, {os.cpu_count()} cores", "memory": f"{int(mem) // 1024 // 1024} GiB",
        "os": platform.platform(), "python": platform.python_version(),
        "postgresql": pg, "sqlite": sqlite3.sqlite_version,
        "packages": f"starlette {starlette.__version__}, uvicorn {uvicorn.__version__}, "
                    f"sqlalchemy {sqlalchemy.__version__}",
        "load": "wrk 4.1 (1 thread) on 127.0.0.1, same machine",
        "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "CPU speed at start": cpu_speed(),
    }


def cpu_speed() -> str:
    """Seconds for a plain Python loop of 10 million additions (best of 3). Machines of the
    same kind have differed by 2x from one session to the next (and within one); absolute
    numbers of different runs move with it, ratios of one run much less."""
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        s = 0
        for i in range(10_000_000):
            s += i
        best = min(best, time.perf_counter() - t)
    return f"a Python loop of 10,000,000 additions in {best:.2f} s (best of 3)"


# --- ledger cache ---------------------------------------------------------------------------

def ledgers(profile: Profile, rebuild: bool) -> dict[str, dict[str, Any]]:
    """{"sqlite": meta, "postgresql": meta} for a ledger of this profile's size, cached."""
    cache = HERE / ".cache"
    cache.mkdir(exist_ok=True)
    sqlite_url = f"sqlite:///{cache / f'ledger-{profile.name}{DB_SUFFIX}.db'}"
    pg_url = f"{PG_BASE}/{profile.pg_db}"
    meta_file = cache / f"ledger-{profile.name}{DB_SUFFIX}.json"
    metas = None
    if meta_file.exists() and not rebuild:
        saved = json.loads(meta_file.read_text())
        if (saved.get("version") == CACHE_VERSION and saved.get("subjects") == profile.subjects
                and saved.get("history", True) == profile.history and _present(saved)):
            metas = saved
    if metas is None:
        _ensure_pg_database(profile.pg_db)
        log(f"generating the {profile.name} ledger ({profile.subjects:,} subjects) ...")
        t = time.monotonic()
        built = ledger.build([sqlite_url, pg_url], profile.subjects, log=log, history=profile.history)
        metas = {"version": CACHE_VERSION, "subjects": profile.subjects, "history": profile.history,
                 "sqlite": {**built[sqlite_url], "url": sqlite_url},
                 "postgresql": {**built[pg_url], "url": pg_url}}
        meta_file.write_text(json.dumps(metas, default=str))
        log(f"  generated in {time.monotonic() - t:.0f} s")
    for kind in ("sqlite", "postgresql"):
        db.migrate(metas[kind]["url"])  # new indexes etc. since the cache was made
        _repair(metas[kind]["url"])
        _tlog_build(metas[kind]["url"])
    ledger.vacuum(metas["postgresql"]["url"])
    return metas


def _tlog_build(url: str) -> None:
    """The transparency log of a generated ledger (written without feed events), built once
    as `consent tlog build` does, so the runs measure the steady state, not the first build."""
    import sqlalchemy as sa
    from sqlmodel import col

    from consent.audit import tlog
    from consent.store.models import Tenant

    engine = db.create_db_engine(url)
    try:
        with db.transaction(engine) as s:
            todo = s.execute(sa.select(col(Tenant.id)).where(~sa.exists().where(tlog.STATE.c.tenant_id == Tenant.id))).scalars().all()
        for tenant_id in todo:
            t = time.monotonic()
            n = tlog.build(engine, tenant_id)
            log(f"  transparency log of {url.rsplit('/', 1)[-1]}: {n:,} leaves in {time.monotonic() - t:.1f} s")
    finally:
        engine.dispose()


def _repair(url: str) -> None:
    """Tables and indexes of the current models that a cached ledger lacks: revisions merged
    later are re-chained by the lead, so a ledger stamped at an older head can skip one (seen:
    export_manifest missing after the audit merge). Creates only what is missing."""
    import sqlalchemy as sa
    from sqlmodel import SQLModel

    import consent.store.models  # noqa: F401  (registers the tables)

    engine = db.create_db_engine(url)
    try:
        SQLModel.metadata.create_all(engine, checkfirst=True)
        names = {ix["name"] for t in sa.inspect(engine).get_table_names()
                 for ix in sa.inspect(engine).get_indexes(t)}
        for table in SQLModel.metadata.sorted_tables:
            for index in table.indexes:
                if index.name not in names:
                    log(f"  adding missing index {index.name}")
                    index.create(engine, checkfirst=True)
    finally:
        engine.dispose()


def _present(saved: dict[str, Any]) -> bool:
    import sqlalchemy as sa

    for kind in ("sqlite", "postgresql"):
        try:
            engine = sa.create_engine(saved[kind]["url"])
            with engine.connect() as conn:
                n = conn.execute(sa.text("SELECT count(*) FROM tenant WHERE id = :t"),
                                 {"t": saved[kind]["tenant_id"]}).scalar()
            engine.dispose()
        except Exception:  # noqa: BLE001 (any failure: the cache is not usable, build it again)
            return False
        if n != 1:
            return False
    return True


def _ensure_pg_database(name: str) -> None:
    import sqlalchemy as sa

    engine = sa.create_engine(f"{PG_BASE}/postgres", isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        if not conn.execute(sa.text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}).first():
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    engine.dispose()


# --- servers --------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A server process tree on 127.0.0.1, stopped on exit; its output goes to ``log_path``."""

    def __init__(self, cmd: list[str], port: int, workers: int, env: dict[str, str], cwd: Path, probe: str,
                 log_path: Path):
        self.port, self.log_path = port, log_path
        with open(log_path, "ab") as out:
            self.proc = subprocess.Popen(cmd, env={**os.environ, **env}, cwd=str(cwd), stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        self.base = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log()[-2000:]}")
            try:
                if httpx.get(self.base + probe, timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            self.stop()
            raise RuntimeError("server did not start in 60 s")
        time.sleep(0.5 * workers)  # let every worker finish its startup

    @classmethod
    def bare(cls, workers: int, tmp: Path) -> Server:
        """bench/bare_app.py at the framework's best settings: httptools, uvloop, no access log."""
        port = free_port()
        cmd = [sys.executable, "-m", "uvicorn", "bare_app:app", "--host", "127.0.0.1", "--port", str(port),
               "--workers", str(workers), "--http", "httptools", "--loop", "uvloop", "--no-access-log",
               "--log-level", "warning"]
        return cls(cmd, port, workers, {}, HERE, "/", tmp / f"bare-{port}.log")

    @classmethod
    def consent_serve(cls, workers: int, env: dict[str, str], tmp: Path) -> Server:
        """The service as a user starts it: `consent serve` (the CLI's own uvicorn settings and
        logging), its output, access log included, written to a file as a log collector would."""
        port = free_port()
        cmd = [sys.executable, "-m", "consent.cli.main", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--workers", str(workers)]
        return cls(cmd, port, workers, env, ROOT, "/healthz", tmp / f"serve-{port}.log")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def access_lines(self) -> int:
        """Lines of the service's access log written so far."""
        return self.log().count('"logger":"consent.access"')

    def pids(self) -> list[int]:
        """The uvicorn process and its children (the workers)."""
        out = [self.proc.pid]
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == self.proc.pid:
                out.append(int(stat.parent.name))
        return out

    def rss_kib(self, pids: list[int] | None = None) -> int:
        total = 0
        for pid in pids if pids is not None else self.pids():
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
            except OSError:
                pass
        return total

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # our own process group, started above
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


# --- load -----------------------------------------------------------------------------------

def ensure_wrk() -> str:
    path = shutil.which("wrk")
    if path:
        return path
    log("installing wrk (apt-get install -y wrk) ...")
    subprocess.run(["apt-get", "install", "-y", "wrk"], check=False, capture_output=True)
    path = shutil.which("wrk")
    if not path:
        sys.exit("wrk is required: apt-get install -y wrk")
    return path


UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def wrk(base: str, script: str, conns: int, profile: Profile, tmp: Path) -> dict[str, float]:
    """Warm up, then one bounded wrk run; rps, p50/p99 in ms and the count of bad answers."""
    lua = tmp / f"s{abs(hash(script))}.lua"
    lua.write_text(script)
    exe = ensure_wrk()

    def run(seconds: int) -> str:
        cmd = [exe, "-t1", f"-c{conns}", f"-d{seconds}s", "--timeout", "5s", "--latency", "-s", str(lua), base]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30, check=False).stdout

    run(profile.warmup)
    out = run(profile.duration)
    found = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not found:
        raise RuntimeError(f"wrk gave no result:\n{out}")
    rps = float(found.group(1))
    lat = {m.group(1): float(m.group(2)) * UNITS[m.group(3)]
           for m in re.finditer(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", out, re.MULTILINE)}
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    return {"rps": rps, "p50": lat.get("50", float("nan")), "p99": lat.get("99", float("nan")),
            "bad": float(bad.group(1)) if bad else 0.0, "socket_errors": 1.0 if errors else 0.0}


def lua_get(path_expr: str, headers: dict[str, str], subjects: int = 1) -> str:
    hdrs = "".join(f'wrk.headers["{k}"] = "{v}"\n' for k, v in headers.items())
    return f"""{hdrs}
local n = {subjects}
local seeded = false
request = function()
  if not seeded then math.randomseed(os.time() * 1000 + math.floor(os.clock() * 1e6)); seeded = true end
  local i = math.random(0, n - 1)
  return wrk.format("GET", {path_expr})
end
"""


def lua_record(key: str, subjects: int) -> str:
    return f"""wrk.headers["Authorization"] = "Bearer {key}"
wrk.headers["Content-Type"] = "application/json"
local purposes = {{"marketing_email", "analytics", "personalization"}}
local decisions = {{"granted", "denied"}}
local seeded = false
request = function()
  if not seeded then math.randomseed(os.time() * 1000 + math.floor(os.clock() * 1e6)); seeded = true end
  local i = math.random(0, {subjects} - 1)
  local body = '{{"subject":{{"email":"user' .. i .. '@bench.example"}},"purpose":"' ..
    purposes[math.random(1, 3)] .. '","decision":"' .. decisions[math.random(1, 2)] .. '"}}'
  return wrk.format("POST", "/v1/consents", nil, body)
end
"""


def route_present(base: str, path: str, headers: dict[str, str]) -> bool:
    r = httpx.get(base + path, headers=headers, timeout=30)
    return not (r.status_code == 404 and "route" in r.json().get("detail", ""))


# --- one configuration ----------------------------------------------------------------------

def bare_cells(workers: int, conns: tuple[int, ...], profile: Profile, tmp: Path) -> list[dict[str, float]]:
    """Bare Starlette (one constant-JSON route) under wrk at each of ``conns`` clients."""
    server = Server.bare(workers, tmp)
    try:
        return [wrk(server.base, lua_get('"/"', {}), c, profile, tmp) for c in conns]
    finally:
        server.stop()


def bench_bare(workers: int, profile: Profile, tmp: Path) -> Result:
    one, many = bare_cells(workers, (1, 32), profile, tmp)
    return Result(f"bare w{workers}", "GET / (constant JSON)", one, many)


def bare_now(workers: int, profile: Profile, tmp: Path) -> dict[str, float]:
    """Bare Starlette at 32 clients, measured again right before a check's 32-client cell: the
    machine's speed drifts by 10-25 % within minutes (docs/bench.md), so the check's ratio is
    also taken against the baseline of the same minute."""
    return bare_cells(workers, (32,), profile, tmp)[0]


TESTS = ("check", "record", "bulk", "snippet", "export")


def bench_service(kind: str, workers: int, meta: dict[str, Any], profile: Profile, tmp: Path,
                  tests: tuple[str, ...] = TESTS) -> list[Result]:
    # Every other setting is the shipped default (log level info: one access line per request).
    # The ledger is migrated already and has its tenant; one key and one address send every
    # request, so the per-minute limits of the public routes are raised.
    env = {"CONSENT_DATABASE_URL": meta["url"], "CONSENT_DATA_DIR": str(tmp / f"data-{kind}{workers}"),
           "CONSENT_DEMO": "false", "CONSENT_MIGRATE_ON_START": "false",
           "CONSENT_ADMIN_TOKEN": ADMIN_TOKEN, "CONSENT_ISSUER": "http://127.0.0.1",
           "CONSENT_RATE_LIMIT_PER_MINUTE": "100000000", "CONSENT_RATE_LIMIT_IP_PER_MINUTE": "100000000"}
    name = f"{kind} w{workers}"
    n = meta["subjects"]
    sk, pk = meta["secret_key"], meta["publishable_key"]
    auth = {"Authorization": f"Bearer {sk}"}
    server = Server.consent_serve(workers, env, tmp)
    out: list[Result] = []
    try:
        # Correctness first: a known subject answers with a receipt.
        r = httpx.get(server.base + "/v1/check", params={"purpose": "marketing_email", "email": ledger.email_of(1)},
                      headers=auth, timeout=30)
        assert r.status_code == 200 and r.json()["receipt"], r.text
        if "check" in tests:
            check = lua_get('"/v1/check?purpose=marketing_email&email=user" .. i .. "%40bench.example"', auth, n)
            one = wrk(server.base, check, 1, profile, tmp)
            bare = bare_now(workers, profile, tmp)  # the service waits idle meanwhile
            many = wrk(server.base, check, 32, profile, tmp)
            ratio = many["rps"] / bare["rps"]
            before = f"bare w{workers} right before ({bare['rps']:,.0f} req/s, p99 {bare['p99']:.2f} ms)"
            log(f"  check at 32 clients: {many['rps']:,.0f} req/s = {ratio:.2f} of {before}, p99 {many['p99']:.2f} ms")
            out.append(Result(name, "GET /v1/check", one, many, note=f"{ratio:.2f} of {before}",
                              values={"bare_adjacent": bare["rps"]}))
        if "record" in tests:
            rec = lua_record(sk, n)
            out.append(Result(name, "POST /v1/consents", wrk(server.base, rec, 1, profile, tmp),
                              wrk(server.base, rec, 32, profile, tmp)))
        if "bulk" in tests:
            out.append(bulk(server, name, auth, n, profile))
        if "snippet" in tests:
            out.extend(snippet(server, name, pk, profile, tmp))
        if "export" in tests:
            try:  # a failing export must not lose the rows measured above
                out.append(export(server, name, auth))
            except Exception as exc:  # noqa: BLE001 (reported in the table)
                out.append(Result(name, "GET /v1/exports/consents", note=f"failed: {type(exc).__name__}"))
    finally:
        server.stop()
    out.append(Result(name, "access log", note=f"{server.access_lines():,} lines written by `consent serve`"))
    return out


BULK_EMAILS = 100_000  # addresses per bulk check


def bulk_emails(subjects: int) -> list[str]:
    """The addresses of a bulk check, in random order: distinct known subjects from the whole
    ledger (all of them when it has fewer than BULK_EMAILS), the rest unknown. Every known
    subject has a decision on ``marketing_email``."""
    rng = random.Random(11)
    known = rng.sample(range(subjects), min(BULK_EMAILS, subjects))
    emails = [ledger.email_of(i) for i in known] + [f"nobody{i}@bench.example" for i in range(BULK_EMAILS - len(known))]
    rng.shuffle(emails)
    return emails


def time_posts(url: str, body: bytes, headers: dict[str, str], calls: int) -> tuple[list[float], httpx.Response]:
    """Seconds of each of ``calls`` POSTs of ``body`` after one warm-up call, and the last answer."""
    times = []
    with httpx.Client(timeout=60) as client:
        for n in range(calls + 1):
            t = time.perf_counter()
            r = client.post(url, content=body, headers={**headers, "Content-Type": "application/json"})
            elapsed = time.perf_counter() - t
            assert r.status_code == 200, r.text[:300]
            if n:
                times.append(elapsed)
    return times, r


def bulk(server: Server, name: str, auth: dict[str, str], subjects: int, profile: Profile) -> Result:
    """POST /v1/check with 100,000 emails (``bulk_emails``): seconds per call."""
    body = json.dumps({"purpose": "marketing_email", "emails": bulk_emails(subjects)}).encode()
    times, r = time_posts(server.base + "/v1/check", body, auth, profile.bulk_calls)
    found = sum(1 for x in r.json()["results"] if x["status"] != "none")
    assert found == min(subjects, BULK_EMAILS), f"{found:,} known addresses answered"
    median = statistics.median(times)
    return Result(name, "POST /v1/check x100,000 emails",
                  note=f"{median:.2f} s median, {min(times):.2f} s best of {len(times)} ({found:,} known)",
                  values={"seconds": median, "times": times})


def snippet(server: Server, name: str, pk: str, profile: Profile, tmp: Path) -> list[Result]:
    auth = {"Authorization": f"Bearer {pk}"}
    if not route_present(server.base, "/v1/snippet/config", auth):
        return [Result(name, "GET /v1/snippet/config", note="n/a (route not present)")]
    r = httpx.get(server.base + "/v1/snippet/config", headers=auth, timeout=30)
    etag = r.headers.get("etag")
    fresh = lua_get('"/v1/snippet/config"', auth)
    out = [Result(name, "GET /v1/snippet/config (fresh)", wrk(server.base, fresh, 1, profile, tmp),
                  wrk(server.base, fresh, 32, profile, tmp), note=f"status {r.status_code}")]
    if etag:
        cond = lua_get('"/v1/snippet/config"', {**auth, "If-None-Match": etag.replace('"', '\\"')})
        out.append(Result(name, "GET /v1/snippet/config (If-None-Match)", wrk(server.base, cond, 1, profile, tmp),
                          wrk(server.base, cond, 32, profile, tmp), note="304"))
    else:
        out.append(Result(name, "GET /v1/snippet/config (If-None-Match)", note="n/a (no ETag)"))
    return out


def export(server: Server, name: str, auth: dict[str, str]) -> Result:
    """The whole ledger as JSONL: records/s and peak RSS of the server processes while it streams."""
    path = "/v1/exports/consents"
    if not route_present(server.base, path + "?from=2100-01-01T00:00:00Z", auth):
        return Result(name, "GET /v1/exports/consents", note="n/a (route not present)")
    pids = server.pids()  # once: scanning /proc every 50 ms cost the reading client CPU
    before = server.rss_kib(pids)
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            peak[0] = max(peak[0], server.rss_kib(pids))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    url = server.base + path + "?format=jsonl"
    try:
        t = time.perf_counter()
        lines = count_lines(url, auth)
        elapsed = time.perf_counter() - t
        t = time.perf_counter()  # the same export read by httpx, for comparison with earlier runs
        httpx_lines = 0
        with httpx.stream("GET", url, headers=auth, timeout=httpx.Timeout(30, read=120)) as r:
            assert r.status_code == 200, r.read()[:300]
            for chunk in r.iter_bytes():
                httpx_lines += chunk.count(b"\n")
        httpx_elapsed = time.perf_counter() - t
    finally:
        done.set()
        sampler.join()
    rate = lines / elapsed
    return Result(name, "GET /v1/exports/consents (all, jsonl)",
                  note=f"{lines:,} lines in {elapsed:.1f} s = {rate:,.0f} records/s "
                       f"(read by httpx: {httpx_lines / httpx_elapsed:,.0f}); "
                       f"RSS {before // 1024} MiB before, {peak[0] // 1024} MiB peak",
                  values={"rate": rate, "httpx_rate": httpx_lines / httpx_elapsed,
                          "rss_before": before, "rss_peak": peak[0]})


def count_lines(url: str, headers: dict[str, str], timeout: float = 120) -> int:
    """GET ``url`` (http://127.0.0.1:port/...) and count the newlines of its chunked body.

    The export's reader: a plain socket reading up to 1 MiB at a time. httpx reads 64 KiB at a
    time through h11 and cost ~3 us of CPU per exported record (docs/bench.md, tenth pass), on
    the same two cores as the server; wrk measures the other routes for the same reason."""
    rest = url.removeprefix("http://")
    hostport, _, target = rest.partition("/")
    host, _, port = hostport.partition(":")
    request = [f"GET /{target} HTTP/1.1", f"Host: {hostport}", "Connection: close",
               *(f"{k}: {v}" for k, v in headers.items()), "", ""]
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall("\r\n".join(request).encode())
        buf = bytearray()

        def more() -> None:
            data = sock.recv(1 << 20)
            if not data:
                raise ConnectionError("the server closed the connection before the end of the body")
            buf.extend(data)

        while (end := buf.find(b"\r\n\r\n")) < 0:
            more()
        head = bytes(buf[:end]).decode("latin-1").lower()
        status = int(head.split(" ", 2)[1])
        if status != 200 or "transfer-encoding: chunked" not in head:
            raise AssertionError(f"export answered {status}: {head[:300]}")
        pos, lines = end + 4, 0
        while True:
            while (eol := buf.find(b"\r\n", pos)) < 0:
                more()
            size = int(bytes(buf[pos:eol]).split(b";")[0], 16)
            pos = eol + 2
            if size == 0:
                return lines
            while len(buf) < pos + size + 2:
                more()
            lines += buf.count(b"\n", pos, pos + size)
            pos += size + 2
            if pos > 1 << 22:  # drop what was read
                del buf[:pos]
                pos = 0


# --- report ---------------------------------------------------------------------------------

def fmt(m: dict[str, float] | None) -> list[str]:
    if not m:
        return ["", "", ""]
    rps = f"{m['rps']:,.0f}" + (" (!)" if m["bad"] or m["socket_errors"] else "")
    return [rps, f"{m['p50']:.2f}", f"{m['p99']:.2f}"]


def table(results: list[Result]) -> str:
    head = ["config", "test", "c=1 req/s", "p50 ms", "p99 ms", "c=32 req/s", "p50 ms", "p99 ms", "notes"]
    rows = [[r.config, r.test, *fmt(r.c1), *fmt(r.c32), r.note] for r in results]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def verdicts(results: list[Result]) -> list[str]:
    by = {(r.config, r.test): r for r in results}
    out = []
    for w in (1, 2):
        bare = by.get((f"bare w{w}", "GET / (constant JSON)"))
        for kind in ("sqlite", "postgresql"):
            chk = by.get((f"{kind} w{w}", "GET /v1/check"))
            if chk and chk.c32 and chk.c1:
                near = chk.c32["rps"] / chk.values["bare_adjacent"]
                ok = near >= 0.5 and chk.c32["p99"] <= 10
                start = ""
                if bare and bare.c32 and bare.c1:
                    start = (f" ({chk.c32['rps'] / bare.c32['rps']:.0%} of the bare w{w} row at the start of the run; "
                             f"c=1: {chk.c1['rps'] / bare.c1['rps']:.0%})")
                out.append(f"- single check {kind} w{w}: {near:.0%} of bare w{w} measured right before it at 32 "
                           f"clients{start}, p99 {chk.c32['p99']:.2f} ms "
                           f"-> {'PASS' if ok else 'FAIL'} (>= 50%, p99 <= 10 ms)")
    rec = by.get(("postgresql w2", "POST /v1/consents"))
    if rec and rec.c32:
        out.append(f"- record with receipt, postgresql w2: {rec.c32['rps']:,.0f}/s at 32 clients -> "
                   f"{'PASS' if rec.c32['rps'] >= 1000 else 'FAIL'} (>= 1,000/s)")
    for r in results:
        if "seconds" in r.values:
            out.append(f"- bulk check {r.config}: {r.values['seconds']:.2f} s per 100,000 emails -> "
                       f"{'PASS' if r.values['seconds'] <= 1 else 'FAIL'} (<= 1 s)")
        if "rate" in r.values:
            out.append(f"- export {r.config}: {r.values['rate']:,.0f} records/s -> "
                       f"{'PASS' if r.values['rate'] >= 100_000 else 'FAIL'} (>= 100,000/s); peak RSS "
                       f"{r.values['rss_peak'] // 1024} MiB (was {r.values['rss_before'] // 1024} MiB)")
    return out


def write_results(profile: Profile, mach: dict[str, str], metas: dict[str, Any], results: list[Result],
                  started: float, write: bool = True) -> str:
    text = [
        "# Benchmark results", "",
        (f"`.venv/bin/python bench/run.py{' --quick' if profile.name == 'quick' else ''}` "
         f"({profile.name} profile; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
         f"{time.monotonic() - started:.0f} s). How to read it: docs/bench.md."), "",
        "## Machine", "", *[f"- {k}: {v}" for k, v in mach.items()],
        (f"- load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
         "(other work on the machine shifts absolute numbers; compare rows of the same run)"),
        f"- CPU speed at end: {cpu_speed()}", "",
        "## Ledger", "",
        (f"- {metas['subjects']:,} subjects, 3 purposes, 2 policy versions, "
         f"{metas['sqlite']['records']:,} records per database (plus those the record runs add)"),
        (f"- wrk: {profile.warmup:g} s warm-up then {profile.duration:g} s measured per cell, 1 thread; "
         "c=1 and c=32 connections"), "",
        "## Results", "", table(results), "",
        "(!) = some answers were not 2xx/3xx or sockets failed: see the raw wrk output.", "",
        "## Targets", "", *verdicts(results), "",
    ]
    out = "\n".join(text)
    if write:
        (HERE / "RESULTS.md").write_text(out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small ledger, short runs (about 3 minutes)")
    p.add_argument("--rebuild", action="store_true", help="generate the ledgers again")
    p.add_argument("--only", default="", help="comma list of configs to run, e.g. bare,sqlite1,postgresql2")
    p.add_argument("--tests", default=",".join(TESTS), help=f"comma list of service tests (default all: {','.join(TESTS)})")
    p.add_argument("--no-write", action="store_true", help="print the table only; leave bench/RESULTS.md alone")
    args = p.parse_args(argv)
    profile = QUICK if args.quick else FULL
    started = time.monotonic()
    timer = threading.Timer(HARD_LIMIT_S, lambda: os.kill(os.getpid(), signal.SIGTERM))
    timer.daemon = True
    timer.start()
    ensure_wrk()
    mach = machine()
    metas = ledgers(profile, args.rebuild)
    only = {x.strip() for x in args.only.split(",") if x.strip()}
    tests = tuple(x.strip() for x in args.tests.split(",") if x.strip())
    unknown = set(tests) - set(TESTS)
    if unknown:
        p.error(f"unknown tests: {', '.join(sorted(unknown))}")
    results: list[Result] = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for w in (1, 2):
            if not only or "bare" in only or f"bare{w}" in only:
                log(f"bare starlette, {w} worker(s) ...")
                results.append(bench_bare(w, profile, tmp))
        for kind in ("sqlite", "postgresql"):
            for w in (1, 2):
                if only and kind not in only and f"{kind}{w}" not in only:
                    continue
                log(f"service on {kind}, {w} worker(s) ...")
                try:
                    results.extend(bench_service(kind, w, metas[kind], profile, tmp, tests))
                except Exception as exc:  # noqa: BLE001 (one broken cell must not lose the whole run)
                    results.append(Result(f"{kind} w{w}", "(run failed)", note=f"{type(exc).__name__}: {exc}"[:200]))
    out = write_results(profile, mach, metas, results, started, write=not args.no_write)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
