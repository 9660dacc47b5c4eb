"""Abuse limits for the public routes: fixed-window counters per client IP and per API key
from that IP, kept in the database every service process shares (a small ``rate_limit`` table, one upsert
per bucket), so N processes behind a load balancer enforce one limit, not N. Each process
counts locally and writes its increments in batches (``Limiter``): for limits of 40 or more
per minute up to N x (batch_size - 1) requests may pass over the limit in one window.

Which routes are limited is decided here, in one place (``is_limited``): every route whose
path starts with one of ``PUBLIC_PREFIXES`` or whose name is in ``PUBLIC_ROUTE_NAMES``, plus
the names listed in ``CONSENT_RATE_LIMIT_ROUTES``. ``create_app`` calls ``guard(routes, …)``
which wraps exactly those endpoints. Over the limit the caller gets 429 problem+json with
``Retry-After`` (seconds to the next window). A database error while counting lets the
request through (logged): limits protect availability, they must not remove it.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from consent.errors import RateLimited
from consent.ledger.recorder import insert_for
from consent.store.db import transaction
from consent.store.tables import RATE_LIMIT_COUNTER as TABLE

log = logging.getLogger("consent.web.ratelimit")

WINDOW_SECONDS = 60
PUBLIC_PREFIXES = ("/v1/snippet/", "/u/")
PUBLIC_ROUTE_NAMES: frozenset[str] = frozenset({"dashboard_sign_in"})  # password guessing
# Routes limited per path token instead of per IP, and how many per token and window.
BY_TOKEN = frozenset({"unsubscribe"})
UNSUBSCRIBE_PER_TOKEN = 10


def is_limited(route: BaseRoute, extra_names: Iterable[str] = ()) -> bool:
    """Whether the abuse limits apply to this route (by path prefix or route name)."""
    if not isinstance(route, Route):
        return False
    names = PUBLIC_ROUTE_NAMES | set(extra_names)
    return route.name in names or route.path.startswith(PUBLIC_PREFIXES)


def presented_key(request: Request) -> str | None:
    """The API key the caller presented (bearer or ?key=), unverified: limits count attempts."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip() if scheme.lower() == "bearer" else ""
    return token or request.query_params.get("key") or None


def buckets(request: Request, per_key: int, per_ip: int, *, by_token: int = 0) -> list[tuple[str, int]]:
    """The budgets one request spends: its client IP's, and its presented key's *from that IP*
    (a flood from one address never spends another visitor's budget for the same publishable
    key). ``by_token``: the route's path token alone, limited to that many per window (one-click
    unsubscribes come from a mail provider's few addresses on behalf of many people)."""
    if by_token:
        token = str(request.path_params.get("token", ""))
        return [("tok:" + hashlib.sha256(token.encode()).hexdigest()[:40], by_token)]
    out = []
    ip = request.client.host if request.client else "unknown"
    if per_ip > 0:
        out.append((f"ip:{ip}"[:100], per_ip))
    key = presented_key(request)
    if key and per_key > 0:
        out.append(("key:" + hashlib.sha256(f"{key}|{ip}".encode()).hexdigest()[:40], per_key))
    return out


def hit(engine: Engine, counted: list[tuple[str, int]], now: float | None = None,
        increments: list[int] | None = None) -> int | None:
    """Add hits to each bucket (one each unless ``increments``); seconds to wait when any
    bucket is over its limit."""
    retry, totals = flush(engine, [(b, n) for (b, _), n in zip(counted, increments or [1] * len(counted))], now)
    over = any(total > limit for total, (_, limit) in zip(totals, counted))
    return retry if over else None


def flush(engine: Engine, adds: list[tuple[str, int]], now: float | None = None) -> tuple[int, list[int]]:
    """Add ``n`` hits to each bucket in the shared table: (seconds to the next window, totals)."""
    now = time.time() if now is None else now
    window = int(now // WINDOW_SECONDS)
    retry = math.ceil((window + 1) * WINDOW_SECONDS - now) or 1
    totals = []
    with transaction(engine, write=True) as db:
        ins = insert_for(db)(TABLE)
        for bucket, n in adds:
            stmt = ins.values(bucket=bucket, window_start=window, hits=n).on_conflict_do_update(
                index_elements=["bucket", "window_start"], set_={"hits": TABLE.c.hits + n},
            ).returning(TABLE.c.hits)
            totals.append(db.execute(stmt).scalar_one())
        if random.random() < 0.01:  # keep the table small: drop finished windows now and then
            db.execute(sa.delete(TABLE).where(TABLE.c.window_start < window - 1))
    return retry, totals


FLUSH_SECONDS = 1.0
MAX_BATCH = 50


def batch_size(limit: int) -> int:
    """Hits a process may count locally before writing them to the shared table: 1 (exact)
    for small limits, at most 5 % of the limit and never more than MAX_BATCH."""
    return max(1, min(MAX_BATCH, limit // 20))


class Bucket:
    __slots__ = ("flushed_at", "known", "pending", "window")

    def __init__(self, window: int) -> None:
        self.window = window
        self.known = 0  # the shared total at our last flush (every process's hits)
        self.pending = 0  # our hits not yet written
        self.flushed_at = 0.0


class Limiter:
    """Per-process front of the shared counters. Perf: one write transaction per request would
    serialise every limited request on the table, so each process counts locally and writes
    its increments (reading the shared total back) every ``batch_size(limit)`` hits or
    FLUSH_SECONDS, whichever comes first. A bucket whose known total is over the limit is
    refused without touching the database. Bound: each process holds at most
    ``batch_size - 1`` unwritten hits per bucket, so P processes admit at most
    P x (batch_size - 1) requests over the limit per window (0 for limits under 40 per minute:
    every hit is written)."""

    def __init__(self) -> None:
        self.buckets: dict[str, Bucket] = {}

    def local(self, counted: list[tuple[str, int]], now: float) -> tuple[bool, int | None]:
        """Count one hit locally: (must flush now, seconds to wait if already over)."""
        window = int(now // WINDOW_SECONDS)
        retry = math.ceil((window + 1) * WINDOW_SECONDS - now) or 1
        mine = []
        for bucket, limit in counted:
            b = self.buckets.get(bucket)
            if b is None or b.window != window:
                if len(self.buckets) > 10_000:  # drop finished windows
                    self.buckets = {k: v for k, v in self.buckets.items() if v.window == window}
                b = self.buckets[bucket] = Bucket(window)
            mine.append((b, limit))
        if any(b.known + b.pending >= limit for b, limit in mine):
            return False, retry  # refused: spends nothing, so a flood cannot spend the next window
        need = False
        for b, limit in mine:
            b.pending += 1
            if b.pending >= batch_size(limit) or now - b.flushed_at >= FLUSH_SECONDS:
                need = True
        return need, None

    def take(self, counted: list[tuple[str, int]], now: float) -> list[tuple[str, int]]:
        """The pending increments to write (concurrent flushes are fine: the table adds)."""
        window = int(now // WINDOW_SECONDS)
        adds = []
        for bucket, _ in counted:
            b = self.buckets.get(bucket)
            if b is None or b.window != window or not b.pending:
                continue
            adds.append((bucket, b.pending))
            b.pending = 0
            b.flushed_at = now
        return adds

    def done(self, adds: list[tuple[str, int]], totals: list[int], now: float) -> None:
        window = int(now // WINDOW_SECONDS)
        for i, (bucket, _) in enumerate(adds):
            b = self.buckets.get(bucket)
            if b is not None and b.window == window:
                b.known = max(b.known, totals[i])

    def over(self, counted: list[tuple[str, int]]) -> bool:
        return any((b := self.buckets.get(bucket)) is not None and b.known + b.pending > limit
                   for bucket, limit in counted)


def limit(endpoint: Callable[[Request], Awaitable[Response]], limiter: Limiter | None = None,
          *, by_token: int = 0) -> Callable[[Request], Awaitable[Response]]:
    """Wrap one endpoint with the per-key and per-IP limits (keeps its OpenAPI ``meta``)."""
    limiter = limiter or Limiter()
    cors = bool(getattr(endpoint, "cors_methods", None))
    # A class endpoint (raw ASGI) is handed back as the "response": Starlette then calls it with
    # the request's ASGI triple, as its route would.
    raw_asgi = not inspect.iscoroutinefunction(endpoint)

    async def limited(request: Request) -> Response:
        services: Any = request.app.state.services
        s = services.settings
        counted = buckets(request, s.rate_limit_per_minute, s.rate_limit_ip_per_minute, by_token=by_token)
        if counted:
            now = time.time()
            need, retry = limiter.local(counted, now)
            if need:
                adds = limiter.take(counted, now)
                try:  # hits of a failed write are dropped: fail open
                    _, totals = await run_in_threadpool(flush, services.engine, adds, now)
                except SQLAlchemyError as exc:  # the database is unavailable: fail open, loudly
                    log.warning("rate limit check failed; request let through", extra={"error": type(exc).__name__})
                    retry = None
                else:
                    limiter.done(adds, totals, now)
                    over = limiter.over(counted)
                    retry = (math.ceil((int(now // WINDOW_SECONDS) + 1) * WINDOW_SECONDS - now) or 1) if over else None
            if retry is not None:
                problem = RateLimited(retry, "too many requests; retry after the time in Retry-After")
                origin = request.headers.get("origin")
                if cors and origin:  # the page's script must be able to read the 429 and wait;
                    # the answer says nothing about the tenant, so any origin may read it
                    problem.headers.update({"Access-Control-Allow-Origin": origin,
                                            "Access-Control-Expose-Headers": "Retry-After", "Vary": "Origin"})
                raise problem
        if raw_asgi:
            return endpoint  # type: ignore[return-value]
        return await endpoint(request)

    limited.__name__ = getattr(endpoint, "__name__", "limited")
    limited.__doc__ = endpoint.__doc__
    if hasattr(endpoint, "meta"):
        limited.meta = endpoint.meta  # type: ignore[attr-defined]
    limited.rate_limited = True  # type: ignore[attr-defined]
    return limited


def guard(routes: list[BaseRoute], extra_names: Iterable[str] = ()) -> list[BaseRoute]:
    """The routes table with the limits applied to every route ``is_limited`` selects."""
    extra = set(extra_names)
    limiter = Limiter()  # one per app: the routes share the per-key and per-IP buckets
    out: list[BaseRoute] = []
    for route in routes:
        if is_limited(route, extra):
            assert isinstance(route, Route)
            by_token = UNSUBSCRIBE_PER_TOKEN if route.name in BY_TOKEN else 0
            route = Route(route.path, limit(route.endpoint, limiter, by_token=by_token),
                          methods=list(route.methods or []) or None,
                          name=route.name, include_in_schema=route.include_in_schema)
        out.append(route)
    return out
