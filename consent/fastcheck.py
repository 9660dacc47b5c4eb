"""``GET /v1/check`` without the framework: the hot path of every marketing email.

``handle`` runs before any middleware (``app.ConsentApp``). For a well-formed check (secret key, a purpose,
exactly one subject, no ``at``) it answers 200 itself with ONE SQL statement and no ORM,
no Starlette request object, no threadpool hop. Everything else (no key, a bad parameter,
an unknown purpose, a revoked key, ``at=``, a database error) is *declined*: the request
goes on to the ordinary route (``api.check_one``), which gives the very same answers and
every error, so the two paths never disagree on errors because only one of them makes them.

Why the answer can never be stale: nothing about consent is cached. The one statement
re-checks, in the same snapshot as the state it reads, that the API key still exists and is
not revoked; the per-process key cache holds only what can never change for a key (its
tenant, its kind, and that tenant's identifier hash key), so a rotation or revocation is
seen by the very next check in every process.

- SQLite: the statement (a ~30 us indexed read in WAL mode, in autocommit: one statement,
  one snapshot) runs on a connection of its own, for a batch of checks at a time: in a reader
  thread while the event loop goes on with other requests, or, where every core already runs
  a worker process, on the loop itself (``sqlite_threaded``).
- PostgreSQL: two asynchronous connections per process; an idle one takes *every* check
  waiting at that moment and answers them with one statement over all of them (group
  lookups, like group commit). One round trip and one psycopg execute serve a whole batch,
  and the event loop never blocks on the network. (Threads were tried first: handing work
  to a thread and back cost more than the query, ~1 ms at one client.)

In process (bench/profile_app.py) a check costs well under 100 us, several times less than the
framework's route.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote_plus

import orjson
from sqlalchemy.engine import Engine
from starlette.types import Scope, Send

from . import crypto, pgraw
from .http import dumps
from .ledger import parse_subject_ref
from .middleware import BASE_HEADERS, finish_request, incoming_request_id, new_request_id
from .models import IDENTIFIER_COVER_INDEX, sqlite_time, utcnow
from .state import derive_status, is_allowed
from .tenants import key_live_sql

log = logging.getLogger("consent.fastcheck")

ROUTE = "/v1/check"
# What the route declares (api.CHECK_QUERY): name -> max length. ``at`` is declined on purpose.
PARAMS = {"purpose": 64, "subject": 400, "email": 320, "anonymous_id": 200}
SUBJECT_PARAMS = {"subject": None, "email": "email", "anonymous_id": "anon"}
KEY_CACHE_MAX = 10_000
SQLITE_CACHE_KIB = 128 * 1024  # page cache of the fast check's own SQLite connection
PG_CONNECTIONS = 2  # per process; each carries a whole batch per round trip

# What a key is, forever: (tenant_id, kind, tenant hash key). Validity is NOT cached, nor read
# here: every check statement tests it (tenants.key_live_sql), in the snapshot it answers from.
_KEY_SQL = ("SELECT k.tenant_id, k.kind, t.hash_key FROM api_key k JOIN tenant t ON t.id = k.tenant_id "
            "WHERE k.key_hash = {kh}")
_LIVE, _LIVE_PG = key_live_sql("k", ":now"), key_live_sql("k", "$2")

# The current record's id and receipt: consent_state's copy where it belongs to the state's
# record (receipt_seq = record_seq, what every writer since migration 0009 leaves), else the
# record itself (a row not yet filled, or moved by older code). The copy spares a probe of
# consent_record (and its TOAST table) per check: ~40 % of PostgreSQL's CPU per check.
def _copied(state_col: str, record_col: str) -> str:
    return (f"CASE WHEN s.receipt_seq = s.record_seq THEN s.{state_col} "
            f"ELSE (SELECT r.{record_col} FROM consent_record r WHERE r.seq = s.record_seq) END")


_RECORD_ID, _RECEIPT_OF = _copied("record_id", "id"), _copied("receipt", "receipt")

# One check on SQLite: the state row if there is one, in a statement that also requires the
# key to be live (same snapshot). Plan (EXPLAIN QUERY PLAN, bench ledger): subject_identifier by
# its covering index (named: the planner would take the primary key, then read the table; 0012),
# consent_state and purpose by primary key, api_key by its unique key_hash, policy_purpose by
# (tenant_id, purpose, policy_key, effective_at). ~24 us.
# No row: _SQLITE_MISS tells a live key and a known purpose (answer "none") from the rest.
_SQLITE_HIT = f"""
SELECT 1, 1, s.subject_id, s.decision, s.confirmed, s.policy_version, {_RECORD_ID}, {_RECEIPT_OF},
       EXISTS (SELECT 1 FROM policy_purpose pp
               WHERE pp.tenant_id = s.tenant_id AND pp.purpose = s.purpose AND pp.policy_key = s.policy_key
                 AND pp.material = 1 AND pp.effective_at <= :now
                 AND pp.policy_version_id > s.policy_version_id), s.gpc
FROM consent_state s
WHERE s.tenant_id = :t AND s.purpose = :p AND s.subject_id = {{subject}}
  AND EXISTS (SELECT 1 FROM api_key k WHERE k.key_hash = :kh AND k.tenant_id = :t AND {_LIVE})
"""
_SQLITE_SUBJECT = {
    "id": ":h",
    "ident": f"(SELECT si.subject_id FROM subject_identifier si INDEXED BY {IDENTIFIER_COVER_INDEX} "
             "WHERE si.tenant_id = :t AND si.kind = :kind AND si.value_hash = :h)",
}
_SQLITE_MISS = f"""
SELECT EXISTS (SELECT 1 FROM api_key k WHERE k.key_hash = :kh AND k.tenant_id = :t AND {_LIVE}),
       EXISTS (SELECT 1 FROM purpose pu WHERE pu.tenant_id = :t AND pu.key = :p),
       NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL
"""

# Several checks, ONE statement on SQLite: the rows _SQLITE_HIT / _SQLITE_MISS give, one per input,
# as one JSON array. Why one statement: sqlite3 lets go of the GIL for each step of a statement,
# and each time the reader thread wants it back it waits for the event loop to let go of it; per
# check (execute, then fetchone's second step) that was four waits, now a few per batch, while
# SQLite does the whole batch in one step. Same probes per input as _SQLITE_HIT (EXPLAIN QUERY
# PLAN, bench ledger): json_each is the outer loop (a LEFT JOIN is never reordered, so
# json_group_array sees the inputs in order; ``i`` is checked anyway), then subject_identifier by
# its covering index, consent_state by its keys, api_key by key_hash, policy_purpose by its
# index. Per check in a tight loop it costs what _SQLITE_HIT does from ~4-6 inputs on, a little
# more below; under load what it saves is the waits.
_SQLITE_BATCH = f"""
WITH q AS MATERIALIZED (
  SELECT j.key AS i, j.value ->> 0 AS kh, j.value ->> 1 AS t, j.value ->> 2 AS kind, j.value ->> 3 AS h,
         j.value ->> 4 AS p,
         EXISTS (SELECT 1 FROM api_key k WHERE k.key_hash = j.value ->> 0 AND k.tenant_id = j.value ->> 1
                   AND {_LIVE}) AS key_ok
  FROM json_each(:inputs) j)
SELECT json_group_array(json_array(q.i, q.key_ok,
  CASE WHEN s.subject_id IS NULL
       THEN EXISTS (SELECT 1 FROM purpose pu WHERE pu.tenant_id = q.t AND pu.key = q.p) ELSE 1 END,
  s.subject_id, s.decision, s.confirmed, s.policy_version, {_RECORD_ID}, {_RECEIPT_OF},
  CASE WHEN s.subject_id IS NOT NULL THEN EXISTS (SELECT 1 FROM policy_purpose pp
         WHERE pp.tenant_id = s.tenant_id AND pp.purpose = s.purpose AND pp.policy_key = s.policy_key
           AND pp.material = 1 AND pp.effective_at <= :now
           AND pp.policy_version_id > s.policy_version_id) END, s.gpc))
FROM q
LEFT JOIN consent_state s ON q.key_ok AND s.tenant_id = q.t AND s.purpose = q.p
  AND s.subject_id = CASE WHEN q.kind = 'id' THEN q.h ELSE
      (SELECT si.subject_id FROM subject_identifier si INDEXED BY {IDENTIFIER_COVER_INDEX}
       WHERE si.tenant_id = q.t AND si.kind = q.kind AND si.value_hash = q.h) END
"""

# Many checks, one statement: one row per input, in input order (``i``). The inputs travel as
# ONE JSON text unpacked by json_to_recordset in C: five text[] parameters cost psycopg a
# Python-level dump per element, a third of the fast path's CPU under load (py-spy,
# docs/bench.md). LATERAL keeps every lookup an index probe whatever the planner guesses.
_PG_SQL = f"""
SELECT q.i,
  EXISTS (SELECT 1 FROM api_key k WHERE k.key_hash = q.kh AND k.tenant_id = q.t AND {_LIVE_PG}),
  EXISTS (SELECT 1 FROM purpose pu WHERE pu.tenant_id = q.t AND pu.key = q.p),
  x.subject_id, x.decision, x.confirmed, x.policy_version, x.record_id, x.receipt, x.stale, x.gpc
FROM json_to_recordset($1::json) AS q(i int, kh text, t text, kind text, h text, p text)
LEFT JOIN LATERAL (
  SELECT s.subject_id, s.decision, s.confirmed, s.policy_version, {_RECORD_ID} AS record_id,
         {_RECEIPT_OF} AS receipt,
         EXISTS (SELECT 1 FROM policy_purpose pp
                 WHERE pp.tenant_id = s.tenant_id AND pp.purpose = s.purpose AND pp.policy_key = s.policy_key
                   AND pp.material AND pp.effective_at <= $2
                   AND pp.policy_version_id > s.policy_version_id) AS stale, s.gpc
  FROM consent_state s
  WHERE s.tenant_id = q.t AND s.purpose = q.p
    AND s.subject_id = CASE WHEN q.kind = 'id' THEN q.h ELSE
        (SELECT si.subject_id FROM subject_identifier si
         WHERE si.tenant_id = q.t AND si.kind = q.kind AND si.value_hash = q.h) END
) AS x ON true
ORDER BY q.i
"""
# Prepared once per connection and run on libpq directly (pgraw: psycopg's execute cost more
# Python than the rest of a batch). $1: the checks as JSON; $2: now.
_PG_BATCH = pgraw.RawStatement("consent_fastcheck", _PG_SQL, ("json", "timestamptz"))

Key = tuple[str, str, str]  # tenant_id, kind, hash_key
# One check to run: (key digest, tenant_id, kind, hash or subject id, purpose).
Item = tuple[str, str, str, str, str]
# Its answer: (key_ok, purpose_ok, subject_id, decision, confirmed, policy_version, record_id,
# receipt, stale, gpc).
Row = tuple[Any, ...]


class Declined(Exception):
    """This request is not for the fast path; the ordinary route answers it."""


def bearer_token(scope: Scope) -> str:
    """The bearer token as ``http.bearer`` reads it (the first Authorization header), else Declined."""
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, rest = value.decode("latin-1").partition(" ")
            token = rest.strip() if scheme.lower() == "bearer" else ""
            if not token or len(token) >= 200:
                break
            return token
    raise Declined


def parse(scope: Scope) -> tuple[str, str, str, str]:
    """(bearer token, purpose, subject kind, subject value) of a well-formed check, else Declined."""
    token = bearer_token(scope)
    query: dict[str, str] = {}
    for name, value in _pairs(scope["query_string"].decode("latin-1")):
        limit = PARAMS.get(name)
        if limit is None or name in query or len(value) > limit or "\x00" in value:
            raise Declined  # unknown (or ``at``), repeated, too long, NUL: the route says why
        query[name] = value
    given = [(n, v) for n, v in query.items() if v and n != "purpose"]
    purpose = query.get("purpose")
    if not purpose or len(given) != 1:
        raise Declined
    name, value = given[0]
    kind = SUBJECT_PARAMS[name]
    if kind is None:
        kind, value = parse_subject_ref(value)
    return token, purpose, kind, value


def _pairs(qs: str) -> list[tuple[str, str]]:
    """``parse_qsl(qs, keep_blank_values=True)`` (what Starlette reads), unquoting only the
    parts that need it (perf: a third of parse_qsl's cost for the usual plain query)."""
    out = []
    for part in qs.split("&"):
        if not part:
            continue
        name, _, value = part.partition("=")
        if "%" in name or "+" in name:
            name = unquote_plus(name)
        if "%" in value or "+" in value:
            # Perf: an email's "@" is the usual (often the only) escape.
            plain = value.replace("%40", "@")
            value = plain if "%" not in plain and "+" not in plain else unquote_plus(value)
        out.append((name, value))
    return out


def answer(purpose: str, row: Row) -> dict[str, Any]:
    """The route's body (``checks.check``) from one result row, or Declined."""
    key_ok, purpose_ok, subject_id, decision, confirmed, policy_version, record_id, receipt, stale, gpc = row
    if not key_ok:
        raise Declined  # revoked since it was cached (or the tenant is gone): the route says 401
    if decision is None:
        if not purpose_ok:
            raise Declined  # unknown purpose: the route says 422
        return {"allowed": False, "status": "none", "purpose": purpose, "subject": None,
                "policy_version": None, "record_id": None, "receipt": None, "gpc": False}
    status = derive_status(decision, confirmed=bool(confirmed), stale=bool(stale))
    return {"allowed": is_allowed(status), "status": status, "purpose": purpose, "subject": subject_id,
            "policy_version": policy_version, "record_id": record_id, "receipt": receipt, "gpc": bool(gpc)}


class KeyCache:
    """API key digest -> (tenant id, kind, tenant hash key): what never changes for a key.
    Validity is never cached; the statements that use a key check it. Bounded (cleared when full)."""

    def __init__(self, ring: Any) -> None:
        self._keys: dict[str, Key] = {}
        self._ring = ring  # the database's crypto.Keyring: the hash key is read sealed


    def get(self, digest: str) -> Key | None:
        return self._keys.get(digest)

    def put(self, digest: str, key: Key) -> Key:
        """Cache a key row as read by _KEY_SQL (its hash key opened once, here)."""
        if len(self._keys) >= KEY_CACHE_MAX:
            self._keys.clear()
        key = (key[0], key[1], self._ring.open(key[2], "tenant.hash_key"))
        self._keys[digest] = key
        return key


def pg_connect_args(engine: Engine) -> dict[str, Any]:
    """What the engine itself connects with, for plain psycopg connections of the fast paths."""
    _, params = engine.dialect.create_connect_args(engine.url)
    params.pop("context", None)  # SQLAlchemy's adapters: plain psycopg types suffice here
    params.setdefault("connect_timeout", 5)
    return dict(params)


async def pg_connect(connect_args: dict[str, Any]) -> Any:
    """An autocommit connection with server-side prepared statements and ONE plan each: custom
    plans re-planned the fast paths' joins on every execute (0.3 ms, more than running them)."""
    import psycopg

    conn = await psycopg.AsyncConnection.connect(**connect_args, autocommit=True, prepare_threshold=0)
    await conn.execute("SET plan_cache_mode = force_generic_plan")
    await conn.execute("SET statement_timeout = 10000")
    return conn


class Reader:
    """Runs checks against one database; ``key`` and ``check`` raise Declined when in doubt."""

    def __init__(self, ring: Any) -> None:
        self._keys = KeyCache(ring)
        self.answered = 0  # checks answered here rather than by the route (tests, debugging)

    async def key(self, digest: str) -> Key:
        found = self._keys.get(digest)
        if found is None:
            found = await self._lookup_key(digest)
            if found is None:
                raise Declined  # unknown or revoked: the route says 401
            found = self._keys.put(digest, found)
        return found

    async def _lookup_key(self, digest: str) -> Key | None:
        raise NotImplementedError

    async def check(self, item: Item) -> Row:
        raise NotImplementedError

    async def close(self) -> None:
        pass


class SqliteReader(Reader):
    """Reads in a thread of their own, on a connection of this process's own (file databases only).

    sqlite3 lets go of the GIL while SQLite works, so the event loop parses and answers other
    requests on the other core meanwhile (the statement is about half of a check's time; run
    inline on the loop it made the loop wait). The thread starts on a check as soon as it is
    queued, takes the checks waiting (at most half of those in flight), answers them with one
    statement (_SQLITE_BATCH; one check alone: _SQLITE_HIT), and hands the answers back to the
    loop with one wake-up. The hand-off costs some latency at one client and buys throughput
    under load, when SQLite works while the loop answers other requests.

    Why at most half: under load every client waited in the same batch, so the loop sat idle
    while the thread read and the thread while the loop answered (27-28 of 32 clients per batch).
    Taking half splits them into two groups that take turns, one read while the other is
    answered: with the batch statement, about a quarter more checks/s at 32 clients, 1 worker.

    Not ``threaded``: the checks submitted in one turn of the event loop wait for its next turn
    and are answered there with one statement, on the loop (no hand-offs; for processes that
    have no core to spare, ``sqlite_threaded``).
    """

    def __init__(self, path: str, now_param: Callable[[], str], threaded: bool = True, *, ring: Any) -> None:
        super().__init__(ring)
        self._path = path
        self._now = now_param
        self._sql = {k: _SQLITE_HIT.format(subject=v) for k, v in _SQLITE_SUBJECT.items()}
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()  # (loop, what, arg, future); None: stop
        self._thread: threading.Thread | None = None
        self._closed = False
        self._in_flight = 0  # checks and key lookups submitted and not yet answered (the loop's count)
        self._threaded = threaded
        self._pending: list[Any] = []  # on the loop (not threaded): (loop, what, arg, future) of this turn
        self._conn: sqlite3.Connection | None = None  # on the loop: its connection
        self.batches = 0  # hand-backs to the loop, or turns answered on it (tests, debugging)
        self.statements = 0  # check statements run (tests, debugging)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self._path, check_same_thread=False, isolation_level=None, timeout=5)
        conn.execute("PRAGMA query_only=ON")
        # A page cache of its own (a check touches ~20 pages of six B-trees). Bounded memory,
        # unlike PRAGMA mmap_size: the mapped file counts in the process's RSS, which then grows
        # with the ledger (docs/bench.md).
        conn.execute(f"PRAGMA cache_size=-{SQLITE_CACHE_KIB}")
        return conn

    def _work(self, conn: sqlite3.Connection, what: str, arg: Any) -> Row | None:
        """One key lookup or one check on ``conn``."""
        if what == "key":
            return conn.execute(_KEY_SQL.format(kh=":kh"), {"kh": arg}).fetchone()  # type: ignore[no-any-return]
        self.statements += 1
        kh, tenant_id, kind, h, purpose = arg
        params = {"kh": kh, "t": tenant_id, "kind": kind, "h": h, "p": purpose, "now": self._now()}
        row = conn.execute(self._sql["id" if kind == "id" else "ident"], params).fetchone()
        if row is None:  # each statement is its own snapshot: a write between them is a race
            row = conn.execute(_SQLITE_MISS, params).fetchone()  # the check could have lost anyway
        return row  # type: ignore[no-any-return]

    def _work_batch(self, conn: sqlite3.Connection, items: list[Item]) -> list[Row]:
        """Several checks on ``conn`` with one statement (one snapshot): their rows, in order."""
        self.statements += 1
        out = conn.execute(_SQLITE_BATCH, {"inputs": orjson.dumps(items), "now": self._now()}).fetchone()[0]
        rows = orjson.loads(out)
        if [r[0] for r in rows] != list(range(len(items))):
            raise sqlite3.DatabaseError(f"{len(rows)} rows out of order for {len(items)} checks")
        return [r[1:] for r in rows]

    async def _submit(self, what: str, arg: Any) -> Any:
        if self._closed:
            raise Declined
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        if not self._threaded:
            self._pending.append((loop, what, arg, fut))
            if len(self._pending) == 1:
                loop.call_soon(self._run_pending)  # after every request of this turn has come in
            return await fut
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, daemon=True, name="fastcheck-sqlite")
            self._thread.start()
        self._in_flight += 1
        self._queue.put((loop, what, arg, fut))
        try:
            return await fut
        finally:
            self._in_flight -= 1

    def _serve(self) -> None:
        """The reader thread, until close(). A database error declines the checks it was
        answering (the route answers them: 503 if the database is down) and reconnects for the
        next ones."""
        conn: sqlite3.Connection | None = None
        get, get_nowait = self._queue.get, self._queue.get_nowait
        while True:
            pending: list[Any] = [get()]
            most = max(1, (self._in_flight + 1) // 2)  # read by this thread, written by the loop's
            try:
                while pending[-1] is not None and len(pending) < most:
                    pending.append(get_nowait())
            except queue.Empty:
                pass
            stop = pending[-1] is None
            conn, answered = self._run(conn, pending[:-1] if stop else pending)
            done: dict[Any, list[tuple[asyncio.Future[Any], Any]]] = {}
            for (loop, _what, _arg, fut), result in answered:
                done.setdefault(loop, []).append((fut, result))
            for loop, answers in done.items():
                try:
                    loop.call_soon_threadsafe(self._answered, answers)
                except RuntimeError:  # that loop is closed: nobody waits any more
                    pass
            if stop:
                _closed(conn)
                return

    def _run(self, conn: sqlite3.Connection | None,
             work: list[Any]) -> tuple[sqlite3.Connection | None, list[tuple[Any, Any]]]:
        """Answer ``work`` ((loop, what, arg, future) each): key lookups one by one, the checks
        with one statement. A database error declines what it was answering (the route answers
        them: 503 if the database is down) and drops the connection (reconnected next time)."""
        checks = [item for item in work if item[1] == "check"]
        out: list[tuple[Any, Any]] = []
        for group in ([[item] for item in work if item[1] != "check"]
                      + ([checks] if len(checks) > 1 else [[item] for item in checks])):
            try:
                if conn is None:
                    conn = self._connect()
                if len(group) > 1:
                    results: list[Any] = self._work_batch(conn, [item[2] for item in group])
                else:
                    results = [self._work(conn, group[0][1], group[0][2])]
            except Exception:  # sqlite3.Error, or a bug: the route answers
                conn = _closed(conn)
                results = [Declined() for _ in group]
            out.extend(zip(group, results))
        return conn, out

    def _run_pending(self) -> None:
        """On the loop (not threaded): the checks that came in this turn, with one statement."""
        work, self._pending = self._pending, []
        if self._closed:  # closed meanwhile: the route answers
            settle([(item[3], Declined()) for item in work])
            return
        self._conn, answered = self._run(self._conn, work)
        self.batches += 1
        settle([(item[3], result) for item, result in answered])

    def _answered(self, answers: list[tuple[asyncio.Future[Any], Any]]) -> None:
        self.batches += 1
        settle(answers)

    async def _lookup_key(self, digest: str) -> Key | None:
        return await self._submit("key", digest)  # type: ignore[no-any-return]

    async def check(self, item: Item) -> Row:
        return await self._submit("check", item)  # type: ignore[no-any-return]

    async def close(self) -> None:
        self._closed = True
        if self._thread is not None:
            self._queue.put(None)
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 5)
        self._conn = _closed(self._conn)


def _closed(conn: sqlite3.Connection | None) -> None:
    """Close a connection if there is one (returns None, to assign back)."""
    if conn is not None:
        conn.close()


def settle(answers: list[tuple[asyncio.Future[Any], Any]]) -> None:
    """On the event loop: answers (rows, or exceptions to raise) to their waiting checks."""
    for fut, result in answers:
        if fut.done():  # the request went away
            continue
        if isinstance(result, BaseException):
            fut.set_exception(result)
        else:
            fut.set_result(result)


class PostgresReader(Reader):
    """Batched reads on ``PG_CONNECTIONS`` asynchronous autocommit connections, on the event
    loop itself (no threads: a thread hand-off cost more than the query). A check waits in
    ``_pending``; an idle connection takes *everything* pending as one statement, and keeps
    draining until nothing waits (group lookups, like group commit)."""

    def __init__(self, connect_args: dict[str, Any], connections: int = PG_CONNECTIONS, *, ring: Any) -> None:
        super().__init__(ring)
        self._connect_args = connect_args
        self._pending: list[tuple[str, Any, asyncio.Future[Any]]] = []
        self._idle: list[Any] = [None] * connections  # connection slots (None: not yet open)
        self._busy: set[Any] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self.statements = 0  # check statements sent (each answers a whole batch)

    async def _submit(self, what: str, arg: Any) -> Any:
        if self._closed:
            raise Declined
        fut = asyncio.get_running_loop().create_future()
        self._pending.append((what, arg, fut))
        if self._idle:
            task = asyncio.get_running_loop().create_task(self._drain(self._idle.pop()))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await fut

    async def _lookup_key(self, digest: str) -> Key | None:
        return await self._submit("key", digest)  # type: ignore[no-any-return]

    async def check(self, item: Item) -> Row:
        return await self._submit("check", item)  # type: ignore[no-any-return]

    async def _drain(self, conn: Any) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    if conn is None or conn.closed:
                        conn = None
                        conn = await pg_connect(self._connect_args)
                        await _PG_BATCH.prepare(conn)
                    results = await self._execute(conn, batch)
                except Exception as exc:  # any driver error: these requests go to the route
                    log.debug("fast check batch failed: %s", type(exc).__name__)
                    if conn is not None:
                        await conn.close()
                        conn = None
                    results = [Declined() for _ in batch]
                settle([(fut, result) for (_what, _arg, fut), result in zip(batch, results)])
        finally:
            if self._closed and conn is not None:
                await conn.close()
            else:
                self._idle.append(conn)

    async def _execute(self, conn: Any, batch: list[tuple[str, Any, Any]]) -> list[Any]:
        results: list[Any] = [None] * len(batch)
        checks = []
        for n, (what, arg, _fut) in enumerate(batch):
            if what == "key":
                cur = await conn.execute(_KEY_SQL.format(kh="%s"), (arg,))
                results[n] = await cur.fetchone()
            else:
                checks.append((n, arg))
        if checks:
            self.statements += 1
            inputs = orjson.dumps([{"i": i, "kh": kh, "t": t, "kind": kind, "h": h, "p": p}
                                   for i, (_, (kh, t, kind, h, p)) in enumerate(checks)])
            res = await _PG_BATCH.run(conn, [inputs, utcnow().isoformat().encode()])
            if res.ntuples != len(checks):
                raise pgraw.StatementError(f"{res.ntuples} rows for {len(checks)} checks")
            value, text, boolean = res.get_value, pgraw.text, pgraw.boolean
            for r, (n, _) in enumerate(checks):
                # (key_ok, purpose_ok, subject_id, decision, confirmed, policy_version, record_id, receipt,
                # stale, gpc)
                results[n] = (value(r, 1) == b"t", value(r, 2) == b"t", text(value(r, 3)), text(value(r, 4)),
                              boolean(value(r, 5)), text(value(r, 6)), text(value(r, 7)), text(value(r, 8)),
                              value(r, 9) == b"t", value(r, 10) == b"t")
        return results

    async def close(self) -> None:
        self._closed = True
        for conn in self._idle:
            if conn is not None:
                await conn.close()
        self._idle = []


_SECOND: list[Any] = [None, ""]  # the current second and its text


def sqlite_now() -> str:
    """``sqlite_time(utcnow())`` at a fraction of the cost (perf: the date part is formatted once
    a second; ~8 -> ~1 us per fast check under load on this machine)."""
    t = time.time()
    second = int(t)
    if second != _SECOND[0]:
        _SECOND[:] = [second, sqlite_time(datetime.fromtimestamp(second, UTC))[:19]]
    return f"{_SECOND[1]}.{int((t - second) * 1_000_000):06d}"


def sqlite_threaded(mode: str, workers: int) -> bool:
    """Whether the SQLite reader runs in a thread (``CONSENT_SQLITE_READER``): ``thread``,
    ``loop``, or ``auto``: a thread where it has a core to itself, i.e. where this process may
    use more cores than there are worker processes. Where every core already runs a worker, the
    thread's hand-offs cost CPU and buy no parallelism (with 2 workers on 2 cores the loop
    served about 9 % more checks; with 1 worker, far fewer)."""
    if mode == "auto":
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            cores = os.cpu_count() or 1
        return cores > workers
    return mode == "thread"


def open_reader(engine: Engine, threaded: bool = True) -> Reader | None:
    """The fast reader for this engine's database, or None where it does not apply
    (an in-memory SQLite database is private to its one pooled connection). ``threaded``:
    SQLite's statements in a reader thread, else on the event loop (``sqlite_threaded``)."""
    url = engine.url
    if engine.dialect.name == "sqlite":
        if not url.database or url.database == ":memory:" or url.database.startswith("file:"):
            return None
        return SqliteReader(url.database, sqlite_now, threaded=threaded, ring=crypto.keyring_of(engine))
    if engine.dialect.name == "postgresql":
        return PostgresReader(pg_connect_args(engine), ring=crypto.keyring_of(engine))
    return None


async def handle(services: Any, scope: Scope, send: Send) -> bool:
    """Answer a well-formed ``GET /v1/check`` (True), or leave it to the route (False).
    Called by ``app.ConsentApp`` before Starlette's middleware stack."""
    reader = getattr(services, "check_reader", None)
    if reader is None:
        return False
    start = time.perf_counter()
    try:
        body = await _answer(reader, scope)
    except Declined:
        return False
    except Exception:  # a bug here must not cost the caller an answer: the route gives it
        log.exception("fast check failed; the route answers")
        return False
    reader.answered += 1
    await send_json(scope, send, 200, body, ROUTE, start)
    return True


async def _answer(reader: Reader, scope: Scope) -> bytes:
    token, purpose, kind, value = parse(scope)
    digest = hashlib.sha256(token.encode()).hexdigest()
    tenant_id, key_kind, hash_key = await reader.key(digest)
    if key_kind != "secret":
        raise Declined  # the route says 403
    if kind != "id":
        value = crypto.keyed_hash(hash_key, kind, crypto.normalize_email(value) if kind == "email" else value)
    row = await reader.check((digest, tenant_id, kind, value, purpose))
    return dumps(answer(purpose, row))


async def send_json(scope: Scope, send: Send, status: int, body: bytes, route: str, start: float) -> None:
    """A JSON answer with the headers the middleware gives every response, then its access line."""
    request_id = incoming_request_id(scope) or new_request_id()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-length", str(len(body)).encode()), (b"content-type", b"application/json"),
        (b"x-request-id", request_id.encode()), *BASE_HEADERS]})
    await send({"type": "http.response.body", "body": body})
    finish_request(scope.get("method"), route, status, start, request_id)
