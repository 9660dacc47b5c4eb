"""The privacy dashboard: server-rendered pages (Jinja2 templates in ``consent/web/templates``,
assets in ``consent/static``, no build step, nothing from a CDN). Handlers are thin: a
``page`` wrapper signs the caller in from the session cookie, checks the CSRF token on every
form, runs the handler in one transaction (committed here) and renders HTML; the data comes
from ``dashboard_data`` and the domain modules.

The session cookie holds a random session id signed with itsdangerous; the session itself
(tenant, role, CSRF token, last seen) is a ``dashboard_session`` row, so sign-out and the idle
timeout end it in every process. The cookie is HttpOnly, SameSite=Strict, Secure over https.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import jinja2
import sqlalchemy as sa
from pydantic import ValidationError as PydanticError
from sqlalchemy.orm import Session
from sqlmodel import col
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response, StreamingResponse
from starlette.staticfiles import StaticFiles

from consent import __version__, crypto
from consent.audit import exports
from consent.audit.verify import VerifyError
from consent.errors import (
    BadToken,
    Conflict,
    ConsentError,
    Forbidden,
    NotFound,
    PayloadTooLarge,
    Unauthorized,
    ValidationFailed,
)
from consent.integrations import snippet, snippet_texts, webhooks
from consent.integrations.schemas_snippet import SnippetSettingsIn
from consent.ledger import catalog, receipts, rights, tenants
from consent.ledger.schemas import PolicyVersionIn, TenantPatch
from consent.ledger.tenants import authenticate_key, get_tenant
from consent.store.db import transaction
from consent.store.models import SigningKey, Tenant, utcnow
from consent.web import dashboard_data as data
from consent.web.api import KEY_RE
from consent.web.http import dumps, parse_time, problem_response, validation_errors

log = logging.getLogger("consent.web.dashboard")

COOKIE = "consent_dashboard"
PRE_COOKIE = "consent_dashboard_pre"  # binds the sign-in form's CSRF token to this browser
SESSION_SALT = "dashboard-session"
SIGNIN_SALT = "dashboard-sign-in"
HTML = "text/html; charset=utf-8"
# The docs page's Swagger UI fetches /openapi.json: the HTML default CSP plus connect-src.
DOCS_CSP = ("default-src 'none'; style-src 'self' 'unsafe-inline'; script-src 'self'; img-src 'self' data:; "
            "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
STATUS_COLORS = {  # chart colours, each at least 4.5:1 against white
    "granted": "#1a7f37", "denied": "#57606a", "withdrawn": "#cf222e", "stale": "#9a6700",
    "pending_confirmation": "#0969da", "acknowledged": "#8250df", "erased": "#24292f",
}
EXPORT_MEDIA = {"jsonl": "application/x-ndjson", "csv": "text/csv; charset=utf-8"}
STATUS_LABELS = {"pending_confirmation": "pending"}
# policy versions in the per-version chart, in order of appearance; each at least 4.5:1 on white
VERSION_COLORS = ("#0969da", "#1a7f37", "#8250df", "#9a6700", "#cf222e", "#0a6b74", "#bf3989", "#57606a")


def csrf_failed(detail: str) -> Forbidden:
    return Forbidden(detail, code="csrf_failed")


@functools.lru_cache(maxsize=1)
def templates() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.PackageLoader("consent.web", "templates"),
                             autoescape=jinja2.select_autoescape(default=True), trim_blocks=True,
                             lstrip_blocks=True, undefined=jinja2.StrictUndefined)
    env.filters["when"] = lambda dt: dt.strftime("%Y-%m-%d %H:%M:%S UTC") if dt else ""
    env.filters["pct"] = lambda x: "–" if x is None else f"{x * 100:.1f} %"
    env.filters["label"] = lambda s: STATUS_LABELS.get(s, s)
    env.filters["val"] = lambda v: ", ".join(map(str, v)) or "(none)" if isinstance(v, list) else v
    env.globals.update(colors=STATUS_COLORS, version=__version__, bar_segments=bar_segments,
                       day_bars=day_bars, version_color=version_color)
    return env


def render(request: Request, template: str, status: int = 200, **ctx: Any) -> Response:
    body = templates().get_template(template).render(request=request, **ctx)
    return Response(body, status_code=status, media_type=HTML, headers={"Cache-Control": "no-store"})


# --- charts (server-rendered SVG geometry) ---------------------------------------------------

def bar_segments(counts: dict[str, int], width: float = 600) -> list[dict[str, Any]]:
    """One stacked horizontal bar: (status, count, x, width) per non-empty status."""
    total = sum(counts.values())
    out, x = [], 0.0
    for status, n in counts.items():
        if n and total:
            w = width * n / total
            out.append({"status": status, "n": n, "x": round(x, 2), "w": round(w, 2),
                        "color": STATUS_COLORS.get(status, "#57606a")})
            x += w
    return out


def version_color(versions: list[str], version: str) -> str:
    return VERSION_COLORS[versions.index(version) % len(VERSION_COLORS)]


def day_bars(per_day: list[tuple[str, dict[str, int]]], height: float = 120, width: float = 600,
             keys: list[str] | None = None) -> list[dict[str, Any]]:
    """Stacked columns, one per day: rectangles with their key (a decision, or with ``keys`` a
    policy version) and count."""
    order = keys if keys is not None else ["granted", "acknowledged", "denied", "withdrawn"]
    peak = max((sum(d.values()) for _, d in per_day), default=0)
    if not peak:
        return []
    step = min(width / max(len(per_day), 1), 40.0)  # a few days stay columns, not slabs
    out = []
    for i, (day, counts) in enumerate(per_day):
        y = height
        for status in order:
            n = counts.get(status, 0)
            if n:
                h = height * n / peak
                y -= h
                color = version_color(order, status) if keys is not None else STATUS_COLORS[status]
                out.append({"day": day, "status": status, "n": n, "x": round(i * step + 1, 2),
                            "y": round(y, 2), "w": round(max(step - 2, 1), 2), "h": round(h, 2),
                            "color": color})
    return out


# --- sessions and the page wrapper -----------------------------------------------------------

def cookie_serializer(request: Request, db: Session, salt: str) -> Any:
    """The cookie signer: CONSENT_DASHBOARD_SECRETS (newest last), else a secret derived from
    the first receipt signing key (kept forever, shared by every process on the database)."""
    services = request.app.state.services
    cached = getattr(request.app.state, "dashboard_secrets", None)
    if cached is None:
        configured = [str(s) for s in services.settings.dashboard_secrets]
        if configured:
            cached = configured
        else:
            pem = db.execute(sa.select(col(SigningKey.private_pem)).order_by(col(SigningKey.created_at)).limit(1)).scalar_one()
            cached = [crypto.derived_secret(pem, "dashboard-cookies")]
        request.app.state.dashboard_secrets = cached
    return crypto.serializer(cached, salt)


def set_cookie(request: Request, response: Response, name: str, value: str, path: str = "/dashboard") -> None:
    response.set_cookie(name, value, path=path, httponly=True, samesite="strict",
                        secure=request.url.scheme == "https")


def clear_cookie(request: Request, response: Response, name: str) -> None:
    response.delete_cookie(name, path="/dashboard", httponly=True, samesite="strict",
                           secure=request.url.scheme == "https")


@dataclass
class Page:
    """What a dashboard handler gets: the request, its transaction, who is signed in, the form."""

    request: Request
    db: Session
    services: Any
    user: data.SignedIn | None
    form: FormData | None
    deferred: bool = False  # a read-only page: its writes run after its transaction
    later: list[Callable[[Session], None]] = dataclasses.field(default_factory=list)
    _tenant: Tenant | None = None

    @property
    def tenant(self) -> Tenant:
        assert self.user is not None
        if self._tenant is None:
            self._tenant = get_tenant(self.db, self.user.tenant_id)
        return self._tenant

    def field(self, name: str, limit: int = 2000) -> str:
        value = self.form.get(name) if self.form is not None else self.request.query_params.get(name)
        if value is None or isinstance(value, UploadFile):
            return ""
        if len(value) > limit:
            raise ValidationFailed.field(name, f"longer than {limit} characters")
        return str(value)

    def audit(self, action: str, target: str | None = None, detail: dict[str, Any] | None = None) -> None:
        assert self.user is not None
        event = (self.user.tenant_id, self.user.actor, action, target, detail)
        self.write(lambda db: data.log_event(db, *event))

    def write(self, fn: Callable[[Session], None]) -> None:
        """Run a write in this page's transaction, or (read-only page) in one right after it."""
        if self.deferred:
            self.later.append(fn)
        else:
            fn(self.db)

    def render(self, template: str, status: int = 200, **ctx: Any) -> Response:
        return render(self.request, template, status, user=self.user, tenant=self._tenant, **ctx)

    def require_admin(self) -> None:
        assert self.user is not None
        if not self.user.is_admin:
            raise Forbidden("this action needs the admin role; you are signed in read-only", code="read_only_role")


def same_origin(request: Request) -> bool:
    """A form post from a page of this service: a named Origin must be ours. Browsers send
    ``null`` under our ``Referrer-Policy: no-referrer``; the CSRF token decides then."""
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        return True
    return origin == f"{request.url.scheme}://{request.url.netloc}"


def page(*, signed_in: bool = True, write: bool = False, max_bytes: int = 64 * 1024) -> Callable[[Any], Any]:
    """Wrap ``fn(page) -> Response`` as a dashboard route (see the module docstring)."""

    def deco(fn: Callable[[Page], Response]) -> Any:
        @functools.wraps(fn)
        async def handler(request: Request) -> Response:
            services = request.app.state.services
            form = None
            if request.method == "POST":
                if not same_origin(request):
                    return negotiated(request, error_page(request, csrf_failed("this form was posted from another site")))
                length = request.headers.get("content-length")
                if length and length.isdigit() and int(length) > max_bytes:
                    return negotiated(request, error_page(
                        request, PayloadTooLarge(f"the form may be at most {max_bytes} bytes")))
                form = await request.form(max_files=1, max_fields=200, max_part_size=max_bytes)
            raw = request.cookies.get(COOKIE)

            writes = write or request.method == "POST"

            def work() -> Response:
                # Read-only pages read in a read transaction and write their audit entries and
                # the session's last-seen time after it, in a short write transaction: on SQLite a
                # read that turns into a write fails at once when another writer got in between.
                with transaction(services.engine, write=writes) as db:
                    user = None
                    if raw:
                        try:
                            sid = crypto.loads_token(cookie_serializer(request, db, SESSION_SALT), raw)
                            user = data.load_session(db, str(sid), idle_seconds=services.settings.dashboard_idle_seconds)
                        except BadToken:
                            user = None
                    if signed_in and user is None:
                        return sign_in_redirect(request)
                    if form is not None and user is not None and signed_in:
                        token = form.get("csrf")
                        if not isinstance(token, str) or not secrets.compare_digest(token, user.csrf):
                            raise csrf_failed("the form's token does not match your session; reload the page")
                    pg = Page(request, db, services, user, form, deferred=not writes)
                    response = fn(pg)
                    if writes and user is not None and user.stale_seen:
                        data.touch_session(db, user.session_hash)
                if pg.later or (not writes and user is not None and user.stale_seen):
                    with transaction(services.engine, write=True) as db:
                        for later in pg.later:
                            later(db)
                        if not writes and user is not None and user.stale_seen:
                            data.touch_session(db, user.session_hash)
                return response

            try:
                return negotiated(request, await run_in_threadpool(work))
            except ConsentError as exc:
                return negotiated(request, error_page(request, exc))
            finally:
                if form is not None:
                    await form.close()

        return handler

    return deco


def sign_in_redirect(request: Request) -> Response:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    response = RedirectResponse(f"/dashboard/sign-in?next={quote(target, safe='')}", status_code=303)
    if request.cookies.get(COOKIE):
        clear_cookie(request, response, COOKIE)
    return response


def error_page(request: Request, exc: ConsentError) -> Response:
    return with_problem(render(request, "error.html", exc.status, user=None, tenant=None, error=exc), exc)


def with_problem(response: Response, exc: ConsentError) -> Response:
    """Mark an error page with its problem: a client that does not ask for HTML gets that."""
    response.problem = exc  # type: ignore[attr-defined]
    return response


def negotiated(request: Request, response: Response) -> Response:
    """An error answer as a browser wants it (the page) or as any other client does (RFC 9457
    problem+json with its stable code, like every other route of the service)."""
    if response.status_code < 400 or "text/html" in request.headers.get("accept", ""):
        return response
    exc = getattr(response, "problem", None)
    if exc is None:
        exc = ConsentError("the request failed")
        exc.status = response.status_code
    route = request.scope.get("route")
    return problem_response(exc, getattr(route, "path", None), request.scope.get("state", {}).get("request_id"))


def safe_next(value: str) -> str:
    """Only a dashboard path of this service: never an open redirect."""
    if value.startswith("/dashboard") and not value.startswith("//") and "\\" not in value:
        return value
    return "/dashboard"


@functools.lru_cache(maxsize=1)
def _static_files() -> StaticFiles:
    return StaticFiles(packages=[("consent.web", "static")])


async def static_asset(request: Request) -> Response:
    """The package's stylesheet, scripts and icon (ETag, Last-Modified; 404 for anything else)."""
    try:
        return await _static_files().get_response(str(request.path_params["path"]), request.scope)
    except HTTPException as exc:
        if exc.status_code == 404:
            raise NotFound("no such asset") from None
        raise


# --- public pages ------------------------------------------------------------------------------

async def landing(request: Request) -> Response:
    return render(request, "landing.html", user=None, tenant=None, demo=request.app.state.services.settings.demo)


async def api_docs(request: Request) -> Response:
    response = render(request, "docs.html", user=None, tenant=None)
    response.headers["content-security-policy"] = DOCS_CSP
    return response


# --- sign-in and sign-out --------------------------------------------------------------------

def _signin_form(p: Page, status: int = 200, error: str | None = None) -> Response:
    problem: ConsentError | None = None
    if status == 401:
        problem = Unauthorized(error or "")
    elif status == 403:
        problem = csrf_failed(error or "")
    elif status == 422:
        problem = ValidationFailed.field("key", error or "")
    pre = p.request.cookies.get(PRE_COOKIE) or secrets.token_urlsafe(16)
    token = cookie_serializer(p.request, p.db, SIGNIN_SALT).dumps(pre)
    response = p.render("sign_in.html", status, csrf=token, error=error,
                        next=safe_next(p.field("next", 500)), tenant_id=p.field("tenant", 40),
                        email=p.field("email", 320), idle_minutes=p.services.settings.dashboard_idle_seconds // 60)
    set_cookie(p.request, response, PRE_COOKIE, pre)
    return with_problem(response, problem) if problem else response


@page(signed_in=False)
def sign_in_page(p: Page) -> Response:
    if p.user is not None:
        return RedirectResponse("/dashboard", status_code=303)
    return _signin_form(p)


@page(signed_in=False, write=True)
def sign_in(p: Page) -> Response:
    try:
        pre = crypto.loads_token(cookie_serializer(p.request, p.db, SIGNIN_SALT), p.field("csrf"), max_age=3600)
    except BadToken:
        pre = None
    if not pre or pre != p.request.cookies.get(PRE_COOKIE):
        return _signin_form(p, 403, "The sign-in form expired. Please try again.")
    key, email = p.field("key", 200).strip(), p.field("email", 320).strip()
    tenant_id = p.field("tenant", 40).strip()
    if key:
        principal = authenticate_key(p.db, key)
        if principal is None or principal.kind != "secret":
            log.info("dashboard sign-in refused: unknown, revoked or non-secret key")
            if principal is not None:
                data.log_event(p.db, principal.tenant_id, f"key:{principal.key_id}", "sign_in_failed",
                               detail={"reason": "not a secret key"})
            return _signin_form(p, 401, "That is not a live secret key (sk_…).")
        tenant_id, actor, role = principal.tenant_id, f"key:{principal.key_id}", "admin"
        sid = data.start_session(p.db, tenant_id, actor=actor, role=role, key_id=principal.key_id)
    elif email and tenant_id:
        if p.db.get(Tenant, tenant_id) is None:
            crypto.dummy_password_check(p.field("password", 1000))
            return _signin_form(p, 401, "Wrong tenant, email or password.")
        user = data.authenticate_user(p.db, tenant_id, email, p.field("password", 1000))
        if user is None:
            data.log_event(p.db, tenant_id, f"user:{crypto.normalize_email(email)}", "sign_in_failed",
                           detail={"reason": "wrong email or password"})
            return _signin_form(p, 401, "Wrong tenant, email or password.")
        actor, role = f"user:{user.email}", user.role
        sid = data.start_session(p.db, tenant_id, actor=actor, role=role, user_id=user.id)
    else:
        return _signin_form(p, 422, "Enter a secret key, or your tenant id, email and password.")
    data.log_event(p.db, tenant_id, actor, "sign_in", detail={"role": role})
    response = RedirectResponse(safe_next(p.field("next", 500)), status_code=303)
    set_cookie(p.request, response, COOKIE, cookie_serializer(p.request, p.db, SESSION_SALT).dumps(sid))
    clear_cookie(p.request, response, PRE_COOKIE)
    return response


@page(write=True)
def sign_out(p: Page) -> Response:
    assert p.user is not None
    data.end_session(p.db, p.user.session_hash)
    p.audit("sign_out")
    response = RedirectResponse("/dashboard/sign-in?signed_out=1", status_code=303)
    clear_cookie(p.request, response, COOKIE)
    return response


# --- signed-in pages -------------------------------------------------------------------------

@page()
def overview(p: Page) -> Response:
    """The numbers as last computed (one row); older than CONSENT_DASHBOARD_OVERVIEW_SECONDS,
    they are recomputed after this answer is sent, so no page view waits for the aggregate."""
    tenant_id, services = p.tenant.id, p.services
    ov = data.stored_overview(p.db, tenant_id)
    refresh = None
    if ov is None:
        ov = data.overview(p.db, tenant_id)
        computed = ov
        p.write(lambda db: data.store_overview(db, tenant_id, computed))
    elif (utcnow() - ov.computed_at).total_seconds() > services.settings.dashboard_overview_seconds:
        refresh = _background_refresh(p.request, tenant_id)
    response = p.render("overview.html", ov=ov, nav="overview", max_age=services.settings.dashboard_overview_seconds)
    response.background = refresh
    return response


def _background_refresh(request: Request, tenant_id: str) -> BackgroundTask | None:
    """Recompute a tenant's overview after the answer (at most one at a time per process)."""
    state = request.app.state
    running: set[str] = getattr(state, "dashboard_refreshing", None) or set()
    state.dashboard_refreshing = running
    if tenant_id in running:
        return None
    running.add(tenant_id)
    engine = request.app.state.services.engine

    def run() -> None:
        try:
            with transaction(engine) as db:
                ov = data.overview(db, tenant_id)
            with transaction(engine, write=True) as db:
                data.store_overview(db, tenant_id, ov)
        finally:
            running.discard(tenant_id)

    return BackgroundTask(run)


@page(write=True)
def refresh_overview(p: Page) -> Response:
    data.store_overview(p.db, p.tenant.id, data.overview(p.db, p.tenant.id))
    p.audit("refresh_overview")
    return RedirectResponse("/dashboard", status_code=303)


@page()
def people(p: Page) -> Response:
    q, kind = p.field("q", 320), p.field("kind", 16) or "email"
    if not q:
        return p.render("people.html", q="", kind=kind, kinds=data.SEARCH_KINDS, error=None, nav="people")
    try:
        subject = data.find_subject(p.db, p.tenant, kind, q)
    except (NotFound, ValidationFailed) as exc:
        p.audit("search", detail={"kind": kind, "found": False})
        return with_problem(p.render("people.html", exc.status, q=q, kind=kind,
                                     kinds=data.SEARCH_KINDS, error=exc.detail, nav="people"), exc)
    p.audit("search", subject.id, {"kind": kind, "found": True})
    return RedirectResponse(f"/dashboard/people/{subject.id}", status_code=303)


def _subject(p: Page) -> Any:
    return data.find_subject(p.db, p.tenant, "subject", str(p.request.path_params["subject"]))


@page()
def person(p: Page) -> Response:
    view = data.subject_view(p.db, p.tenant, _subject(p))
    p.audit("view_subject", view.subject.id)
    return p.render("person.html", view=view, nav="people", erased=p.field("erased", 4) == "1")


@page()
def person_export(p: Page) -> Response:
    subject = _subject(p)
    fmt = str(p.request.path_params["fmt"])
    if fmt not in ("json", "md"):
        raise NotFound("exports are .json or .md")
    s = p.services
    export = rights.access_export(p.db, p.tenant, subject, signer=s.signer, issuer=s.settings.issuer)
    p.audit("export_subject", subject.id, {"format": fmt})
    disposition = f'attachment; filename="{subject.id}.{"md" if fmt == "md" else "json"}"'
    headers = {"Content-Disposition": disposition, "Cache-Control": "no-store"}
    if fmt == "md":
        return Response(rights.access_markdown(export), media_type="text/markdown; charset=utf-8", headers=headers)
    return Response(dumps(export), media_type="application/json", headers=headers)


@page(write=True)
def person_erase(p: Page) -> Response:
    p.require_admin()
    subject = _subject(p)
    if p.field("confirm", 100).strip() != subject.id:
        raise ValidationFailed.field("confirm", f"type the subject id {subject.id} to confirm the erasure")
    s = p.services
    erased, summary = rights.erase(p.db, p.tenant, subject, signer=s.signer, issuer=s.settings.issuer)
    p.audit("erase_subject", subject.id, {"erased_now": erased, "identifiers_removed": summary["identifiers_removed"]})
    return RedirectResponse(f"/dashboard/people/{subject.id}?erased=1", status_code=303)


@page()
def verifier(p: Page) -> Response:
    return p.render("verify.html", nav="verify", receipt=None, export=None, token="")


VERIFY_MAX_BYTES = 64 * 1024 * 1024


@page(write=True, max_bytes=VERIFY_MAX_BYTES)
def verify_post(p: Page) -> Response:
    upload = p.form.get("export") if p.form is not None else None
    if isinstance(upload, UploadFile) and upload.filename:
        if (upload.size or 0) > VERIFY_MAX_BYTES:  # a body sent without a length is counted here
            raise PayloadTooLarge(f"an export to verify here may be at most {VERIFY_MAX_BYTES} bytes")
        body = upload.file.read()
        try:
            report = data.check_export(p.db, body, p.field("manifest", 4000).strip() or None)
            result: dict[str, Any] = {"ok": True, "report": report, "name": upload.filename}
        except VerifyError as exc:
            result = {"ok": False, "line": exc.line, "problem": exc.message, "name": upload.filename}
        p.audit("verify_export", upload.filename[:200], {"ok": result["ok"], "bytes": len(body)})
        return p.render("verify.html", nav="verify", receipt=None, export=result, token="")
    token = p.field("receipt", 20000)
    if not token.strip():
        raise ValidationFailed.field("receipt", "paste a receipt or choose an export file")
    res = data.check_receipt(p.db, token, p.services.settings.issuer)
    p.audit("verify_receipt", (res.claims or {}).get("jti"), {"ok": res.ok})
    return p.render("verify.html", nav="verify", receipt=res, export=None, token=token)


def _policies_page(p: Page, status: int = 200, errors: list[dict[str, str]] | None = None,
                   form: dict[str, Any] | None = None) -> Response:
    t = p.tenant
    now = utcnow()
    return p.render("policies.html", status, nav="policies", rows=data.policy_versions(p.db, t.id, now=now),
                    purposes=catalog.list_purposes(p.db, t.id), notice_days=t.notice_days,
                    earliest_material=catalog.earliest_effective(t.notice_days, material=True, now=now),
                    errors=errors or [], form=form or {"policy": "privacy", "version": "", "document_url": "",
                                                        "document_sha256": "", "material": False,
                                                        "effective_at": "", "purposes": []},
                    published=p.field("published", 64))


@page()
def policies(p: Page) -> Response:
    return _policies_page(p)


@page(write=True)
def publish_policy(p: Page) -> Response:
    p.require_admin()
    assert p.form is not None
    effective = p.field("effective_at", 40).strip()
    form: dict[str, Any] = {"policy": p.field("policy", 64).strip() or "privacy", "version": p.field("version", 64).strip(),
            "document_url": p.field("document_url", 2000).strip(),
            "document_sha256": p.field("document_sha256", 64).strip().lower(),
            "material": p.field("material", 4) == "on", "effective_at": effective,
            "purposes": [str(v) for v in p.form.getlist("purposes")][:100]}
    body = {k: form[k] for k in ("version", "document_url", "document_sha256", "material", "purposes")}
    if effective:
        body["effective_at"] = effective if effective[-1:] in ("Z", "z") or "+" in effective[10:] else effective + "Z"
    try:
        if not re.fullmatch(KEY_RE, form["policy"]):
            raise ValidationFailed.field("policy", "lowercase letters, digits, _ . - (at most 64)")
        try:
            spec = PolicyVersionIn.model_validate(body)
        except PydanticError as exc:
            raise ValidationFailed(validation_errors(exc)) from None
        v = catalog.publish_version(p.db, p.tenant.id, p.tenant.notice_days, form["policy"], spec)
    except (ValidationFailed, Conflict) as exc:
        errors = getattr(exc, "extra", {}).get("errors") or [{"field": "version", "message": exc.detail}]
        return with_problem(_policies_page(p, exc.status, errors, form), exc)
    p.audit("publish_version", f"{v.policy_key} {v.version}", {"material": v.material,
                                                               "effective_at": crypto.iso(v.effective_at)})
    return RedirectResponse(f"/dashboard/policies?published={quote(v.version)}", status_code=303)


# --- exports ---------------------------------------------------------------------------------

def _export_filter(p: Page) -> tuple[exports.ExportFilter, str]:
    """The export form's fields as a filter (the same rules as GET /v1/exports/consents)."""
    fmt = p.field("format", 8) or "jsonl"
    if fmt not in exports.FORMATS:
        raise ValidationFailed.field("format", f"must be one of {', '.join(exports.FORMATS)}")
    times = {}
    for name in ("from", "to"):
        raw = p.field(name, 40).strip()
        times[name] = parse_time(name, raw if raw[-1:] in ("Z", "z") or "+" in raw[10:] else raw + "Z") if raw else None
    if times["from"] is not None and times["to"] is not None and times["from"] >= times["to"]:
        raise ValidationFailed.field("to", "must be after from")
    purpose = p.field("purpose", 64).strip() or None
    if purpose is not None and catalog.get_purpose(p.db, p.tenant.id, purpose) is None:
        raise ValidationFailed.field("purpose", f"unknown purpose {purpose!r}")
    version = p.field("policy_version", 64).strip() or None
    return exports.ExportFilter(p.tenant.id, times["from"], times["to"], purpose, version), fmt


def _exports_page(p: Page, status: int = 200, error: str | None = None) -> Response:
    return p.render("exports.html", status, nav="exports", error=error,
                    recent=data.recent_exports(p.db, p.tenant.id), purposes=catalog.list_purposes(p.db, p.tenant.id))


@page()
def exports_page(p: Page) -> Response:
    return _exports_page(p)


@page(write=True)
def export_download(p: Page) -> Response:
    try:
        flt, fmt = _export_filter(p)
    except ValidationFailed as exc:
        return with_problem(_exports_page(p, exc.status, exc.detail), exc)
    export_id = exports.new_export_id()
    p.audit("start_export", export_id, {"format": fmt, **flt.claims()})
    s = p.services
    body = exports.stream_export(s.engine, flt, fmt, signer=s.signer, issuer=s.settings.issuer, export_id=export_id)
    return StreamingResponse(body, media_type=EXPORT_MEDIA[fmt], headers={
        "Consent-Export-Id": export_id, "Cache-Control": "no-store",
        "Content-Disposition": f'attachment; filename="consents-{export_id}.{fmt}"'})


@page()
def export_manifest(p: Page) -> Response:
    m = exports.get_manifest(p.db, p.tenant.id, str(p.request.path_params["export_id"]))
    if m is None:
        raise NotFound("no completed export with this id")
    return Response(m.manifest + "\n", media_type="text/plain; charset=utf-8", headers={
        "Content-Disposition": f'attachment; filename="{m.id}.manifest.jwt"', "Cache-Control": "no-store"})


# --- webhooks --------------------------------------------------------------------------------

@page()
def webhooks_page(p: Page) -> Response:
    return p.render("webhooks.html", nav="webhooks", endpoints=data.webhook_overview(p.db, p.tenant.id),
                    done=p.field("done", 40), retried=p.field("retried", 20))


@page(write=True)
def webhook_enable(p: Page) -> Response:
    p.require_admin()
    ep = webhooks.enable_endpoint(p.db, p.tenant.id, str(p.request.path_params["webhook_id"]))
    p.audit("enable_webhook", ep.id, {"url": ep.url})
    return RedirectResponse(f"/dashboard/webhooks?done={quote(ep.id)}#{ep.id}", status_code=303)


@page(write=True)
def webhook_retry(p: Page) -> Response:
    p.require_admin()
    raw = str(p.request.path_params["delivery_id"])
    if not raw.isdigit() or len(raw) > 18:
        raise NotFound("delivery not found")
    d = webhooks.retry_delivery(p.db, p.tenant.id, int(raw))
    p.audit("retry_delivery", str(d["id"]), {"endpoint": d["endpoint_id"]})
    return RedirectResponse(f"/dashboard/webhooks?retried={d['id']}#{d['endpoint_id']}", status_code=303)


# --- settings --------------------------------------------------------------------------------

SETTINGS_LIMITS = {"name": 400, "allowed_origins": 50 * 300, "notice_days": 40, "default_lang": 40}


def _settings_form(t: Tenant) -> dict[str, Any]:
    return {"name": t.name, "allowed_origins": "\n".join(t.allowed_origins), "notice_days": str(t.notice_days),
            "default_lang": t.default_lang, "store_full_ip": t.store_full_ip, "store_user_agent": t.store_user_agent}


def _settings_page(p: Page, new_keys: dict[str, str] | None = None, *, status: int = 200, leaked: bool = False,
                   form: dict[str, Any] | None = None, errors: dict[str, str] | None = None) -> Response:
    return p.render("settings.html", status, nav="settings", keys=data.api_keys(p.db, p.tenant.id),
                    new_keys=new_keys or {}, leaked=leaked, jwks=receipts.jwks(p.db)["keys"], now=utcnow(),
                    form=form or _settings_form(p.tenant), errors=errors or {}, saved=p.field("saved", 8))


@page()
def settings_page(p: Page) -> Response:
    return _settings_page(p)


@page(write=True)
def settings_post(p: Page) -> Response:
    """The tenant's settings through ``tenants.update_settings``, the function PATCH /v1/tenant
    uses: the same rules, and the change lands in the tenant audit trail (once) by this user."""
    p.require_admin()
    assert p.user is not None
    form: dict[str, Any] = {k: p.field(k, 64 * 1024) for k in SETTINGS_LIMITS}  # the whole form's bound
    form["store_full_ip"] = p.field("store_full_ip", 4) == "on"
    form["store_user_agent"] = p.field("store_user_agent", 4) == "on"
    body: dict[str, Any] = {**form, "name": form["name"].strip(), "default_lang": form["default_lang"].strip(),
                            "allowed_origins": [o.strip() for o in form["allowed_origins"].splitlines() if o.strip()]}
    try:
        for name, limit in SETTINGS_LIMITS.items():
            if len(form[name]) > limit:
                raise ValidationFailed.field(name, f"longer than {limit} characters")
        days = form["notice_days"].strip()
        if not days.isdigit():
            raise ValidationFailed.field("notice_days", "a whole number of days, 0 to 365")
        body["notice_days"] = int(days)
        try:
            patch = TenantPatch.model_validate(body)
        except PydanticError as exc:
            raise ValidationFailed(validation_errors(exc)) from None
        changed = tenants.update_settings(p.db, p.tenant, patch, actor=data.tenant_actor(p.user))
    except ValidationFailed as exc:
        errors: dict[str, str] = {}
        for e in exc.errors:
            errors.setdefault(e["field"].split(".")[0], e["message"].removeprefix("Value error, "))
        return with_problem(_settings_page(p, status=exc.status, form=form, errors=errors), exc)
    return RedirectResponse(f"/dashboard/settings?saved={len(changed)}#settings-h", status_code=303)


@page(write=True)
def rotate_keys(p: Page) -> Response:
    """New keys, shown once on this answer (never in a URL); a session signed in with the
    secret key it replaces moves to the new one, so rotating does not sign you out."""
    p.require_admin()
    kind = p.field("kind", 16)
    if kind not in ("secret", "publishable", "both"):
        raise ValidationFailed.field("kind", "must be secret, publishable or both")
    kinds = ["secret", "publishable"] if kind == "both" else [kind]
    leaked = p.field("leaked", 4) == "1"
    assert p.user is not None
    # the rotation's tenant audit entry is its record in the trail (no dashboard event beside it)
    new = tenants.rotate_keys(p.db, p.tenant.id, kinds, actor=data.tenant_actor(p.user), leaked=leaked)
    if "secret" in new and p.user.actor.startswith("key:"):
        principal = authenticate_key(p.db, new["secret"])
        assert principal is not None
        data.rebind_session(p.db, p.user.session_hash, principal.key_id)
    return _settings_page(p, new, leaked=leaked)


@page()
def audit_trail(p: Page) -> Response:
    return p.render("audit.html", entries=data.audit_trail(p.db, p.tenant.id, 100), nav="audit")


@page()
def users(p: Page) -> Response:
    return p.render("users.html", users=data.list_users(p.db, p.tenant.id), roles=data.ROLES, nav="users",
                    error=None, created=p.field("created", 320))


@page(write=True)
def users_post(p: Page) -> Response:
    p.require_admin()
    try:
        user = data.create_user(p.db, p.tenant.id, email=p.field("email", 320), password=p.field("password", 1000),
                                role=p.field("role", 16))
    except ConsentError as exc:
        page_ = p.render("users.html", exc.status, users=data.list_users(p.db, p.tenant.id), roles=data.ROLES,
                         nav="users", error=exc.detail, created="")
        return with_problem(page_, exc)
    p.audit("create_user", user.email, {"role": user.role})
    return RedirectResponse(f"/dashboard/users?created={quote(user.email)}", status_code=303)


# --- banner (the snippet's texts and theme, with a live preview) -------------------------------

PREVIEW_KEY = "pk_preview"  # the snippet needs a key attribute; the preview's config route ignores it
PREVIEW_API = "/dashboard/banner/preview"  # the snippet's data-api: its config comes from here
BANNER_CSP = ("default-src 'none'; style-src 'self' 'unsafe-inline'; script-src 'self'; img-src 'self' data:; "
              "frame-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
PREVIEW_CSP = ("default-src 'none'; style-src 'self'; script-src 'self'; connect-src 'self'; img-src 'self' data:; "
               "form-action 'none'; frame-ancestors 'self'; base-uri 'none'")
THEME_FIELDS = ("mode", "layout", "brand", "radius", "font")


def _banner_lang(p: Page, own: dict[str, Any]) -> str:
    raw = p.field("lang", 35).strip().lower()
    if not raw:
        return snippet.lang_key(None, p.tenant.default_lang)
    if raw not in snippet_texts.TEXTS and raw not in own:
        raise ValidationFailed.field("lang", f"no texts for language {raw!r}: pick one of the list")
    return raw


def _banner_form(stored: dict[str, Any], lang: str) -> dict[str, Any]:
    """The form's values: the tenant's words for ``lang`` over the built-in ones, theme, cooldown."""
    built_in = snippet_texts.TEXTS.get(lang, snippet_texts.TEXTS["en"])
    own = stored["texts"].get(lang, {})
    form: dict[str, Any] = {f"text_{k}": own.get(k, built_in.get(k, "")) for k in snippet_texts.TEXT_KEYS}
    form.update({k: "" if stored["theme"].get(k) is None else str(stored["theme"][k]) for k in THEME_FIELDS})
    form["refusal_cooldown_days"] = str(stored["refusal_cooldown_days"])
    return form


def _banner_page(p: Page, stored: dict[str, Any], lang: str, *, status: int = 200,
                 form: dict[str, Any] | None = None, errors: dict[str, str] | None = None) -> Response:
    languages = sorted(set(snippet_texts.TEXTS) | set(stored["texts"]))
    policy = catalog.current_version(p.db, p.tenant.id, "privacy", at=utcnow())
    response = p.render("banner.html", status, nav="banner", lang=lang, languages=languages, stored=stored,
                        form=form or _banner_form(stored, lang), errors=errors or {}, keys=snippet_texts.TEXT_KEYS,
                        saved=p.field("saved", 12), has_policy=policy is not None)
    response.headers["Content-Security-Policy"] = BANNER_CSP
    return response


@page()
def banner(p: Page) -> Response:
    stored = snippet.get_settings(p.db, p.tenant.id)
    return _banner_page(p, stored, _banner_lang(p, stored["texts"]))


@page(write=True)
def banner_post(p: Page) -> Response:
    """One language's texts and the theme through ``snippet.put_settings``, the function PUT
    /v1/tenant/snippet uses (the same schema, so the same 422s); other languages are kept. A
    text equal to the built-in one is not stored, so it follows the built-in texts; an empty
    field means the built-in text."""
    p.require_admin()
    stored = snippet.get_settings(p.db, p.tenant.id)
    lang = _banner_lang(p, stored["texts"])
    names = [f"text_{k}" for k in snippet_texts.TEXT_KEYS] + list(THEME_FIELDS) + ["refusal_cooldown_days"]
    form: dict[str, Any] = {k: p.field(k, 4000) for k in names}
    built_in = snippet_texts.TEXTS.get(lang)
    mine = {}
    for k in snippet_texts.TEXT_KEYS:
        value = form[f"text_{k}"].strip()
        if value and (built_in is None or value != built_in.get(k)):
            mine[k] = value
    texts = {code: t for code, t in stored["texts"].items() if code != lang}
    if mine:
        texts[lang] = mine
    theme: dict[str, Any] = {k: form[k].strip() for k in ("mode", "layout", "brand")}
    theme["font"] = form["font"].strip() or None
    try:
        numbers = {}
        for name in ("radius", "refusal_cooldown_days"):
            raw = form[name].strip()
            if not raw.isdigit() or len(raw) > 6:
                raise ValidationFailed.field(name, "a whole number")
            numbers[name] = int(raw)
        theme["radius"] = numbers["radius"]
        try:
            spec = SnippetSettingsIn.model_validate({"texts": texts, "theme": theme,
                                                     "refusal_cooldown_days": numbers["refusal_cooldown_days"]})
        except PydanticError as exc:
            raise ValidationFailed(validation_errors(exc)) from None
        out = snippet.put_settings(p.db, p.tenant.id, spec)
    except ValidationFailed as exc:
        errors: dict[str, str] = {}
        for e in exc.errors:
            parts = e["field"].split(".")
            if parts[0] == "texts" and len(parts) > 2:
                name = f"text_{parts[2]}"
            elif parts[0] == "theme":  # the contrast rule is about the whole theme: the brand colour
                name = parts[1] if len(parts) > 1 and parts[1] in THEME_FIELDS else "brand"
            else:
                name = parts[0]
            errors.setdefault(name, e["message"].removeprefix("Value error, "))
        return with_problem(_banner_page(p, stored, lang, status=exc.status, form=form, errors=errors), exc)
    p.audit("save_banner", f"version {out['version']}", {"lang": lang, "texts": sorted(mine),
                                                         "theme": spec.theme.model_dump(),
                                                         "refusal_cooldown_days": spec.refusal_cooldown_days})
    return RedirectResponse(f"/dashboard/banner?lang={lang}&saved={out['version']}", status_code=303)


@page()
def banner_preview(p: Page) -> Response:
    """A page holding only the real /snippet.js, its config read from ``PREVIEW_API`` (this
    session's tenant, never a publishable key or an allowed origin); framed by the banner page."""
    lang = _banner_lang(p, snippet.get_settings(p.db, p.tenant.id)["texts"])
    response = render(p.request, "banner_preview.html", lang=lang, tenant_id=p.tenant.id, key=PREVIEW_KEY,
                      api=PREVIEW_API)
    response.headers["Content-Security-Policy"] = PREVIEW_CSP
    response.headers["X-Frame-Options"] = "SAMEORIGIN"
    return response


@page()
def banner_preview_config(p: Page) -> Response:
    """The snippet config the preview shows: built as /v1/snippet/config builds it."""
    config = snippet.build_config(p.db, p.tenant, "privacy", p.field("lang", 35) or None)
    return Response(dumps(config), media_type="application/json", headers={"Cache-Control": "no-store"})
