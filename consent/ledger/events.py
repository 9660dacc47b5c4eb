"""The change feed and the webhook outbox: every consent record becomes one event at a
per-tenant position, and one outbox row per matching webhook endpoint, in the record's own
transaction.

Why positions come from a counter row taken at commit time: ids from a sequence are handed
out in *start* order, but transactions become visible in *commit* order, so a reader paging
by id can see id 7 before id 6 commits and skip 6 for ever. Here ``ledger.record_decision``
only queues the event (``on_record``); just before the transaction commits, ``_allocate``
bumps the tenant's ``event_counter`` row (``INSERT .. ON CONFLICT DO UPDATE .. RETURNING``)
and inserts the events. The counter's row lock is held until COMMIT, so a second writer of
the same tenant waits there and gets the next position only after the first one is visible:
positions are gap-free and commit-ordered, and ``position > cursor`` never misses a row. The
lock is the last one a transaction takes (nothing runs between it and COMMIT), so it cannot
close a deadlock cycle, and it is held for the few milliseconds of the commit only. On
SQLite ``BEGIN IMMEDIATE`` already serialises writers; the same code runs there.
``batch_writes`` (the group commit on PostgreSQL) takes the same counter row the same way, in
the single statement that writes a batch of records (one increment by the number written),
held until that statement commits.

The same row hands out each record's *leaf index* in the tenant's transparency log
(``leaves``, ``next_leaf``), for the same reason: indexes are then gap-free and in commit
order, so the sequencer (tlog.py) appends leaves by stored index and never chooses an order.
The index goes into the record's receipt, which is signed before the record is inserted, so it
is taken earlier than the feed position: after the subject's row lock and before the insert
(never before a subject lock, so every writer takes subject rows first and this row last, and
no deadlock cycle can close), and held to COMMIT like the position. A record that rolls back
(a savepoint too) gives its index back with the row lock. ``batch_writes`` claims a batch's
indexes in one statement after locking the batch's subjects (``statements.CLAIM_SQL``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event as sa_event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, SessionTransaction

from consent import crypto
from consent.store.models import (
    utcnow,
)
from consent.store.tables import EVENT
from consent.store.tables import EVENT_COUNTER as COUNTER
from consent.store.tables import SUBJECT_IDENTIFIER as SI
from consent.store.tables import WEBHOOK_DELIVERY as DELIVERY
from consent.store.tables import WEBHOOK_ENDPOINT as ENDPOINT

_PENDING = "consent.pending_events"
_LISTENING = "consent.events_listening"
_ENQUEUED = "consent.deliveries_enqueued"
_wakers: list[Callable[[], None]] = []  # delivery loops of this process, told after a commit
_READY: weakref.WeakSet[Any] = weakref.WeakSet()  # engines whose database has the feed tables
log = logging.getLogger("consent.ledger.events")
EVENT_TYPES = ("consent.granted", "consent.denied", "consent.withdrawn", "consent.acknowledged",
               "consent.notified")


def on_record(db: Session, record: Any, status: str) -> None:
    """Queue the event of a record just appended; it is written when the transaction commits."""
    if not db.info.get(_LISTENING):
        sa_event.listen(db, "before_commit", _allocate)
        sa_event.listen(db, "after_soft_rollback", _forget)
        sa_event.listen(db, "after_commit", _wake)
        db.info[_LISTENING] = True
    db.info.setdefault(_PENDING, []).append(event_for(record, status))


def event_for(record: Any, status: str) -> dict[str, Any]:
    """The change-feed entry of a record (its position is taken at commit)."""
    return {
        "tenant_id": record.tenant_id,
        "id": crypto.new_id("evt", 12),
        "type": f"consent.{record.decision}",
        "record_id": record.id,
        "subject_id": record.subject_id,
        "data": {
            "record_id": record.id,
            "subject": record.subject_id,
            "purpose": record.purpose,
            "decision": record.decision,
            "status": status,
            "policy": {"key": record.policy_key, "version": record.policy_version},
            "source": record.source,
            "recorded_at": crypto.iso(record.recorded_at),
            "record_hash": record.record_hash,
        },
    }


def add_waker(fn: Callable[[], None]) -> None:
    """Call ``fn`` (thread-safe, non-blocking) after a commit that wrote outbox rows."""
    _wakers.append(fn)


def remove_waker(fn: Callable[[], None]) -> None:
    if fn in _wakers:
        _wakers.remove(fn)


def _wake(db: Session) -> None:
    if db.info.pop(_ENQUEUED, False):
        wake_delivery_loops()
    for tenant_id in db.info.pop(_FEED_TENANTS, ()):
        feed_changed(tenant_id)


# --- change-feed waits: woken by commits, not by polling -----------------------------------
# A long-poll registers here and sleeps until a commit of its tenant wakes it: commits of this
# process directly (``_wake``, batch_writes), commits of other processes through PostgreSQL
# LISTEN/NOTIFY (``FeedListener``; every event write runs ``pg_notify(FEED_CHANNEL, tenant)``).

FEED_CHANNEL = "consent_feed"
_FEED_TENANTS = "consent.feed_tenants"
_feed_waiters: dict[str, set[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}
_feed_lock = threading.Lock()


class TooManyWaits(Exception):
    pass


@contextlib.contextmanager
def feed_waiter(tenant_id: str, cap: int) -> Iterator[asyncio.Event]:
    """An event set when the tenant's feed changes; at most ``cap`` at once per tenant and
    process (``TooManyWaits`` beyond)."""
    waiter = (asyncio.get_running_loop(), asyncio.Event())
    with _feed_lock:
        mine = _feed_waiters.setdefault(tenant_id, set())
        if len(mine) >= cap:
            raise TooManyWaits
        mine.add(waiter)
    try:
        yield waiter[1]
    finally:
        with _feed_lock:
            mine.discard(waiter)
            if not mine:
                _feed_waiters.pop(tenant_id, None)


def feed_changed(tenant_id: str) -> None:
    """Wake this process's waits on ``tenant_id`` (thread-safe, non-blocking)."""
    with _feed_lock:
        waiters = list(_feed_waiters.get(tenant_id, ()))
    for loop, ev in waiters:
        try:
            loop.call_soon_threadsafe(ev.set)
        except RuntimeError:  # that loop closed meanwhile
            pass


class FeedListener:
    """One LISTEN connection per process (PostgreSQL): other processes' commits wake our waits."""

    def __init__(self, connect_args: dict[str, Any]):
        self.connect_args = connect_args
        self.task: asyncio.Task[None] | None = None

    def start(self) -> FeedListener:
        self.task = asyncio.create_task(self._run(), name="feed-listener")
        return self

    async def _run(self) -> None:
        import psycopg

        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(**self.connect_args, autocommit=True)
                async with conn:
                    await conn.execute(f"LISTEN {FEED_CHANNEL}")
                    async for note in conn.notifies():
                        feed_changed(note.payload)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - database restart: waits fall back to their slow poll
                log.warning("change-feed listener lost its connection: %s", type(exc).__name__)
                await asyncio.sleep(1.0)

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task


def wake_delivery_loops() -> None:
    """Tell this process's webhook loops that outbox rows were committed."""
    for fn in _wakers[:]:  # a copy: a loop may stop meanwhile
        fn()


def _forget(db: Session, previous: SessionTransaction) -> None:
    if previous.parent is None:  # the whole transaction rolled back: its events never happened
        db.info.pop(_PENDING, None)


def _upsert(db: Session) -> Any:
    return postgresql.insert if db.get_bind().dialect.name == "postgresql" else sqlite.insert


def _feed_ready(db: Session) -> bool:
    """True once the feed's tables exist. The service only serves at the migration head, so
    this is True there (checked once per engine); it is False only for a database still at an
    older revision written by newer code (tools, migration tests), which then gets no events."""
    engine = db.get_bind().engine
    if engine in _READY:
        return True
    if sa.inspect(db.connection()).has_table(COUNTER.name):
        _READY.add(engine)
        return True
    log.warning("change-feed tables are missing (database below the migration head): no events written")
    return False


def _allocate(db: Session) -> None:
    if db.in_nested_transaction():  # a savepoint is being released, not the transaction
        return
    pending: list[dict[str, Any]] = db.info.pop(_PENDING, None) or []
    if not pending or not _feed_ready(db):
        return
    by_tenant: dict[str, list[dict[str, Any]]] = {}
    for ev in pending:
        by_tenant.setdefault(ev["tenant_id"], []).append(ev)
    now = utcnow()
    # Read the endpoints before taking the counter lock: the lock is held until COMMIT, so
    # everything done under it is paid by every other writer of the tenant.
    endpoints = {t: _endpoints(db, t) for t in by_tenant}
    for tenant_id in sorted(by_tenant):  # a fixed lock order if one transaction spans tenants
        events = by_tenant[tenant_id]
        n = len(events)
        ins = _upsert(db)(COUNTER).values(tenant_id=tenant_id, last_position=n)
        stmt = ins.on_conflict_do_update(
            index_elements=["tenant_id"], set_={"last_position": COUNTER.c.last_position + n}
        ).returning(COUNTER.c.last_position)
        last = int(db.execute(stmt).scalar_one())
        for i, ev in enumerate(events):
            ev["position"] = last - n + 1 + i
            ev["created_at"] = now
        db.execute(sa.insert(EVENT), events)
        enqueue_deliveries(db, tenant_id, events, endpoints[tenant_id], now)
        if db.get_bind().dialect.name == "postgresql":  # delivered to listeners at COMMIT
            db.execute(sa.select(sa.func.pg_notify(FEED_CHANNEL, tenant_id)))
    db.info[_FEED_TENANTS] = list(by_tenant)


def next_leaf(db: Session, tenant_id: str, n: int = 1) -> int | None:
    """Take the tenant's next ``n`` transparency-log leaf indexes (the counter row stays locked
    until COMMIT); the first of them. None only on a database below the migration head."""
    if not _feed_ready(db):
        return None
    ins = _upsert(db)(COUNTER).values(tenant_id=tenant_id, last_position=0, leaves=n)
    stmt = ins.on_conflict_do_update(
        index_elements=["tenant_id"], set_={"leaves": COUNTER.c.leaves + n}).returning(COUNTER.c.leaves)
    return int(db.execute(stmt).scalar_one()) - n




def type_matches(patterns: Iterable[str], event_type: str) -> bool:
    """``*`` matches everything, ``consent.*`` a prefix, anything else exactly."""
    for p in patterns:
        if p == "*" or p == event_type or (p.endswith(".*") and event_type.startswith(p[:-1])):
            return True
    return False


def _endpoints(db: Session, tenant_id: str) -> list[Any]:
    return list(db.execute(
        sa.select(ENDPOINT.c.id, ENDPOINT.c.event_types).where(
            ENDPOINT.c.tenant_id == tenant_id, ENDPOINT.c.enabled.is_(True), ENDPOINT.c.deleted_at.is_(None))
    ).all())


def enqueue_deliveries(db: Session, tenant_id: str, events: list[dict[str, Any]], endpoints: list[Any],
                       now: Any) -> None:
    """The outbox: one pending delivery per (event, enabled endpoint that wants its type)."""
    rows = [
        {"tenant_id": tenant_id, "endpoint_id": ep.id, "event_id": ev["id"], "event_position": ev["position"],
         "event_type": ev["type"], "status": "pending", "attempts": 0, "next_attempt_at": now,
         "created_at": now}
        for ev in events for ep in endpoints if type_matches(ep.event_types, ev["type"])
    ]
    if rows:
        db.execute(sa.insert(DELIVERY), rows)
        db.info[_ENQUEUED] = True


def last_position(db: Session, tenant_id: str) -> int:
    """The newest position handed out for the tenant (0 before the first record)."""
    value = db.execute(sa.select(COUNTER.c.last_position).where(COUNTER.c.tenant_id == tenant_id)).scalar()
    return int(value or 0)


def read_events(db: Session, tenant_id: str, *, after: int, limit: int) -> list[Any]:
    """Events after a position, in position order."""
    q = (sa.select(EVENT).where(EVENT.c.tenant_id == tenant_id, EVENT.c.position > after)
         .order_by(EVENT.c.position).limit(limit))
    return list(db.execute(q).all())


def identifiers(db: Session, tenant_id: str, subject_ids: Iterable[str]) -> dict[str, dict[str, str]]:
    """The raw user id and email currently held for each subject (none after erasure)."""
    ids = list(set(subject_ids))
    out: dict[str, dict[str, str]] = {s: {} for s in ids}
    if not ids:
        return out
    rows = db.execute(
        sa.select(SI.c.subject_id, SI.c.kind, SI.c.value)
        .where(SI.c.tenant_id == tenant_id, SI.c.subject_id.in_(ids), SI.c.kind.in_(("user", "email")),
               SI.c.value.is_not(None))
        .order_by(SI.c.created_at)
    ).all()
    for r in rows:
        out[r.subject_id].setdefault("user_id" if r.kind == "user" else "email", r.value)
    return out


def event_out(row: Any, idents: dict[str, dict[str, str]]) -> dict[str, Any]:
    """The public shape of one event (also the ``data`` of a webhook delivery)."""
    data = dict(row.data)
    data["identifiers"] = idents.get(row.subject_id, {})
    return {"position": row.position, "id": row.id, "type": row.type, "created_at": row.created_at,
            "data": data}


def render(db: Session, tenant_id: str, rows: list[Any]) -> list[dict[str, Any]]:
    idents = identifiers(db, tenant_id, (r.subject_id for r in rows))
    return [event_out(r, idents) for r in rows]
