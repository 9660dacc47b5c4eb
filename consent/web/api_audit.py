"""HTTP handlers for audit exports and data-subject rights: streaming ledger export and its
manifest, access export, erasure, retention settings. Routes are in app.py."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from consent.audit import exports, retention
from consent.audit.schemas_audit import (
    AccessExport,
    ErasureOut,
    ManifestOut,
    RetentionIn,
    RetentionOut,
    TenantClosed,
)
from consent.errors import NotFound, ValidationFailed
from consent.ledger import recorder, rights
from consent.ledger.catalog import get_purpose
from consent.store.db import transaction
from consent.web.http import (
    Ctx,
    Q,
    authenticate,
    describe,
    endpoint,
    parse_query,
    require_credentials,
)

log = logging.getLogger("consent.audit.exports")
_END = object()


class ExportStream(StreamingResponse):
    """A streamed export that lets go of its database connection and snapshot within seconds
    when the client goes away or stops reading: a chunk the client does not take within
    ``stall_seconds`` ends the response, and either way the export generator is closed at once
    (its ``finally`` rolls the snapshot back and returns the connection), not whenever the
    garbage collector gets to it."""

    def __init__(self, body: Iterator[bytes], stall_seconds: float, **kw: Any):
        super().__init__(body, **kw)
        self.source, self.stall_seconds = body, stall_seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gone = asyncio.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        watcher = asyncio.create_task(watch())
        complete = False
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            while not gone.is_set():
                chunk = await run_in_threadpool(next, self.source, _END)
                if chunk is _END:
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                    complete = True
                    break
                async with asyncio.timeout(self.stall_seconds):
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except (TimeoutError, OSError):
            pass
        finally:
            watcher.cancel()
            if not complete:
                log.info("export ended early: the client went away or stopped reading")
            close = getattr(self.source, "close", None)
            if close is not None:
                await run_in_threadpool(close)


EXPORT_QUERY = (
    Q("from", datetime, description="only records with recorded_at at or after this time"),
    Q("to", datetime, description="only records with recorded_at before this time"),
    Q("purpose", max_length=64, empty_ok=False, description="only this purpose"),
    Q("policy_version", max_length=64, empty_ok=False, description="only records made under this policy version"),
    Q("format", default="jsonl", choices=exports.FORMATS, description="jsonl (manifest as last line) or csv"),
)
MEDIA = {"jsonl": "application/x-ndjson", "csv": "text/csv; charset=utf-8"}


@describe(auth="secret", summary="Stream the ledger (constant memory), one line per record with its hashes "
          "and receipt, then a signed manifest (JSONL trailer; for any format also at "
          "/v1/exports/{export_id}/manifest, id in the Consent-Export-Id header)", query=EXPORT_QUERY,
          responses={200: "application/x-ndjson or text/csv stream"}, headers=())
async def export_consents(request: Request) -> Response:
    services = request.app.state.services
    require_credentials(request, "secret")  # 401 before any input error, like every other route

    def prepare() -> tuple[str, dict[str, Any]]:
        with transaction(services.engine) as db:
            principal = authenticate(db, services, request, "secret")
            assert principal is not None
            q = parse_query(request, EXPORT_QUERY)
            if q["from"] is not None and q["to"] is not None and q["from"] >= q["to"]:
                raise ValidationFailed.field("to", "must be after from")
            if q["purpose"] is not None and get_purpose(db, principal.tenant_id, q["purpose"]) is None:
                raise ValidationFailed.field("purpose", f"unknown purpose {q['purpose']!r}")
            return principal.tenant_id, q

    tenant_id, q = await run_in_threadpool(prepare)  # errors here are still problem+json
    flt = exports.ExportFilter(tenant_id, q["from"], q["to"], q["purpose"], q["policy_version"])
    export_id = exports.new_export_id()
    body = exports.stream_export(services.engine, flt, q["format"], signer=services.signer,
                                 issuer=services.settings.issuer, export_id=export_id)
    return ExportStream(body, services.settings.export_stall_seconds, media_type=MEDIA[q["format"]], headers={
        "Consent-Export-Id": export_id,
        "Link": f'</v1/exports/{export_id}/manifest>; rel="describedby"',
        "Content-Disposition": f'attachment; filename="consents-{export_id}.{q["format"]}"',
        "Cache-Control": "no-store",
    })


@endpoint(auth="secret", summary="The signed manifest of a completed export", response=ManifestOut)
def export_manifest(ctx: Ctx) -> Any:
    assert ctx.principal is not None  # auth="secret"
    m = exports.get_manifest(ctx.db, ctx.principal.tenant_id, ctx.path("export_id"))
    if m is None:
        raise NotFound("no completed export with this id")
    return {"id": m.id, "format": m.format, "count": m.count, "body_sha256": m.body_sha256,
            "created_at": m.created_at, "manifest": m.manifest}


def wants_markdown(request: Request) -> bool:
    accept = request.headers.get("accept", "")
    return any(part.split(";")[0].strip() == "text/markdown" for part in accept.split(","))


@endpoint(auth="secret", summary="Everything held about one person: identifiers, every record with its "
          "evidence, current state, receipts (JSON, or Markdown with Accept: text/markdown)",
          response=AccessExport)
def subject_export(ctx: Ctx) -> Any:
    t = ctx.tenant
    subject = recorder.lookup_subject(ctx.db, t, ctx.path("subject"))
    data = rights.access_export(ctx.db, t, subject, signer=ctx.services.signer, issuer=ctx.services.settings.issuer)
    if wants_markdown(ctx.request):
        return Response(rights.access_markdown(data), media_type="text/markdown; charset=utf-8")
    return data


@endpoint(auth="secret", summary="Erase a person: identifiers and evidence removed, decisions and hashes "
          "kept under the pseudonym, an erasure record appended (idempotent: 200 when already erased)",
          response=ErasureOut, write=True)
def erase_subject(ctx: Ctx) -> Any:
    t = ctx.tenant
    subject = recorder.lookup_subject(ctx.db, t, ctx.path("subject"))
    _, summary = rights.erase(ctx.db, t, subject, signer=ctx.services.signer, issuer=ctx.services.settings.issuer)
    return summary


@endpoint(auth="secret", summary="The tenant's retention settings", response=RetentionOut)
def get_retention(ctx: Ctx) -> Any:
    return retention.settings_out(ctx.tenant)


@endpoint(auth="secret", summary="Set the tenant's retention (applied by `consent retention run`)",
          body=RetentionIn, response=RetentionOut, write=True)
def put_retention(ctx: Ctx) -> Any:
    assert ctx.principal is not None  # auth="secret"
    t = retention.set_retention(ctx.db, ctx.principal.tenant_id,
                                evidence_days=ctx.body.evidence_retention_days,
                                record_years=ctx.body.record_retention_years,
                                actor=ctx.principal.key_id)
    return retention.settings_out(t)


@endpoint(auth="admin", summary="Close a tenant (idempotent): all its keys stop working at once; "
          "record retention counts from now",
          response=TenantClosed, write=True)
def close_tenant(ctx: Ctx) -> Any:
    t = retention.close_tenant(ctx.db, ctx.path("tenant_id"))
    return {"id": t.id, "closed_at": t.closed_at}
