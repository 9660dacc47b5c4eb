"""Webhook endpoints and delivery of the outbox (rows written by ``events`` with each record).

Delivery is at-least-once and signed the Standard Webhooks way (``webhook-id``,
``webhook-timestamp``, ``webhook-signature: v1,<base64 HMAC-SHA256>``). A pass *claims* due
deliveries in a short write transaction (``FOR UPDATE SKIP LOCKED`` on PostgreSQL, so two
processes never claim the same row; SQLite's write lock serialises) and pushes their
``next_attempt_at`` out by a lease, commits, then makes the HTTP calls with no transaction
open, and records each result. A process that dies mid-call leaves the lease to expire and
another process retries. Failures back off exponentially with jitter until the retry window
(a day by default) is spent; an endpoint failing ``webhook_disable_after`` times in a row is
disabled.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import httpx
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from . import crypto, events
from .catalog import decode_cursor, encode_cursor
from .db import transaction
from .errors import NotFound
from .models import Event, WebhookAttempt, WebhookDelivery, WebhookEndpoint, utcnow
from .settings import Settings

log = logging.getLogger("consent.webhooks")

ENDPOINT = WebhookEndpoint.__table__  # type: ignore[attr-defined]
DELIVERY = WebhookDelivery.__table__  # type: ignore[attr-defined]
ATTEMPT = WebhookAttempt.__table__  # type: ignore[attr-defined]
EVENT = Event.__table__  # type: ignore[attr-defined]
BATCH = 50
LEASE_EXTRA = 30.0  # seconds a claim outlives the HTTP timeout before another process may retry
USER_AGENT = "consent-webhooks/1"


# --- endpoints -------------------------------------------------------------------------------


def create_endpoint(db: Session, tenant_id: str, *, url: str, event_types: list[str],
                    description: str = "") -> WebhookEndpoint:
    ep = WebhookEndpoint(id=crypto.new_id("wh", 10), tenant_id=tenant_id, url=url, event_types=event_types,
                         description=description, secret=crypto.new_webhook_secret(), enabled=True,
                         created_at=utcnow())
    db.add(ep)
    db.flush()
    return ep


def list_endpoints(db: Session, tenant_id: str) -> list[WebhookEndpoint]:
    q = (sa.select(WebhookEndpoint)
         .where(ENDPOINT.c.tenant_id == tenant_id, ENDPOINT.c.deleted_at.is_(None))
         .order_by(ENDPOINT.c.created_at))
    return list(db.execute(q).scalars())


def get_endpoint(db: Session, tenant_id: str, endpoint_id: str) -> WebhookEndpoint:
    ep = db.get(WebhookEndpoint, endpoint_id)
    if ep is None or ep.tenant_id != tenant_id or ep.deleted_at is not None:
        raise NotFound("webhook endpoint not found")
    return ep


def delete_endpoint(db: Session, tenant_id: str, endpoint_id: str) -> None:
    """Stop deliveries at once; the endpoint and its log are kept (soft delete) for audit."""
    ep = get_endpoint(db, tenant_id, endpoint_id)
    now = utcnow()
    ep.deleted_at, ep.enabled = now, False
    db.execute(sa.update(DELIVERY).where(DELIVERY.c.endpoint_id == ep.id, DELIVERY.c.status == "pending")
               .values(status="cancelled", last_error="endpoint deleted"))
    db.flush()


def enable_endpoint(db: Session, tenant_id: str, endpoint_id: str) -> WebhookEndpoint:
    """Re-enable a disabled endpoint; its deliveries still pending are retried now."""
    ep = get_endpoint(db, tenant_id, endpoint_id)
    ep.enabled, ep.consecutive_failures, ep.disabled_at, ep.disabled_reason = True, 0, None, None
    db.execute(sa.update(DELIVERY).where(DELIVERY.c.endpoint_id == ep.id, DELIVERY.c.status == "pending")
               .values(next_attempt_at=utcnow()))
    db.flush()
    return ep


def endpoint_out(ep: WebhookEndpoint) -> dict[str, Any]:
    return {"id": ep.id, "url": ep.url, "event_types": ep.event_types, "description": ep.description,
            "enabled": ep.enabled, "consecutive_failures": ep.consecutive_failures,
            "disabled_reason": ep.disabled_reason, "disabled_at": ep.disabled_at, "created_at": ep.created_at}


def list_deliveries(db: Session, tenant_id: str, endpoint_id: str, *, limit: int,
                    cursor: str | None) -> tuple[list[dict[str, Any]], str | None]:
    """The delivery log of one endpoint, newest first, each with its attempts."""
    get_endpoint(db, tenant_id, endpoint_id)
    q = sa.select(DELIVERY).where(DELIVERY.c.endpoint_id == endpoint_id)
    before = decode_cursor(cursor)
    if before is not None:
        q = q.where(DELIVERY.c.id < before)
    rows = db.execute(q.order_by(DELIVERY.c.id.desc()).limit(limit + 1)).all()
    more, rows = len(rows) > limit, rows[:limit]
    attempts: dict[int, list[dict[str, Any]]] = {r.id: [] for r in rows}
    if rows:
        for a in db.execute(sa.select(ATTEMPT).where(ATTEMPT.c.delivery_id.in_(list(attempts)))
                            .order_by(ATTEMPT.c.id)):
            attempts[a.delivery_id].append({"attempted_at": a.attempted_at, "status_code": a.status_code,
                                            "error": a.error, "duration_ms": a.duration_ms})
    items = [{
        "id": r.id, "event_id": r.event_id, "event_position": r.event_position, "event_type": r.event_type,
        "status": r.status, "attempts": r.attempts, "next_attempt_at": r.next_attempt_at if r.status == "pending" else None,
        "last_status_code": r.last_status_code, "last_error": r.last_error, "created_at": r.created_at,
        "delivered_at": r.delivered_at, "log": attempts[r.id],
    } for r in rows]
    return items, (encode_cursor(rows[-1].id) if more and rows else None)


# --- delivery --------------------------------------------------------------------------------


@dataclass
class Job:
    delivery_id: int
    endpoint_id: str
    url: str
    secret: str
    msg_id: str
    body: bytes


@dataclass
class Result:
    status_code: int | None
    error: str | None
    duration_ms: int

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def _due(now: Any) -> Any:
    return (sa.select(DELIVERY.c.id, DELIVERY.c.tenant_id, DELIVERY.c.endpoint_id, DELIVERY.c.event_position,
                      ENDPOINT.c.url, ENDPOINT.c.secret)
            .join(ENDPOINT, ENDPOINT.c.id == DELIVERY.c.endpoint_id)
            .where(DELIVERY.c.status == "pending", DELIVERY.c.next_attempt_at <= now, ENDPOINT.c.enabled.is_(True))
            .order_by(DELIVERY.c.next_attempt_at, DELIVERY.c.id))


def claim_due(engine: Engine, settings: Settings, limit: int = BATCH) -> list[Job]:
    """Claim up to ``limit`` due deliveries for this process and build their signed bodies."""
    now = utcnow()
    with transaction(engine) as db:  # cheap read first: no write lock when nothing is due
        if db.execute(_due(now).limit(1)).first() is None:
            return []
    with transaction(engine, write=True) as db:
        q = _due(now).limit(limit)
        if db.get_bind().dialect.name == "postgresql":
            q = q.with_for_update(skip_locked=True, of=DELIVERY)
        rows = db.execute(q).all()
        if not rows:
            return []
        lease = now + timedelta(seconds=settings.webhook_timeout_seconds + LEASE_EXTRA)
        db.execute(sa.update(DELIVERY).where(DELIVERY.c.id.in_([r.id for r in rows])).values(next_attempt_at=lease))
        jobs = []
        for tenant_id in {r.tenant_id for r in rows}:
            mine = [r for r in rows if r.tenant_id == tenant_id]
            evs = list(db.execute(sa.select(EVENT).where(EVENT.c.tenant_id == tenant_id, EVENT.c.position.in_(
                {r.event_position for r in mine}))).all())
            by_pos = {e.position: e for e in evs}
            rendered = {e["position"]: e for e in events.render(db, tenant_id, evs)}
            for r in mine:
                ev = rendered[r.event_position]
                body = {"type": ev["type"], "timestamp": crypto.iso(by_pos[r.event_position].created_at),
                        "data": {**ev["data"], "event_id": ev["id"], "position": ev["position"]}}
                jobs.append(Job(r.id, r.endpoint_id, r.url, r.secret, ev["id"], crypto.canonical_json(body)))
        return jobs


def headers_for(job: Job, now: float | None = None) -> dict[str, str]:
    ts = int(now if now is not None else time.time())
    return {"content-type": "application/json", "user-agent": USER_AGENT, "webhook-id": job.msg_id,
            "webhook-timestamp": str(ts), "webhook-signature": crypto.webhook_signature(job.secret, job.msg_id, ts, job.body)}


def _failure(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"[:500]


def post_sync(client: httpx.Client, job: Job) -> Result:
    start = time.perf_counter()
    try:
        r = client.post(job.url, content=job.body, headers=headers_for(job))
        return Result(r.status_code, None if r.is_success else f"HTTP {r.status_code}", _ms(start))
    except httpx.HTTPError as exc:
        return Result(None, _failure(exc), _ms(start))


async def post_async(client: httpx.AsyncClient, job: Job) -> Result:
    start = time.perf_counter()
    try:
        r = await client.post(job.url, content=job.body, headers=headers_for(job))
        return Result(r.status_code, None if r.is_success else f"HTTP {r.status_code}", _ms(start))
    except httpx.HTTPError as exc:
        return Result(None, _failure(exc), _ms(start))


def _ms(start: float) -> int:
    return int((time.perf_counter() - start) * 1000)


def backoff(settings: Settings, attempts: int) -> float:
    """Exponential backoff with jitter: base * 2^(n-1), capped, times a random 0.5..1."""
    delay = min(settings.webhook_backoff_max_seconds, settings.webhook_backoff_seconds * 2 ** (attempts - 1))
    return delay * random.uniform(0.5, 1.0)


def record_results(engine: Engine, settings: Settings, done: list[tuple[Job, Result]]) -> None:
    """Store each attempt; schedule the retry, give up after the retry window, disable endpoints."""
    if not done:
        return
    now = utcnow()
    with transaction(engine, write=True) as db:
        for job, res in done:
            row = db.execute(sa.select(DELIVERY.c.attempts, DELIVERY.c.created_at, DELIVERY.c.status)
                             .where(DELIVERY.c.id == job.delivery_id)).one()
            attempts = row.attempts + 1
            db.execute(sa.insert(ATTEMPT).values(delivery_id=job.delivery_id, attempted_at=now,
                                                 status_code=res.status_code, error=res.error,
                                                 duration_ms=res.duration_ms))
            values: dict[str, Any] = {"attempts": attempts, "last_status_code": res.status_code,
                                      "last_error": res.error}
            if row.status != "pending":  # deleted meanwhile: keep the log, change nothing else
                db.execute(sa.update(DELIVERY).where(DELIVERY.c.id == job.delivery_id).values(**values))
                continue
            if res.ok:
                values.update(status="delivered", delivered_at=now)
                db.execute(sa.update(ENDPOINT).where(ENDPOINT.c.id == job.endpoint_id).values(consecutive_failures=0))
            else:
                retry_at = now + timedelta(seconds=backoff(settings, attempts))
                if (retry_at - row.created_at).total_seconds() > settings.webhook_retry_seconds:
                    values.update(status="failed")
                else:
                    values.update(next_attempt_at=retry_at)
                _count_failure(db, settings, job.endpoint_id, now)
            db.execute(sa.update(DELIVERY).where(DELIVERY.c.id == job.delivery_id).values(**values))


def _count_failure(db: Session, settings: Settings, endpoint_id: str, now: Any) -> None:
    db.execute(sa.update(ENDPOINT).where(ENDPOINT.c.id == endpoint_id)
               .values(consecutive_failures=ENDPOINT.c.consecutive_failures + 1))
    failures = db.execute(sa.select(ENDPOINT.c.consecutive_failures).where(ENDPOINT.c.id == endpoint_id)).scalar_one()
    if failures >= settings.webhook_disable_after:
        db.execute(sa.update(ENDPOINT).where(ENDPOINT.c.id == endpoint_id, ENDPOINT.c.enabled.is_(True)).values(
            enabled=False, disabled_at=now, disabled_reason=f"{failures} failed attempts in a row"))
        log.warning("webhook endpoint %s disabled after %d failed attempts", endpoint_id, failures)


def _timeout(settings: Settings) -> httpx.Timeout:
    return httpx.Timeout(settings.webhook_timeout_seconds, connect=min(3.0, settings.webhook_timeout_seconds))


def deliver_once(engine: Engine, settings: Settings) -> int:
    """One synchronous delivery pass (tests, CLI): claim what is due, send it, record it."""
    jobs = claim_due(engine, settings)
    if not jobs:
        return 0
    with httpx.Client(timeout=_timeout(settings), follow_redirects=False, trust_env=False) as client:
        done = [(job, post_sync(client, job)) for job in jobs]
    record_results(engine, settings, done)
    return len(done)


class DeliveryWorker:
    """The delivery loop of one service process (started and stopped by the app's lifespan)."""

    def __init__(self, engine: Engine, settings: Settings):
        self.engine, self.settings = engine, settings
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> DeliveryWorker:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._run(), name="webhook-delivery")
        events.add_waker(self.wake)
        return self

    def wake(self) -> None:
        """Called from request threads after a commit that wrote outbox rows: deliver now."""
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._wake.set)
            except RuntimeError:  # the loop closed meanwhile (shutdown)
                pass

    async def stop(self) -> None:
        events.remove_waker(self.wake)
        self._stop.set()
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, timeout=self.settings.webhook_timeout_seconds + 5)
            except (TimeoutError, asyncio.CancelledError):
                self._task.cancel()

    async def _run(self) -> None:
        from starlette.concurrency import run_in_threadpool

        async with httpx.AsyncClient(timeout=_timeout(self.settings), follow_redirects=False,
                                     trust_env=False) as client:
            while not self._stop.is_set():
                busy = False
                try:
                    jobs = await run_in_threadpool(claim_due, self.engine, self.settings)
                    if jobs:
                        results = await asyncio.gather(*(post_async(client, j) for j in jobs))
                        await run_in_threadpool(record_results, self.engine, self.settings,
                                                list(zip(jobs, results)))
                        busy = True
                except Exception:  # a bad pass must not end the loop (DB restart, etc.)
                    log.exception("webhook delivery pass failed")
                if busy:
                    continue
                try:  # until the poll interval passes, or this process commits new outbox rows
                    await asyncio.wait_for(self._wake.wait(), timeout=self.settings.webhook_poll_seconds)
                except TimeoutError:
                    pass
                self._wake.clear()


def start_worker(engine: Engine, settings: Settings) -> DeliveryWorker | None:
    """Start this process's delivery loop unless ``CONSENT_WEBHOOK_WORKER=false``."""
    return DeliveryWorker(engine, settings).start() if settings.webhook_worker else None


def retry_delivery(db: Session, tenant_id: str, delivery_id: int) -> dict[str, Any]:
    """One failed delivery of this tenant, due again now: the worker makes one more attempt,
    and a failure marks it failed again (its retry window is over). 409 unless it failed or
    while its endpoint is disabled (enabling retries what is pending)."""
    from .errors import Conflict

    row = db.execute(sa.select(DELIVERY.c.id, DELIVERY.c.endpoint_id, DELIVERY.c.status).where(
        DELIVERY.c.id == delivery_id, DELIVERY.c.tenant_id == tenant_id)).first()
    if row is None:
        raise NotFound("delivery not found")
    if row.status != "failed":
        raise Conflict(f"only a failed delivery can be retried; this one is {row.status}", code="delivery_not_failed")
    if not get_endpoint(db, tenant_id, row.endpoint_id).enabled:
        raise Conflict("the endpoint is disabled: enable it first", code="endpoint_disabled")
    db.execute(sa.update(DELIVERY).where(DELIVERY.c.id == delivery_id, DELIVERY.c.status == "failed")
               .values(status="pending", next_attempt_at=utcnow()))
    db.flush()
    return {"id": row.id, "endpoint_id": row.endpoint_id, "status": "pending"}
