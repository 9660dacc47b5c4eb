"""Engine, sessions and migrations. The app's lifespan owns the engine; a unit of work is
one transaction, committed or rolled back in ``transaction()`` only."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import CursorResult, Engine
from sqlalchemy.orm import Session

WRITE = {"sqlite_immediate": True}
# PostgreSQL reads run without BEGIN/COMMIT (two round trips fewer); at READ COMMITTED every
# statement has its own snapshot inside a transaction too, so a read-only unit sees the same.
READ_PG = {"isolation_level": "AUTOCOMMIT"}
# A pooled connection that sat idle longer than this is pinged before use (see below).
IDLE_PING_SECONDS = 2.0


NO_KEK = ("CONSENT_SECRET_KEYS is not set: a PostgreSQL database needs a key-encryption key to seal "
          "the secrets it stores (make one with: openssl rand -base64 32; see docs/reliability.md)")


def sqlite_path(url: str) -> str | None:
    """The file of a SQLite URL (None: in memory, a URI, or not SQLite)."""
    if not url.startswith("sqlite"):
        return None
    path = url.split("///", 1)[-1].split("?", 1)[0]
    return path if path and path != ":memory:" and not path.startswith("file:") else None


def kek_file(url: str) -> Path | None:
    """Where the embedded default keeps its generated key-encryption key: beside the database."""
    path = sqlite_path(url)
    return Path(path + ".kek") if path else None


def keyring_for(url: str, secret_keys: Any = None) -> Any:
    """The key-encryption keys of the database at ``url``: ``secret_keys`` (the setting), else
    CONSENT_SECRET_KEYS from the environment, else (SQLite) the key file beside the database,
    generated 0600 on first use. PostgreSQL without one gets a keyring that refuses to seal or
    open (create_app and the CLI refuse to start before that)."""
    from consent import crypto

    if secret_keys is None:
        from consent.settings import env_setting

        secret_keys = env_setting("secret_keys")
    if secret_keys:
        return crypto.Keyring([crypto.parse_kek(str(k)) for k in secret_keys])
    if not url.startswith("sqlite"):
        return crypto.NoKeyring(NO_KEK)
    path = kek_file(url)
    if path is None:  # an in-memory database lives as long as this key
        return crypto.Keyring([crypto.parse_kek(crypto.new_kek_text())])
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(crypto.new_kek_text() + "\n")
            f.flush()
            os.fsync(f.fileno())
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    if not lines:
        raise crypto.SecretKeyError(f"{path} holds no key-encryption key")
    return crypto.Keyring([crypto.parse_kek(line) for line in lines])  # newest first, like the setting


def create_db_engine(url: str, *, secret_keys: Any = None, **kwargs: Any) -> Engine:
    """An engine with the per-backend settings this service relies on, and the database's
    key-encryption keys on its dialect (models.Sealed columns use them)."""
    kwargs.setdefault("hide_parameters", True)  # driver errors (logged) never carry emails or keys
    engine = _create_engine(url, **kwargs)
    engine.dialect.consent_keyring = keyring_for(url, secret_keys)  # type: ignore[attr-defined]
    return engine


def _create_engine(url: str, **kwargs: Any) -> Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1].split("?", 1)[0]
        if path and path != ":memory:" and not path.startswith("file:"):
            Path(path).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            # the ledger holds personal data and secrets: readable by this user only, from
            # creation (SQLite gives its -wal and -shm files the database file's mode). Only a
            # file that does not exist yet is touched: closing any descriptor of an open SQLite
            # file would drop this process's locks on it.
            if not os.path.exists(path):
                with contextlib.suppress(FileExistsError):
                    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        engine = sa.create_engine(
            url, connect_args={"check_same_thread": False, "timeout": 30}, **kwargs
        )

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (see below)
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: sa.Connection) -> None:
            # Writers take the write lock up front: a deferred transaction that reads the chain
            # head and then writes would fail with SQLITE_BUSY instead of waiting its turn.
            immediate = conn.get_execution_options().get("sqlite_immediate")
            conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

        return engine
    # 32 + 8 = the threadpool's size (anyio's default limiter, 40): every worker thread can
    # hold a connection. Overflow connections are closed on return (a reconnect each time), so
    # the steady pool covers 32 concurrent clients per worker.
    kwargs.setdefault("pool_size", 32)
    kwargs.setdefault("max_overflow", 8)
    engine = sa.create_engine(url, **kwargs)
    if not kwargs.get("pool_pre_ping"):
        _ping_when_idle(engine)
    return engine


def service_engine_options(settings: Any) -> dict[str, Any]:
    """The service's own engine on PostgreSQL: a connection budget and timeouts, so a database
    that stops answering (or a black-holed network) costs seconds, not minutes. Connect within
    ``db_connect_timeout_seconds``; the server ends any statement after
    ``db_statement_timeout_seconds``; the kernel drops a connection whose sent data goes
    unacknowledged for as long (``tcp_user_timeout``) and probes idle ones (keepalives); a
    checkout waits at most the connect timeout for a free connection. SQLite: nothing to add."""
    if settings.is_sqlite:
        return {}
    connect_ms = int(settings.db_connect_timeout_seconds * 1000)
    statement_ms = int(settings.db_statement_timeout_seconds * 1000)
    given = sa.engine.make_url(settings.database_url).query.get("options") or ""  # e.g. a search_path
    options = " ".join([*(given if isinstance(given, tuple) else (given,)), f"-c statement_timeout={statement_ms}"])
    return {
        "pool_size": settings.db_pool_size, "max_overflow": 0,
        "pool_timeout": settings.db_connect_timeout_seconds,
        "connect_args": {
            "connect_timeout": max(1, round(settings.db_connect_timeout_seconds)),
            "options": options.strip(),
            "tcp_user_timeout": max(connect_ms, statement_ms),
            "keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2, "keepalives_count": 2,
        },
    }


def _ping_when_idle(engine: Engine) -> None:
    """Perf: ``pool_pre_ping`` costs a round trip on every checkout. Ping only connections
    that sat unused for IDLE_PING_SECONDS (where a database restart could have gone
    unnoticed); a busy connection that turns out dead fails one statement, and SQLAlchemy
    then invalidates the whole pool, so the next checkout connects afresh either way."""

    @event.listens_for(engine, "checkin")
    def _checkin(_dbapi_conn: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checkout(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        since = record.info.pop("idle_since", None)
        if since is None or time.monotonic() - since < IDLE_PING_SECONDS:
            return
        try:
            alive = engine.dialect.do_ping(dbapi_conn)
        except engine.dialect.loaded_dbapi.Error:  # the driver's own errors: the connection is gone
            alive = False
        if not alive:
            raise sa.exc.DisconnectionError("pooled connection is gone")  # the pool reconnects


@contextmanager
def transaction(engine: Engine, *, write: bool = False, read_only: bool = False) -> Iterator[Session]:
    """One unit of work: commit on success, roll back on any exception. ``read_only`` units
    (statements that never write) skip BEGIN/COMMIT on PostgreSQL."""
    with Session(engine, expire_on_commit=False) as session:
        if write:
            session.connection(execution_options=WRITE)
        elif read_only and engine.dialect.name == "postgresql":
            session.connection(execution_options=READ_PG)
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


def migrations_dir() -> Path:
    """Where the Alembic scripts live: CONSENT_MIGRATIONS_DIR, else the package's own
    ``migrations/`` (in a checkout a link to the repository's ``migrations/``; an installed
    wheel carries a copy)."""
    from consent.settings import env_setting

    env = env_setting("migrations_dir")
    path = Path(env) if env else Path(__file__).parent / "migrations"
    if not (path / "env.py").is_file():
        from consent.errors import ConsentError

        raise ConsentError(f"no Alembic migrations at {path} (CONSENT_MIGRATIONS_DIR)")
    return path


def alembic_config(url: str, secret_keys: Any = None) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.attributes["secret_keys"] = secret_keys
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    cfg.attributes["configure_logger"] = False
    return cfg


def migrate(url: str, revision: str = "head", *, secret_keys: Any = None) -> None:
    """Bring the database at ``url`` to ``revision`` (upgrade)."""
    from alembic import command

    if url.startswith("sqlite"):
        create_db_engine(url, secret_keys=secret_keys).dispose()  # makes the data directory
    command.upgrade(alembic_config(url, secret_keys), revision)


def downgrade(url: str, revision: str) -> None:
    """Take the database at ``url`` down to ``revision`` (the CLI asks ``downgrade_plan`` first)."""
    from alembic import command

    command.downgrade(alembic_config(url), revision)


def tables_at(revision: str) -> set[str]:
    """The tables the migrations build up to ``revision`` (``base``: none), found by running
    them on a scratch SQLite file."""
    import tempfile

    if revision == "base":
        return set()
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'scratch.db'}"
        migrate(url, revision)
        engine = create_db_engine(url)
        try:
            return set(sa.inspect(engine).get_table_names()) - {"alembic_version"}
        finally:
            engine.dispose()


def downgrade_plan(url: str, revision: str) -> dict[str, int]:
    """The tables a downgrade to ``revision`` would drop, with how many rows each holds now."""
    engine = create_db_engine(url)
    try:
        current = set(sa.inspect(engine).get_table_names()) - {"alembic_version"}
        dropped = sorted(current - tables_at(revision))
        with engine.connect() as conn:
            return {t: conn.execute(sa.select(sa.func.count()).select_from(sa.table(t))).scalar_one()
                    for t in dropped}
    finally:
        engine.dispose()


def head_revision(url: str) -> str | None:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config(url)).get_current_head()


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


# Every sealed column (models.Sealed) as (table, primary key column, column). The migration that
# sealed them carries its own copy: it must keep meaning what it did when it ran.
SEALED_COLUMNS = (
    ("tenant", "id", "hash_key"),
    ("tenant", "id", "token_secret"),
    ("signing_key", "kid", "private_pem"),
    ("subject_token_key", "kid", "secret"),
    ("email_link_secret", "id", "secret"),
    ("webhook_endpoint", "id", "secret"),
    ("webhook_endpoint", "id", "previous_secret"),
)


def reseal(conn: sa.Connection, columns: Any = SEALED_COLUMNS) -> int:
    """Seal every stored secret under the newest key-encryption key of ``conn``'s engine: rows
    still in plain text (written before sealing) and rows sealed under an older key. Returns
    how many values changed. Any value that opens under no key fails the whole run (nothing is
    written: the caller's transaction rolls back)."""
    from consent import crypto

    ring = crypto.keyring_of(conn)
    changed = 0
    for table, pk, column in columns:
        where = f"{table}.{column}"
        t = sa.table(table, sa.column(pk), sa.column(column))
        for key, value in conn.execute(sa.select(t.c[pk], t.c[column])).all():
            if value is None or ring.is_current(value, where):
                continue
            conn.execute(sa.update(t).where(t.c[pk] == key)
                         .values({column: ring.seal(ring.open(value, where), where)}))
            changed += 1
    return changed


def rowcount(result: Any) -> int:
    """Rows an UPDATE or DELETE touched: Session.execute is typed as returning a plain Result,
    but for these statements it is a CursorResult, which carries the count."""
    return cast(CursorResult[Any], result).rowcount
