"""Public transparency-log routes (no key: a receipt holder or an auditor needs no secret):
checkpoints as C2SP signed notes, the note verifier keys, inclusion and consistency proofs."""

from __future__ import annotations

import base64
from typing import Any

from starlette.responses import PlainTextResponse

from consent.audit import merkle, tlog
from consent.errors import ValidationFailed
from consent.web.http import Ctx, Q, endpoint

NOTE_TYPE = "text/plain; charset=utf-8"
SIZE = 2**62
# A checkpoint at a given size never changes; the newest one changes every few seconds.
FOREVER, BRIEF = "public, max-age=31536000, immutable", "public, max-age=2"


def _size(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise ValidationFailed.field("size", "must be an integer") from None
    if not 0 < value < SIZE:
        raise ValidationFailed.field("size", "must be a positive tree size")
    return value


@endpoint(auth=None, summary="The note verifier keys of the log's checkpoints, one per line (newest first)",
          media_types=("text/plain",))
def tlog_keys(ctx: Ctx) -> Any:
    keys = tlog.verifier_keys(ctx.db, ctx.services.settings)
    return PlainTextResponse("".join(k + "\n" for k in keys), headers={"Cache-Control": "public, max-age=300"})


@endpoint(auth=None, summary="The newest checkpoint of a tenant's log (C2SP signed note)", inline=True,
          media_types=("text/plain",), responses={404: "no checkpoint yet"})
def latest_checkpoint(ctx: Ctx) -> Any:
    row = tlog.checkpoint(ctx.db, ctx.request.path_params["tenant_id"])
    return PlainTextResponse(row.note, media_type=NOTE_TYPE, headers={"Cache-Control": BRIEF})


@endpoint(auth=None, summary="The checkpoint of a tenant's log at a tree size", inline=True,
          media_types=("text/plain",), responses={404: "no checkpoint at that size"})
def checkpoint_at(ctx: Ctx) -> Any:
    size = _size(ctx.request.path_params["size"])
    row = tlog.checkpoint(ctx.db, ctx.request.path_params["tenant_id"], size)
    return PlainTextResponse(row.note, media_type=NOTE_TYPE, headers={"Cache-Control": FOREVER})


@endpoint(auth=None, summary="Inclusion proof of a record (by record id, receipt jti or the receipt's "
          "tlog_index) against a checkpoint (RFC 9162 §2.1.3)",
          query=(Q("record_id", max_length=40, description="the record's id"),
                 Q("jti", max_length=40, description="or the jti of its receipt"),
                 Q("leaf_index", int, minimum=0, maximum=SIZE,
                   description="or its leaf index (the receipt's tlog_index claim)"),
                 Q("tree_size", int, minimum=1, maximum=SIZE,
                   description="a tree size up to the newest checkpoint's (default: newest)")),
          responses={404: "record not in the log yet, or no such checkpoint"})
def inclusion_proof(ctx: Ctx) -> Any:
    q = ctx.query
    if sum(q[k] is not None for k in ("record_id", "jti", "leaf_index")) != 1:
        raise ValidationFailed.field("record_id", "give exactly one of record_id, jti and leaf_index")
    tenant_id = ctx.request.path_params["tenant_id"]
    p = tlog.inclusion(ctx.db, tenant_id, record_id=q["record_id"], jti=q["jti"], leaf_index=q["leaf_index"],
                       tree_size=q["tree_size"])
    leaf = merkle.leaf_hash(tlog.leaf_data(p.record_hash))
    return {"leaf_index": p.leaf_index, "tree_size": p.tree_size, "record_id": p.record_id,
            "record_hash": p.record_hash, "leaf_hash": base64.b64encode(leaf).decode(),
            "hashes": tlog.b64(p.hashes), "checkpoint": p.checkpoint}


@endpoint(auth=None, summary="Consistency proof between two tree sizes of a tenant's log (RFC 9162 §2.1.4)",
          query=(Q("first", int, required=True, minimum=1, maximum=SIZE, description="the older tree size"),
                 Q("second", int, minimum=1, maximum=SIZE, description="the newer checkpoint's size (default: newest)")),
          responses={404: "a size beyond the newest checkpoint"})
def consistency_proof(ctx: Ctx) -> Any:
    tenant_id, q = ctx.request.path_params["tenant_id"], ctx.query
    second, hashes = tlog.consistency(ctx.db, tenant_id, q["first"], q["second"])
    return {"first": q["first"], "second": second, "hashes": tlog.b64(hashes)}
