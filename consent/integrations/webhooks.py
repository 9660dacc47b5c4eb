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
import functools
import ipaddress
import logging
import random
import socket
import time
import urllib.parse
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import httpx
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from consent import crypto
from consent.errors import NotFound
from consent.ledger import events
from consent.ledger.catalog import decode_cursor, encode_cursor
from consent.settings import Settings
from consent.store.db import transaction
from consent.store.models import WebhookEndpoint, utcnow
from consent.store.tables import EVENT
from consent.store.tables import WEBHOOK_ATTEMPT as ATTEMPT
from consent.store.tables import WEBHOOK_DELIVERY as DELIVERY
from consent.store.tables import WEBHOOK_ENDPOINT as ENDPOINT

log = logging.getLogger("consent.integrations.webhooks")

BATCH = 50  # deliveries in flight per process at most
PER_ENDPOINT = 10  # deliveries of one endpoint per claim
LEASE_EXTRA = 30.0  # seconds a claim outlives an attempt's total deadline
RESPONSE_LIMIT = 64 * 1024  # bytes of a receiver's answer read at most (only its status matters)
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


def rotate_secret(db: Session, tenant_id: str, endpoint_id: str, grace: timedelta) -> WebhookEndpoint:
    """A new signing secret; the one it replaces signs deliveries too for ``grace`` (0: stops now)."""
    ep = get_endpoint(db, tenant_id, endpoint_id)
    if grace > timedelta(0):
        ep.previous_secret, ep.previous_secret_until = ep.secret, utcnow() + grace
    else:
        ep.previous_secret, ep.previous_secret_until = None, None
    ep.secret = crypto.new_webhook_secret()
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


# --- targets (SSRF) ----------------------------------------------------------------------------

METADATA_HOSTS = frozenset({"metadata.google.internal", "metadata", "instance-data"})


class UnsafeTarget(ValueError):
    """A webhook URL that must not be called: internal address, credentials, plain http."""


def address_allowed(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Only public unicast addresses: no loopback, private, link-local (cloud metadata),
    unique-local, multicast, unspecified, reserved or shared (CGNAT) ranges."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is not None:
            return address_allowed(embedded)
        if ip in NAT64:
            return address_allowed(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return ip.is_global and not (ip.is_multicast or ip.is_unspecified or ip.is_loopback
                                 or ip.is_link_local or ip.is_private or ip.is_reserved)


NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def check_url(url: str, *, allow_private: bool) -> urllib.parse.SplitResult:
    """The URL's own rules (no DNS): https (http only with allow_private), a host, no user:pass."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise UnsafeTarget("must be an absolute http(s) URL")
    if parts.scheme != "https" and not allow_private:
        raise UnsafeTarget("must use https")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise UnsafeTarget("must not carry credentials")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as exc:
        raise UnsafeTarget("has an invalid port") from exc
    if not allow_private and parts.hostname.rstrip(".").lower() in METADATA_HOSTS:
        raise UnsafeTarget("must not name a cloud metadata service")
    return parts


def _checked(infos: list[Any], host: str, allow_private: bool) -> str:
    addrs = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
    if not addrs:
        raise UnsafeTarget(f"host {host!r} does not resolve")
    if not allow_private:
        bad = [a for a in addrs if not address_allowed(a)]
        if bad:  # every address is checked: a name with one internal address is refused
            raise UnsafeTarget(f"host {host!r} resolves to a non-public address ({bad[0]})")
    return str(addrs[0])


def _port(parts: urllib.parse.SplitResult) -> int:
    return parts.port or (443 if parts.scheme == "https" else 80)


def resolve_target(url: str, *, allow_private: bool) -> str:
    """Check ``url`` and resolve its host once; the checked address (registration)."""
    parts = check_url(url, allow_private=allow_private)
    try:
        infos = socket.getaddrinfo(parts.hostname, _port(parts), type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise UnsafeTarget(f"host {parts.hostname!r} does not resolve") from exc
    return _checked(infos, str(parts.hostname), allow_private)


async def _resolve_async(parts: urllib.parse.SplitResult, allow_private: bool) -> str:
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(parts.hostname, _port(parts),
                                                              type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise UnsafeTarget(f"host {parts.hostname!r} does not resolve") from exc
    return _checked(infos, str(parts.hostname), allow_private)


# --- delivery --------------------------------------------------------------------------------


@dataclass
class Job:
    delivery_id: int
    endpoint_id: str
    url: str
    secret: str
    msg_id: str
    body: bytes
    previous_secret: str | None = None  # rotated out, still signing until its time is up


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
                      ENDPOINT.c.url, ENDPOINT.c.secret, ENDPOINT.c.previous_secret,
                      ENDPOINT.c.previous_secret_until)
            .join(ENDPOINT, ENDPOINT.c.id == DELIVERY.c.endpoint_id)
            .where(DELIVERY.c.status == "pending", DELIVERY.c.next_attempt_at <= now, ENDPOINT.c.enabled.is_(True))
            .order_by(DELIVERY.c.next_attempt_at, DELIVERY.c.id))


def lease_seconds(settings: Settings) -> float:
    """How long a claim is this process's: every attempt ends (its total deadline) well before."""
    return settings.webhook_timeout_seconds + LEASE_EXTRA


def claim_due(engine: Engine, settings: Settings, limit: int = BATCH,
              skip: frozenset[str] = frozenset()) -> list[Job]:
    """Claim up to ``limit`` due deliveries, at most ``PER_ENDPOINT`` per endpoint and none for
    the endpoints in ``skip`` (still in flight here), and build their signed bodies."""
    now = utcnow()
    with transaction(engine) as db:  # cheap read first: no write lock when nothing is due
        probe = _due(now)
        if skip:
            probe = probe.where(DELIVERY.c.endpoint_id.notin_(sorted(skip)))
        if db.execute(probe.limit(1)).first() is None:
            return []
    with transaction(engine, write=True) as db:
        # a fair share: one endpoint's backlog never fills a claim that other endpoints wait on
        ranked = (sa.select(DELIVERY.c.id, sa.func.row_number().over(
                      partition_by=DELIVERY.c.endpoint_id,
                      order_by=(DELIVERY.c.next_attempt_at, DELIVERY.c.id)).label("n"))
                  .join(ENDPOINT, ENDPOINT.c.id == DELIVERY.c.endpoint_id)
                  .where(DELIVERY.c.status == "pending", DELIVERY.c.next_attempt_at <= now,
                         ENDPOINT.c.enabled.is_(True)))
        if skip:
            ranked = ranked.where(DELIVERY.c.endpoint_id.notin_(sorted(skip)))
        sub = ranked.subquery()
        q = _due(now).where(DELIVERY.c.id.in_(sa.select(sub.c.id).where(sub.c.n <= PER_ENDPOINT)))
        q = q.limit(limit)
        if db.get_bind().dialect.name == "postgresql":
            q = q.with_for_update(skip_locked=True, of=DELIVERY)
        rows = db.execute(q).all()
        if not rows:
            return []
        lease = now + timedelta(seconds=lease_seconds(settings))
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
                previous = r.previous_secret if r.previous_secret_until and r.previous_secret_until > now else None
                jobs.append(Job(r.id, r.endpoint_id, r.url, r.secret, ev["id"], crypto.canonical_json(body),
                                previous))
        return jobs


def headers_for(job: Job, now: float | None = None) -> dict[str, str]:
    ts = int(now if now is not None else time.time())
    # Standard Webhooks: space-separated signatures; a receiver still on the previous secret
    # verifies the second until the rotation's grace period ends.
    signature = " ".join(crypto.webhook_signature(s, job.msg_id, ts, job.body)
                         for s in (job.secret, job.previous_secret) if s)
    return {"content-type": "application/json", "user-agent": USER_AGENT, "webhook-id": job.msg_id,
            "webhook-timestamp": str(ts), "webhook-signature": signature}


def _failure(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"[:500]


async def _attempt(client: httpx.AsyncClient, job: Job, allow_private: bool) -> int:
    """Resolve once, check the address, connect to that address (so a DNS answer that changes
    after the check is never used), send, and read at most ``RESPONSE_LIMIT`` raw bytes."""
    parts = check_url(job.url, allow_private=allow_private)
    ip = await _resolve_async(parts, allow_private)
    host = f"[{ip}]" if ":" in ip else ip
    target = parts._replace(netloc=f"{host}:{_port(parts)}").geturl()
    headers = {**headers_for(job), "host": parts.netloc}
    request = client.build_request("POST", target, content=job.body, headers=headers,
                                   extensions={"sni_hostname": parts.hostname})
    response = await client.send(request, stream=True)
    try:
        seen = 0
        async for chunk in response.aiter_raw():  # raw: a gzip body is never inflated
            seen += len(chunk)
            if seen >= RESPONSE_LIMIT:
                break
    finally:
        await response.aclose()
    return response.status_code


async def post_async(client: httpx.AsyncClient, job: Job, settings: Settings) -> Result:
    """One attempt under one total deadline (resolve, connect, send, status, body)."""
    start = time.perf_counter()
    try:
        async with asyncio.timeout(settings.webhook_timeout_seconds):
            status = await _attempt(client, job, settings.webhook_allow_private)
        return Result(status, None if 200 <= status < 300 else f"HTTP {status}", _ms(start))
    except TimeoutError:
        return Result(None, f"timeout: no complete answer within {settings.webhook_timeout_seconds:g} s",
                      _ms(start))
    except UnsafeTarget as exc:
        return Result(None, f"refused target: {exc}"[:500], _ms(start))
    except (httpx.HTTPError, OSError) as exc:
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


def _client(settings: Settings) -> httpx.AsyncClient:
    timeout = httpx.Timeout(settings.webhook_timeout_seconds, connect=min(3.0, settings.webhook_timeout_seconds))
    # no redirects (a 3xx is a failure: following one would bypass the address check), no
    # proxies from the environment, a small pool
    return httpx.AsyncClient(timeout=timeout, follow_redirects=False, trust_env=False,
                             limits=httpx.Limits(max_connections=BATCH, max_keepalive_connections=10))


def by_endpoint(jobs: list[Job]) -> dict[str, list[Job]]:
    groups: dict[str, list[Job]] = {}
    for job in jobs:
        groups.setdefault(job.endpoint_id, []).append(job)
    return groups


async def deliver_group(engine: Engine, settings: Settings, client: httpx.AsyncClient,
                        jobs: list[Job]) -> None:
    """One endpoint's claimed deliveries, concurrently, then their results in one transaction:
    nothing here waits on another endpoint."""
    from starlette.concurrency import run_in_threadpool

    results = await asyncio.gather(*(post_async(client, j, settings) for j in jobs))
    await run_in_threadpool(record_results, engine, settings, list(zip(jobs, results)))


def deliver_once(engine: Engine, settings: Settings) -> int:
    """One delivery pass (tests, CLI): claim what is due, send it, record it per endpoint."""
    jobs = claim_due(engine, settings)
    if not jobs:
        return 0

    async def run() -> None:
        async with _client(settings) as client:
            await asyncio.gather(*(deliver_group(engine, settings, client, g)
                                   for g in by_endpoint(jobs).values()))

    asyncio.run(run())
    return len(jobs)


class DeliveryWorker:
    """The delivery loop of one service process (started and stopped by the app's lifespan).

    Each endpoint's claimed deliveries run as their own task; the loop claims again whenever
    a task ends or a commit wakes it, skipping endpoints still in flight, so a slow receiver
    holds only its own deliveries."""

    def __init__(self, engine: Engine, settings: Settings):
        self.engine, self.settings = engine, settings
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inflight: dict[str, tuple[asyncio.Task[None], int]] = {}

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

    def _done(self, endpoint_id: str, task: asyncio.Task[None]) -> None:
        self._inflight.pop(endpoint_id, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("webhook delivery to endpoint %s failed", endpoint_id, exc_info=task.exception())
        self._wake.set()

    async def _run(self) -> None:
        from starlette.concurrency import run_in_threadpool

        async with _client(self.settings) as client:
            while not self._stop.is_set():
                self._wake.clear()
                room = BATCH - sum(n for _, n in self._inflight.values())
                jobs: list[Job] = []
                if room > 0:
                    try:
                        jobs = await run_in_threadpool(claim_due, self.engine, self.settings, room,
                                                       frozenset(self._inflight))
                    except Exception:  # a bad pass must not end the loop (DB restart, etc.)
                        log.exception("webhook delivery claim failed")
                for endpoint_id, group in by_endpoint(jobs).items():
                    task = asyncio.create_task(deliver_group(self.engine, self.settings, client, group))
                    self._inflight[endpoint_id] = (task, len(group))
                    task.add_done_callback(functools.partial(self._done, endpoint_id))
                if jobs and len(jobs) >= room:
                    continue  # more may be due
                try:  # until the poll interval passes, a task ends, or a commit here writes outbox rows
                    await asyncio.wait_for(self._wake.wait(), timeout=self.settings.webhook_poll_seconds)
                except TimeoutError:
                    pass
            tasks = [t for t, _ in self._inflight.values()]
            if tasks:  # each attempt has its own deadline: this ends within it
                await asyncio.gather(*tasks, return_exceptions=True)


def start_worker(engine: Engine, settings: Settings) -> DeliveryWorker | None:
    """Start this process's delivery loop unless ``CONSENT_WEBHOOK_WORKER=false``."""
    return DeliveryWorker(engine, settings).start() if settings.webhook_worker else None


def retry_delivery(db: Session, tenant_id: str, delivery_id: int) -> dict[str, Any]:
    """One failed delivery of this tenant, due again now: the worker makes one more attempt,
    and a failure marks it failed again (its retry window is over). 409 unless it failed or
    while its endpoint is disabled (enabling retries what is pending)."""
    from consent.errors import Conflict

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
