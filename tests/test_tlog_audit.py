"""What a dishonest operator cannot hide: a person's whole chain deleted from the database, the
log rebuilt and every manifest and checkpoint signed again. ``consent verify`` with a checkpoint
saved before reports it; ``consent checkpoint fetch`` refuses the rewritten log. SQLite and
PostgreSQL."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from starlette.testclient import TestClient

from consent import crypto
from consent.audit import tlog
from consent.cli.main import main
from consent.cli.tlog import fetch_checkpoint
from consent.errors import BadToken
from consent.store.db import transaction
from consent.store.models import Subject
from consent.store.tables import STATE
from consent.store.tables import SUBJECT_IDENTIFIER as SI
from consent.web.app import create_app

from .conftest import settings_for
from .helpers import Tenant

SUBJ = Subject.__table__  # type: ignore[attr-defined]


def services(t: Tenant) -> Any:
    return t.client.app.state.services  # type: ignore[attr-defined]


def sequence(t: Tenant) -> None:
    s = services(t)
    tlog.run_once(s.engine, s.settings, s.signer, wait=True)


def export(t: Tenant, tmp: Path, name: str) -> Path:
    path = tmp / name
    r = t.get("/v1/exports/consents")
    assert r.status_code == 200, r.text
    path.write_bytes(r.content)
    return path


def verify(path: Path, jwks: Path, capsys: pytest.CaptureFixture[str], *checkpoints: Path) -> tuple[int, str, str]:
    args = ["verify", str(path), "--jwks", str(jwks)]
    for c in checkpoints:
        args += ["--checkpoint", str(c)]
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def people(t: Tenant, n: int, prefix: str) -> None:
    for i in range(n):
        t.record(email=f"{prefix}{i}@example.com")
        t.record("analytics", email=f"{prefix}{i}@example.com")


def delete_person(t: Tenant, email: str) -> int:
    """The operator's deletion: the subject's records, state, identifiers and row, all gone."""
    with transaction(services(t).engine, write=True) as db:
        subject_id = db.execute(sa.select(SI.c.subject_id).where(SI.c.tenant_id == t.id, SI.c.value == email)).scalar_one()
        db.execute(sa.delete(STATE).where(STATE.c.subject_id == subject_id))
        n = db.execute(sa.delete(tlog.REC).where(tlog.REC.c.subject_id == subject_id)).rowcount
        db.execute(sa.delete(SI).where(SI.c.subject_id == subject_id))
        db.execute(sa.delete(SUBJ).where(SUBJ.c.id == subject_id))
    return n


def rebuild_log(t: Tenant) -> None:
    """The operator's cover-up: the records left renumbered without the gap, the tenant's log
    dropped and built again, checkpoints re-signed."""
    with transaction(services(t).engine, write=True) as db:
        params = {"t": t.id}
        db.execute(sa.text("UPDATE consent_record SET leaf_index = -1 - leaf_index WHERE tenant_id = :t"), params)
        db.execute(sa.text("UPDATE consent_record SET leaf_index = x.n FROM (SELECT seq, ROW_NUMBER() OVER "
                           "(ORDER BY leaf_index DESC) - 1 AS n FROM consent_record WHERE tenant_id = :t) x "
                           "WHERE consent_record.seq = x.seq"), params)
        db.execute(sa.text("UPDATE event_counter SET leaves = (SELECT count(*) FROM consent_record "
                           "WHERE tenant_id = :t) WHERE tenant_id = :t"), params)
        for table in (tlog.LEAF, tlog.NODE, tlog.CHECKPOINT, tlog.STATE):
            db.execute(sa.delete(table).where(table.c.tenant_id == t.id))
    sequence(t)


def test_a_deleted_chain_is_reported_against_a_saved_checkpoint(tenant: Tenant, tmp_path: Path, capsys) -> None:
    people(tenant, 4, "p")
    sequence(tenant)
    jwks = tmp_path / "jwks.json"
    jwks.write_text(tenant.client.get("/.well-known/jwks.json").text)
    saved = tmp_path / "saved.note"
    saved.write_text(tenant.client.get(f"/v1/tlog/{tenant.id}/checkpoint").text)
    people(tenant, 2, "q")  # the log grows honestly: the saved checkpoint is a prefix of it
    sequence(tenant)
    code, out, err = verify(export(tenant, tmp_path, "honest.jsonl"), jwks, capsys, saved)
    assert code == 0, err
    assert json.loads(out)["tlog_size"] == 12 and json.loads(out)["saved_checkpoints_matched"] == [8]

    assert delete_person(tenant, "p1@example.com") == 2
    # Deleted rows only: the log still holds their leaves, and the export misses them.
    code, _, err = verify(export(tenant, tmp_path, "deleted.jsonl"), jwks, capsys)
    assert code == 1 and "is not in the export: a record was removed" in err

    rebuild_log(tenant)  # every signature the service can make, made again
    tampered = export(tenant, tmp_path, "tampered.jsonl")
    code, out, err = verify(tampered, jwks, capsys)
    assert code == 0, err  # consistent in itself: without a saved checkpoint nothing shows
    assert json.loads(out)["tlog_size"] == 10
    code, _, err = verify(tampered, jwks, capsys, saved)
    assert code == 1 and "no longer hash to the saved checkpoint" in err

    people(tenant, 3, "r")  # more records after the cover-up: the log is longer than the saved one again
    sequence(tenant)
    code, _, err = verify(export(tenant, tmp_path, "later.jsonl"), jwks, capsys, saved)
    assert code == 1 and "no longer hash to the saved checkpoint" in err


def test_a_rewritten_log_shorter_than_the_saved_checkpoint(tenant: Tenant, tmp_path: Path, capsys) -> None:
    people(tenant, 3, "s")
    sequence(tenant)
    jwks = tmp_path / "jwks.json"
    jwks.write_text(tenant.client.get("/.well-known/jwks.json").text)
    saved = tmp_path / "saved.note"
    saved.write_text(tenant.client.get(f"/v1/tlog/{tenant.id}/checkpoint").text)
    delete_person(tenant, "s2@example.com")
    rebuild_log(tenant)
    code, _, err = verify(export(tenant, tmp_path, "t.jsonl"), jwks, capsys, saved)
    assert code == 1 and "records were removed from the log" in err
    other = tmp_path / "forged.note"
    other.write_text(saved.read_text().replace("\n6\n", "\n5\n"))
    code, _, err = verify(export(tenant, tmp_path, "t.jsonl"), jwks, capsys, other)
    assert code == 1 and "does not verify" in err


def test_checkpoint_fetch_keeps_checkpoints_and_refuses_a_rewritten_log(tenant: Tenant, tmp_path: Path) -> None:
    c = tenant.client
    people(tenant, 3, "f")
    sequence(tenant)
    first = fetch_checkpoint("http://testserver", tenant.id, tmp_path, client=c)
    assert first["tree_size"] == 6 and first["consistent_with"] is None
    people(tenant, 5, "g")
    sequence(tenant)
    second = fetch_checkpoint("http://testserver", tenant.id, tmp_path, client=c)
    assert second["tree_size"] == 16 and second["consistent_with"] == 6
    assert sorted(p.name for p in (tmp_path / tenant.id).iterdir()) == ["16.note", "6.note"]
    again = fetch_checkpoint("http://testserver", tenant.id, tmp_path, client=c)
    assert again["consistent_with"] == 16
    delete_person(tenant, "f0@example.com")
    rebuild_log(tenant)
    people(tenant, 2, "h")
    sequence(tenant)  # 14 + 4 = 18 leaves: longer than the kept 16, but not an extension of it
    with pytest.raises(BadToken, match="not consistent"):
        fetch_checkpoint("http://testserver", tenant.id, tmp_path, client=c)
    stranger = crypto.note_vkey("testserver", crypto.generate_signing_key().public_jwk)
    with pytest.raises(BadToken, match="not signed by a known key"):  # a pinned key that did not sign it
        fetch_checkpoint("http://testserver", tenant.id, tmp_path / "x", [stranger], client=c)


def test_the_service_sequences_and_checkpoints_within_seconds(db_url: str, tenant: Tenant) -> None:
    with TestClient(create_app(settings_for(db_url, tlog_seconds=0.2))) as live:
        r = live.post("/v1/consents", headers=tenant.h, json={
            "subject": {"email": "soon@example.com"}, "purpose": "marketing_email", "decision": "granted"})
        assert r.status_code == 201, r.text
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            p = live.get(f"/v1/tlog/{tenant.id}/proof/inclusion", params={"record_id": r.json()["id"]})
            if p.status_code == 200:
                break
            time.sleep(0.1)
        assert p.status_code == 200, p.text
        assert p.json()["leaf_index"] == 0 and p.json()["tree_size"] == 1


def test_tlog_build_command_builds_an_older_ledger(tenant: Tenant, db_url: str, monkeypatch, capsys) -> None:
    from .ledger_factory import generate_ledger

    generate_ledger(services(tenant).engine, tenant.id, 40)  # written around the feed: no events
    monkeypatch.setenv("CONSENT_DATABASE_URL", db_url)
    monkeypatch.setenv("CONSENT_ISSUER", "http://testserver")
    assert main(["tlog", "build", "--tenant", tenant.id]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == [{"tenant": tenant.id, "appended": 40, "tree_size": 40}]
    note = tenant.client.get(f"/v1/tlog/{tenant.id}/checkpoints/40")
    assert note.status_code == 200 and note.text.startswith(f"testserver/tenants/{tenant.id}\n40\n")
    assert main(["tlog", "build", "--tenant", tenant.id]) == 0  # again: nothing to add
    assert json.loads(capsys.readouterr().out)[0]["appended"] == 0
