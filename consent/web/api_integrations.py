"""HTTP handlers for email links, the change feed, webhooks and policy-change notices.

The link pages (``/u/{token}``, ``/c/{token}``) need no key: the signed token is the credential.
GET only shows a page (mail scanners open links); POST acts. Errors there are HTML pages for
browsers and problem+json for callers that ask for JSON; never a 500 for a bad token.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, Field, field_validator
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response, StreamingResponse

from consent.errors import BadRequest, Conflict, ConsentError, RateLimited, ValidationFailed
from consent.integrations import email_links, notices, webhooks
from consent.ledger import catalog, events
from consent.ledger.schemas import Evidence, Key, Strict, SubjectRef
from consent.store.db import transaction
from consent.web.http import (
    Ctx,
    JSONResponse,
    Q,
    authenticate,
    describe,
    dumps,
    endpoint,
    parse_query,
    problem_response,
    read_limited,
)

MAX_LINK_BODY = 8 * 1024
MAX_WAIT = 30
FEED_POLL = 5.0  # seconds between reads of an idle wait when no commit wakes it


# --- shapes ------------------------------------------------------------------------------------


class EmailLinkIn(Strict):
    subject: SubjectRef
    purpose: Key
    confirm_days: int | None = Field(default=None, ge=1, le=90,
                                     description="lifetime of the confirm link (default: CONSENT_EMAIL_CONFIRM_DAYS, 7)")


class ListUnsubscribeHeaders(BaseModel):
    List_Unsubscribe: str = Field(alias="List-Unsubscribe")
    List_Unsubscribe_Post: str = Field(alias="List-Unsubscribe-Post")


class EmailLinkOut(BaseModel):
    subject: str
    purpose: str
    unsubscribe_url: str
    headers: ListUnsubscribeHeaders
    confirm_url: str | None
    confirm_expires_at: datetime | None


class LinkSecretsOut(BaseModel):
    secrets: int = Field(description="how many link secrets now verify links (the newest signs)")


class OneClickForm(BaseModel):
    """RFC 8058: what a mail provider POSTs (application/x-www-form-urlencoded or multipart)."""

    List_Unsubscribe: Literal["One-Click"] = Field(alias="List-Unsubscribe")


class LinkResult(BaseModel):
    status: str
    purpose: str
    record_id: str
    already: bool


class EventOut(BaseModel):
    position: int
    id: str
    type: str
    created_at: datetime
    data: dict[str, Any]


class EventList(BaseModel):
    items: list[EventOut]
    next_cursor: str = Field(description="pass as ?after= to continue; unchanged when nothing new")
    has_more: bool


class WebhookIn(Strict):
    url: str = Field(max_length=2000)
    event_types: list[str] = Field(default_factory=lambda: ["consent.*"], min_length=1, max_length=20)
    description: str = Field(default="", max_length=200)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        return v

    @field_validator("event_types")
    @classmethod
    def _types(cls, v: list[str]) -> list[str]:
        for t in v:
            if t not in ("*", "consent.*") and t not in events.EVENT_TYPES:
                raise ValueError(f"unknown event type {t!r}; use *, consent.* or one of {', '.join(events.EVENT_TYPES)}")
        return list(dict.fromkeys(v))


class WebhookOut(BaseModel):
    id: str
    url: str
    event_types: list[str]
    description: str
    enabled: bool
    consecutive_failures: int
    disabled_reason: str | None
    disabled_at: datetime | None
    created_at: datetime


class WebhookCreated(WebhookOut):
    secret: str = Field(description="whsec_… signing secret, shown once")


class WebhookList(BaseModel):
    items: list[WebhookOut]


class DeliveryAttempt(BaseModel):
    attempted_at: datetime
    status_code: int | None
    error: str | None
    duration_ms: int


class DeliveryOut(BaseModel):
    id: int
    event_id: str
    event_position: int
    event_type: str
    status: Literal["pending", "delivered", "failed", "cancelled"]
    attempts: int
    next_attempt_at: datetime | None
    last_status_code: int | None
    last_error: str | None
    created_at: datetime
    delivered_at: datetime | None
    log: list[DeliveryAttempt]


class DeliveryList(BaseModel):
    items: list[DeliveryOut]
    next_cursor: str | None


class NoticesIn(Strict):
    limit: int = Field(default=500, ge=1, le=5000, description="at most this many records per call")
    evidence: Evidence | None = Field(default=None, description="how they were told (channel, message id…)")


class NoticesOut(BaseModel):
    policy: str
    version: str
    effective_at: datetime
    notified: int = Field(description="notified records written by this call")
    more: bool = Field(description="true when subjects remain: call again")


# --- email links -------------------------------------------------------------------------------


@endpoint(auth="secret", summary="Signed one-click unsubscribe link (RFC 8058 headers) and, for "
          "double-opt-in purposes, an expiring confirm link", body=EmailLinkIn, response=EmailLinkOut,
          write=True)
def create_email_links(ctx: Ctx) -> Any:
    s = ctx.services.settings
    return email_links.make_links(ctx.db, ctx.tenant, ctx.body.subject, ctx.body.purpose, issuer=s.issuer,
                                  confirm_days=ctx.body.confirm_days or s.email_confirm_days)


@endpoint(auth="secret", summary="Rotate the email-link signing secret; links already sent keep working",
          response=LinkSecretsOut, write=True)
def rotate_link_secret(ctx: Ctx) -> Any:
    return {"secrets": email_links.rotate_secret(ctx.db, ctx.tenant)}


@endpoint(auth="secret", summary="Retire every email-link secret but the newest; links signed with the "
          "others stop working", response=LinkSecretsOut, write=True)
def retire_link_secrets(ctx: Ctx) -> Any:
    return {"secrets": email_links.retire_secrets(ctx.db, ctx.tenant)}


def wants_json(request: Request) -> bool:
    """Browsers (navigation, form posts) send ``Accept: text/html,…`` and get pages; mail
    providers and API callers (no Accept, ``*/*`` or JSON) get JSON and problem+json."""
    return "text/html" not in request.headers.get("accept", "")


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<meta name="robots" content="noindex"><title>{title}</title>
<style>body{{font:16px/1.5 system-ui,sans-serif;max-width:32rem;margin:4rem auto;padding:0 1rem;color:#222}}
button{{font:inherit;padding:.6rem 1.2rem;border:0;border-radius:.4rem;background:#1f4fd1;color:#fff;cursor:pointer}}
.muted{{color:#666;font-size:.9rem}}</style></head>
<body><h1>{title}</h1>{body}</body></html>
"""


def page(title: str, body: str, status: int = 200) -> HTMLResponse:
    content = PAGE.format(title=html.escape(title), body=body)
    return HTMLResponse(content, status_code=status, headers={"Cache-Control": "no-store"})


def error_page(request: Request, exc: ConsentError) -> Response:
    if wants_json(request):  # the token is a credential: never echo it back (instance)
        return problem_response(exc, request.url.path[:3] + "…")
    titles = {"token_expired": "This link has expired", "bad_token": "This link is not valid",
              "already_confirmed": "Already confirmed", "nothing_to_confirm": "Nothing to confirm"}
    title = titles.get(exc.code, exc.title)
    body = f"<p>{html.escape(exc.detail)}</p><p class=muted>Nothing was changed.</p>"
    response = page(title, body, exc.status)
    response.headers.update(exc.headers)
    return response


async def run_link(request: Request, fn: Callable[[], Any]) -> Any:
    """Run link work in the threadpool; a ConsentError becomes an error page or problem+json."""
    try:
        return await run_in_threadpool(fn)
    except ConsentError as exc:
        return error_page(request, exc)


async def read_link_body(request: Request) -> bytes:
    return await read_limited(request, MAX_LINK_BODY)


def _client(request: Request) -> tuple[str | None, str | None]:
    return (request.client.host if request.client else None), request.headers.get("user-agent")


def _title(purpose: Any) -> str:
    return html.escape(purpose.title or purpose.key)


LINK_RESPONSES = {400: "invalid or tampered link", 410: "expired link, or its subject was erased"}


@describe(summary="Unsubscribe page: shows one button that POSTs; never changes anything",
          media_types=("text/html",), responses=LINK_RESPONSES)
async def unsubscribe_page(request: Request) -> Response:
    services = request.app.state.services
    token = request.path_params["token"]

    def work() -> Response:
        with transaction(services.engine) as db:
            link = email_links.verify(db, token, "unsubscribe")
        if wants_json(request):
            return JSONResponse({"purpose": link.purpose.key, "action": "POST this URL to unsubscribe"})
        body = (f"<p>Stop receiving <strong>{_title(link.purpose)}</strong>?</p>"
                '<form method="post"><input type="hidden" name="List-Unsubscribe" value="One-Click">'
                "<button type=submit>Unsubscribe</button></form>")
        return page("Unsubscribe", body)

    return await run_link(request, work)


# The body is not parsed as an API body (no ``body=`` declared): mail providers send
# ``List-Unsubscribe=One-Click`` form-encoded or multipart (OneClickForm), and any POST with a
# valid token acts; the evidence records which it was.
@describe(summary="RFC 8058 one-click unsubscribe (body List-Unsubscribe=One-Click, form-encoded or "
          "multipart): withdraws at once; idempotent", response=LinkResult,
          responses={**LINK_RESPONSES, 413: "body too large"})
async def unsubscribe(request: Request) -> Response:
    services = request.app.state.services
    token = request.path_params["token"]
    try:
        body = await read_link_body(request)
    except ConsentError as exc:
        return error_page(request, exc)
    # Providers send "List-Unsubscribe=One-Click" (RFC 8058); any POST with a valid token acts,
    # and the evidence says which it was.
    one_click = b"List-Unsubscribe=One-Click" in body or b'name="List-Unsubscribe"' in body  # form or multipart
    ip, ua = _client(request)

    def act(db: Any, link: Any) -> Any:
        return email_links.unsubscribe(db, link, one_click=one_click, signer=services.signer,
                                       issuer=services.settings.issuer, ip=ip, user_agent=ua)

    return await run_link(request, _link_action(
        request, token, "unsubscribe", act, "withdrawn", "You are unsubscribed",
        lambda title: f"<p>You will no longer receive <strong>{title}</strong>.</p>"
                      "<p class=muted>You can close this page.</p>"))


def _link_action(request: Request, token: str, kind: str, act: Callable[[Any, Any], Any], status: str,
                 heading: str, message: Callable[[str], str]) -> Callable[[], Response]:
    """The work of a link that records a decision (unsubscribe, confirm): verify the token and
    ``act`` in one write transaction, then answer JSON or a page saying ``message(purpose title)``."""
    engine = request.app.state.services.engine

    def work() -> Response:
        with transaction(engine, write=True) as db:
            link = email_links.verify(db, token, kind)
            record, created = act(db, link)
        if wants_json(request):
            return JSONResponse({"status": status, "purpose": link.purpose.key, "record_id": record.id,
                                 "already": not created})
        return page(heading, message(_title(link.purpose)))

    return work


@describe(summary="Double-opt-in confirm page: shows one button that POSTs; never changes anything",
          media_types=("text/html",), responses={**LINK_RESPONSES, 409: "nothing to confirm"})
async def confirm_page(request: Request) -> Response:
    services = request.app.state.services
    token = request.path_params["token"]

    def work() -> Response:
        with transaction(services.engine) as db:
            link = email_links.verify(db, token, "confirm")
            state = email_links.pending_state(db, link)
        if state is not None and state.decision == "granted" and state.confirmed:
            raise Conflict("your subscription is already confirmed; nothing to do", code="already_confirmed")
        if state is None or state.decision != "granted":
            raise Conflict("there is no pending subscription to confirm", code="nothing_to_confirm")
        if wants_json(request):
            return JSONResponse({"purpose": link.purpose.key, "action": "POST this URL to confirm"})
        body = (f"<p>Confirm that you want to receive <strong>{_title(link.purpose)}</strong>.</p>"
                '<form method="post"><button type=submit>Confirm subscription</button></form>')
        return page("Confirm your subscription", body)

    return await run_link(request, work)


@describe(summary="Double-opt-in confirm: records a confirmed grant; idempotent per link",
          response=LinkResult, responses={**LINK_RESPONSES, 409: "nothing to confirm"})
async def confirm(request: Request) -> Response:
    services = request.app.state.services
    token = request.path_params["token"]
    ip, ua = _client(request)
    try:
        await read_link_body(request)
    except ConsentError as exc:
        return error_page(request, exc)

    def act(db: Any, link: Any) -> Any:
        return email_links.confirm(db, link, signer=services.signer, issuer=services.settings.issuer,
                                   ip=ip, user_agent=ua)

    return await run_link(request, _link_action(
        request, token, "confirm", act, "granted", "Subscription confirmed",
        lambda title: f"<p>Thank you: you will receive <strong>{title}</strong>.</p>"
                      "<p class=muted>Every email has a link to unsubscribe.</p>"))


# --- change feed -------------------------------------------------------------------------------

FEED_QUERY = (
    Q("after", int, default=0, minimum=0, maximum=2**62, description="position of the last event seen (0: start)"),
    Q("limit", int, default=100, minimum=1, maximum=1000, description="page size"),
    Q("wait", int, default=0, minimum=0, maximum=MAX_WAIT, description="long-poll up to this many seconds"),
)


@describe(auth="secret", summary="Change feed: every record once, in commit order, with a cursor; "
          "wait= long-polls", query=FEED_QUERY, response=EventList,
          responses={400: "after is beyond the end of the feed (bad_cursor)"})
async def list_events(request: Request) -> Response:
    services = request.app.state.services
    q: dict[str, Any] = {}

    def read(tenant_id: str | None) -> tuple[str, list[dict[str, Any]]]:
        with transaction(services.engine) as db:
            if tenant_id is None:
                principal = authenticate(db, services, request, "secret")
                assert principal is not None
                tenant_id = principal.tenant_id
                q.update(parse_query(request, FEED_QUERY))  # after the key: a stranger learns no rules
                if q["after"] > events.last_position(db, tenant_id):
                    raise BadRequest("after is beyond the end of the feed: pass a position you have seen "
                                     "(next_cursor), or 0", code="bad_cursor")
            rows = events.read_events(db, tenant_id, after=q["after"], limit=q["limit"] + 1)
            return tenant_id, events.render(db, tenant_id, rows)

    tenant_id, items = await run_in_threadpool(read, None)
    deadline = time.monotonic() + q["wait"]
    if not items and q["wait"]:
        try:
            with events.feed_waiter(tenant_id, services.settings.feed_max_waits_per_tenant) as changed:
                while not items and time.monotonic() < deadline:
                    # woken by a commit of this tenant; the slow poll only covers a lost listener
                    # (and notices a client that went away)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(changed.wait(), min(FEED_POLL, max(0.0, deadline - time.monotonic())))
                    if await request.is_disconnected():
                        break
                    changed.clear()
                    _, items = await run_in_threadpool(read, tenant_id)
        except events.TooManyWaits:
            exc = RateLimited(1, f"at most {services.settings.feed_max_waits_per_tenant} change-feed waits "
                                 "of one tenant at a time (per process): read without wait=, or retry")
            exc.code = "too_many_waits"
            raise exc from None
    more = len(items) > q["limit"]
    items = items[:q["limit"]]
    cursor = str(items[-1]["position"]) if items else str(q["after"])
    return JSONResponse({"items": items, "next_cursor": cursor, "has_more": more})


# --- webhooks ----------------------------------------------------------------------------------


@endpoint(auth="secret", summary="Register a webhook endpoint; the signing secret is returned once",
          body=WebhookIn, status=201, response=WebhookCreated)
def create_webhook(ctx: Ctx) -> Any:
    b = ctx.body
    try:  # before the write transaction: a slow DNS answer must not hold the write lock
        webhooks.resolve_target(b.url, allow_private=ctx.services.settings.webhook_allow_private)
    except webhooks.UnsafeTarget as exc:
        raise ValidationFailed.field("url", str(exc)) from None
    with transaction(ctx.services.engine, write=True) as db:
        ep = webhooks.create_endpoint(db, ctx.tenant.id, url=b.url, event_types=b.event_types,
                                      description=b.description)
    return {**webhooks.endpoint_out(ep), "secret": ep.secret}


@endpoint(auth="secret", summary="List webhook endpoints", response=WebhookList)
def list_webhooks(ctx: Ctx) -> Any:
    return {"items": [webhooks.endpoint_out(e) for e in webhooks.list_endpoints(ctx.db, ctx.tenant.id)]}


@endpoint(auth="secret", summary="One webhook endpoint", response=WebhookOut)
def get_webhook(ctx: Ctx) -> Any:
    return webhooks.endpoint_out(webhooks.get_endpoint(ctx.db, ctx.tenant.id, ctx.path("webhook_id")))


@endpoint(auth="secret", summary="Delete a webhook endpoint; pending deliveries are cancelled", status=204,
          write=True)
def delete_webhook(ctx: Ctx) -> Any:
    webhooks.delete_endpoint(ctx.db, ctx.tenant.id, ctx.path("webhook_id"))
    return Response(status_code=204)


@endpoint(auth="secret", summary="Re-enable a disabled webhook endpoint; pending deliveries retry now",
          response=WebhookOut, write=True)
def enable_webhook(ctx: Ctx) -> Any:
    return webhooks.endpoint_out(webhooks.enable_endpoint(ctx.db, ctx.tenant.id, ctx.path("webhook_id")))


@endpoint(auth="secret", summary="Rotate a webhook endpoint's signing secret (returned once); deliveries "
          "carry the old secret's signature too for `grace_hours`",
          query=(Q("grace_hours", int, default=24, minimum=0, maximum=720),), response=WebhookCreated, write=True)
def rotate_webhook_secret(ctx: Ctx) -> Any:
    ep = webhooks.rotate_secret(ctx.db, ctx.tenant.id, ctx.path("webhook_id"),
                                timedelta(hours=ctx.query["grace_hours"]))
    return {**webhooks.endpoint_out(ep), "secret": ep.secret}


@endpoint(auth="secret", summary="Delivery log of a webhook endpoint, newest first",
          query=(Q("limit", int, default=50, minimum=1, maximum=500), Q("cursor")), response=DeliveryList)
def list_deliveries(ctx: Ctx) -> Any:
    items, nxt = webhooks.list_deliveries(ctx.db, ctx.tenant.id, ctx.path("webhook_id"),
                                          limit=ctx.query["limit"], cursor=ctx.query["cursor"])
    return {"items": items, "next_cursor": nxt}


# --- policy-change notices ---------------------------------------------------------------------

NOTICE_QUERY = (Q("pending", default="false", choices=("true", "false"),
                  description="true: only subjects not yet notified"),)


@describe(auth="secret", summary="JSONL stream of the subjects to tell about this version before it "
          "takes effect (a decision for its purposes under an earlier version)", query=NOTICE_QUERY,
          responses={200: "application/x-ndjson, one subject per line"})
async def list_notices(request: Request) -> Response:
    services = request.app.state.services
    q: dict[str, Any] = {}

    def lookup() -> tuple[str, int]:
        with transaction(services.engine) as db:
            principal = authenticate(db, services, request, "secret")
            assert principal is not None
            q.update(parse_query(request, NOTICE_QUERY))  # after the key: a stranger learns no rules
            v = catalog.require_version(db, principal.tenant_id, _policy(request), request.path_params["version"])
            assert v.id is not None  # a stored version has its id
            return principal.tenant_id, v.id

    tenant_id, version_id = await run_in_threadpool(lookup)

    def lines() -> Iterator[bytes]:
        for line in notices.stream(services.engine, tenant_id, version_id, pending_only=q["pending"] == "true"):
            yield dumps(line) + b"\n"

    return StreamingResponse(lines(), media_type="application/x-ndjson", headers={"Cache-Control": "no-store"})


def _policy(request: Request) -> str:
    import re

    from consent.errors import ValidationFailed
    from consent.web.api import KEY_RE

    value = str(request.path_params["policy"])
    if not re.match(KEY_RE, value):
        raise ValidationFailed.field("policy", "lowercase letters, digits, _ . - (at most 64)")
    return value


@endpoint(auth="secret", summary="Record a `notified` record (no consent change) for each subject and "
          "purpose not yet told about this version; call again while `more` is true", body=NoticesIn,
          response=NoticesOut, write=True)
def record_notices(ctx: Ctx) -> Any:
    v = catalog.require_version(ctx.db, ctx.tenant.id, _policy(ctx.request), ctx.path("version"))
    evidence = ctx.body.evidence.model_dump(exclude_none=True) if ctx.body.evidence else None
    return notices.record_notices(ctx.db, ctx.tenant, v, limit=ctx.body.limit, evidence=evidence,
                                  signer=ctx.services.signer, issuer=ctx.services.settings.issuer)
