"""Transparency-log cost on one tenant of 1,000,000 records (docs/transparency.md, "Cost").

    .venv/bin/python bench/tlog_bench.py [--records 1000000] [--only sqlite,postgresql]

For each backend, in a database of its own (SQLite in a temporary directory; PostgreSQL
``bench_tlog_<pid>``, dropped at the end): appends the leaves of N records with realistic ids
(``tlog.append``, CHUNK leaves per transaction, as the sequencer does) and reports leaves/s;
the storage per record (PostgreSQL: tables and indexes; SQLite: file growth); then times
inclusion proofs for random records against the newest tree (the route's statements: the leaf
by record id, then the proof's subtrees in two reads), consistency proofs and tree heads.
"""

from __future__ import annotations

import argparse
import os
import random
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from consent.audit import merkle, tlog
from consent.store import db

PG_BASE = os.environ.get("BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432")


def fill(engine: sa.Engine, tenant: str, records: int) -> tuple[list[str], float]:
    ids: list[str] = []
    size = 0
    t = time.perf_counter()
    while size < records:
        n = min(tlog.CHUNK, records - size)
        rows = []
        for _ in range(n):
            rid = "rec_" + secrets.token_hex(12)
            rows.append((rid, "rct_" + secrets.token_hex(12), merkle.leaf_hash(secrets.token_hex(32).encode())))
            ids.append(rid)
        with db.transaction(engine, write=True) as s:
            size = tlog.append(s, tenant, size, rows)
    return ids, time.perf_counter() - t


def timed(fn, repeat: int) -> list[float]:  # type: ignore[no-untyped-def]
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return out


def summary(ms: list[float]) -> str:
    ms = sorted(ms)
    return (f"p50 {statistics.median(ms):.2f} ms, p99 {ms[int(len(ms) * 0.99) - 1]:.2f} ms, "
            f"max {ms[-1]:.2f} ms ({len(ms)} runs)")


def proof(engine: sa.Engine, tenant: str, record_id: str, size: int) -> list[bytes]:
    """What the inclusion route reads, bar the record's hash (one primary-key read)."""
    with db.transaction(engine, read_only=True) as s:
        idx = s.execute(sa.select(tlog.LEAF.c.idx).where(tlog.LEAF.c.tenant_id == tenant,
                                                         tlog.LEAF.c.record_id == record_id)).scalar_one()
        return list(tlog._run(s, tenant, lambda g: merkle.inclusion_path(g, idx, size)))


def run(kind: str, url: str, records: int, path: Path | None) -> None:
    db.migrate(url)
    engine = db.create_db_engine(url)
    tenant = "ten_" + secrets.token_hex(8)
    before = path.stat().st_size if path else 0
    ids, seconds = fill(engine, tenant, records)
    print(f"{kind}: appended {records:,} leaves in {seconds:.1f} s = {records / seconds:,.0f} leaves/s")
    if kind == "postgresql":
        with engine.connect() as c:
            total = sum(c.execute(sa.text(f"SELECT pg_total_relation_size('{t}')")).scalar_one()
                        for t in ("tlog_leaf", "tlog_node"))
            leaf = c.execute(sa.text("SELECT pg_total_relation_size('tlog_leaf')")).scalar_one()
    else:
        with engine.connect() as c:
            c.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
        total, leaf = path.stat().st_size - before, None  # type: ignore[union-attr]
    print(f"{kind}: storage {total / records:.0f} bytes per record"
          + (f" (leaves and their indexes {leaf / records:.0f}, subtrees {(total - leaf) / records:.0f})"
             if leaf else ""))
    size = records
    rnd = random.Random(1)
    sample = [ids[rnd.randrange(records)] for _ in range(300)]
    for rid in sample[:20]:  # warm the caches a little, as a running service's are
        proof(engine, tenant, rid, size)
    it = iter(sample[20:])
    print(f"{kind}: inclusion proof (leaf by record id + path): "
          + summary(timed(lambda: proof(engine, tenant, next(it), size), 280)))
    olds = iter([rnd.randrange(1, size) for _ in range(200)])

    def consistency() -> None:
        with db.transaction(engine, read_only=True) as s:
            old = next(olds)
            tlog._run(s, tenant, lambda g: merkle.consistency_path(g, old, size))

    print(f"{kind}: consistency proof (random older size): " + summary(timed(consistency, 200)))

    def head() -> None:
        with db.transaction(engine, read_only=True) as s:
            tlog.root_at(s, tenant, size - rnd.randrange(1000))

    print(f"{kind}: tree head at a size: " + summary(timed(head, 100)))
    engine.dispose()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--records", type=int, default=1_000_000)
    p.add_argument("--only", default="sqlite,postgresql")
    args = p.parse_args()
    kinds = args.only.split(",")
    if "sqlite" in kinds:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "tlog.db"
            run("sqlite", f"sqlite:///{path}", args.records, path)
    if "postgresql" in kinds:
        name = f"bench_tlog_{os.getpid()}"
        admin = sa.create_engine(f"{PG_BASE}/postgres", isolation_level="AUTOCOMMIT")
        with admin.connect() as c:
            c.exec_driver_sql(f"CREATE DATABASE {name}")
        try:
            run("postgresql", f"{PG_BASE}/{name}", args.records, None)
        finally:
            with admin.connect() as c:
                c.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            admin.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
