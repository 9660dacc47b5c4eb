"""Pure ASGI middleware: a request id on every request and response, and the security
headers every response carries (HTML responses get a strict CSP)."""

from __future__ import annotations

import logging
import random
import time

from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from consent.logs import info_fields, request_id_var
from consent.web import metrics

log = logging.getLogger("consent.access")

BASE_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]
HTML_HEADERS = [
    (b"content-security-policy",
     (b"default-src 'none'; style-src 'self' 'unsafe-inline'; script-src 'self'; img-src 'self' data:; "
      b"form-action 'self'; frame-ancestors 'none'; base-uri 'none'")),
    (b"x-frame-options", b"DENY"),
]


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp):
        self.app = app

    @classmethod
    def as_middleware(cls) -> Middleware:
        return Middleware(cls)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = incoming_request_id(scope) or new_request_id()
        scope.setdefault("state", {})["request_id"] = request_id
        token = request_id_var.set(request_id)
        start = time.perf_counter()
        status = 0

        async def send_wrapped(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                headers.extend(BASE_HEADERS)
                ctype = next((v for k, v in headers if k == b"content-type"), b"")
                if ctype.startswith(b"text/html"):
                    headers.extend(h for h in HTML_HEADERS if not any(k == h[0] for k, _ in headers))
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_wrapped)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            finish_request(scope.get("method"), route, status, start, request_id)
            request_id_var.reset(token)


def finish_request(method: str | None, route: str, status: int, start: float, request_id: str) -> None:
    """Metrics and the access line of one request ."""
    duration = time.perf_counter() - start
    method = metrics.method_label(method)
    metrics.observe(method, route, status, duration)
    if log.isEnabledFor(logging.INFO):  # queued as it is; formatted and written off the loop
        info_fields(log, "request", {"request_id": request_id, "method": method, "route": route, "status": status,
                                     "duration_ms": round(duration * 1000, 3)})


def new_request_id() -> str:
    """16 hex digits. Ids only tell requests apart in logs; they need not be unguessable
    (perf: no urandom system call per request)."""
    return f"{random.getrandbits(64):016x}"


def incoming_request_id(scope: Scope) -> str | None:
    for k, v in scope.get("headers", []):
        if k == b"x-request-id":
            value = v.decode("latin-1")
            if 0 < len(value) <= 64 and value.replace("-", "").isalnum():
                return value
    return None

