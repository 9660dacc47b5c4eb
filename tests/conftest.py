"""Fixtures: every API test runs against SQLite and against the real PostgreSQL of this
machine, with the schema built by the real Alembic migrations. Each test run creates its own
PostgreSQL database (a unique name) and drops it at the end, so it never touches a database it
did not make; each test gets its own tenant, so tests never see each other's data."""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from starlette.testclient import TestClient

from consent import crypto
from consent.settings import Settings
from consent.store import db
from consent.web.app import create_app

from .helpers import ADMIN_TOKEN, Tenant, make_tenant

# The server only: each run makes its own databases on it, named after this prefix.
PG_SERVER = os.environ.get("CONSENT_TEST_PG_SERVER", "postgresql+psycopg://postgres@127.0.0.1:5432")
RUN_DB_PREFIX = f"consent_test_{os.getpid()}_{secrets.token_hex(3)}"
PG_URL = f"{PG_SERVER}/{RUN_DB_PREFIX}"
# The key-encryption key of this run's databases: in the environment, so every engine a test
# makes (and every `consent` process it starts) opens the secrets the service sealed.
SECRET_KEYS = os.environ.setdefault("CONSENT_SECRET_KEYS", crypto.new_kek_text())
BACKENDS = [b.strip() for b in os.environ.get("CONSENT_TEST_BACKENDS", "sqlite,postgresql").split(",") if b.strip()]


def _maintenance_engine() -> sa.Engine:
    return sa.create_engine(f"{PG_SERVER}/postgres", isolation_level="AUTOCOMMIT")


def create_run_database(suffix: str = "") -> str:
    """Create a database of this run (``RUN_DB_PREFIX`` + suffix) and return its URL."""
    name = RUN_DB_PREFIX + suffix
    engine = _maintenance_engine()
    try:
        with engine.connect() as conn:
            if not conn.execute(sa.text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}).first():
                conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    finally:
        engine.dispose()
    return f"{PG_SERVER}/{name}"


def drop_run_databases() -> None:
    """Drop every database this run created (and only those: they carry its unique prefix)."""
    engine = _maintenance_engine()
    try:
        with engine.connect() as conn:
            names = conn.execute(sa.text("SELECT datname FROM pg_database WHERE datname LIKE :p"),
                                 {"p": RUN_DB_PREFIX.replace("_", r"\_") + "%"}).scalars().all()
            for name in names:
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        engine.dispose()


def pytest_sessionstart(session: pytest.Session) -> None:
    if "postgresql" in BACKENDS:
        create_run_database()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if "postgresql" in BACKENDS:
        drop_run_databases()


def reset_postgres(url: str) -> None:
    """Drop everything in one of this run's databases (fails loudly if PostgreSQL is not there)."""
    assert url.rpartition("/")[2].split("?")[0].startswith(RUN_DB_PREFIX), url
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP SCHEMA IF EXISTS public CASCADE")
            conn.exec_driver_sql("CREATE SCHEMA public")
    finally:
        engine.dispose()


def fresh_database(backend: str, tmp: Path) -> str:
    """An empty database of that backend, migrated to head; returns its URL."""
    if backend == "postgresql":
        reset_postgres(PG_URL)
        url = PG_URL
    else:
        url = f"sqlite:///{tmp / 'consent.db'}"
    db.migrate(url)
    return url


@pytest.fixture(scope="session", params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="session")
def db_url(backend: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    return fresh_database(backend, tmp_path_factory.mktemp(backend))


def settings_for(url: str, **overrides: Any) -> Settings:
    env = {"CONSENT_DATABASE_URL": url, "CONSENT_ADMIN_TOKEN": ADMIN_TOKEN, "CONSENT_DEMO": "false",
           "CONSENT_ISSUER": "http://testserver", "CONSENT_SECRET_KEYS": SECRET_KEYS, "CONSENT_WEBHOOK_WORKER": "false",
           "CONSENT_TLOG_SECONDS": "0",  # tests run the log's sequencer themselves (tlog.run_once)
           # the test receivers listen on 127.0.0.1 over http; test_webhook_targets refuses both
           "CONSENT_WEBHOOK_ALLOW_PRIVATE": "true",
           # the shared test client is one IP making thousands of calls; test_limits sets its own
           "CONSENT_RATE_LIMIT_PER_MINUTE": "1000000", "CONSENT_RATE_LIMIT_IP_PER_MINUTE": "1000000"}
    return Settings.from_env(env, **overrides)


@pytest.fixture(scope="session")
def settings(db_url: str) -> Settings:
    return settings_for(db_url)


@pytest.fixture(scope="session")
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture(scope="module")
def route_client(db_url: str) -> Iterator[TestClient]:
    """The same service on its per-request executors only (no batched reader, no group commit):
    what the batched executors' answers are compared with."""
    with TestClient(create_app(settings_for(db_url))) as c:
        services = c.app.state.services  # type: ignore[attr-defined]
        services.check_reader = services.record_writer = None
        yield c


@pytest.fixture
def tenant(client: TestClient) -> Tenant:
    """A fresh tenant with the usual catalog: purposes, a session cookie, a policy version."""
    return make_tenant(client)


@pytest.fixture
def bare_tenant(client: TestClient) -> Tenant:
    """A fresh tenant with nothing defined yet."""
    return make_tenant(client, catalog=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
