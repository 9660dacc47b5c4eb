"""The batched executor of ``GET /v1/check``: many checks, one statement (``statements.CHECK``).

The route (``api.CheckOne``) hands each check to this process's ``Reader`` and builds the answer
from the row it gets back (``checks.check_answer``); the per-request executor
(``checks.check_rows``) runs the same statement for one check, where no reader runs (an
in-memory SQLite database) or after a reader failure (logged and counted in /metrics).

- SQLite: the checks that arrive in one turn of the event loop are answered in its next turn,
  by one statement on a connection of the process's own.
- PostgreSQL: two asynchronous connections per process; an idle one takes *every* check
  waiting at that moment and answers them with one statement over all of them (group lookups,
  like group commit), prepared once per connection and run on libpq directly (``pgraw``).

Nothing about consent is cached: the statement re-checks, in the snapshot it answers from, that
the API key still works, so a revocation is seen by the very next check in every process.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.engine import Engine

from consent.ledger import pgraw, statements
from consent.store.models import sqlite_time, utcnow

log = logging.getLogger("consent.ledger.batch_reads")

SQLITE_CACHE_KIB = 128 * 1024  # page cache of the reader's own SQLite connection
PG_CONNECTIONS = 2  # per process; each carries a whole batch per round trip

# One check to run: (key digest, tenant_id, kind, hash or subject id, purpose).
Item = tuple[str, str, str, str, str]
# Its answer: (key_ok, purpose_ok, subject_id, decision, confirmed, policy_version, record_id,
# receipt, stale, gpc).
Row = tuple[Any, ...]

_PG_BATCH = pgraw.RawStatement("consent_check", statements.CHECK_PG_RAW, statements.CHECK_PG_TYPES)


def pg_connect_args(engine: Engine) -> dict[str, Any]:
    """What the engine itself connects with, for the plain psycopg connections of the batched
    executors."""
    _, params = engine.dialect.create_connect_args(engine.url)
    params.pop("context", None)  # SQLAlchemy's adapters: plain psycopg types suffice here
    params.setdefault("connect_timeout", 5)
    return dict(params)


async def pg_connect(connect_args: dict[str, Any]) -> Any:
    """An autocommit connection with server-side prepared statements and ONE plan each: custom
    plans re-planned the batch statements' joins on every execute (more than running them)."""
    import psycopg

    conn = await psycopg.AsyncConnection.connect(**connect_args, autocommit=True, prepare_threshold=0)
    await conn.execute("SET plan_cache_mode = force_generic_plan")
    await conn.execute("SET statement_timeout = 10000")
    return conn


class Reader:
    """Runs checks against one database; ``check`` raises the database's error when it fails."""

    answered = 0  # checks answered by this reader (tests, debugging)

    async def check(self, item: Item) -> Row:
        raise NotImplementedError

    async def close(self) -> None:
        pass


def settle(answers: list[tuple[asyncio.Future[Any], Any]]) -> None:
    """On the event loop: answers (rows, or exceptions to raise) to their waiting requests."""
    for fut, result in answers:
        if fut.done():  # the request went away
            continue
        if isinstance(result, BaseException):
            fut.set_exception(result)
        else:
            fut.set_result(result)


class SqliteReader(Reader):
    """Reads on a connection of this process's own (file databases only), on the event loop.

    The checks submitted in one turn of the loop wait for its next turn and are answered there
    with one statement. No thread: a batch's statement costs a few microseconds per check,
    less than handing the checks to a thread and back (and the GIL switches that come with it).
    """

    def __init__(self, path: str, now_param: Callable[[], str]) -> None:
        self._path = path
        self._now = now_param
        self._sql = str(statements.CHECK["sqlite"])
        self._closed = False
        self._pending: list[tuple[Item, asyncio.Future[Any]]] = []  # the checks of this turn
        self._conn: sqlite3.Connection | None = None
        self.batches = 0  # turns answered (tests, debugging)
        self.statements = 0  # check statements run (tests, debugging)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self._path, isolation_level=None, timeout=5)
        conn.execute("PRAGMA query_only=ON")
        # A page cache of its own (a check touches ~20 pages of six B-trees). Bounded memory,
        # unlike PRAGMA mmap_size: the mapped file counts in the process's RSS.
        conn.execute(f"PRAGMA cache_size=-{SQLITE_CACHE_KIB}")
        return conn

    def _work_batch(self, conn: sqlite3.Connection, items: list[Item]) -> list[Row]:
        """Checks on ``conn`` with one statement (one snapshot): their rows, in order."""
        self.statements += 1
        inputs, order = statements.check_input_sqlite(items)
        answers, receipts = conn.execute(self._sql, {"inputs": inputs, "now": self._now()}).fetchone()
        return statements.check_rows_sqlite(answers, receipts, order)

    async def check(self, item: Item) -> Row:
        if self._closed:
            raise RuntimeError("the check reader is closed")
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._pending.append((item, fut))
        if len(self._pending) == 1:
            loop.call_soon(self._run_pending)  # after every request of this turn has come in
        return await fut

    def _run_pending(self) -> None:
        """The checks that came in this turn, with one statement. A database error is the
        answer of every check of the batch (the route logs, counts and runs them itself) and
        drops the connection (reconnected next time)."""
        work, self._pending = self._pending, []
        self.batches += 1
        results: list[Any]
        try:
            if self._conn is None:
                self._conn = self._connect()
            results = self._work_batch(self._conn, [item for item, _ in work])
        except Exception as exc:  # noqa: BLE001 - each waiting request gets it; the route logs and counts it
            _closed(self._conn)
            self._conn = None
            results = [exc] * len(work)
        settle([(fut, result) for (_, fut), result in zip(work, results)])

    async def close(self) -> None:
        self._closed = True
        _closed(self._conn)
        self._conn = None


def _closed(conn: sqlite3.Connection | None) -> None:
    """Close a connection if there is one."""
    if conn is not None:
        conn.close()


class PostgresReader(Reader):
    """Batched reads on ``PG_CONNECTIONS`` asynchronous autocommit connections, on the event
    loop itself (no threads: a thread hand-off cost more than the query). A check waits in
    ``_pending``; an idle connection takes *everything* pending as one statement, and keeps
    draining until nothing waits."""

    def __init__(self, connect_args: dict[str, Any], connections: int = PG_CONNECTIONS) -> None:
        self._connect_args = connect_args
        self._pending: list[tuple[Item, asyncio.Future[Any]]] = []
        self._idle: list[Any] = [None] * connections  # connection slots (None: not yet open)
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self.statements = 0  # check statements sent (each answers a whole batch)

    async def check(self, item: Item) -> Row:
        if self._closed:
            raise RuntimeError("the check reader is closed")
        fut = asyncio.get_running_loop().create_future()
        self._pending.append((item, fut))
        if self._idle:
            task = asyncio.get_running_loop().create_task(self._drain(self._idle.pop()))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await fut

    async def _drain(self, conn: Any) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    if conn is None or conn.closed:
                        conn = None
                        conn = await pg_connect(self._connect_args)
                        await _PG_BATCH.prepare(conn)
                    results: list[Any] = await self._execute(conn, [item for item, _ in batch])
                except Exception as exc:  # noqa: BLE001 - each waiting request gets it; the route logs and counts it
                    if conn is not None:
                        await conn.close()
                        conn = None
                    results = [exc] * len(batch)
                settle([(fut, result) for (_item, fut), result in zip(batch, results)])
        finally:
            if self._closed and conn is not None:
                await conn.close()
            else:
                self._idle.append(conn)

    async def _execute(self, conn: Any, items: list[Item]) -> list[Row]:
        self.statements += 1
        inputs = statements.check_input_pg(items)
        res = await _PG_BATCH.run(conn, [inputs, utcnow().isoformat().encode()])
        if res.ntuples != len(items):
            raise pgraw.StatementError(f"{res.ntuples} rows for {len(items)} checks")
        value, text, boolean = res.get_value, pgraw.text, pgraw.boolean
        return [(value(r, 1) == b"t", value(r, 2) == b"t", text(value(r, 3)), text(value(r, 4)),
                 boolean(value(r, 5)), text(value(r, 6)), text(value(r, 7)), text(value(r, 8)),
                 value(r, 9) == b"t", value(r, 10) == b"t") for r in range(len(items))]

    async def close(self) -> None:
        self._closed = True
        for conn in self._idle:
            if conn is not None:
                await conn.close()
        self._idle = []


_SECOND: list[Any] = [None, ""]  # the current second and its text


def sqlite_now() -> str:
    """``sqlite_time(utcnow())`` at a fraction of the cost (the date part is formatted once a
    second)."""
    t = time.time()
    second = int(t)
    if second != _SECOND[0]:
        _SECOND[:] = [second, sqlite_time(datetime.fromtimestamp(second, UTC))[:19]]
    return f"{_SECOND[1]}.{int((t - second) * 1_000_000):06d}"


def open_reader(engine: Engine) -> Reader | None:
    """The batched reader for this engine's database, or None where it does not apply (an
    in-memory SQLite database is private to its one pooled connection)."""
    url = engine.url
    if engine.dialect.name == "sqlite":
        if not url.database or url.database == ":memory:" or url.database.startswith("file:"):
            return None
        return SqliteReader(url.database, sqlite_now)
    if engine.dialect.name == "postgresql":
        return PostgresReader(pg_connect_args(engine))
    return None
