"""The transparency log (consent/tlog.py): leaves in commit order, stored subtrees, checkpoints,
proofs checked by the test-only RFC 9162 / signed-note verifier (tests/rfc9162.py), on SQLite
and PostgreSQL."""

from __future__ import annotations

import hashlib
from typing import Any

import sqlalchemy as sa

from consent import crypto, merkle, tlog
from consent.db import transaction
from consent.models import Event

from . import rfc9162
from .helpers import Tenant
from .ledger_factory import generate_ledger

EVENT = Event.__table__  # type: ignore[attr-defined]


def services(t: Tenant) -> Any:
    return t.client.app.state.services  # type: ignore[attr-defined]


def sequence(t: Tenant) -> None:
    s = services(t)
    tlog.run_once(s.engine, s.settings, s.signer, wait=True)


def leaf_rows(t: Tenant) -> list[Any]:
    with transaction(services(t).engine) as db:
        return db.execute(sa.select(tlog.LEAF.c.idx, tlog.LEAF.c.record_id, tlog.REC.c.record_hash)
                          .join(tlog.REC, tlog.REC.c.id == tlog.LEAF.c.record_id)
                          .where(tlog.LEAF.c.tenant_id == t.id).order_by(tlog.LEAF.c.idx)).all()


def test_append_stores_complete_subtrees_for_every_size(client: Any) -> None:
    """Appends of odd sizes; every tree head and proof from the store matches the RFC."""
    engine = client.app.state.services.engine
    tid = crypto.new_id("tlt", 8)
    data = [hashlib.sha256(b"%d" % i).hexdigest().encode() for i in range(300)]
    size = 0
    with transaction(engine, write=True) as db:
        for step in (1, 2, 13, 16, 17, 31, 64, 1, 90, 65):
            rows = [(f"r{tid}{i}", None, merkle.leaf_hash(data[i])) for i in range(size, size + step)]
            size = tlog.append(db, tid, size, rows)
            assert tlog.root_at(db, tid, size) == rfc9162.mth(data[:size])
        assert size == 300
        for n in (1, 15, 16, 17, 100, 256, 299, 300):
            head = tlog.root_at(db, tid, n)
            assert head == rfc9162.mth(data[:n])
            for m in {0, n // 2, n - 1}:
                path = tlog._run(db, tid, lambda g, m=m, n=n: merkle.inclusion_path(g, m, n))
                assert rfc9162.verify_inclusion(data[m], m, n, path, head)
        nodes = db.execute(sa.select(sa.func.count()).select_from(tlog.NODE).where(tlog.NODE.c.tenant_id == tid))
        assert nodes.scalar_one() == sum(300 >> lvl for lvl in range(tlog.NODE_LEVEL, 9))


def test_sequencer_appends_records_in_commit_order_and_builds_older_ones(tenant: Tenant) -> None:
    generate_ledger(services(tenant).engine, tenant.id, 23)  # bulk-written: no feed events
    for i in range(5):
        tenant.record(email=f"p{i}@example.com")
    sequence(tenant)
    rows = leaf_rows(tenant)
    assert [r.idx for r in rows] == list(range(28))
    with transaction(services(tenant).engine) as db:
        fed = db.execute(sa.select(EVENT.c.record_id).where(EVENT.c.tenant_id == tenant.id)
                         .order_by(EVENT.c.position)).scalars().all()
        older = db.execute(sa.select(tlog.REC.c.id).where(tlog.REC.c.tenant_id == tenant.id,
                                                           tlog.REC.c.id.not_in(fed)).order_by(tlog.REC.c.seq)).scalars().all()
    assert [r.record_id for r in rows] == older + fed  # the ledger before the log, then the feed
    sequence(tenant)  # nothing new: nothing appended twice
    assert len(leaf_rows(tenant)) == 28
    tenant.record(email="late@example.com")
    generate_ledger(services(tenant).engine, tenant.id, 3)
    sequence(tenant)
    assert len(leaf_rows(tenant)) == 29  # the bulk-written records wait for `consent tlog build`
    assert tlog.build(services(tenant).engine, tenant.id) == 3
    rows = leaf_rows(tenant)
    assert len(rows) == 32 and len({r.record_id for r in rows}) == 32
    with transaction(services(tenant).engine) as db:
        assert tlog.root_at(db, tenant.id, 32) == rfc9162.mth([r.record_hash.encode() for r in rows])
