"""``create_app(settings)`` assembles the service: the routes table (the whole HTTP surface on
one screen), middleware, error handlers and the lifespan that owns the engine and signer."""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from consent.audit.tlog import start_sequencer
from consent.crypto import Signer
from consent.errors import ConsentError, MethodNotAllowed, NotFound, Unavailable
from consent.integrations import webhooks
from consent.ledger import batch_reads, batch_writes, events, receipts
from consent.settings import Settings
from consent.store import db
from consent.web import api, api_audit, api_snippet, ratelimit, snippet_bundle
from consent.web import api_integrations as integ
from consent.web import api_tlog as tl
from consent.web import dashboard as pages
from consent.web.http import JSONResponse, db_work, describe, problem_response
from consent.web.metrics import metrics_handler
from consent.web.middleware import RequestContextMiddleware
from consent.web.openapi import openapi_handler

log = logging.getLogger("consent")
GC_YOUNG = 50_000  # net container allocations between two collections of the young generation


@dataclass
class Services:
    """What handlers share for the life of the process (no per-request state)."""

    settings: Settings
    engine: Engine
    signer: Signer
    head: str | None
    check_reader: batch_reads.Reader | None = None  # GET /v1/check's batched executor (None: per request)
    record_writer: batch_writes.Writer | None = None  # POST /v1/consents' group commit (None: per request)
    # secret key digest -> (tenant id, tenant hash key): what never changes for a key (api.secret_key)
    secret_keys: dict[str, tuple[str, str]] = field(default_factory=dict)

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
        except Exception as exc:  # noqa: BLE001 - any driver error means "not ready", never a 500
            return {"database": "unreachable", "error": type(exc).__name__}
        return {"database": "ok", "migration": current, "head": services.head}

    try:  # a database that does not answer at all is "unreachable" within the deadline too
        checks = await db_work(services, probe)
    except TimeoutError:
        checks = {"database": "unreachable", "error": "timeout"}
    checks.update(disk_check(services.settings))
    ready = (checks.get("database") == "ok" and checks.get("migration") == checks.get("head")
             and checks.get("disk") != "full")
    return JSONResponse({"status": "ready" if ready else "unavailable", "checks": checks},
                        status_code=200 if ready else 503)


def disk_check(settings: Settings) -> dict[str, Any]:
    """Free space where this process writes (the SQLite database's directory, else the data
    directory): below ``disk_min_free_mb`` the process is not ready (writes would fail)."""
    import shutil
    from pathlib import Path

    where = Path(settings.database_url.split("///", 1)[-1]).parent if settings.is_sqlite else settings.data_dir
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        return {"disk": "unknown"}
    return {"disk": "ok" if free >= settings.disk_min_free_mb * 1024 * 1024 else "full",
            "disk_free_mb": free // (1024 * 1024)}


routes = [
    # The two hot routes first: the router tries routes in order.
    Route("/v1/check", api.check_one, methods=["GET"], name="check_one"),
    Route("/v1/consents", api.record_consent, methods=["POST"], name="record_consent"),
    Route("/healthz", healthz, methods=["GET"], name="healthz"),
    Route("/readyz", readyz, methods=["GET"], name="readyz"),
    Route("/openapi.json", openapi_handler, methods=["GET"], name="openapi"),
    Route("/.well-known/jwks.json", api.jwks, methods=["GET"], name="jwks"),
    Route("/v1/tenants", api.create_tenant, methods=["POST"], name="create_tenant"),
    Route("/v1/tenants/{tenant_id}/keys/rotate", api.admin_rotate_keys, methods=["POST"], name="admin_rotate_keys"),
    Route("/v1/tenant", api.get_own_tenant, methods=["GET"], name="get_own_tenant"),
    Route("/v1/keys/rotate", api.rotate_keys, methods=["POST"], name="rotate_keys"),
    # --- tenant settings and audit trail ---
    Route("/v1/tenant", api.patch_own_tenant, methods=["PATCH"], name="patch_own_tenant"),
    Route("/v1/tenant/audit", api.own_tenant_audit, methods=["GET"], name="own_tenant_audit"),
    Route("/v1/tenants/{tenant_id}", api.admin_get_tenant, methods=["GET"], name="admin_get_tenant"),
    Route("/v1/tenants/{tenant_id}", api.admin_patch_tenant, methods=["PATCH"], name="admin_patch_tenant"),
    Route("/v1/tenants/{tenant_id}/audit", api.admin_tenant_audit, methods=["GET"], name="admin_tenant_audit"),
    # --- end tenant settings ---
    Route("/v1/purposes", api.list_purposes, methods=["GET"], name="list_purposes"),
    Route("/v1/purposes/{key}", api.put_purpose, methods=["PUT"], name="put_purpose"),
    Route("/v1/cookies", api.list_cookies, methods=["GET"], name="list_cookies"),
    Route("/v1/cookies/{name}", api.put_cookie, methods=["PUT"], name="put_cookie"),
    Route("/v1/policies/{policy}/versions", api.publish_version, methods=["POST"], name="publish_version"),
    Route("/v1/policies/{policy}/versions", api.list_versions, methods=["GET"], name="list_versions"),
    Route("/v1/subjects/{subject}/consents", api.subject_consents, methods=["GET"], name="subject_consents"),
    Route("/v1/check", api.check_bulk, methods=["POST"], name="check_bulk"),
    # --- reliability ---
    Route("/metrics", metrics_handler, methods=["GET"], name="metrics"),
    # --- snippet: publishable-key routes with CORS, subject tokens, linking, assets ---
    Route("/v1/snippet/config", api_snippet.snippet_config, methods=["GET"], name="snippet_config"),
    Route("/v1/snippet/config", api_snippet.preflight_for(("GET",)), methods=["OPTIONS"],
          name="snippet_config_preflight"),
    Route("/v1/snippet/consents", api_snippet.snippet_consents, methods=["POST"], name="snippet_consents"),
    Route("/v1/snippet/consents", api_snippet.preflight_for(("POST",)), methods=["OPTIONS"],
          name="snippet_consents_preflight"),
    Route("/v1/snippet/gpc", api_snippet.snippet_gpc, methods=["GET"], name="snippet_gpc"),
    Route("/v1/snippet/gpc", api_snippet.preflight_for(("GET",)), methods=["OPTIONS"], name="snippet_gpc_preflight"),
    Route("/v1/subject-tokens", api_snippet.mint_subject_token, methods=["POST"], name="mint_subject_token"),
    Route("/v1/subject-tokens/secret", api_snippet.subject_token_secret, methods=["GET"],
          name="subject_token_secret"),
    Route("/v1/subject-tokens/secret/rotate", api_snippet.rotate_subject_token_secret, methods=["POST"],
          name="rotate_subject_token_secret"),
    Route("/v1/subject-links", api_snippet.link_subject, methods=["POST"], name="link_subject"),
    Route("/.well-known/gpc.json", api_snippet.gpc_json, methods=["GET"], name="gpc_json"),
    Route("/snippet.js", api_snippet.snippet_js, methods=["GET"], name="snippet_js"),
    Route("/snippet.css", api_snippet.snippet_css, methods=["GET"], name="snippet_css"),
    Route("/v1/snippet/{publishable_key}.js", snippet_bundle.tenant_snippet, methods=["GET"], name="tenant_snippet"),
    Route("/v1/tenant/snippet", api_snippet.get_snippet_settings, methods=["GET"], name="get_snippet_settings"),
    Route("/v1/tenant/snippet", api_snippet.put_snippet_settings, methods=["PUT"], name="put_snippet_settings"),
    Route("/demo", api_snippet.demo_page, methods=["GET"], name="demo"),
    Route("/demo/demo.js", api_snippet.demo_js, methods=["GET"], name="demo_js"),
    # --- end snippet ---
    # --- audit exports and data-subject rights (consent/web/api_audit.py) ---
    Route("/v1/exports/consents", api_audit.export_consents, methods=["GET"], name="export_consents"),
    Route("/v1/exports/{export_id}/manifest", api_audit.export_manifest, methods=["GET"], name="export_manifest"),
    Route("/v1/subjects/{subject}/export", api_audit.subject_export, methods=["GET"], name="subject_export"),
    Route("/v1/subjects/{subject}", api_audit.erase_subject, methods=["DELETE"], name="erase_subject"),
    Route("/v1/tenant/retention", api_audit.get_retention, methods=["GET"], name="get_retention"),
    Route("/v1/tenant/retention", api_audit.put_retention, methods=["PUT"], name="put_retention"),
    Route("/v1/tenants/{tenant_id}/close", api_audit.close_tenant, methods=["POST"], name="close_tenant"),
    # --- end audit ---
    # --- integrations: email links, change feed, webhooks, policy-change notices ---
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
    Route("/v1/webhooks/{webhook_id}/secret/rotate", integ.rotate_webhook_secret, methods=["POST"],
          name="rotate_webhook_secret"),
    Route("/v1/email-links/secrets/retire", integ.retire_link_secrets, methods=["POST"],
          name="retire_link_secrets"),
    Route("/v1/policies/{policy}/versions/{version}/notices", integ.list_notices, methods=["GET"], name="list_notices"),
    Route("/v1/policies/{policy}/versions/{version}/notices", integ.record_notices, methods=["POST"],
          name="record_notices"),
    # --- transparency log (consent/web/api_tlog.py): public, no key ---
    Route("/v1/tlog/key", tl.tlog_keys, methods=["GET"], name="tlog_keys"),
    Route("/v1/tlog/{tenant_id}/checkpoint", tl.latest_checkpoint, methods=["GET"], name="latest_checkpoint"),
    Route("/v1/tlog/{tenant_id}/checkpoints/{size}", tl.checkpoint_at, methods=["GET"], name="checkpoint_at"),
    Route("/v1/tlog/{tenant_id}/proof/inclusion", tl.inclusion_proof, methods=["GET"], name="inclusion_proof"),
    Route("/v1/tlog/{tenant_id}/proof/consistency", tl.consistency_proof, methods=["GET"], name="consistency_proof"),
    # --- dashboard (consent/web/dashboard.py): HTML pages, session cookie, assets ---
    Route("/", pages.landing, methods=["GET"], name="landing"),
    Route("/docs", pages.api_docs, methods=["GET"], name="api_docs"),
    Route("/static/{path:path}", pages.static_asset, methods=["GET"], name="static"),
    Route("/dashboard", pages.overview, methods=["GET"], name="dashboard"),
    Route("/dashboard/refresh", pages.refresh_overview, methods=["POST"], name="dashboard_refresh"),
    Route("/dashboard/sign-in", pages.sign_in_page, methods=["GET"], name="dashboard_sign_in_page"),
    Route("/dashboard/sign-in", pages.sign_in, methods=["POST"], name="dashboard_sign_in"),
    Route("/dashboard/sign-out", pages.sign_out, methods=["POST"], name="dashboard_sign_out"),
    Route("/dashboard/people", pages.people, methods=["GET"], name="dashboard_people"),
    Route("/dashboard/people/{subject}", pages.person, methods=["GET"], name="dashboard_person"),
    Route("/dashboard/people/{subject}/export.{fmt}", pages.person_export, methods=["GET"],
          name="dashboard_person_export"),
    Route("/dashboard/people/{subject}/erase", pages.person_erase, methods=["POST"], name="dashboard_erase"),
    Route("/dashboard/verify", pages.verifier, methods=["GET"], name="dashboard_verify_page"),
    Route("/dashboard/verify", pages.verify_post, methods=["POST"], name="dashboard_verify"),
    Route("/dashboard/policies", pages.policies, methods=["GET"], name="dashboard_policies"),
    Route("/dashboard/policies", pages.publish_policy, methods=["POST"], name="dashboard_publish_policy"),
    Route("/dashboard/exports", pages.exports_page, methods=["GET"], name="dashboard_exports"),
    Route("/dashboard/exports/download", pages.export_download, methods=["GET"], name="dashboard_export_download"),
    Route("/dashboard/exports/{export_id}/manifest", pages.export_manifest, methods=["GET"],
          name="dashboard_export_manifest"),
    Route("/dashboard/webhooks", pages.webhooks_page, methods=["GET"], name="dashboard_webhooks"),
    Route("/dashboard/webhooks/{webhook_id}/enable", pages.webhook_enable, methods=["POST"],
          name="dashboard_webhook_enable"),
    Route("/dashboard/settings", pages.settings_page, methods=["GET"], name="dashboard_settings"),
    Route("/dashboard/settings/keys/rotate", pages.rotate_keys, methods=["POST"], name="dashboard_rotate_keys"),
    Route("/dashboard/settings", pages.settings_post, methods=["POST"], name="dashboard_settings_save"),
    Route("/dashboard/webhooks/deliveries/{delivery_id}/retry", pages.webhook_retry, methods=["POST"],
          name="dashboard_webhook_retry"),
    Route("/dashboard/audit", pages.audit_trail, methods=["GET"], name="dashboard_audit"),
    Route("/dashboard/users", pages.users, methods=["GET"], name="dashboard_users"),
    Route("/dashboard/users", pages.users_post, methods=["POST"], name="dashboard_users_create"),
    Route("/dashboard/banner", pages.banner, methods=["GET"], name="dashboard_banner"),
    Route("/dashboard/banner", pages.banner_post, methods=["POST"], name="dashboard_banner_save"),
    Route("/dashboard/banner/preview", pages.banner_preview, methods=["GET"], name="dashboard_banner_preview"),
    Route("/dashboard/banner/preview/v1/snippet/config", pages.banner_preview_config, methods=["GET"],
          name="dashboard_banner_preview_config"),
    # --- end dashboard ---
]


def instance_of(request: Request) -> str | None:
    """The problem's ``instance``: the route template, never the raw path (which may carry an
    email address or a token the caller put in it)."""
    route = request.scope.get("route")
    return getattr(route, "path", None)


async def on_consent_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ConsentError)
    return problem_response(exc, instance_of(request), request.scope.get("state", {}).get("request_id"))


def allowed_methods(request: Request) -> str:
    """Every method any route on this path accepts (a path may have one Route per method)."""
    methods: set[str] = set()
    for route in request.app.routes:
        if isinstance(route, Route) and route.path_regex.match(request.url.path):
            methods |= route.methods or set()
    return ", ".join(sorted(methods))


async def on_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    err: ConsentError
    if exc.status_code == 404:
        err = NotFound("no such route")
    elif exc.status_code == 405:
        err = MethodNotAllowed(f"{request.method} is not allowed here", headers={"Allow": allowed_methods(request)})
    else:
        err = ConsentError(str(exc.detail))
        err.status, err.code = exc.status_code, "http_error"
    return problem_response(err, instance_of(request), request.scope.get("state", {}).get("request_id"))


async def on_database_error(request: Request, exc: Exception) -> Response:
    """Database unreachable (or a transient driver failure): 503 with Retry-After, not a 500."""
    log.warning("database error on %s %s: %s", request.method, instance_of(request) or "unmatched route",
                type(getattr(exc, "orig", None) or exc).__name__)
    err = Unavailable("the database is unavailable; retry shortly", headers={"Retry-After": "1"})
    return problem_response(err, instance_of(request), request.scope.get("state", {}).get("request_id"))


async def on_unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, instance_of(request) or "unmatched route")
    return problem_response(ConsentError("an unexpected error occurred; it has been logged"), instance_of(request),
                            request.scope.get("state", {}).get("request_id"))


def prepare(settings: Settings, engine: Engine) -> Signer:
    """Migrate (if configured) and load the active signing key, creating one on first start."""
    if settings.migrate_on_start:
        db.migrate(settings.database_url, secret_keys=settings.secret_keys or None)
    with db.transaction(engine, write=True) as session:
        key = receipts.ensure_signing_key(session)
        return Signer(key.kid, key.private_pem)


def create_app(settings: Settings | None = None) -> Starlette:
    """Build the ASGI app. Nothing happens at import time; uvicorn calls this with --factory."""
    settings = settings or Settings.from_env()
    if not settings.is_sqlite and not settings.secret_keys:
        raise ConsentError(db.NO_KEK)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        engine = db.create_db_engine(settings.database_url, secret_keys=settings.secret_keys or None,
                                     **db.service_engine_options(settings))
        worker = reader = sequencer = listener = None
        try:
            signer = await run_in_threadpool(prepare, settings, engine)
            reader = batch_reads.open_reader(engine)
            services = Services(settings, engine, signer, db.head_revision(settings.database_url), reader)
            services.record_writer = batch_writes.open_writer(engine, services)
            app.state.services = services
            # What startup built (models, compiled statements, the routes) lives as long as the
            # process: out of the collector's sight, a full collection no longer walks it on the
            # request path. Requests free what they allocate by reference counting; the
            # collector only finds cycles, so it runs every GC_YOUNG allocations instead of
            # every 700 (each run walks the objects of every request in flight).
            gc.freeze()
            gc.set_threshold(GC_YOUNG, *gc.get_threshold()[1:])
            worker = webhooks.start_worker(engine, settings)  # webhook outbox delivery
            sequencer = start_sequencer(engine, settings, signer)
            if engine.dialect.name == "postgresql":  # other processes' commits wake our feed waits
                listener = events.FeedListener(batch_reads.pg_connect_args(engine)).start()
            yield
        finally:
            if listener is not None:
                await listener.stop()
            if sequencer is not None:
                await sequencer.stop()
            if worker is not None:
                await worker.stop()
            if reader is not None:
                await reader.close()
            writer = getattr(getattr(app.state, "services", None), "record_writer", None)
            if writer is not None:
                await writer.close()
            engine.dispose()

    # Pure ASGI middleware only. Proxy headers first, so rate limits and IP evidence see the
    # visitor's address wherever a trusted proxy forwarded it (and never a spoofed one).
    proxies = [Middleware(ProxyHeadersMiddleware, trusted_hosts=list(settings.trusted_proxies))
               ] if settings.trusted_proxies else []
    app = Starlette(
        routes=ratelimit.guard(list(routes), settings.rate_limit_routes),
        middleware=[*proxies, RequestContextMiddleware.as_middleware()],
        exception_handlers={ConsentError: on_consent_error, HTTPException: on_http_exception,
                            sa_exc.OperationalError: on_database_error, sa_exc.TimeoutError: on_database_error,
                            Exception: on_unexpected},
        lifespan=lifespan,
    )
    return app
