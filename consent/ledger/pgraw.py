"""A prepared statement run straight on a psycopg connection's libpq handle, on the event loop.

The fast paths send one statement per batch of requests. psycopg's ``AsyncConnection.execute``
wraps each statement in a cursor, a query converter, a generator per wait, and a future plus a
timer per wait; measured here, about 170 us of Python per statement on a slow core against
~20 us for the libpq calls themselves. ``RawStatement``
keeps only those calls: ``send_query_prepared``, then ``consume_input`` / ``get_result`` from a
reader callback, with one future per statement. Parameters and results are text, as libpq
gives them; the callers turn the few columns they read into Python values.

The psycopg connection still opens, configures and closes the connection; nothing else may use
it while a statement is in flight (each fast-path connection belongs to one task at a time).
"""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
from psycopg import OperationalError, pq

TUPLES_OK = pq.ExecStatus.TUPLES_OK
COMMAND_OK = pq.ExecStatus.COMMAND_OK


class StatementError(Exception):
    """The server answered with an error (the message is the server's)."""


class RawStatement:
    """One named prepared statement of one connection (``PREPARE``d by ``prepare``)."""

    def __init__(self, name: str, sql: str, types: tuple[str, ...]):
        if not name.isidentifier():
            raise ValueError(f"bad statement name {name!r}")
        self.name = name
        self._prepare = f"PREPARE {name} ({', '.join(types)}) AS {sql}"

    async def prepare(self, conn: Any) -> None:
        """Make the statement known to ``conn`` (a psycopg AsyncConnection, autocommit)."""
        await conn.execute(self._prepare)

    async def run(self, conn: Any, params: list[bytes | None]) -> pq.abc.PGresult:
        """Execute on ``conn``; the result (TUPLES_OK or COMMAND_OK), else StatementError
        (the server said no) or OperationalError (the connection is gone)."""
        pgconn = conn.pgconn
        loop = asyncio.get_running_loop()
        fd = pgconn.socket
        pgconn.send_query_prepared(self.name.encode(), params)
        while pgconn.flush():  # a parameter bigger than the socket's buffer: wait to write the rest
            await _writable(loop, fd)
        waiter = _Results(pgconn, loop.create_future())
        loop.add_reader(fd, waiter.readable)
        try:
            waiter.readable()  # the answer may be in already
            results = await waiter.future
        finally:
            loop.remove_reader(fd)
        last = results[-1] if results else None
        if last is None:
            raise OperationalError("no result")
        if last.status not in (TUPLES_OK, COMMAND_OK):
            raise StatementError(str(last.get_error_message() or "").strip())
        return last


class _Results:
    """Collects a statement's results as input arrives; resolves the future when libpq says the
    statement is complete (``get_result`` gives None)."""

    __slots__ = ("_got", "_pgconn", "future")

    def __init__(self, pgconn: Any, future: asyncio.Future[list[Any]]):
        self._pgconn = pgconn
        self.future = future
        self._got: list[Any] = []

    def readable(self) -> None:
        if self.future.done():
            return
        pgconn = self._pgconn
        try:
            pgconn.consume_input()
            while not pgconn.is_busy():
                res = pgconn.get_result()
                if res is None:
                    self.future.set_result(self._got)
                    return
                self._got.append(res)
        except psycopg.Error as exc:  # libpq reports a broken connection as OperationalError
            self.future.set_exception(OperationalError(str(exc)))


async def _writable(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    future = loop.create_future()
    def ready() -> None:
        if not future.done():
            future.set_result(None)

    loop.add_writer(fd, ready)
    try:
        await future
    finally:
        loop.remove_writer(fd)


def text(value: bytes | None) -> str | None:
    return None if value is None else value.decode()


def boolean(value: bytes | None) -> bool | None:
    return None if value is None else value == b"t"
