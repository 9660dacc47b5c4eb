"""Migrations with data, on PostgreSQL: a database filled at every revision of the Alembic
script directory (iterated, so new revisions are covered) upgrades to head keeping every
record and chain; downgrade/upgrade round-trips keep them too."""

from __future__ import annotations

import re
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.script import ScriptDirectory
from sqlalchemy.orm import Session

from consent import catalog, db, ledger, tenants
from consent.crypto import Signer, generate_signing_key
from consent.models import ConsentRecord, Subject
from consent.schemas import ConsentIn, PolicyVersionIn, PurposeIn, TenantIn

from .conftest import PG_URL, reset_postgres
from .helpers import DOC_SHA


def second_database() -> str:
    base, _, name = PG_URL.rpartition("/")
    other = f"{name}_migrations"
    engine = sa.create_engine(f"{base}/postgres", isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            if not conn.execute(sa.text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": other}).first():
                conn.exec_driver_sql(f'CREATE DATABASE "{other}"')
    finally:
        engine.dispose()
    return f"{base}/{other}"


def fill(url: str, rev: str) -> str:
    """A tenant with a catalog and two subjects' chains, written by the domain code."""
    engine = db.create_db_engine(url)
    pair = generate_signing_key()
    signer = Signer(pair.kid, pair.private_pem)
    try:
        with db.transaction(engine, write=True) as s:
            t, _ = tenants.create_tenant(s, TenantIn(name=f"at {rev}", notice_days=0))
            catalog.put_purpose(s, t.id, "marketing_email", PurposeIn(title="Mail"))
            catalog.publish_version(s, t.id, 0, "privacy", PolicyVersionIn(
                version="v1", document_url="https://acme.test/p", document_sha256=DOC_SHA,
                purposes=["marketing_email"]))
        for i, decision in enumerate(["granted", "withdrawn", "granted", "denied"]):
            with db.transaction(engine, write=True) as s:
                tenant = tenants.get_tenant(s, t.id)
                ledger.record_decision(s, tenant, ConsentIn.model_validate({
                    "subject": {"email": f"m{i % 2}@example.com"}, "purpose": "marketing_email",
                    "decision": decision}), signer=signer, issuer="http://testserver", idempotency_key=f"{rev}-{i}")
        return str(t.id)
    finally:
        engine.dispose()


def snapshot(url: str) -> dict[str, Any]:
    """Every record (id -> hash) and a verification of every chain."""
    engine = db.create_db_engine(url)
    try:
        with Session(engine) as s:
            records = list(s.execute(sa.select(ConsentRecord).order_by(ConsentRecord.seq)).scalars())  # type: ignore[arg-type]
            subjects = {x.id: x for x in s.execute(sa.select(Subject)).scalars()}
    finally:
        engine.dispose()
    heads: dict[str, str | None] = {}
    for r in records:
        assert r.prev_hash == heads.get(r.subject_id), f"broken chain at {r.id}"
        assert ledger.compute_record_hash(r, subjects[r.subject_id].pseudonym) == r.record_hash
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
