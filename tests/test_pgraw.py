"""consent/ledger/pgraw.py (a prepared statement run on libpq directly) and the PostgreSQL batched check
reader built on it, against the real PostgreSQL of this machine: results, server errors, parameters
bigger than a socket buffer, and a connection that dies under a batch."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from starlette.testclient import TestClient

from consent.ledger import batch_reads, pgraw
from consent.store import db

from .helpers import make_tenant


@pytest.fixture()
def pg_args(backend: str, db_url: str) -> Iterator[dict[str, Any]]:
    if backend != "postgresql":
        pytest.skip("libpq statements are PostgreSQL only")
    engine = db.create_db_engine(db_url)
    try:
        yield batch_reads.pg_connect_args(engine)
    finally:
        engine.dispose()


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 30))  # a hang fails the test


def test_results_errors_and_big_parameters(pg_args: dict[str, Any]) -> None:
    echo = pgraw.RawStatement("t_echo", "SELECT $1::text AS v, length($1) AS n, NULL::text AS z, $2::int > 0 AS b",
                              ("text", "int"))
    divide = pgraw.RawStatement("t_divide", "SELECT 1 / $1::int", ("int",))

    async def go() -> None:
        conn = await batch_reads.pg_connect(pg_args)
        try:
            await echo.prepare(conn)
            await divide.prepare(conn)
            res = await echo.run(conn, ["h\u00e9llo \"'\\".encode(), b"3"])
            assert res.ntuples == 1
            assert pgraw.text(res.get_value(0, 0)) == "h\u00e9llo \"'\\"
            assert res.get_value(0, 1) == b"9"
            assert pgraw.text(res.get_value(0, 2)) is None and pgraw.boolean(res.get_value(0, 2)) is None
            assert pgraw.boolean(res.get_value(0, 3)) is True
            # 8 MB: far more than a socket buffer takes at once, so the send waits to write the rest
            big = b"x" * (8 << 20)
            res = await echo.run(conn, [big, b"-1"])
            assert res.get_value(0, 1) == str(len(big)).encode() and pgraw.boolean(res.get_value(0, 3)) is False
            assert res.get_value(0, 0) == big
            with pytest.raises(pgraw.StatementError, match="division by zero"):
                await divide.run(conn, [b"0"])
            # the connection is still good after the server said no
            assert (await divide.run(conn, [b"1"])).get_value(0, 0) == b"1"
            # many statements in flight on many connections at once
            others = [await batch_reads.pg_connect(pg_args) for _ in range(3)]
            for other in others:
                await echo.prepare(other)
            got = await asyncio.gather(*[echo.run(c, [str(i).encode(), b"1"]) for i, c in enumerate(others)])
            assert [r.get_value(0, 0) for r in got] == [b"0", b"1", b"2"]
            for other in others:
                await other.close()
        finally:
            await conn.close()

    run(go())


def test_a_dead_connection_raises(pg_args: dict[str, Any], db_url: str) -> None:
    sleep = pgraw.RawStatement("t_sleep", "SELECT pg_sleep($1::float8)", ("float8",))

    async def go() -> None:
        conn = await batch_reads.pg_connect(pg_args)
        await sleep.prepare(conn)
        pid = conn.pgconn.backend_pid
        try:
            task = asyncio.ensure_future(sleep.run(conn, [b"5"]))
            await asyncio.sleep(0.3)
            killer = await batch_reads.pg_connect(pg_args)
            await killer.execute("SELECT pg_terminate_backend(%s)", (pid,))
            await killer.close()
            with pytest.raises((psycopg.OperationalError, pgraw.StatementError)):
                await asyncio.wait_for(task, 4)  # well before the sleep would have ended
        finally:
            await conn.close()

    run(go())


def test_the_check_reader_fails_over_then_reconnects_after_the_database_drops_it(client: TestClient, backend: str,
                                                                             db_url: str) -> None:
    """A batch whose connection dies is logged, counted in /metrics and answered per request
    (the caller gets its answer all the same); the next check opens a new connection and is
    answered by the reader again."""
    if backend != "postgresql":
        pytest.skip("PostgreSQL only")
    t = make_tenant(client)
    t.record("marketing_email", "granted", email="ada@example.com")
    reader = client.app.state.services.check_reader  # type: ignore[attr-defined]
    params = {"purpose": "marketing_email", "email": "ada@example.com"}
    assert t.check(**params)["allowed"] is True
    answered = reader.answered
    engine = sa.create_engine(db_url)
    try:
        with engine.begin() as conn:  # every connection of this test database but our own
            killed = conn.exec_driver_sql(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                "AND query LIKE '%%consent_check%%'").scalar_one()
    finally:
        engine.dispose()
    assert killed >= 1, "the reader's connection was there to drop"
    for _ in range(3):  # the first may land on the dropped connection: answered per request
        assert t.check(**params)["allowed"] is True
    assert reader.answered >= answered + 2, "the reader answers again after reconnecting"
    failures = [line for line in client.get("/metrics").text.splitlines()
                if line.startswith("consent_executor_failures_total{") and 'executor="check"' in line]
    assert failures and float(failures[0].rsplit(" ", 1)[1]) >= 1, failures
