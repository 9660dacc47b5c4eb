"""Migrations with data, on PostgreSQL: a database filled at every revision of the Alembic
script directory (iterated, so new revisions are covered) upgrades to head keeping every
record and chain; downgrade/upgrade round-trips keep them too."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.script import ScriptDirectory
from sqlalchemy.orm import Session

from consent.audit import tlog
from consent.crypto import Signer, generate_signing_key
from consent.ledger import catalog, recorder, tenants
from consent.ledger.schemas import ConsentIn, PolicyVersionIn, PurposeIn, TenantIn
from consent.store import db
from consent.store.models import ConsentRecord, Subject

from .conftest import create_run_database, reset_postgres
from .helpers import DOC_SHA


def second_database() -> str:
    return create_run_database("_migrations")


REC = ConsentRecord.__table__  # type: ignore[attr-defined]
# Columns a revision adds and fills from the others: table -> column -> type.
ADDED_LATER = {"consent_record": {"export_line": "bytea"},
               "consent_state": {"receipt_seq": "bigint", "record_id": "varchar(40)", "receipt": "varchar"},
               "subject": {"merged_into": "varchar(40)"}}
ADDED_LATER["consent_record"]["gpc"] = ADDED_LATER["consent_state"]["gpc"] = "boolean"
ADDED_LATER["consent_record"]["leaf_index"] = "bigint"
ADDED_LATER["event_counter"] = {"leaves": "bigint NOT NULL DEFAULT 0"}


def columns_of(engine: sa.Engine, table: str = "consent_record") -> set[str]:
    return {c["name"] for c in sa.inspect(engine).get_columns(table)}


def fill(url: str, rev: str) -> str:
    """A tenant with a catalog and two subjects' chains, written by the domain code. At a
    revision without a column of ``ADDED_LATER`` the column is there only while writing, and
    dropped again: the rows hold what code of that revision would have written."""
    engine = db.create_db_engine(url)
    pair = generate_signing_key()
    signer = Signer(pair.kid, pair.private_pem)
    missing = [(t, c, kind) for t, cols in ADDED_LATER.items() if t in sa.inspect(engine).get_table_names()
               for c, kind in cols.items() if c not in columns_of(engine, t)]
    try:
        if missing:
            with engine.begin() as conn:
                for t, c, kind in missing:
                    conn.exec_driver_sql(f"ALTER TABLE {t} ADD COLUMN {c} {kind}")
        return _fill(engine, rev, signer)
    finally:
        if missing:
            with engine.begin() as conn:
                for t, c, _ in missing:
                    conn.exec_driver_sql(f"ALTER TABLE {t} DROP COLUMN {c}")
        engine.dispose()


def _fill(engine: sa.Engine, rev: str, signer: Signer) -> str:
    with db.transaction(engine, write=True) as s:
        t, _ = tenants.create_tenant(s, TenantIn(name=f"at {rev}", notice_days=0))
        catalog.put_purpose(s, t.id, "marketing_email", PurposeIn(title="Mail"))
        catalog.publish_version(s, t.id, 0, "privacy", PolicyVersionIn(
            version="v1", document_url="https://acme.test/p", document_sha256=DOC_SHA,
            purposes=["marketing_email"]))
    for i, decision in enumerate(["granted", "withdrawn", "granted", "denied"]):
        with db.transaction(engine, write=True) as s:
            tenant = tenants.get_tenant(s, t.id)
            recorder.record_decision(s, tenant, ConsentIn.model_validate({
                "subject": {"email": f"m{i % 2}@example.com"}, "purpose": "marketing_email",
                "decision": decision}), signer=signer, issuer="http://testserver", idempotency_key=f"{rev}-{i}")
    return str(t.id)


def snapshot(url: str) -> dict[str, Any]:
    """Every record (id -> hash) and a verification of every chain (and, where the revision has
    them, of every stored export line and of consent_state's copy of each current receipt)."""
    engine = db.create_db_engine(url)
    try:
        columns = [c for c in REC.c if c.name in columns_of(engine)]
        with Session(engine) as s:
            records = s.execute(sa.select(*columns).order_by(REC.c.seq)).all()
            subjects = {x.id: x for x in s.execute(sa.select(Subject.id, Subject.pseudonym, Subject.head_hash))}
            copies = s.execute(sa.text(
                "SELECT s.receipt_seq, s.record_seq, s.record_id, r.id, s.receipt, r.receipt FROM consent_state s "
                "JOIN consent_record r ON r.seq = s.record_seq")).all() \
                if "receipt_seq" in columns_of(engine, "consent_state") else []
    finally:
        engine.dispose()
    for copy in copies:  # filled by the migration, or written with the record
        assert copy[0] == copy[1] and copy[2] == copy[3] and copy[4] == copy[5], copy
    heads: dict[str, str | None] = {}
    for r in records:
        assert r.prev_hash == heads.get(r.subject_id), f"broken chain at {r.id}"
        pseudonym = subjects[r.subject_id].pseudonym
        assert recorder.compute_record_hash(r, pseudonym) == r.record_hash
        if "export_line" in r._fields:
            sealed = SimpleNamespace(**r._asdict())
            recorder.seal_record(sealed, pseudonym)  # type: ignore[arg-type]
            assert r.export_line == sealed.export_line, f"export line of {r.id}"
        heads[r.subject_id] = r.record_hash
    for sid, head in heads.items():
        assert subjects[sid].head_hash == head
    return {r.id: r.record_hash for r in records}


def test_upgrade_with_data_from_every_revision(backend) -> None:
    if backend != "postgresql":
        pytest.skip("run once, on PostgreSQL")
    url = second_database()
    reset_postgres(url)
    script = ScriptDirectory.from_config(db.alembic_config(url))
    revisions = [r.revision for r in reversed(list(script.walk_revisions()))]  # base -> head
    assert revisions[0] == "0001" and revisions[-1] == script.get_current_head()
    filled: list[str] = []
    for rev in revisions:
        db.migrate(url, rev)
        try:
            fill(url, rev)
            filled.append(rev)
        except sa.exc.DBAPIError as exc:  # head models may need columns a later revision adds
            if rev == revisions[-1] or rev == revisions[0]:
                raise
            print(f"revision {rev}: the current domain code cannot write at this revision ({exc.orig!r})")
    print(f"\nrevisions {revisions}, filled at {filled}")
    before = snapshot(url)
    assert len(before) == 4 * len(filled)
    # round trips: down one revision at a time to the first, then back up to head
    for rev in reversed(revisions[:-1]):
        db.downgrade(url, rev)
        assert snapshot(url) == before
    db.migrate(url)
    assert snapshot(url) == before
    fill(url, "after-roundtrip")
    assert len(snapshot(url)) == len(before) + 4
    # schema round trip through base
    db.downgrade(url, "base")
    engine = sa.create_engine(url)
    try:
        names = set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()
    assert names <= {"alembic_version"}, names
    db.migrate(url)
    assert snapshot(url) == {}
    assert re.match(r"^\w+$", revisions[-1])


def test_0019_moves_dashboard_events_into_the_tenant_audit_trail(backend: str, tmp_path) -> None:
    """Filled at 0018 (a tenant with a settings change and dashboard events, one actor longer
    than the trail's 64 characters), 0019 keeps every event in ``tenant_audit`` with its time,
    and drops ``dashboard_event``; downgrade brings back the table, empty."""
    if backend == "postgresql":
        url = create_run_database("_audit0019")
        reset_postgres(url)
    else:
        url = f"sqlite:///{tmp_path / 'audit.db'}"
    db.migrate(url, "0018")
    engine = db.create_db_engine(url)
    t1, t2 = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC), datetime(2026, 2, 3, 4, 5, 6, tzinfo=UTC)
    long_actor = "user:" + "x" * 90 + "@example.com"
    try:
        with Session(engine) as s, s.begin():
            tenant_id = tenants.create_tenant(s, TenantIn(name="Acme"))[0].id
            tenants.record_change(s, tenant_id, "cli", "settings.update", {"notice_days": 0}, {"notice_days": 3})
            s.execute(sa.text(
                "INSERT INTO dashboard_event (tenant_id, at, actor, action, target, detail) VALUES "
                "(:t, :at1, 'key:key_1', 'sign_in', NULL, :d1), (:t, :at2, :long, 'erase_subject', 'sub_1', :d2),"
                " (:t, :at2, 'key:key_1', 'sign_out', NULL, NULL)"),
                {"t": tenant_id, "at1": t1, "at2": t2, "long": long_actor,
                 "d1": '{"role": "admin"}', "d2": '{"erased_now": true}'})
        db.migrate(url, "0019")
        assert "dashboard_event" not in sa.inspect(engine).get_table_names()
        with Session(engine) as s:
            rows = s.execute(sa.text("SELECT actor, action, changed_at, before, after FROM tenant_audit "
                                     "WHERE tenant_id = :t ORDER BY id"), {"t": tenant_id}).all()
        got = [(r.actor, r.action, r.before if isinstance(r.before, dict) else json.loads(r.before),
                r.after if isinstance(r.after, dict) else json.loads(r.after)) for r in rows]
        assert got == [
            ("cli", "settings.update", {"notice_days": 0}, {"notice_days": 3}),
            ("dashboard key:key_1", "dashboard.sign_in", {}, {"detail": {"role": "admin"}}),
            (f"dashboard {long_actor}"[:64], "dashboard.erase_subject", {},
             {"target": "sub_1", "detail": {"erased_now": True}}),
            ("dashboard key:key_1", "dashboard.sign_out", {}, {}),
        ]
        times = [r.changed_at if isinstance(r.changed_at, datetime) else datetime.fromisoformat(r.changed_at)
                 for r in rows[1:]]
        assert [t.replace(tzinfo=UTC) if t.tzinfo is None else t for t in times] == [t1, t2, t2]
        db.downgrade(url, "0018")
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM dashboard_event")).scalar() == 0
            assert conn.execute(sa.text("SELECT count(*) FROM tenant_audit")).scalar() == 4
        db.migrate(url)
    finally:
        engine.dispose()


def test_0020_keeps_every_leaf_index_the_log_gave(backend: str, tmp_path) -> None:
    """Filled at 0019 with part of one tenant's records already in its log (out of seq order,
    and a leaf whose record is gone), 0020 stores each record's index: the log's own where it
    has one, the next ones in seq order otherwise; the counters continue after them, and the
    sequencer then appends the rest. Downgrade and upgrade again give the same indexes."""
    if backend == "postgresql":
        url = create_run_database("_tlog0020")
        reset_postgres(url)
    else:
        url = f"sqlite:///{tmp_path / 'tlog.db'}"
    db.migrate(url, "0019")
    a, b = fill(url, "0019a"), fill(url, "0019b")
    engine = db.create_db_engine(url)
    try:
        with engine.begin() as conn:
            ids = conn.execute(sa.text("SELECT id FROM consent_record WHERE tenant_id = :t ORDER BY seq"),
                               {"t": a}).scalars().all()
            for idx, rid in ((0, ids[2]), (1, ids[0]), (2, "rec_deleted_by_retention")):
                conn.execute(sa.text("INSERT INTO tlog_leaf (tenant_id, idx, record_id, jti, hash) "
                                     "VALUES (:t, :i, :r, NULL, :h)"), {"t": a, "i": idx, "r": rid, "h": b"x" * 32})
            conn.execute(sa.text("INSERT INTO tlog_state (tenant_id, size, position, build_seq, build_until, "
                                 "signed_size, updated_at) VALUES (:t, 3, 0, 0, 0, 0, :now)"),
                         {"t": a, "now": datetime(2026, 1, 1, tzinfo=UTC)})
        expected = {a: {ids[2]: 0, ids[0]: 1, ids[1]: 3, ids[3]: 4}}

        def stored() -> dict[str, dict[str, int]]:
            with engine.connect() as conn:
                rows = conn.execute(sa.text("SELECT tenant_id, id, leaf_index FROM consent_record")).all()
            out: dict[str, dict[str, int]] = {}
            for r in rows:
                out.setdefault(r.tenant_id, {})[r.id] = r.leaf_index
            return out

        db.migrate(url)
        got = stored()
        assert got[a] == expected[a]
        assert sorted(got[b].values()) == [0, 1, 2, 3]
        with engine.connect() as conn:
            counters = dict(conn.execute(sa.text("SELECT tenant_id, leaves FROM event_counter")).all())
        assert (counters[a], counters[b]) == (5, 4)
        with Session(engine) as s, s.begin():
            assert tlog.sequence(s, a) == 2 and tlog.tree_size(s, a) == 5
        db.downgrade(url, "0019")
        db.migrate(url)
        assert stored() == got
    finally:
        engine.dispose()
