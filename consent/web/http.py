"""The thin HTTP layer: an ``endpoint`` decorator that authenticates, parses and validates
input, runs the handler in one database transaction (committed or rolled back here only),
and renders JSON. Its declarations (auth, body, query, responses) also drive /openapi.json.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote_plus

import orjson
from pydantic import BaseModel, ValidationError
from sqlalchemy.orm import Session
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from consent.errors import (
    BadRequest,
    ConsentError,
    Forbidden,
    MalformedJSON,
    PayloadTooLarge,
    Unauthorized,
    Unavailable,
    UnsupportedMediaType,
    ValidationFailed,
)
from consent.ledger.tenants import (
    Principal,
    TenantRef,
    attach_tenant,
    authenticate_key,
    get_tenant,
    is_admin_token,
)
from consent.store.db import transaction
from consent.store.models import Tenant

JSON_TYPES = ("application/json",)


class JSONResponse(Response):
    """orjson-rendered JSON; datetimes as RFC 3339 UTC with Z."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return dumps(content)


def dumps(content: Any) -> bytes:
    return orjson.dumps(content, option=orjson.OPT_UTC_Z | orjson.OPT_NON_STR_KEYS, default=_default)


def _default(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def problem_response(exc: ConsentError, instance: str | None = None, request_id: str | None = None) -> Response:
    body = exc.to_problem(instance)
    if request_id:
        body["request_id"] = request_id
    return Response(dumps(body), status_code=exc.status, headers=exc.headers,
                    media_type="application/problem+json")


@dataclass(frozen=True)
class Q:
    """A declared query parameter: parsed, validated (422 naming it) and documented."""

    name: str
    type: type = str
    required: bool = False
    default: Any = None
    description: str = ""
    minimum: int | None = None
    maximum: int | None = None
    max_length: int = 1000
    choices: tuple[str, ...] | None = None
    empty_ok: bool = True  # False for filters: an empty one would silently match everything

    def parse(self, raw: str | None) -> Any:
        if raw == "" and not self.empty_ok:
            raise ValidationFailed.field(self.name, "must not be empty")
        if raw is None or (raw == "" and self.type is str):  # an empty number or time is invalid
            if self.required:
                raise ValidationFailed.field(self.name, "is required")
            return self.default
        if len(raw) > self.max_length:
            raise ValidationFailed.field(self.name, f"longer than {self.max_length} characters")
        if "\x00" in raw:
            raise ValidationFailed.field(self.name, "must not contain NUL characters")
        if self.choices is not None and raw not in self.choices:
            raise ValidationFailed.field(self.name, f"must be one of {', '.join(self.choices)}")
        if self.type is int:
            try:
                value = int(raw)
            except ValueError:
                raise ValidationFailed.field(self.name, "must be an integer") from None
            if (self.minimum is not None and value < self.minimum) or (
                self.maximum is not None and value > self.maximum
            ):
                raise ValidationFailed.field(self.name, f"must be between {self.minimum} and {self.maximum}")
            return value
        if self.type is datetime:
            return parse_time(self.name, raw)
        return raw


def parse_query(request: Request, declared: tuple[Q, ...], extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """Parse the declared query parameters (``parse_query_pairs``)."""
    return parse_query_pairs(request.query_params.multi_items(), declared, extra)


def parse_query_pairs(pairs: list[tuple[str, str]], declared: tuple[Q, ...],
                      extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """The declared query parameters from the query's (name, value) pairs. A route that declares
    any refuses unknown ones: a mistyped filter (``purpse=``) must not silently widen an export
    or a list."""
    values: dict[str, str] = {}
    if declared:
        known = {q.name for q in declared} | set(extra)
        for name, value in pairs:
            if name not in known:
                raise ValidationFailed.field(name, f"unknown query parameter (known: {', '.join(sorted(known))})")
            if name in values:  # one value would win silently: ``?purpose=a&purpose=`` must not widen
                raise ValidationFailed.field(name, "given more than once")
            values[name] = value
    return {q.name: q.parse(values.get(q.name)) for q in declared}


def query_pairs(qs: str) -> list[tuple[str, str]]:
    """``parse_qsl(qs, keep_blank_values=True)`` (what Starlette reads), unquoting only the
    parts that need it (a third of parse_qsl's cost for the usual plain query)."""
    out = []
    for part in qs.split("&"):
        if not part:
            continue
        name, _, value = part.partition("=")
        if "%" in name or "+" in name:
            name = unquote_plus(name)
        if "%" in value or "+" in value:
            plain = value.replace("%40", "@")  # an email's "@" is the usual (often the only) escape
            value = plain if "%" not in plain and "+" not in plain else unquote_plus(value)
        out.append((name, value))
    return out


def parse_time(name: str, raw: str) -> datetime:
    try:
        value = datetime.fromisoformat(raw.replace("Z", "+00:00").replace(" ", "+"))
    except ValueError:
        raise ValidationFailed.field(name, "must be an RFC 3339 timestamp") from None
    if value.tzinfo is None:
        raise ValidationFailed.field(name, "must carry a time zone (e.g. Z)")
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValidationFailed.field(name, "is out of range") from None


@dataclass
class Meta:
    """What an endpoint declares; read by the OpenAPI builder."""

    auth: str | None
    summary: str
    body: type[BaseModel] | None = None
    query: tuple[Q, ...] = ()
    status: int = 200
    response: type[BaseModel] | None = None
    responses: dict[int, str] = field(default_factory=dict)
    write: bool = False
    text_body: bool = False
    media_types: tuple[str, ...] = ("application/json",)
    headers: tuple[str, ...] = ()
    # Run on the event loop instead of the threadpool: only for short indexed reads that never
    # write (they also run without BEGIN/COMMIT on PostgreSQL). Perf: the threadpool hop costs
    # ~190 us CPU per GET /v1/check.
    inline: bool = False


@dataclass
class Ctx:
    """What a handler gets: the request, its transaction, caller, parsed body and query."""

    request: Request
    db: Session
    services: Any
    principal: Principal | None
    body: Any
    query: dict[str, Any]
    _tenant: Tenant | None = None

    @property
    def tenant(self) -> Tenant:
        if self._tenant is None:
            assert self.principal is not None
            row = self.principal.tenant_row
            self._tenant = attach_tenant(self.db, row) if row else get_tenant(self.db, self.principal.tenant_id)
        return self._tenant

    @property
    def tenant_ref(self) -> TenantRef:
        """The tenant's id and hash key, read with the API key: no query (unlike ``tenant``)."""
        assert self.principal is not None and self.principal.hash_key
        return TenantRef(self.principal.tenant_id, self.principal.hash_key)

    def path(self, name: str) -> str:
        return str(self.request.path_params[name])


def bearer(request: Request) -> str | None:
    return bearer_value(request.headers.get("authorization"))


def bearer_value(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer`` header (None: no header; 401: another scheme)."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("use 'Authorization: Bearer <key>'")
    return token.strip()


def authenticate(db: Session, services: Any, request: Request, auth: str) -> Principal | None:
    """Check the caller against what the route needs: admin, secret or publishable key."""
    token = bearer(request)
    if token is None and auth == "publishable":
        token = request.query_params.get("key")
    return authenticate_token(db, services, token, auth)


def authenticate_token(db: Session, services: Any, token: str | None, auth: str) -> Principal | None:
    """``authenticate`` for a token already taken from the request."""
    if token is None:
        raise Unauthorized("this route needs an API key")
    if auth == "admin":
        if is_admin_token(db, token, services.admin_token):
            return None
        if authenticate_key(db, token) is not None:
            raise Forbidden("this route needs the admin token, not a tenant key", code="wrong_key_type")
        raise Unauthorized("unknown admin token")
    principal = authenticate_key(db, token) if len(token) < 200 else None
    if principal is None:
        if is_admin_token(db, token, services.admin_token):
            raise Forbidden("the admin token cannot act for a tenant; use the tenant's secret key",
                            code="wrong_key_type")
        raise Unauthorized("unknown or revoked API key")
    if principal.kind != auth:
        raise Forbidden(f"this route needs a {auth} key, not a {principal.kind} key", code="wrong_key_type")
    return principal


async def read_body(request: Request, meta: Meta, limit: int) -> Any:
    """Read, parse and validate the body (415/413/400/422)."""
    return parse_body(await read_raw(request, meta, limit), meta)


async def read_raw(request: Request, meta: Meta, limit: int) -> bytes:
    """The raw body, after the content type (415) and size (413) checks."""
    check_body_headers(request, meta, limit)
    return await read_limited(request, limit)


def check_body_headers(request: Request, meta: Meta, limit: int) -> None:
    """415 for a content type the route does not take, 413 for a declared length over ``limit``."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    allowed = JSON_TYPES + (("text/plain",) if meta.text_body else ())
    if ctype not in allowed and not ctype.endswith("+json"):
        raise UnsupportedMediaType(f"send the body as {' or '.join(allowed)}")
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise PayloadTooLarge(f"the body may be at most {limit} bytes")


async def read_limited(request: Request, limit: int) -> bytes:
    """The body, refusing (413) as soon as it passes ``limit`` bytes rather than after reading it all."""
    chunks = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"the body may be at most {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:  # the caller left mid-body: nothing to do, nobody to answer
        raise BadRequest("the connection closed before the whole body arrived",
                         code="client_disconnected") from None
    return b"".join(chunks)


def parse_body(raw: bytes, meta: Meta) -> Any:
    """JSON-decode (400) and validate against ``meta.body`` (422)."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        data = _loads_strict(raw)
    if b"\\u0000" in raw:  # cheap pre-check: a NUL can only arrive escaped
        _reject_nul(data, "body")
    assert meta.body is not None
    try:
        return meta.body.model_validate(data)
    except ValidationError as exc:
        raise ValidationFailed(validation_errors(exc)) from None


async def db_work(services: Any, fn: Callable[[], Any]) -> Any:
    """``fn`` (database work) in a worker thread, given up after ``db_request_timeout_seconds``
    (TimeoutError): a database that stops answering costs the caller seconds, not minutes. The
    abandoned thread ends when its connection fails (tcp_user_timeout, statement_timeout)."""
    import anyio.to_thread

    async with asyncio.timeout(services.settings.db_request_timeout_seconds):
        return await anyio.to_thread.run_sync(fn, abandon_on_cancel=True)


async def db_call(services: Any, fn: Callable[[], Any]) -> Any:
    """``db_work``, a database that does not answer in time being a 503 the caller may retry."""
    try:
        return await db_work(services, fn)
    except TimeoutError:
        raise Unavailable("the database did not answer in time; retry shortly", headers={"Retry-After": "1"}) from None


PREAUTH_BYTES = 64 * 1024  # bodies declared this small are read before the key check (one transaction)


def small_body(request: Request) -> bool:
    """Whether the request declares a body of at most ``PREAUTH_BYTES`` (chunked: unknown)."""
    length = request.headers.get("content-length")
    return length is not None and length.isdigit() and int(length) <= PREAUTH_BYTES


def pre_authenticate(services: Any, request: Request, auth: str) -> Principal | None:
    with transaction(services.engine, read_only=True) as db:
        return authenticate(db, services, request, auth)


def require_credentials(request: Request, auth: str) -> None:
    """401 at once, before the body is read, when the caller presents no usable credentials."""
    if bearer(request) is None and not (auth == "publishable" and request.query_params.get("key")):
        raise Unauthorized("this route needs an API key")


def _loads_strict(raw: bytes) -> Any:
    """What orjson refused, parsed by ``json`` (exact error for edge cases), but never NaN,
    Infinity, lone surrogates or pathological nesting, which no database column can store."""

    def no_constant(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    def finite(text: str) -> float:
        value = float(text)
        if value in (float("inf"), float("-inf")):
            raise ValueError("number out of range")
        return value

    try:
        data = json.loads(raw, parse_constant=no_constant, parse_float=finite)
        orjson.dumps(data)  # refuses lone surrogates and nesting deeper than we store
    except (ValueError, UnicodeDecodeError, RecursionError, orjson.JSONEncodeError):
        raise MalformedJSON("the body is not valid JSON") from None
    return data


def _reject_nul(value: Any, where: str) -> None:
    """NUL characters cannot be stored in PostgreSQL text: refuse them naming the field."""
    if isinstance(value, str):
        if "\x00" in value:
            raise ValidationFailed.field(where, "must not contain NUL characters")
    elif isinstance(value, dict):
        for k, v in value.items():
            _reject_nul(k, where)
            _reject_nul(v, f"{where}.{k}" if where != "body" else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _reject_nul(v, f"{where}[{i}]")


def validation_errors(exc: ValidationError) -> list[dict[str, str]]:
    out = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"]) or "body"
        out.append({"field": loc, "message": err["msg"]})
    return out


def endpoint(*, auth: str | None, summary: str, **kw: Any) -> Callable[[Callable[[Ctx], Any]], Any]:
    """Wrap a sync handler ``fn(ctx)`` that returns a body (dict/model), ``(status, body)`` or a Response."""
    meta = Meta(auth=auth, summary=summary, **kw)

    def deco(fn: Callable[[Ctx], Any]) -> Any:
        async def handler(request: Request) -> Response:
            # Order: no credentials (401) → content type/size (415/413) → in the transaction:
            # key check (401/403) → JSON (400) → validation (422). An unauthenticated caller
            # learns nothing about the body rules and never makes us parse a large body.
            services = request.app.state.services
            checked: list[Principal | None] = []
            if auth:
                require_credentials(request, auth)
                if meta.body and not small_body(request):
                    # a body that may be large is read only for a caller whose key is valid,
                    # so unauthenticated traffic never makes us hold megabytes
                    check_body_headers(request, meta, services.settings.max_body_bytes)
                    checked.append(await db_call(services, lambda: pre_authenticate(services, request, auth)))
            raw = await read_raw(request, meta, services.settings.max_body_bytes) if meta.body else None

            def work() -> Any:
                with transaction(services.engine, write=meta.write, read_only=meta.inline) as db:
                    principal = checked[0] if checked else (
                        authenticate(db, services, request, auth) if auth else None)
                    for name, value in request.path_params.items():
                        if "\x00" in str(value):
                            raise ValidationFailed.field(name, "must not contain NUL characters")
                    body = parse_body(raw, meta) if raw is not None else None
                    query = parse_query(request, meta.query, ("key",) if auth == "publishable" else ())
                    return fn(Ctx(request, db, services, principal, body, query))

            # Inline only on SQLite (in-process reads): on PostgreSQL the loop would sit blocked
            # through every round trip, so the threadpool overlaps them (measured: better p99).
            inline = meta.inline and services.engine.dialect.name == "sqlite"
            return render(work() if inline else await db_call(services, work), meta.status)

        handler.meta = meta  # type: ignore[attr-defined]
        handler.__name__ = fn.__name__
        handler.__doc__ = fn.__doc__
        return handler

    return deco


def describe(*, auth: str | None = None, summary: str, **kw: Any) -> Callable[[Any], Any]:
    """Attach OpenAPI metadata to a plain async handler (no transaction, no auth)."""

    def deco(fn: Any) -> Any:
        fn.meta = Meta(auth=auth, summary=summary, **kw)
        return fn

    return deco


def render(result: Any, status: int) -> Response:
    if isinstance(result, Response):
        return result
    if isinstance(result, tuple):
        status, result = result
    return JSONResponse(result, status_code=status)


def require(cond: bool, field_name: str, message: str) -> None:
    if not cond:
        raise ValidationFailed.field(field_name, message)


__all__ = ["BadRequest", "Ctx", "JSONResponse", "Q", "endpoint", "problem_response", "render", "require"]
