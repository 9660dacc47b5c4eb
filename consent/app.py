"""``create_app(settings)`` assembles the service: the routes table (the whole HTTP surface on
one screen), middleware, error handlers and the lifespan that owns the engine and signer."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import Engine
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from . import api, db, receipts, webhooks
from . import api_integrations as integ
from .crypto import Signer
from .errors import ConsentError, MethodNotAllowed, NotFound
from .http import JSONResponse, describe, problem_response
from .middleware import RequestContextMiddleware
from .openapi import openapi_handler
from .settings import Settings

log = logging.getLogger("consent")


@dataclass
class Services:
    """What handlers share for the life of the process (no per-request state)."""

    settings: Settings
    engine: Engine
    signer: Signer
    head: str | None

    @property
    def admin_token(self) -> str | None:
        return str(self.settings.admin_token) if self.settings.admin_token else None


@describe(summary="Liveness: the process answers")
async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


@describe(summary="Readiness: database reachable and migrations at head", responses={503: "not ready"})
async def readyz(request: Request) -> Response:
    services: Services = request.app.state.services

    def probe() -> dict[str, Any]:
        try:
            current = db.current_revision(services.engine)
        except Exception as exc:  # any driver error means "not ready", never a 500
            return {"database": "unreachable", "error": type(exc).__name__}
        return {"database": "ok", "migration": current, "head": services.head}

    checks = await run_in_threadpool(probe)
    ready = checks.get("database") == "ok" and checks.get("migration") == checks.get("head")
    return JSONResponse({"status": "ready" if ready else "unavailable", "checks": checks},
                        status_code=200 if ready else 503)


routes = [
    Route("/healthz", healthz, methods=["GET"], name="healthz"),
    Route("/readyz", readyz, methods=["GET"], name="readyz"),
    Route("/openapi.json", openapi_handler, methods=["GET"], name="openapi"),
    Route("/.well-known/jwks.json", api.jwks, methods=["GET"], name="jwks"),
    Route("/v1/tenants", api.create_tenant, methods=["POST"], name="create_tenant"),
    Route("/v1/tenants/{tenant_id}/keys/rotate", api.admin_rotate_keys, methods=["POST"], name="admin_rotate_keys"),
    Route("/v1/tenant", api.get_own_tenant, methods=["GET"], name="get_own_tenant"),
    Route("/v1/keys/rotate", api.rotate_keys, methods=["POST"], name="rotate_keys"),
    Route("/v1/purposes", api.list_purposes, methods=["GET"], name="list_purposes"),
    Route("/v1/purposes/{key}", api.put_purpose, methods=["PUT"], name="put_purpose"),
    Route("/v1/cookies", api.list_cookies, methods=["GET"], name="list_cookies"),
    Route("/v1/cookies/{name}", api.put_cookie, methods=["PUT"], name="put_cookie"),
    Route("/v1/policies/{policy}/versions", api.publish_version, methods=["POST"], name="publish_version"),
    Route("/v1/policies/{policy}/versions", api.list_versions, methods=["GET"], name="list_versions"),
    Route("/v1/consents", api.record_consent, methods=["POST"], name="record_consent"),
    Route("/v1/subjects/{subject}/consents", api.subject_consents, methods=["GET"], name="subject_consents"),
    Route("/v1/check", api.check_one, methods=["GET"], name="check_one"),
    Route("/v1/check", api.check_bulk, methods=["POST"], name="check_bulk"),
    # --- integrations (issue 4): email links, change feed, webhooks, policy-change notices ---
    Route("/v1/email-links", integ.create_email_links, methods=["POST"], name="create_email_links"),
    Route("/v1/email-links/secrets/rotate", integ.rotate_link_secret, methods=["POST"], name="rotate_link_secret"),
    Route("/u/{token}", integ.unsubscribe_page, methods=["GET"], name="unsubscribe_page"),
    Route("/u/{token}", integ.unsubscribe, methods=["POST"], name="unsubscribe"),
    Route("/c/{token}", integ.confirm_page, methods=["GET"], name="confirm_page"),
    Route("/c/{token}", integ.confirm, methods=["POST"], name="confirm"),
    Route("/v1/events", integ.list_events, methods=["GET"], name="list_events"),
    Route("/v1/webhooks", integ.create_webhook, methods=["POST"], name="create_webhook"),
    Route("/v1/webhooks", integ.list_webhooks, methods=["GET"], name="list_webhooks"),
    Route("/v1/webhooks/{webhook_id}", integ.get_webhook, methods=["GET"], name="get_webhook"),
    Route("/v1/webhooks/{webhook_id}", integ.delete_webhook, methods=["DELETE"], name="delete_webhook"),
    Route("/v1/webhooks/{webhook_id}/enable", integ.enable_webhook, methods=["POST"], name="enable_webhook"),
    Route("/v1/webhooks/{webhook_id}/deliveries", integ.list_deliveries, methods=["GET"], name="list_deliveries"),
    Route("/v1/policies/{policy}/versions/{version}/notices", integ.list_notices, methods=["GET"], name="list_notices"),
    Route("/v1/policies/{policy}/versions/{version}/notices", integ.record_notices, methods=["POST"],
          name="record_notices"),
]


async def on_consent_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ConsentError)
    return problem_response(exc, request.url.path, request.scope.get("state", {}).get("request_id"))


async def on_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    err: ConsentError
    if exc.status_code == 404:
        err = NotFound(f"no route {request.url.path}")
    elif exc.status_code == 405:
        err = MethodNotAllowed(f"{request.method} is not allowed here")
    else:
        err = ConsentError(str(exc.detail))
        err.status, err.code = exc.status_code, "http_error"
    return problem_response(err, request.url.path, request.scope.get("state", {}).get("request_id"))


async def on_unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return problem_response(ConsentError("an unexpected error occurred; it has been logged"), request.url.path)


def prepare(settings: Settings, engine: Engine) -> Signer:
    """Migrate (if configured) and load the active signing key, creating one on first start."""
    if settings.migrate_on_start:
        db.migrate(settings.database_url)
    with db.transaction(engine, write=True) as session:
        key = receipts.ensure_signing_key(session)
        return Signer(key.kid, key.private_pem)


def create_app(settings: Settings | None = None) -> Starlette:
    """Build the ASGI app. Nothing happens at import time; uvicorn calls this with --factory."""
    settings = settings or Settings.from_env()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        engine = db.create_db_engine(settings.database_url)
        worker = None
        try:
            signer = await run_in_threadpool(prepare, settings, engine)
            app.state.services = Services(settings, engine, signer, db.head_revision(settings.database_url))
            worker = webhooks.start_worker(engine, settings)  # webhook outbox delivery (issue 4)
            yield
        finally:
            if worker is not None:
                await worker.stop()
            engine.dispose()

    app = Starlette(
        routes=list(routes),
        middleware=[RequestContextMiddleware.as_middleware()],
        exception_handlers={ConsentError: on_consent_error, HTTPException: on_http_exception,
                            Exception: on_unexpected},
        lifespan=lifespan,
    )
    return app
