"""The transparency log (consent/audit/tlog.py): leaves in commit order, stored subtrees, checkpoints,
proofs checked by the test-only RFC 9162 / signed-note verifier (tests/rfc9162.py), on SQLite
and PostgreSQL."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import jwt
import sqlalchemy as sa

from consent import crypto
from consent.audit import merkle, tlog
from consent.store.db import transaction
from consent.store.models import Event

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


def test_sequencer_appends_records_by_their_stored_index(tenant: Tenant) -> None:
    generate_ledger(services(tenant).engine, tenant.id, 23)  # bulk-written: indexes taken in their transaction
    for i in range(5):
        tenant.record(email=f"p{i}@example.com")
    sequence(tenant)
    rows = leaf_rows(tenant)
    assert [r.idx for r in rows] == list(range(28))
    with transaction(services(tenant).engine) as db:
        stored = db.execute(sa.select(tlog.REC.c.id).where(tlog.REC.c.tenant_id == tenant.id)
                            .order_by(tlog.REC.c.leaf_index)).scalars().all()
    assert [r.record_id for r in rows] == stored
    sequence(tenant)  # nothing new: nothing appended twice
    assert len(leaf_rows(tenant)) == 28
    tenant.record(email="late@example.com")
    generate_ledger(services(tenant).engine, tenant.id, 3)
    assert tlog.build(services(tenant).engine, tenant.id) == 4  # `consent tlog build`: at once
    rows = leaf_rows(tenant)
    assert len(rows) == 32 and len({r.record_id for r in rows}) == 32
    with transaction(services(tenant).engine) as db:
        assert tlog.root_at(db, tenant.id, 32) == rfc9162.mth([r.record_hash.encode() for r in rows])


def test_the_log_stops_at_a_record_deleted_before_it_was_appended(tenant: Tenant) -> None:
    recs = [tenant.record(email=f"g{i}@example.com") for i in range(4)]
    with transaction(services(tenant).engine, write=True) as db:
        db.execute(sa.delete(tlog.STATE).where(tlog.STATE.c.tenant_id == tenant.id))
        db.execute(sa.delete(tlog.REC).where(tlog.REC.c.id == recs[2]["id"]))
    sequence(tenant)
    assert [r.idx for r in leaf_rows(tenant)] == [0, 1]  # not renumbered around the gap


def note_parts(t: Tenant, note: str) -> tuple[str, int, bytes]:
    vkey = t.client.get("/v1/tlog/key").text.splitlines()[0]
    return rfc9162.open_checkpoint(note, vkey)


def test_checkpoints_and_proofs_verify_with_an_independent_verifier(tenant: Tenant) -> None:
    first = [tenant.record(email=f"a{i}@example.com") for i in range(5)]
    sequence(tenant)
    later = [tenant.record(email=f"b{i}@example.com", decision="denied") for i in range(12)]
    sequence(tenant)
    c = tenant.client
    r = c.get(f"/v1/tlog/{tenant.id}/checkpoint")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    origin, size, head = note_parts(tenant, r.text)
    assert (origin, size) == (f"testserver/tenants/{tenant.id}", 17)
    hashes = [row.record_hash.encode() for row in leaf_rows(tenant)]
    assert head == rfc9162.mth(hashes)
    old = c.get(f"/v1/tlog/{tenant.id}/checkpoints/5")
    assert old.status_code == 200 and "immutable" in old.headers["cache-control"]
    assert note_parts(tenant, old.text)[1:] == (5, rfc9162.mth(hashes[:5]))
    for rec in first + later:
        receipt = jwt.decode(rec["receipt"], options={"verify_signature": False})
        for size_, params in ((17, {"record_id": rec["id"]}), (17, {"jti": receipt["jti"]}),
                              (17, {"leaf_index": receipt["tlog_index"]}),
                              (5, {"record_id": rec["id"], "tree_size": 5})):
            p = c.get(f"/v1/tlog/{tenant.id}/proof/inclusion", params=params)
            if size_ == 5 and rec in later:
                assert p.status_code == 404 and p.json()["code"] == "tlog_record_not_found"
                continue
            assert p.status_code == 200, p.text
            body = p.json()
            assert body["tree_size"] == size_ and body["record_hash"] == receipt["record_hash"]
            assert body["leaf_index"] == receipt["tlog_index"] and body["record_id"] == rec["id"]
            _, _, root = note_parts(tenant, body["checkpoint"])
            path = [base64.b64decode(h) for h in body["hashes"]]
            assert rfc9162.verify_inclusion(receipt["record_hash"].encode(), body["leaf_index"], size_, path, root)
            assert not rfc9162.verify_inclusion(hashes[(body["leaf_index"] + 1) % size_], body["leaf_index"],
                                                size_, path, root)
    p = c.get(f"/v1/tlog/{tenant.id}/proof/consistency", params={"first": 5})
    assert p.status_code == 200 and p.json()["second"] == 17
    path = [base64.b64decode(h) for h in p.json()["hashes"]]
    assert rfc9162.verify_consistency(5, 17, rfc9162.mth(hashes[:5]), head, path)
    assert c.get(f"/v1/tlog/{tenant.id}/proof/consistency", params={"first": 17, "second": 17}).json()["hashes"] == []


def test_tlog_routes_reject_bad_input(tenant: Tenant) -> None:
    rec = tenant.record()
    c = tenant.client
    base = f"/v1/tlog/{tenant.id}"
    assert c.get(f"{base}/checkpoint").json()["code"] == "checkpoint_not_found"  # not sequenced yet
    sequence(tenant)
    cases = [
        (f"{base}/checkpoints/x", {}, 422, "validation_failed"),
        (f"{base}/checkpoints/0", {}, 422, "validation_failed"),
        (f"{base}/checkpoints/2", {}, 404, "checkpoint_not_found"),
        ("/v1/tlog/ten_nobody/checkpoint", {}, 404, "checkpoint_not_found"),
        (f"{base}/proof/inclusion", {}, 422, "validation_failed"),
        (f"{base}/proof/inclusion", {"record_id": rec["id"], "jti": "rct_x"}, 422, "validation_failed"),
        (f"{base}/proof/inclusion", {"leaf_index": 0, "jti": "rct_x"}, 422, "validation_failed"),
        (f"{base}/proof/inclusion", {"leaf_index": -1}, 422, "validation_failed"),
        (f"{base}/proof/inclusion", {"leaf_index": 1}, 404, "tlog_record_not_found"),
        (f"{base}/proof/inclusion", {"record_id": "rec_nothing"}, 404, "tlog_record_not_found"),
        (f"{base}/proof/inclusion", {"record_id": rec["id"], "tree_size": 3}, 404, "checkpoint_not_found"),  # > newest
        (f"{base}/proof/inclusion", {"record_id": rec["id"], "tree_size": "z"}, 422, "validation_failed"),
        (f"{base}/proof/consistency", {}, 422, "validation_failed"),
        (f"{base}/proof/consistency", {"first": 2, "second": 1}, 422, "validation_failed"),
        (f"{base}/proof/consistency", {"first": 1, "second": 9}, 404, "checkpoint_not_found"),
    ]
    for path, params, status, code in cases:
        r = c.get(path, params=params)
        assert (r.status_code, r.json()["code"]) == (status, code), (path, params, r.text)
        assert r.headers["content-type"].startswith("application/problem+json")


def test_erasure_never_changes_a_leaf(tenant: Tenant) -> None:
    recs = [tenant.record(email=f"e{i}@example.com") for i in range(3)]
    sequence(tenant)
    before = tenant.client.get(f"/v1/tlog/{tenant.id}/checkpoint").text
    r = tenant.delete("/v1/subjects/email:e1@example.com")
    assert r.status_code in (200, 204), r.text
    tenant.record(email="e9@example.com")
    sequence(tenant)
    _, size, head = note_parts(tenant, tenant.client.get(f"/v1/tlog/{tenant.id}/checkpoint").text)
    assert size == 5 and tenant.client.get(f"/v1/tlog/{tenant.id}/checkpoints/3").text == before
    erased = r.json()["record"]
    claims = jwt.decode(erased["receipt"], options={"verify_signature": False})
    assert claims["tlog_index"] == 3  # the erasure record is in the log, between the two records
    p = tenant.client.get(f"/v1/tlog/{tenant.id}/proof/inclusion", params={"leaf_index": 3}).json()
    assert p["record_id"] == erased["id"] and p["record_hash"] == erased["record_hash"]
    p = tenant.client.get(f"/v1/tlog/{tenant.id}/proof/inclusion", params={"record_id": recs[1]["id"]}).json()
    path = [base64.b64decode(h) for h in p["hashes"]]
    assert rfc9162.verify_inclusion(p["record_hash"].encode(), p["leaf_index"], 5, path, head)
    assert p["record_hash"] == jwt.decode(recs[1]["receipt"], options={"verify_signature": False})["record_hash"]


def test_sequencers_racing_writers_miss_nothing_and_append_nothing_twice(tenant: Tenant) -> None:
    """Writers in threads while two sequencers (two service processes) run: every record ends
    up as exactly one leaf, and every checkpoint is a prefix of the final tree."""
    import threading

    s = services(tenant)
    stop = threading.Event()
    errors: list[BaseException] = []

    def write(k: int) -> None:
        try:
            for i in range(12):
                tenant.record(email=f"w{k}-{i % 4}@example.com", decision=("granted", "withdrawn")[i % 2])
        except BaseException as exc:  # noqa: BLE001 (reported below, in the test thread)
            errors.append(exc)

    def sequencer() -> None:
        try:
            while not stop.is_set():
                tlog.run_once(s.engine, s.settings, s.signer)
        except BaseException as exc:  # noqa: BLE001 (reported below, in the test thread)
            errors.append(exc)

    seqs = [threading.Thread(target=sequencer) for _ in range(2)]
    writers = [threading.Thread(target=write, args=(k,)) for k in range(4)]
    for t in seqs + writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    for t in seqs:
        t.join()
    assert not errors, errors
    sequence(tenant)
    rows = leaf_rows(tenant)
    with transaction(s.engine) as db:
        ids = set(db.execute(sa.select(tlog.REC.c.id).where(tlog.REC.c.tenant_id == tenant.id)).scalars())
        kept = db.execute(sa.select(tlog.CHECKPOINT.c.size, tlog.CHECKPOINT.c.root)
                          .where(tlog.CHECKPOINT.c.tenant_id == tenant.id)).all()
    assert [r.idx for r in rows] == list(range(48)) and {r.record_id for r in rows} == ids
    data = [r.record_hash.encode() for r in rows]
    assert kept and all(bytes(root) == rfc9162.mth(data[:size]) for size, root in kept)
