"""/openapi.json, built from the routes table and each endpoint's declared Meta, so the
document cannot drift from what the handlers actually parse and return."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from consent import __version__
from consent.ledger.schemas import Problem
from consent.web.api import KEY_RE
from consent.web.http import JSONResponse, Meta

REF = "#/components/schemas/{model}"
ERRORS = {
    "400": "malformed request", "401": "missing or invalid key", "403": "wrong key type",
    "404": "not found", "409": "conflict", "413": "body too large", "415": "wrong content type",
    "422": "validation failed", "429": "rate limited",
}


def _schema(model: type[BaseModel], defs: dict[str, Any], mode: JsonSchemaMode) -> dict[str, Any]:
    schema = model.model_json_schema(ref_template=REF, mode=mode)
    for name, sub in schema.pop("$defs", {}).items():
        defs.setdefault(name, sub)
    defs.setdefault(model.__name__, schema)
    return {"$ref": REF.format(model=model.__name__)}


# Tags by path prefix, first match wins (the areas of README's API table).
TAGS: tuple[tuple[str, str], ...] = (
    ("/v1/policies/{policy}/versions/{version}/notices", "integrations"),
    ("/v1/subjects/{subject}/consents", "ledger and checks"),
    ("/v1/subjects/", "audit and rights"), ("/v1/exports", "audit and rights"),
    ("/v1/tenant/retention", "audit and rights"), ("/v1/tenants/{tenant_id}/close", "audit and rights"),
    ("/v1/tenant", "tenants and keys"), ("/v1/keys", "tenants and keys"),
    ("/v1/purposes", "catalog"), ("/v1/cookies", "catalog"), ("/v1/policies", "catalog"),
    ("/v1/consents", "ledger and checks"), ("/v1/check", "ledger and checks"),
    ("/v1/snippet", "snippet"), ("/v1/subject-", "snippet"), ("/snippet.js", "snippet"), ("/snippet.css", "snippet"), ("/demo", "snippet"),
    ("/.well-known/gpc.json", "snippet"),
    ("/v1/email-links", "integrations"), ("/u/", "integrations"), ("/c/", "integrations"),
    ("/v1/events", "integrations"), ("/v1/webhooks", "integrations"),
    ("/.well-known/jwks.json", "receipts"), ("/v1/tlog", "transparency log"),
    ("/healthz", "operations"), ("/readyz", "operations"), ("/metrics", "operations"), ("/openapi.json", "operations"),
)
TAG_DESCRIPTIONS = {
    "tenants and keys": "Tenants (admin token) and their secret and publishable keys.",
    "catalog": "Purposes, cookie disclosures and immutable policy versions.",
    "ledger and checks": "Record decisions (hash-chained, with a signed receipt) and ask whether one is allowed.",
    "snippet": "The browser snippet's routes: publishable key, allowed origins only.",
    "integrations": "Email links, the change feed, webhooks and policy-change notices.",
    "audit and rights": "Streaming exports verifiable offline, access export, erasure, retention.",
    "receipts": "The public keys that verify every receipt and export.",
    "transparency log": "Public signed checkpoints of each tenant's append-only log, inclusion and consistency proofs.",
    "operations": "Health, readiness, metrics and this document.",
}
AUTH_TEXT = {
    "secret": "Needs the tenant's secret key: `Authorization: Bearer sk_…`.",
    "publishable": "Needs the tenant's publishable key (`Authorization: Bearer pk_…` or `?key=`), "
                   "from one of the tenant's allowed origins.",
    "admin": "Needs the admin token: `Authorization: Bearer adm_…`.",
}
# The patterns the handlers enforce on path parameters (422 naming the parameter otherwise).
KEY_PATTERN = KEY_RE
PATH_SCHEMAS: dict[str, dict[str, Any]] = {
    "key": {"pattern": KEY_PATTERN, "example": "marketing_email"},
    "policy": {"pattern": KEY_PATTERN, "example": "privacy"},
    "name": {"maxLength": 128, "example": "session"},
    "subject": {"maxLength": 1000, "example": "email:ada@example.com",
                "description": "the tenant's user id, or email:…, anon:…, user:…, or our sub_… id"},
    "version": {"maxLength": 64, "example": "2026-01"},
    "tenant_id": {"example": "ten_1a2b3c4d5e6f7a8b"},
    "publishable_key": {"maxLength": 200, "example": "pk_3f2a9c0d1e4b5a67a8b9c0d1",
                        "description": "the tenant's publishable key"},
    "export_id": {"example": "exp_1a2b3c4d5e6f7a8b9c0d1e2f"},
    "webhook_id": {"example": "wh_1a2b3c4d5e6f7a8b"},
    "token": {"example": "eyJ0IjoidGVuXzEiLCJzIjoic3ViXzEifQ.ZmFrZQ.c2ln",
              "description": "a signed link token this service issued"},
}
# Example values by field name, for examples built from the schemas (valid for their patterns).
FIELD_EXAMPLES: dict[str, Any] = {
    "email": "ada@example.com", "user_id": "42", "anonymous_id": "anon-3f2a9c0d", "subject": "sub_3f2a9c0d1e4b5a67",
    "purpose": "marketing_email", "purposes": ["marketing_email"], "version": "2026-01", "policy_version": "2026-01",
    "policy_key": "privacy", "document_url": "https://acme.example/privacy", "name": "Acme",
    "document_sha256": "5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8",
    "allowed_origins": ["https://acme.example"], "url": "https://hooks.acme.example/consent",
    "default_lang": "en", "lang": "en", "title": "Marketing email", "provider": "acme.example",
    "lifetime": "session", "same_site": "Lax", "id": "rec_3f2a9c0d1e4b5a67a8b9", "tenant": "ten_1a2b3c4d5e6f7a8b",
    "record_hash": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08", "ip": "203.0.113.0",
    "subject_token": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiI0MiJ9.c2ln", "receipt": "eyJhbGciOiJFZERTQSJ9.eyJ9.c2ln",
    "kind": "consent", "legal_basis": "consent", "decision": "granted", "status": "granted",
}

# Whole examples for bodies whose rules span fields (one of two lists, a field only with another).
BODY_EXAMPLES: dict[str, Any] = {
    "ConsentIn": {"subject": {"user_id": "42", "email": "ada@example.com"}, "purpose": "marketing_email",
                  "decision": "granted", "policy_version": "2026-01", "source": "api",
                  "evidence": {"ip": "203.0.113.7", "form": "signup"}},
    "BulkCheckIn": {"purpose": "marketing_email", "emails": ["ada@example.com", "grace@example.com"]},
    "WebhookIn": {"url": "https://hooks.acme.example/consent", "event_types": ["consent.withdrawn"],
                  "description": "stop marketing mail"},
}


def tag_of(path: str) -> str:
    return next((tag for prefix, tag in TAGS if path.startswith(prefix)), "other")


def example_of(schema: dict[str, Any], defs: dict[str, Any], name: str = "", depth: int = 0) -> Any:
    """An example value for a JSON schema: named fields get realistic values, others the
    schema's default, first enum value or a placeholder of its type."""
    if "$ref" in schema:
        return example_of(defs.get(schema["$ref"].rsplit("/", 1)[-1], {}), defs, name, depth)
    if depth > 6:
        return None
    if name in FIELD_EXAMPLES and not (schema.get("type") == "object" and name not in ("evidence",)):
        value = FIELD_EXAMPLES[name]
        if "enum" not in schema or value in schema["enum"]:
            return value
    if "example" in schema:
        return schema["example"]
    if schema.get("default") is not None:
        return schema["default"]
    if "enum" in schema:
        return schema["enum"][0]
    if "const" in schema:
        return schema["const"]
    for key in ("anyOf", "oneOf", "allOf"):
        if key in schema:
            options = [o for o in schema[key] if o.get("type") != "null"] or schema[key]
            return example_of(options[0], defs, name, depth + 1)
    kind = schema.get("type")
    if kind == "object" or "properties" in schema:
        props = schema.get("properties", {})
        required = set(schema.get("required", []))
        return {k: example_of(v, defs, k, depth + 1) for k, v in props.items()
                if k in required or k in FIELD_EXAMPLES or depth == 0}
    if kind == "array":
        return [example_of(schema.get("items", {}), defs, name.rstrip("s"), depth + 1)]
    if kind == "integer":
        return schema.get("minimum", 1)
    if kind == "number":
        return 1.0
    if kind == "boolean":
        return False
    if schema.get("format") == "date-time":
        return "2026-01-15T09:30:00.000000Z"
    return "string"


def _query_param(q: Any) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "integer" if q.type is int else "string"}
    if q.type.__name__ == "datetime":
        schema["format"] = "date-time"
    if q.choices:
        schema["enum"] = list(q.choices)
    if q.minimum is not None:
        schema["minimum"] = q.minimum
    if q.maximum is not None:
        schema["maximum"] = q.maximum
    if q.type is str:
        schema["maxLength"] = q.max_length
    return {"name": q.name, "in": "query", "required": q.required, "schema": schema,
            "description": q.description}


def build_openapi(routes: list[Any]) -> dict[str, Any]:
    defs: dict[str, Any] = {}
    paths: dict[str, Any] = {}
    problem = {"application/problem+json": {"schema": _schema(Problem, defs, "serialization")}}
    for route in routes:
        if not isinstance(route, Route):
            continue
        meta: Meta | None = getattr(route.endpoint, "meta", None)
        if meta is None:
            continue
        for method in sorted((route.methods or set()) - {"HEAD"}):
            op: dict[str, Any] = {"operationId": route.name, "summary": meta.summary,
                                  "tags": [tag_of(route.path)], "description": _description(route, meta)}
            params = [_path_param(p) for p in route.param_convertors]
            params += [_query_param(q) for q in meta.query]
            params += [{"name": h, "in": "header", "required": False,
                        "schema": {"type": "string", "minLength": 1, "maxLength": 200}} for h in meta.headers]
            if meta.auth == "publishable":
                params.append({"name": "key", "in": "query", "required": False, "schema": {"type": "string"},
                               "description": "publishable key (or Authorization: Bearer pk_…)"})
            if params:
                op["parameters"] = params
            if meta.body is not None:
                body_schema = _schema(meta.body, defs, "validation")
                body_example = BODY_EXAMPLES.get(meta.body.__name__) or example_of(body_schema, defs)
                op["requestBody"] = {"required": True, "content": {
                    t: {"schema": body_schema, "example": body_example} for t in meta.media_types}}
            ok: dict[str, Any] = {"description": "success"}
            if meta.response is not None:
                out_schema = _schema(meta.response, defs, "serialization")
                ok["content"] = {"application/json": {"schema": out_schema, "example": example_of(out_schema, defs)}}
            else:
                ok["content"] = {media: {"schema": {}, "example": example}
                                 for media, example in _plain_examples(route.path, method).items()}
            responses: dict[str, Any] = {str(meta.status): ok}
            for code, text in meta.responses.items():
                responses.setdefault(str(code), {**ok, "description": text} if code < 300 else
                                     {"description": text, "content": problem})
            for status, text in ERRORS.items():
                responses.setdefault(status, {"description": text, "content": problem})
            op["responses"] = responses
            if meta.auth:
                op["security"] = [{"bearer": []}]
            paths.setdefault(route.path, {})[method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "Consent service", "version": __version__,
                 "description": "Consent and cookie-preference ledger with signed, offline-verifiable receipts. "
                                "Errors are RFC 9457 problem+json with a stable `code`."},
        "tags": [{"name": k, "description": v} for k, v in TAG_DESCRIPTIONS.items()],
        "paths": paths,
        "components": {"schemas": defs, "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }


def _path_param(name: str) -> dict[str, Any]:
    extra = dict(PATH_SCHEMAS.get(name, {}))
    description = extra.pop("description", "")
    example = extra.pop("example", None)
    out: dict[str, Any] = {"name": name, "in": "path", "required": True,
                           "schema": {"type": "string", "minLength": 1, **extra}}
    if description:
        out["description"] = description
    if example is not None:
        out["example"] = example
    return out


def _description(route: Route, meta: Meta) -> str:
    doc = (getattr(route.endpoint, "__doc__", None) or "").strip()
    text = " ".join(doc.split()) if doc else meta.summary + "."
    auth = AUTH_TEXT.get(meta.auth or "", "No key needed.")
    return f"{text}\n\n{auth}"


def _plain_examples(path: str, method: str) -> dict[str, Any]:
    """Media types and examples of an operation that declares no response model."""
    if path in ("/healthz", "/readyz"):
        return {"application/json": {"status": "ok"}}
    if path == "/metrics":
        return {"text/plain": 'consent_requests_total{route="/v1/check",status="200"} 1.0\n'}
    if path.endswith(".js"):
        return {"text/javascript": "/* the script */"}
    if path.endswith(".css"):
        return {"text/css": "/* the banner's styles */"}
    if path == "/v1/tlog/key":
        return {"text/plain": "consent.example+58dc9563+AYDBDL7I…\n"}
    if path.startswith("/v1/tlog/") and "/checkpoint" in path:
        return {"text/plain": "consent.example/tenants/ten_…\n42\nq1d…=\n\n\u2014 consent.example 58dc9563…\n"}
    if path == "/demo" or (method == "GET" and path.startswith(("/u/", "/c/"))):
        return {"text/html": "<!doctype html><html lang=en>…</html>"}
    line = '{"n":1,"id":"rec_3f2a9c0d1e4b5a67a8b9","record_hash":"9f86…"}\n{"manifest":"eyJ…"}\n'
    if path == "/v1/exports/consents":
        return {"application/x-ndjson": line, "text/csv": "n,v,id,tenant,subject,…\n1,1,rec_…\n"}
    if method == "GET" and path.endswith("/notices"):
        return {"application/x-ndjson": line}
    return {"application/json": {"items": [], "next_cursor": None}}


async def openapi_handler(request: Request) -> Response:
    app = request.app
    if not hasattr(app.state, "openapi"):
        app.state.openapi = build_openapi(app.routes)
    return JSONResponse(app.state.openapi)
