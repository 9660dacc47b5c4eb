"""Prometheus metrics: request counts and latency histograms per route (the route *template*,
so label cardinality stays bounded), served at ``GET /metrics`` in the text format.

Several worker processes: ``consent serve --workers N`` sets ``PROMETHEUS_MULTIPROC_DIR`` to
an emptied directory before the workers start, and prometheus_client's multiprocess mode
then sums every worker's samples at scrape time. With one process the values live in
memory. (When you run uvicorn/gunicorn yourself with several workers, set
``PROMETHEUS_MULTIPROC_DIR`` to an empty directory yourself, or each scrape sees one worker.)
"""

from __future__ import annotations

import logging
import os
import sqlite3
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)
from starlette.requests import Request
from starlette.responses import Response

from consent.web.http import describe

log = logging.getLogger("consent.web.metrics")
_DRIVER_ERRORS: tuple[type[BaseException], ...] = (sqlite3.Error,)
try:
    import psycopg

    _DRIVER_ERRORS += (psycopg.Error,)
except ImportError:  # PostgreSQL support not installed
    pass

REQUESTS = Counter("consent_http_requests_total", "HTTP requests by route, method and status",
                   ["method", "route", "status"])
LATENCY = Histogram("consent_http_request_duration_seconds", "HTTP request latency by route and method",
                    ["method", "route"],
                    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))

# A batched executor (the check reader, the group-commit writer) that failed: the requests it
# held were answered by the per-request executor, so nothing is lost, but it must be seen.
EXECUTOR_FAILURES = Counter("consent_executor_failures_total",
                            "Batched executor failures (the requests went to the per-request executor)",
                            ["executor", "error"])


_CHILDREN: dict[tuple[str, str, int], tuple[Any, Any]] = {}
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def method_label(method: str | None) -> str:
    """The method as a label: any method we do not serve is ``other`` (a client may send any
    token as a method; each distinct one would otherwise be a new series)."""
    return method if method in METHODS else "other"


def observe(method: str, route: str, status: int, seconds: float) -> None:
    # Perf: the labelled children are looked up once per (method, route, status), not per
    # request (``labels()`` takes a lock and builds the label tuple). Routes are templates,
    # so the dict stays small; unknown methods share one label.
    method = method_label(method)
    children = _CHILDREN.get((method, route, status))
    if children is None:
        children = (REQUESTS.labels(method, route, str(status)), LATENCY.labels(method, route))
        if len(_CHILDREN) < 10_000:
            _CHILDREN[(method, route, status)] = children
    children[0].inc()
    children[1].observe(seconds)


def executor_failed(executor: str, exc: BaseException) -> None:
    """Log and count one failure of a batched executor (``check`` or ``record``)."""
    log.warning("%s executor failed (%s: %s); answered per request", executor, type(exc).__name__, exc,
                exc_info=not isinstance(exc, (OSError, *_DRIVER_ERRORS)))
    EXECUTOR_FAILURES.labels(executor, type(exc).__name__).inc()


def exposition() -> bytes:
    """The text exposition of every metric (summed over workers in multiprocess mode)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)
    from prometheus_client import REGISTRY

    return generate_latest(REGISTRY)


@describe(summary="Prometheus metrics (text exposition format)")
async def metrics_handler(request: Request) -> Response:
    return Response(exposition(), media_type=CONTENT_TYPE_LATEST)
