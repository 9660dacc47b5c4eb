"""No command destroys data by accident: a downgrade needs an explicit target, refuses to drop
tables holding rows without --destroy-data and lists them with --dry-run; a retention run says
what it would purge and asks before doing it on a terminal. Both backends, each test on a
database (PostgreSQL: a schema) of its own."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic.script import ScriptDirectory
from starlette.testclient import TestClient

from consent.cli import main
from consent.store import db
from consent.store.models import utcnow
from consent.web.app import create_app

from .conftest import BACKENDS, PG_URL, settings_for
from .helpers import make_tenant, pg_schema_url
from .test_migrations import revision, tables

AUDIT_REVISION = "0014"  # migrations/versions/0014_tenant_audit.py: creates tenant_audit


@pytest.fixture(params=BACKENDS)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "postgresql":
        yield pg_schema_url(PG_URL, "no_destruction_test")
    else:
        yield f"sqlite:///{tmp_path / 'nd.db'}"


@pytest.fixture
def run(url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Any:
    """``consent ARGS...`` against ``url``: (exit status, stdout, stderr)."""
    settings = settings_for(url)
    monkeypatch.setattr(main.Settings, "from_env", classmethod(lambda cls, *a, **k: settings))

    def call(*args: str) -> tuple[int, str, str]:
        code = main.main(list(args))
        out, err = capsys.readouterr()
        return code, out, err
    return call




def test_downgrade_needs_a_target_and_a_flag_to_destroy(url: str, run: Any) -> None:
    with TestClient(create_app(settings_for(url))) as c:
        t = make_tenant(c, catalog=False)
        assert t.client.patch("/v1/tenant", json={"notice_days": 5}, headers=t.h).status_code == 200
    head = db.head_revision(url)
    before = tables(url)
    code, _, err = run("migrate", "--downgrade")
    assert code == 2 and err.count("\n") == 1 and "explicit target" in err, err
    code, _, err = run("migrate", "--downgrade", "--revision", "base", "--dry-run")
    assert code == 0 and "would drop table tenant (1 rows)" in err and "would drop table consent_record (0 rows)" in err
    assert revision(url) == head and tables(url) == before
    code, _, err = run("migrate", "--downgrade", "--revision", "base")
    assert code == 2 and err.startswith("error: refusing to drop") and "--destroy-data" in err, err
    assert revision(url) == head and tables(url) == before
    # going below the audit trail's revision drops it, and it holds a row: refused too, then allowed
    previous = ScriptDirectory.from_config(db.alembic_config(url)).get_revision(AUDIT_REVISION).down_revision
    code, _, err = run("migrate", "--downgrade", "--revision", str(previous))
    assert code == 2 and "tenant_audit" in err and revision(url) == head
    code, _, err = run("migrate", "--downgrade", "--revision", str(previous), "--destroy-data")
    assert code == 0 and revision(url) == previous and "tenant_audit" not in tables(url), err
    assert "tenant" in tables(url)
    # an empty table goes without the flag; an unknown revision is one line
    assert run("migrate")[0] == 0 and revision(url) == head
    code, _, err = run("migrate", "--downgrade", "--revision", str(previous))
    assert code == 0 and revision(url) == previous
    code, _, err = run("migrate", "--downgrade", "--revision", "nope")
    assert code == 2 and err.count("\n") == 1 and err.startswith("error:"), err


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_retention_says_what_it_would_purge_and_asks(url: str, run: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    with TestClient(create_app(settings_for(url))) as c:
        t = make_tenant(c)
        old = (utcnow() - timedelta(days=60)).isoformat()
        for n in range(3):
            t.record(source="import", recorded_at=old, policy_version="v1", email=f"r{n}@example.com",
                     evidence={"ip": "192.0.2.1"})
        assert t.put("/v1/tenant/retention", json={"evidence_retention_days": 30}).status_code == 200

        def evidence_left() -> int:
            return sum(r["evidence"] is not None for n in range(3)
                       for r in t.get(f"/v1/subjects/email:r{n}@example.com/export").json()["records"])

        code, out, err = run("retention", "run", "--dry-run")
        assert code == 0 and json.loads(out)["evidence_purged"] == 3 and "evidence of 3 records" in err
        assert evidence_left() == 3
        monkeypatch.setattr("sys.stdin", Terminal("n\n"))
        code, out, err = run("retention", "run")
        assert code == 1 and "would purge the evidence of 3 records" in err and "nothing done" in err
        assert evidence_left() == 3
        monkeypatch.setattr("sys.stdin", Terminal("y\n"))
        code, out, _ = run("retention", "run")
        assert code == 0 and json.loads(out)["evidence_purged"] == 3 and evidence_left() == 0
        t.record(source="import", recorded_at=old, policy_version="v1", email="r0@example.com",
                 evidence={"ip": "192.0.2.2"})
        monkeypatch.setattr("sys.stdin", Terminal(""))  # --yes never reads the terminal
        code, out, _ = run("retention", "run", "--yes")
        assert code == 0 and json.loads(out)["evidence_purged"] == 1
