"""``GET /v1/snippet/{publishable_key}.js``: the snippet with the tenant's config inside, so the
first banner needs one request (the script) instead of two in a row (script, then config).

The body is the built snippet whose closing call ``(window,document)`` gets two more
arguments, the publishable key and the config (the same JSON ``GET /v1/snippet/config``
answers, built by the same code and cache: ``api_snippet.built_config``). The ETag is derived
from the snippet build's ETag, the config's ETag (which moves with the tenant's config stamp:
a policy version, a purpose edit, a settings version) and the key, so a 304 costs the stamp
query and no bundling. ``Cache-Control: public, no-cache``: browsers and CDNs keep it but
revalidate every use, so a new config shows at once. The content changes with the tenant's
config, so it cannot carry a fixed SRI hash (docs/snippet.md)."""

from __future__ import annotations

import gzip
import hashlib
import threading
from collections import OrderedDict
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from consent.errors import Forbidden, NotFound, Unauthorized
from consent.ledger.tenants import attach_tenant, authenticate_key
from consent.store.db import transaction
from consent.web import api_snippet
from consent.web.http import db_call, describe, dumps

BUNDLE_CACHE = "public, no-cache"  # stored, revalidated on each use (a 304 is a few hundred bytes)
# The built snippet ends with this call; the per-tenant script passes the key and config into it.
HOOK = b"(window,document)"
KEY_MAX = 200

# Perf: built bundles (body, gzipped body) by their ETag; per process, bounded. A bundle is
# the snippet plus one config, about 4 kB gzipped.
_BUNDLES: OrderedDict[str, tuple[bytes, bytes]] = OrderedDict()
_BUNDLES_MAX = 256
_BUNDLES_LOCK = threading.Lock()


def bundle_etag(snippet_etag: str, config_etag: str, key: str) -> str:
    """A strong ETag for the bundle: it changes when the snippet build, the config or the key does."""
    raw = f"{snippet_etag}\n{config_etag}\n{key}".encode()
    return '"' + hashlib.sha256(raw).hexdigest()[:32] + '"'


def bundle(snippet: bytes, key: str, config: bytes) -> bytes:
    """The snippet with ``key`` and ``config`` (JSON) passed to its closing call."""
    at = snippet.rfind(HOOK)
    if at < 0:
        raise NotFound("the built snippet has no config hook; rebuild client-snippet", code="snippet_missing")
    end = at + len(HOOK) - 1  # before the closing parenthesis
    return snippet[:end] + b"," + dumps(key) + b"," + config + snippet[end:]


def _config(services: Any, key: str, lang: str | None, policy: str) -> tuple[bytes, str]:
    with transaction(services.engine, read_only=True) as db:
        principal = authenticate_key(db, key) if len(key) <= KEY_MAX else None
        if principal is None:
            raise Unauthorized("unknown or revoked publishable key")
        if principal.kind != "publishable":
            # the URL is public: a secret key there must be rotated (POST /v1/keys/rotate)
            raise Forbidden("this script URL needs the publishable key; rotate a secret key that was put in a URL",
                            code="wrong_key_type")
        assert principal.tenant_row is not None
        tenant = attach_tenant(db, principal.tenant_row)  # read with the key: no query
        body, etag, _ = api_snippet.built_config(db, tenant, policy, lang)
        return body, etag


@describe(summary="The snippet with the tenant's config inside (one request to the first banner); "
          "strong ETag, 304 on If-None-Match, gzip, Cache-Control: public, no-cache",
          responses={304: "not modified", 401: "unknown publishable key", 403: "not a publishable key",
                     404: "no policy version in effect"},
          query=api_snippet.CONFIG_QUERY, headers=("If-None-Match",))
async def tenant_snippet(request: Request) -> Response:
    services = request.app.state.services
    key = request.path_params["publishable_key"]
    query = {q.name: q.parse(request.query_params.get(q.name)) for q in api_snippet.CONFIG_QUERY}
    script = await api_snippet.asset(request)
    config, config_etag = await db_call(services, lambda: _config(services, key, query["lang"], query["policy"]))
    etag = bundle_etag(script.etag, config_etag, key)
    headers = {"ETag": etag, "Cache-Control": BUNDLE_CACHE, "Vary": "Accept-Encoding",
               "Access-Control-Allow-Origin": "*", "Cross-Origin-Resource-Policy": "cross-origin"}
    if api_snippet.etag_matches(request.headers.get("if-none-match"), etag):
        return Response(status_code=304, headers=headers)
    found = _BUNDLES.get(etag)
    if found is None:
        body = bundle(script.body, key, config)
        found = (body, gzip.compress(body, 9, mtime=0))
        with _BUNDLES_LOCK:
            _BUNDLES[etag] = found
            while len(_BUNDLES) > _BUNDLES_MAX:
                _BUNDLES.popitem(last=False)
    body = found[0]
    if "gzip" in request.headers.get("accept-encoding", ""):
        body, headers["Content-Encoding"] = found[1], "gzip"
    return Response(body, media_type="text/javascript; charset=utf-8", headers=headers)

