"""Migrations on both backends: up, down to base and up again; no drift between the table
models and what the migrations build; /readyz follows the database's revision."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from starlette.testclient import TestClient

from consent.store import db
from consent.store.models import TABLES
from consent.web.app import create_app

from .conftest import BACKENDS, PG_URL, settings_for
from .helpers import pg_schema_url


@pytest.fixture(params=BACKENDS)
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database of each backend (PostgreSQL: a schema of its own, not the shared one)."""
    if request.param == "postgresql":
        yield pg_schema_url(PG_URL, "migrations_test")
    else:
        yield f"sqlite:///{tmp_path / 'mig.db'}"


def tables(url: str) -> set[str]:
    engine = db.create_db_engine(url)
    try:
        return set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def revision(url: str) -> str | None:
    engine = db.create_db_engine(url)
    try:
        return db.current_revision(engine)
    finally:
        engine.dispose()


def drift(url: str) -> list[object]:
    """What `alembic revision --autogenerate` would write: must be nothing."""
    engine = db.create_db_engine(url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
            return list(compare_metadata(ctx, TABLES))
    finally:
        engine.dispose()


def test_upgrade_downgrade_upgrade(empty_url: str) -> None:
    head = db.head_revision(empty_url)
    assert head is not None
    model_tables = set(TABLES.tables)
    db.migrate(empty_url)
    assert revision(empty_url) == head
    assert model_tables <= tables(empty_url)
    db.downgrade(empty_url, "base")
    assert revision(empty_url) is None
    assert tables(empty_url) - {"alembic_version"} == set()
    db.migrate(empty_url)
    assert revision(empty_url) == head
    assert model_tables <= tables(empty_url)


def test_models_and_migrations_do_not_drift(empty_url: str) -> None:
    db.migrate(empty_url)
    assert drift(empty_url) == []


def test_drift_check_can_fail(empty_url: str) -> None:
    """The comparison sees a column the migrations did not create (so the test above means something)."""
    db.migrate(empty_url)
    engine = db.create_db_engine(empty_url)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("ALTER TABLE tenant ADD COLUMN stray_column INTEGER")
    finally:
        engine.dispose()
    diffs = drift(empty_url)
    assert any(d[0] == "remove_column" and d[3].name == "stray_column" for d in diffs), diffs  # type: ignore[index]


def test_readyz_follows_the_revision(empty_url: str) -> None:
    with TestClient(create_app(settings_for(empty_url))) as client:  # migrates on start
        r = client.get("/readyz")
        assert r.status_code == 200 and r.json()["status"] == "ready"
        db.downgrade(empty_url, "base")
        r = client.get("/readyz")
        assert r.status_code == 503 and r.json()["checks"]["migration"] is None
        assert r.json()["checks"]["head"] == db.head_revision(empty_url)
        db.migrate(empty_url)
        assert client.get("/readyz").status_code == 200
