"""HTTP side of the browser snippet: the two publishable-key routes with CORS (only the
tenant's allowed origins), /snippet.js, /.well-known/gpc.json, subject tokens, subject linking
and the /demo page. Domain logic lives in snippet.py and subject_tokens.py."""

from __future__ import annotations

import gzip
import hashlib
import html
import logging
import re
import secrets
import threading
from base64 import b64encode
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from consent.errors import ConsentError, NotFound, OriginNotAllowed, Unauthorized
from consent.integrations import snippet
from consent.integrations.schemas_snippet import (
    GpcJson,
    LinkIn,
    LinkOut,
    SnippetConfig,
    SnippetConsentsIn,
    SnippetConsentsOut,
    SnippetGpcOut,
    SnippetSettingsIn,
    SnippetSettingsOut,
    SubjectTokenIn,
    SubjectTokenOut,
    SubjectTokenSecretOut,
)
from consent.ledger import subject_tokens
from consent.ledger.tenants import attach_tenant, authenticate_key, get_tenant
from consent.store.db import transaction
from consent.store.models import Tenant, utcnow
from consent.web.http import (
    Ctx,
    JSONResponse,
    Meta,
    Q,
    authenticate,
    db_call,
    describe,
    dumps,
    endpoint,
    problem_response,
    read_body,
    render,
)

log = logging.getLogger("consent.integrations.snippet")

SNIPPET_MAX_BODY = 64 * 1024  # a snippet submission is a few hundred bytes
ALLOW_HEADERS = "Authorization, Content-Type, If-None-Match"
PREFLIGHT_MAX_AGE = "600"
CONFIG_VARY = "Origin, Accept-Encoding"
CONFIG_CACHE = "no-cache"  # stored, but revalidated (cheap: ETag) so a new version shows at once
SNIPPET_CACHE = "public, max-age=86400, stale-while-revalidate=604800"
GPC_LAST_UPDATE = "2026-11-22"  # when this service started honouring GPC; bump on policy change
DEMO_KEY_RE = re.compile(r"^pk_[A-Za-z0-9_-]{10,100}$")


def _request_id(request: Request) -> str | None:
    return request.scope.get("state", {}).get("request_id")


def origin_allowed(allowed: list[str] | None, origin: str | None) -> bool:
    """Whether ``origin`` is one of a tenant's ``allowed_origins``."""
    return bool(origin) and origin != "null" and origin in (allowed or [])


def cors_endpoint(*, summary: str, methods: tuple[str, ...], require_origin: bool = False,
                  **kw: Any) -> Callable[[Callable[[Ctx], Any]], Any]:
    """Like ``http.endpoint(auth="publishable")``, with CORS for the tenant's allowed origins.

    Order: key (401), then Origin (403 origin_not_allowed, no CORS headers), then body and
    query (415/413/400/422). Every response after the origin check, errors included, carries
    the CORS headers, so the page's script can read it."""
    meta = Meta(auth="publishable", summary=summary, **kw)
    if meta.body is not None:
        meta.text_body = True
        meta.media_types = ("text/plain", "application/json")

    def deco(fn: Callable[[Ctx], Any]) -> Any:
        async def handler(request: Request) -> Response:
            services = request.app.state.services
            cors: dict[str, str] = {}
            body: Any = None
            body_error: ConsentError | None = None
            if meta.body is not None:
                try:
                    body = await read_body(request, meta, min(services.settings.max_body_bytes, SNIPPET_MAX_BODY))
                except ConsentError as exc:  # reported after the key and origin checks
                    body_error = exc

            def work() -> Any:
                with transaction(services.engine, write=meta.write) as db:
                    principal = authenticate(db, services, request, "publishable")
                    assert principal is not None and principal.tenant_row is not None
                    tenant = attach_tenant(db, principal.tenant_row)  # read with the key: no query
                    origin = request.headers.get("origin")
                    if origin is not None or require_origin:
                        if not origin_allowed(tenant.allowed_origins, origin):
                            raise OriginNotAllowed(f"origin {origin!r} is not allowed for this key"
                                                   if origin else "this route needs an Origin header")
                        cors.update({"Access-Control-Allow-Origin": str(origin),
                                     "Access-Control-Expose-Headers": "ETag"})
                    if body_error is not None:
                        raise body_error
                    query = {q.name: q.parse(request.query_params.get(q.name)) for q in meta.query}
                    return fn(Ctx(request, db, services, principal, body, query, tenant))

            try:
                response = render(await db_call(services, work), meta.status)
            except ConsentError as exc:
                response = problem_response(exc, request.url.path, _request_id(request))
            response.headers.update(cors)
            response.headers.setdefault("Vary", "Origin")
            return response

        handler.meta = meta  # type: ignore[attr-defined]
        handler.__name__ = fn.__name__
        handler.__doc__ = fn.__doc__
        handler.cors_methods = methods  # type: ignore[attr-defined]
        return handler

    return deco


def preflight_for(methods: tuple[str, ...]) -> Any:
    """A CORS preflight handler: 204 with the allowed methods and headers for an allowed origin
    (the publishable key comes in ?key=, as browsers send no Authorization on a preflight);
    403 origin_not_allowed, without CORS headers, for any other origin."""

    @describe(summary=f"CORS preflight for {', '.join(methods)} (publishable key in ?key=)",
              status=204, responses={403: "origin not allowed"},
              query=(Q("key", required=True, description="publishable key"),))
    async def preflight(request: Request) -> Response:
        services = request.app.state.services
        origin = request.headers.get("origin")
        key = request.query_params.get("key")

        def allowed() -> None:
            if not key or len(key) > 200:
                raise Unauthorized("a preflight needs the publishable key in ?key=")
            with transaction(services.engine) as db:
                principal = authenticate_key(db, key)
                if principal is None or principal.kind != "publishable":
                    raise Unauthorized("unknown or revoked publishable key")
                tenant = get_tenant(db, principal.tenant_id)
                if not origin_allowed(tenant.allowed_origins, origin):
                    raise OriginNotAllowed(f"origin {origin!r} is not allowed for this key" if origin
                                           else "a preflight needs an Origin header")

        try:
            await run_in_threadpool(allowed)
        except ConsentError as exc:
            response = problem_response(exc, request.url.path, _request_id(request))
            response.headers["Vary"] = "Origin"
            return response
        return Response(status_code=204, headers={
            "Access-Control-Allow-Origin": str(origin),
            "Access-Control-Allow-Methods": ", ".join(methods),
            "Access-Control-Allow-Headers": ALLOW_HEADERS,
            "Access-Control-Max-Age": PREFLIGHT_MAX_AGE,
            "Vary": "Origin, Access-Control-Request-Method, Access-Control-Request-Headers",
        })

    return preflight


def etag_of(body: bytes) -> str:
    return '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


def etag_matches(header: str | None, etag: str) -> bool:
    if not header:
        return False
    tags = [t.strip() for t in header.split(",")]
    return "*" in tags or etag in tags or f"W/{etag}" in tags


# Perf: built configs per (tenant, policy, language), each with the stamp it was built under
# (snippet.config_stamp). A request costs the stamp query; the body and its ETag are rebuilt
# only when the stamp moved. The stamp is read BEFORE building, so a cached body is never
# older than its stamp: no write leaves the cache stale. Per process, bounded.
# The gzipped body is kept beside it: a config is a few kB of JSON, on the banner's critical path.
_CONFIGS: OrderedDict[tuple[str, str, str], tuple[tuple[Any, ...], bytes, str, bytes]] = OrderedDict()
_CONFIGS_MAX = 1024
_CONFIGS_LOCK = threading.Lock()


def built_config(db: Any, tenant: Tenant, policy_key: str, lang: str | None) -> tuple[bytes, str, bytes]:
    """The config's JSON body, ETag (from the body, so every process agrees) and gzipped body."""
    key = (tenant.id, policy_key, snippet.lang_key(lang, tenant.default_lang))
    stamp = snippet.config_stamp(db, tenant.id, policy_key, utcnow())
    cached = _CONFIGS.get(key)
    if cached is not None and cached[0] == stamp:
        return cached[1], cached[2], cached[3]
    body = dumps(snippet.build_config(db, tenant, policy_key, lang))
    etag, gz = etag_of(body), gzip.compress(body, 6, mtime=0)
    with _CONFIGS_LOCK:
        _CONFIGS[key] = (stamp, body, etag, gz)
        _CONFIGS.move_to_end(key)
        while len(_CONFIGS) > _CONFIGS_MAX:
            _CONFIGS.popitem(last=False)
    return body, etag, gz


CONFIG_QUERY = (Q("lang", max_length=35, description="page language, e.g. de or de-AT (default: tenant's)"),
                Q("policy", default="privacy", max_length=64, description="policy key"))


def config_response(request: Request, body: bytes, etag: str, gz: bytes, headers: dict[str, str]) -> Response:
    """200 with the config (gzipped when accepted), or 304 when If-None-Match names its ETag."""
    headers = {"ETag": etag, "Cache-Control": CONFIG_CACHE, **headers, "Vary": CONFIG_VARY}
    if etag_matches(request.headers.get("if-none-match"), etag):
        return Response(status_code=304, headers=headers)
    if "gzip" in request.headers.get("accept-encoding", ""):
        body, headers["Content-Encoding"] = gz, "gzip"
    return Response(body, media_type="application/json", headers=headers)


@cors_endpoint(summary="What the snippet shows: policy version in effect, purposes (with the version "
               "label whose answer counts), cookie disclosures, texts. ETag; 304 on If-None-Match",
               methods=("GET",), response=SnippetConfig,
               responses={304: "not modified", 403: "origin not allowed", 404: "no policy version in effect"},
               query=CONFIG_QUERY, headers=("If-None-Match",))
def snippet_config(ctx: Ctx) -> Any:
    return config_response(ctx.request, *built_config(ctx.db, ctx.tenant, ctx.query["policy"], ctx.query["lang"]), {})


@cors_endpoint(summary="Record the visitor's choices (text/plain or JSON; only from allowed origins). "
               "201 when something was recorded, 200 when everything replayed",
               methods=("POST",), require_origin=True, body=SnippetConsentsIn, response=SnippetConsentsOut,
               status=201, write=True, responses={200: "replayed", 403: "origin not allowed"})
def snippet_consents(ctx: Ctx) -> Any:
    req = ctx.request
    visit = snippet.Visit(
        origin=req.headers.get("origin"),
        ip=req.client.host if req.client else None,  # forwarded only by trusted proxies (app.create_app)
        user_agent=req.headers.get("user-agent"),
        sec_gpc=req.headers.get("sec-gpc", "").strip() == "1",
    )
    s = ctx.services
    out = snippet.record_choices(ctx.db, ctx.tenant, ctx.body, visit, signer=s.signer, issuer=s.settings.issuer)
    return (201 if any(r["created"] for r in out["records"]) else 200), out


@cors_endpoint(summary="The visitor's Global Privacy Control status, for the snippet to show "
               "\"Opt-Out Preference Signal Honored\" (CCPA regulations § 7025(c)(6))",
               methods=("GET",), response=SnippetGpcOut, responses={403: "origin not allowed"},
               query=(Q("anonymous_id", max_length=200, description="the visitor's anonymous id"),
                      Q("gpc", default="false", choices=("true", "false"),
                        description="navigator.globalPrivacyControl as the page saw it "
                                    "(the Sec-GPC: 1 request header counts too)")))
def snippet_gpc(ctx: Ctx) -> Any:
    signal = ctx.query["gpc"] == "true" or ctx.request.headers.get("sec-gpc", "").strip() == "1"
    return snippet.gpc_status(ctx.db, ctx.tenant, anonymous_id=ctx.query["anonymous_id"], signal=signal)


@endpoint(auth="secret", summary="The tenant's snippet texts, theme and refusal cooldown (current, or an "
          "earlier ?version=)", response=SnippetSettingsOut,
          query=(Q("version", int, minimum=0, maximum=2**31 - 1, description="an earlier settings version (0: the built-in "
                   "defaults)"),), responses={404: "no such version"})
def get_snippet_settings(ctx: Ctx) -> Any:
    return snippet.get_settings(ctx.db, ctx.tenant.id, ctx.query["version"])


@endpoint(auth="secret", summary="Replace the tenant's snippet texts, theme and refusal cooldown; stored as "
          "the next version (earlier ones are kept); the config serves it at once",
          body=SnippetSettingsIn, response=SnippetSettingsOut, write=True)
def put_snippet_settings(ctx: Ctx) -> Any:
    return snippet.put_settings(ctx.db, ctx.tenant.id, ctx.body)


@endpoint(auth="secret", summary="Mint a subject token for a user id (backends may also mint offline "
          "with the secret from GET /v1/subject-tokens/secret)", body=SubjectTokenIn, status=201,
          response=SubjectTokenOut, write=True)
def mint_subject_token(ctx: Ctx) -> Any:
    return subject_tokens.mint(ctx.db, ctx.tenant.id, ctx.body.user_id, ctx.body.ttl_seconds)


@endpoint(auth="secret", summary="The HS256 secret to mint subject tokens offline (created on first use)",
          response=SubjectTokenSecretOut, write=True)
def subject_token_secret(ctx: Ctx) -> Any:
    tid = ctx.tenant.id
    return subject_tokens.secret_out(ctx.db, tid, subject_tokens.current_key(ctx.db, tid))


@endpoint(auth="secret", summary="Rotate the subject-token secret; the previous one verifies until the next "
          "rotation", response=SubjectTokenSecretOut, write=True)
def rotate_subject_token_secret(ctx: Ctx) -> Any:
    tid = ctx.tenant.id
    return subject_tokens.secret_out(ctx.db, tid, subject_tokens.rotate(ctx.db, tid))


@endpoint(auth="secret", summary="Link an anonymous id (from the snippet) to a user id", body=LinkIn,
          response=LinkOut, write=True, responses={409: "anonymous id linked to another user"})
def link_subject(ctx: Ctx) -> Any:
    s = ctx.services
    return snippet.link(ctx.db, ctx.tenant, ctx.body.anonymous_id, ctx.body.user_id,
                        signer=s.signer, issuer=s.settings.issuer)


@describe(summary="Global Privacy Control support resource", response=GpcJson)
async def gpc_json(request: Request) -> Response:
    return JSONResponse({"gpc": True, "lastUpdate": GPC_LAST_UPDATE}, headers={
        "Cache-Control": "public, max-age=86400", "Access-Control-Allow-Origin": "*"})


# --- /snippet.js -------------------------------------------------------------------------

def snippet_path() -> Path:
    """The built snippet: CONSENT_SNIPPET_PATH, else the package's ``static/snippet.js`` (in a
    checkout a link to client-snippet/dist/snippet.js; an installed wheel carries a copy)."""
    from consent.settings import env_setting

    env = env_setting("snippet_path")
    if env:
        return Path(env)
    return Path(__file__).parent / "static" / "snippet.js"


@dataclass(frozen=True)
class Asset:
    body: bytes
    gzipped: bytes
    etag: str
    integrity: str


def load_asset(path: Path) -> Asset:
    body = path.read_bytes()
    return Asset(body, gzip.compress(body, 9, mtime=0), etag_of(body), sri(body))


async def asset(request: Request, name: str = "snippet.js") -> Asset:
    """A built snippet file (snippet.js, or snippet.css beside it), read once per process (a
    deploy restarts the service)."""
    state = request.app.state
    found_all: dict[str, Asset] = getattr(state, "snippet_assets", None) or {}
    found = found_all.get(name)
    if found is None:
        try:
            path = snippet_path()  # CONSENT_SNIPPET_PATH may name the script anything
            found = await run_in_threadpool(load_asset, path if name == "snippet.js" else path.with_name(name))
        except OSError:
            raise NotFound(f"the snippet is not built (client-snippet/dist/{name})",
                           code="snippet_missing") from None
        state.snippet_assets = {**found_all, name: found}
    return found


def sri(body: bytes) -> str:
    """Subresource Integrity value (sha384) of a file's bytes."""
    return "sha384-" + b64encode(hashlib.sha384(body).digest()).decode()


def asset_response(request: Request, found: Asset, media_type: str) -> Response:
    headers = {"ETag": found.etag, "Cache-Control": SNIPPET_CACHE, "Access-Control-Allow-Origin": "*",
               "Cross-Origin-Resource-Policy": "cross-origin", "Vary": "Accept-Encoding"}
    if etag_matches(request.headers.get("if-none-match"), found.etag):
        return Response(status_code=304, headers=headers)
    body = found.body
    if "gzip" in request.headers.get("accept-encoding", ""):
        body, headers["Content-Encoding"] = found.gzipped, "gzip"
    return Response(body, media_type=media_type, headers=headers)


@describe(summary="The consent snippet (JavaScript); cacheable, ETag, CORS *", responses={304: "not modified"})
async def snippet_js(request: Request) -> Response:
    return asset_response(request, await asset(request), "text/javascript; charset=utf-8")


@describe(summary="The snippet's stylesheet, linked by the snippet (CSP style-src 'self' <service>, no "
          "inline style); cacheable, ETag, CORS *", responses={304: "not modified"})
async def snippet_css(request: Request) -> Response:
    return asset_response(request, await asset(request, "snippet.css"), "text/css; charset=utf-8")


# --- /demo -------------------------------------------------------------------------------

DEMO_JS = b"""(() => {
  const out = document.getElementById("state");
  const show = () => { out.textContent = JSON.stringify(
    Object.fromEntries(["strictly_necessary", "marketing_email", "product_updates", "analytics"]
      .map((k) => [k, window.Consent ? Consent.get(k) : null])), null, 2); };
  document.addEventListener("consent:change", show);
  const wait = () => (window.Consent ? Consent.ready.then(show) : setTimeout(wait, 50));
  wait();
})();
"""

DEMO_PAGE = """<!doctype html>
<html lang="{lang}"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>Consent snippet demo</title>
<style nonce="{nonce}">body{{font:16px/1.5 system-ui,sans-serif;max-width:42rem;margin:2rem auto;padding:0 1rem;color:#1a1a1a}}
pre{{background:#f3f3f3;padding:1rem}}a{{color:#0645ad}}</style>
<script src="/snippet.js" data-key="{key}" integrity="{integrity}" crossorigin="anonymous" async></script>
<script src="/demo/demo.js" defer></script>
</head><body>
<h1>Consent snippet demo</h1>
<p>This page embeds the snippet with the demo tenant's publishable key, under a strict
Content-Security-Policy (no inline script; this page's own styles by nonce, the banner's by
a constructable stylesheet). Choose in the banner, then reload:
it stays silent until a material policy version asks again.</p>
<p><a href="#" data-consent-open>Privacy choices</a> &middot;
<a href="?key={key}&amp;lang=de">Deutsch</a> &middot; <a href="?key={key}&amp;lang=en">English</a></p>
<h2>Current answers</h2><pre id="state">loading…</pre>
</body></html>
"""

DEMO_HELP = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Consent snippet demo</title></head><body>
<h1>Consent snippet demo</h1>
<p>Open this page as <code>/demo?key=pk_…</code> with the demo tenant's publishable key
(printed once by <code>consent serve</code> when it created the demo tenant).</p>
</body></html>
"""


@describe(summary="Demo page embedding the snippet (only with CONSENT_DEMO on; publishable key in ?key=)",
          responses={404: "demo off"}, query=(Q("key", description="a publishable key"), Q("lang")))
async def demo_page(request: Request) -> Response:
    services = request.app.state.services
    if not services.settings.demo:
        raise NotFound("the demo is off (CONSENT_DEMO=false)")
    key = request.query_params.get("key", "")
    if not DEMO_KEY_RE.match(key):
        return Response(DEMO_HELP, media_type="text/html; charset=utf-8")
    lang = snippet.pick_lang(request.query_params.get("lang"), "en")
    js = await asset(request)
    nonce = secrets.token_urlsafe(16)
    page = DEMO_PAGE.format(lang=lang, key=html.escape(key, quote=True), nonce=nonce,
                            integrity=js.integrity)
    csp = (f"default-src 'none'; script-src 'self'; style-src 'nonce-{nonce}'; connect-src 'self'; "
           "img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
    return Response(page, media_type="text/html; charset=utf-8",
                    headers={"Content-Security-Policy": csp, "Cache-Control": "no-store"})


@describe(summary="Script of the demo page (shows the current answers)", responses={404: "demo off"})
async def demo_js(request: Request) -> Response:
    if not request.app.state.services.settings.demo:
        raise NotFound("the demo is off (CONSENT_DEMO=false)")
    return Response(DEMO_JS, media_type="text/javascript; charset=utf-8",
                    headers={"Cache-Control": "public, max-age=300"})
