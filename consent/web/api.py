"""HTTP handlers of the v1 API: parse, call the domain, render. The routes table is in app.py."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from starlette.requests import Request
from starlette.types import Receive, Scope, Send

from consent import crypto
from consent.errors import ConsentError, Unauthorized, ValidationFailed
from consent.ledger import asof, batch_writes, catalog, checks, recorder, tenants
from consent.ledger.receipts import jwks as load_jwks
from consent.ledger.schemas import (
    AuditList,
    BulkCheckIn,
    BulkCheckOut,
    CheckOut,
    ConsentIn,
    CookieIn,
    CookieOut,
    Jwks,
    PolicyVersionIn,
    PolicyVersionList,
    PolicyVersionOut,
    PurposeIn,
    PurposeOut,
    RecordOut,
    RotatedKeysOut,
    RotateKeysIn,
    SubjectConsents,
    TenantCreated,
    TenantDetail,
    TenantIn,
    TenantOut,
    TenantPatch,
)
from consent.ledger.tenants import TenantRef, attach_tenant
from consent.store.db import transaction
from consent.store.models import utcnow
from consent.web import metrics
from consent.web.http import (
    Ctx,
    JSONResponse,
    Meta,
    Q,
    authenticate_token,
    bearer_value,
    check_body_headers,
    db_call,
    dumps,
    endpoint,
    parse_body,
    parse_query_pairs,
    query_pairs,
    read_limited,
    require,
    require_credentials,
)

KEY_RE = r"^[a-z0-9][a-z0-9_.-]{0,63}$"
KEY_CACHE_MAX = 10_000  # secret keys cached per process (cleared when full)
LIMIT = Q("limit", int, default=50, minimum=1, maximum=500, description="page size")
CURSOR = Q("cursor", description="next_cursor of the previous page")


def tenant_out(t: Any) -> dict[str, Any]:
    return {k: getattr(t, k) for k in TenantOut.model_fields}


def path_key(ctx: Ctx, name: str) -> str:
    import re

    value = ctx.path(name)
    require(bool(re.match(KEY_RE, value)), name, "lowercase letters, digits, _ . - (at most 64)")
    return value


@endpoint(auth="admin", summary="Create a tenant; its keys are returned once", body=TenantIn,
          status=201, response=TenantCreated, write=True)
def create_tenant(ctx: Ctx) -> Any:
    tenant, keys = tenants.create_tenant(ctx.db, ctx.body)
    return {**tenant_out(tenant), "keys": {"secret_key": keys["secret"], "publishable_key": keys["publishable"]}}


def tenant_detail(ctx: Ctx, t: Any) -> dict[str, Any]:
    return {**tenant_out(t), "keys": tenants.live_keys(ctx.db, t.id)}


@endpoint(auth="secret", summary="The calling tenant's settings and the keys that work now",
          response=TenantDetail)
def get_own_tenant(ctx: Ctx) -> Any:
    return tenant_detail(ctx, ctx.tenant)


@endpoint(auth="secret", summary="Change the calling tenant's settings (each change is audited)",
          body=TenantPatch, response=TenantDetail, write=True)
def patch_own_tenant(ctx: Ctx) -> Any:
    tenants.update_settings(ctx.db, ctx.tenant, ctx.body, actor=ctx.principal.key_id)  # type: ignore[union-attr]
    return tenant_detail(ctx, ctx.tenant)


@endpoint(auth="admin", summary="A tenant's settings and the keys that work now (admin)", response=TenantDetail)
def admin_get_tenant(ctx: Ctx) -> Any:
    return tenant_detail(ctx, tenants.get_tenant(ctx.db, ctx.path("tenant_id")))


@endpoint(auth="admin", summary="Change a tenant's settings (admin; each change is audited)",
          body=TenantPatch, response=TenantDetail, write=True)
def admin_patch_tenant(ctx: Ctx) -> Any:
    t = tenants.get_tenant(ctx.db, ctx.path("tenant_id"))
    tenants.update_settings(ctx.db, t, ctx.body, actor="admin")
    return tenant_detail(ctx, t)


def audit_page(ctx: Ctx, tenant_id: str) -> dict[str, Any]:
    rows, nxt = tenants.audit_trail(ctx.db, tenant_id, limit=ctx.query["limit"], cursor=ctx.query["cursor"])
    return {"items": [{"id": r.id, "actor": r.actor, "action": r.action, "changed_at": r.changed_at,
                       "before": r.before, "after": r.after} for r in rows], "next_cursor": nxt}


@endpoint(auth="secret", summary="The tenant's audit trail: settings and key changes, newest first",
          query=(LIMIT, CURSOR), response=AuditList)
def own_tenant_audit(ctx: Ctx) -> Any:
    return audit_page(ctx, ctx.principal.tenant_id)  # type: ignore[union-attr]


@endpoint(auth="admin", summary="A tenant's audit trail (admin), newest first", query=(LIMIT, CURSOR),
          response=AuditList)
def admin_tenant_audit(ctx: Ctx) -> Any:
    return audit_page(ctx, tenants.get_tenant(ctx.db, ctx.path("tenant_id")).id)


def rotation(ctx: Ctx, tenant_id: str, actor: str) -> dict[str, Any]:
    b = ctx.body
    grace = tenants.grace_periods(b.publishable_grace_days, b.secret_grace_hours)
    keys = tenants.rotate_keys(ctx.db, tenant_id, tenants.rotation_kinds(b.kind), actor=actor, leaked=b.leaked,
                               grace=grace)
    return {"secret_key": keys.get("secret"), "publishable_key": keys.get("publishable"),
            "keys": tenants.live_keys(ctx.db, tenant_id)}


@endpoint(auth="secret", summary="Rotate the tenant's keys: old ones keep working for a grace period "
          "(publishable 7 days, secret 24 hours by default), or stop at once when `leaked`",
          body=RotateKeysIn, response=RotatedKeysOut, write=True)
def rotate_keys(ctx: Ctx) -> Any:
    return rotation(ctx, ctx.principal.tenant_id, ctx.principal.key_id)  # type: ignore[union-attr]


@endpoint(auth="admin", summary="Rotate a tenant's keys (admin; grace periods as for the tenant's own)",
          body=RotateKeysIn, response=RotatedKeysOut, write=True)
def admin_rotate_keys(ctx: Ctx) -> Any:
    return rotation(ctx, ctx.path("tenant_id"), "admin")


def purpose_out(p: Any) -> dict[str, Any]:
    return {k: getattr(p, k) for k in PurposeOut.model_fields}


@endpoint(auth="secret", summary="Create or update a purpose (201 created, 200 updated)",
          body=PurposeIn, response=PurposeOut, write=True, responses={201: "created"})
def put_purpose(ctx: Ctx) -> Any:
    purpose, created = catalog.put_purpose(ctx.db, ctx.principal.tenant_id, path_key(ctx, "key"), ctx.body)  # type: ignore[union-attr]
    return (201 if created else 200), purpose_out(purpose)


@endpoint(auth="secret", summary="List purposes", response=None, responses={200: "list of purposes"})
def list_purposes(ctx: Ctx) -> Any:
    return {"items": [purpose_out(p) for p in catalog.list_purposes(ctx.db, ctx.principal.tenant_id)]}  # type: ignore[union-attr]


@endpoint(auth="secret", summary="Create or update a cookie disclosure (201 created, 200 updated)",
          body=CookieIn, response=CookieOut, write=True, responses={201: "created"})
def put_cookie(ctx: Ctx) -> Any:
    name = ctx.path("name")
    require(0 < len(name) <= 128 and name.isprintable(), "name", "1 to 128 printable characters")
    cookie, created = catalog.put_cookie(ctx.db, ctx.principal.tenant_id, name, ctx.body)  # type: ignore[union-attr]
    return (201 if created else 200), catalog.cookie_out(cookie)


@endpoint(auth="secret", summary="List cookie disclosures", responses={200: "list of cookies"})
def list_cookies(ctx: Ctx) -> Any:
    return {"items": [catalog.cookie_out(c) for c in catalog.list_cookies(ctx.db, ctx.principal.tenant_id)]}  # type: ignore[union-attr]


@endpoint(auth="secret", summary="Publish an immutable policy version", body=PolicyVersionIn,
          status=201, response=PolicyVersionOut, write=True)
def publish_version(ctx: Ctx) -> Any:
    t = ctx.tenant
    v = catalog.publish_version(ctx.db, t.id, t.notice_days, path_key(ctx, "policy"), ctx.body)
    return catalog.version_out(v)


@endpoint(auth="secret", summary="List a policy's versions, newest first", query=(LIMIT, CURSOR),
          response=PolicyVersionList)
def list_versions(ctx: Ctx) -> Any:
    rows, nxt = catalog.list_versions(ctx.db, ctx.principal.tenant_id, path_key(ctx, "policy"),  # type: ignore[union-attr]
                                      limit=ctx.query["limit"], cursor=ctx.query["cursor"])
    return {"items": [catalog.version_out(v) for v in rows], "next_cursor": nxt}


def idempotency_key(headers: Any) -> str | None:
    key = headers.get("idempotency-key")
    if key is not None:
        require(0 < len(key) <= 200 and key.isprintable(), "Idempotency-Key", "1 to 200 printable characters")
    return key


def authorization(scope: Scope) -> str | None:
    """The first Authorization header, as ``Request.headers`` reads it."""
    for name, value in scope["headers"]:
        if name == b"authorization":
            return value.decode("latin-1")
    return None


async def secret_key(services: Any, scope: Scope) -> tuple[str, str, str]:
    """(key digest, tenant id, tenant hash key) of the request's secret key, else 401/403.
    What a key is never changes, so it is cached per process; whether it still works is not:
    every statement that acts for it tests that, in its own snapshot."""
    token = bearer_value(authorization(scope))
    if token is None:
        raise Unauthorized("this route needs an API key")
    digest = crypto.hash_token(token)
    known = services.secret_keys.get(digest)
    if known is None:
        def lookup() -> Any:
            with transaction(services.engine, read_only=True) as db:
                return authenticate_token(db, services, token, "secret")  # 401 / 403 as every route

        principal = await db_call(services, lookup)
        known = (principal.tenant_id, principal.hash_key)
        if len(services.secret_keys) >= KEY_CACHE_MAX:
            services.secret_keys.clear()
        services.secret_keys[digest] = known
    return digest, known[0], known[1]


async def send_json(send: Send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class RecordConsent:
    """``POST /v1/consents``: a raw ASGI endpoint (Starlette's router calls it with the ASGI
    triple: no threadpool hop while the record waits for its batch). Checked in the order every
    route checks: credentials (401), content type and size (415/413), the key (401/403), JSON
    (400), validation (422). A record the group commit can take (PostgreSQL) goes to the
    process's ``batch_writes.Writer``; any other, or one it hands back, is written by
    ``recorder.record_decision`` in one transaction. Both build the record with the same ledger
    functions and write it with ``statements``."""

    meta = Meta(auth="secret", summary="Record one decision; returns the record and its receipt "
                "(201; 200 when an Idempotency-Key replays an earlier request)", body=ConsentIn, status=201,
                response=RecordOut, write=True, responses={200: "replayed"}, headers=("Idempotency-Key",))
    __name__ = "record_consent"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        services = scope["app"].state.services
        request = Request(scope, receive)
        require_credentials(request, "secret")
        limit = services.settings.max_body_bytes
        check_body_headers(request, self.meta, limit)
        digest, tenant_id, hash_key = await secret_key(services, scope)
        spec = parse_body(await read_limited(request, limit), self.meta)
        ikey = idempotency_key(request.headers)
        writer = services.record_writer
        out: tuple[bool, dict[str, Any]] | None = None
        if writer is not None and batch_writes.takes(spec):
            try:
                record, status = await writer.record(tenant_id, hash_key, digest, spec, ikey)
                out = True, recorder.record_out(record, status)
            except batch_writes.PerRequest:
                pass  # a new subject, an Idempotency-Key seen before, a hot subject: written below
            except ConsentError:
                raise  # the request's own error (422, 401, 503), found by the batch
            except Exception as exc:  # noqa: BLE001 - logged and counted; the record is written per request
                metrics.executor_failed("record", exc)
        if out is None:
            token = bearer_value(authorization(scope))

            def write() -> tuple[bool, dict[str, Any]]:
                with transaction(services.engine, write=True) as db:
                    principal = authenticate_token(db, services, token, "secret")
                    assert principal is not None and principal.tenant_row is not None
                    result = recorder.record_decision(db, attach_tenant(db, principal.tenant_row), spec,
                                                    signer=services.signer, issuer=services.settings.issuer,
                                                    idempotency_key=ikey)
                    return result.created, recorder.record_out(result.record, result.status)

            out = await db_call(services, write)
        created, body = out
        await send_json(send, 201 if created else 200, dumps(body))


record_consent = RecordConsent()


AT = Q("at", datetime, description="answer as of this RFC 3339 time (state then, receipt of the record then in force)")


@endpoint(auth="secret", summary="Current state per purpose for one subject, with receipts (or as of `at`)",
          query=(AT,), response=SubjectConsents)
def subject_consents(ctx: Ctx) -> Any:
    t = ctx.tenant
    subject = recorder.lookup_subject(ctx.db, t, ctx.path("subject"))
    at = ctx.query["at"]
    states = checks.subject_states(ctx.db, t, subject.id) if at is None else asof.subject_states_at(ctx.db, t, subject.id, at)
    claims = checks.state_receipt_claims(ctx.services.settings.issuer, t, subject.id, states)
    if at is not None:
        claims["as_of"] = crypto.iso(at)
    for s in states:
        s.pop("legal_basis")
    return {"subject": subject.id, "purposes": states, "receipt": ctx.services.signer.sign(claims)}


CHECK_QUERY = (
    Q("purpose", required=True, max_length=64),
    Q("subject", max_length=400, description="user id, or sub_…, user:…, email:…, anon:…"),
    Q("email", max_length=320),
    Q("anonymous_id", max_length=200),
    AT,
)


SUBJECT_PARAMS = {"subject": None, "email": "email", "anonymous_id": "anon"}


class CheckOne:
    """``GET /v1/check``: a raw ASGI endpoint (Starlette's router calls it with the ASGI triple:
    no Request object, no threadpool). The key comes from the per-process cache
    (``secret_key``); the check runs on the process's batched reader (``batch_reads``), or, where
    none runs or it failed (logged and counted), on the per-request executor
    (``checks.check_rows``): one statement either way (``statements.CHECK``), one answer builder
    (``checks.check_answer``). ``at=`` answers from the ledger (``asof``) in a transaction."""

    meta = Meta(auth="secret", summary="May we? One subject, one purpose", query=CHECK_QUERY, response=CheckOut)
    __name__ = "check_one"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        services = scope["app"].state.services
        digest, tenant_id, hash_key = await secret_key(services, scope)
        q = parse_query_pairs(query_pairs(scope["query_string"].decode("latin-1")), CHECK_QUERY)
        given = [(k, q[k]) for k in SUBJECT_PARAMS if q[k]]
        if len(given) != 1:
            raise ValidationFailed.field("subject", "give exactly one of subject, email, anonymous_id")
        name, value = given[0]
        kind = SUBJECT_PARAMS[name]
        if kind is None:
            kind, value = recorder.parse_subject_ref(value)
        purpose, tenant = q["purpose"], TenantRef(tenant_id, hash_key)
        if q["at"] is not None:  # as-of answers: from the ledger, off the hot path
            def as_of() -> dict[str, Any]:
                with transaction(services.engine, read_only=True) as db:
                    return asof.check_at(db, tenant, purpose=purpose, kind=kind, value=value, at=q["at"])

            body = await db_call(services, as_of)
        else:
            body = checks.check_answer(purpose, await run_check(services, checks.check_item(
                digest, tenant, purpose, kind, value)))
        await send_json(send, 200, dumps(body))


async def run_check(services: Any, item: tuple[str, str, str, str, str]) -> tuple[Any, ...]:
    """``statements.CHECK``'s row for one check: on the batched reader, else per request."""
    reader = services.check_reader
    if reader is not None:
        try:
            row = await reader.check(item)
        except Exception as exc:  # noqa: BLE001 - logged and counted; the check runs per request
            metrics.executor_failed("check", exc)
        else:
            reader.answered += 1
            return row

    def per_request() -> tuple[Any, ...]:
        with transaction(services.engine, read_only=True) as db:
            return checks.check_rows(db.connection(), [item], utcnow())[0]

    return await db_call(services, per_request)


check_one = CheckOne()


@endpoint(auth="secret", summary="Bulk check: one purpose for up to 100,000 emails or subjects",
          body=BulkCheckIn, response=BulkCheckOut)
def check_bulk(ctx: Ctx) -> Any:
    b = ctx.body
    n = len(b.emails if b.emails is not None else b.subjects)
    limit = ctx.services.settings.max_bulk
    if n > limit:
        raise ValidationFailed.field("emails" if b.emails is not None else "subjects", f"at most {limit} per call")
    return checks.bulk_check(ctx.db, ctx.tenant_ref, purpose=b.purpose, emails=b.emails, subjects=b.subjects)


@endpoint(auth=None, summary="Public receipt verification keys (old keys kept after rotation)", response=Jwks)
def jwks(ctx: Ctx) -> Any:
    return JSONResponse(load_jwks(ctx.db), headers={"Cache-Control": "public, max-age=300"})


