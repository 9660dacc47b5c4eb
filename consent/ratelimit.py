"""Abuse limits for the public routes: fixed-window counters per API key and per client IP,
kept in the database every service process shares (a small ``rate_limit`` table, one upsert
per bucket), so N processes behind a load balancer enforce one limit, not N.

Which routes are limited is decided here, in one place (``is_limited``): every route whose
path starts with one of ``PUBLIC_PREFIXES`` or whose name is in ``PUBLIC_ROUTE_NAMES``, plus
the names listed in ``CONSENT_RATE_LIMIT_ROUTES``. ``create_app`` calls ``guard(routes, …)``
which wraps exactly those endpoints. Over the limit the caller gets 429 problem+json with
``Retry-After`` (seconds to the next window). A database error while counting lets the
request through (logged): limits protect availability, they must not remove it.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from .db import transaction
from .errors import RateLimited
from .ledger import insert_for
from .models import RateLimitCounter

log = logging.getLogger("consent.ratelimit")

WINDOW_SECONDS = 60
PUBLIC_PREFIXES = ("/v1/snippet/", "/u/")
PUBLIC_ROUTE_NAMES: frozenset[str] = frozenset()
TABLE = RateLimitCounter.__table__  # type: ignore[attr-defined]


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


def buckets(request: Request, per_key: int, per_ip: int) -> list[tuple[str, int]]:
    out = []
    ip = request.client.host if request.client else "unknown"
    if per_ip > 0:
        out.append((f"ip:{ip}"[:100], per_ip))
    key = presented_key(request)
    if key and per_key > 0:
        out.append(("key:" + hashlib.sha256(key.encode()).hexdigest()[:40], per_key))
    return out


def hit(engine: Engine, counted: list[tuple[str, int]], now: float | None = None) -> int | None:
    """Count one request in each bucket; seconds to wait when any bucket is over its limit."""
    now = time.time() if now is None else now
    window = int(now // WINDOW_SECONDS)
    retry = math.ceil((window + 1) * WINDOW_SECONDS - now) or 1
    over = False
    with transaction(engine, write=True) as db:
        ins = insert_for(db)(TABLE)
        for bucket, limit in counted:
            stmt = ins.values(bucket=bucket, window_start=window, hits=1).on_conflict_do_update(
                index_elements=["bucket", "window_start"], set_={"hits": TABLE.c.hits + 1},
            ).returning(TABLE.c.hits)
            if db.execute(stmt).scalar_one() > limit:
                over = True
        if random.random() < 0.01:  # keep the table small: drop finished windows now and then
            db.execute(sa.delete(TABLE).where(TABLE.c.window_start < window - 1))
    return retry if over else None


def limit(endpoint: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """Wrap one endpoint with the per-key and per-IP limits (keeps its OpenAPI ``meta``)."""

    async def limited(request: Request) -> Response:
        services: Any = request.app.state.services
        s = services.settings
        counted = buckets(request, s.rate_limit_per_minute, s.rate_limit_ip_per_minute)
        if counted:
            try:
                retry = await run_in_threadpool(hit, services.engine, counted)
            except Exception as exc:  # fail open, loudly
                log.warning("rate limit check failed; request let through", extra={"error": type(exc).__name__})
                retry = None
            if retry is not None:
                raise RateLimited(retry, "too many requests; retry after the time in Retry-After")
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
    out: list[BaseRoute] = []
    for route in routes:
        if is_limited(route, extra):
            assert isinstance(route, Route)
            route = Route(route.path, limit(route.endpoint), methods=list(route.methods or []) or None,
                          name=route.name, include_in_schema=route.include_in_schema)
        out.append(route)
    return out
