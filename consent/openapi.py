"""/openapi.json, built from the routes table and each endpoint's declared Meta, so the
document cannot drift from what the handlers actually parse and return."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from . import __version__
from .http import JSONResponse, Meta
from .schemas import Problem

REF = "#/components/schemas/{model}"
ERRORS = {
    "400": "malformed request", "401": "missing or invalid key", "403": "wrong key type",
    "404": "not found", "409": "conflict", "413": "body too large", "415": "wrong content type",
    "422": "validation failed", "429": "rate limited",
}


def _schema(model: type[BaseModel], defs: dict[str, Any], mode: str) -> dict[str, Any]:
    schema = model.model_json_schema(ref_template=REF, mode=mode)  # type: ignore[arg-type]
    for name, sub in schema.pop("$defs", {}).items():
        defs.setdefault(name, sub)
    defs.setdefault(model.__name__, schema)
    return {"$ref": REF.format(model=model.__name__)}


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
            op: dict[str, Any] = {"operationId": route.name, "summary": meta.summary}
            params = [{"name": p, "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}}
                      for p in route.param_convertors]
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
                op["requestBody"] = {"required": True, "content": {t: {"schema": body_schema} for t in meta.media_types}}
            ok: dict[str, Any] = {"description": "success"}
            if meta.response is not None:
                ok["content"] = {"application/json": {"schema": _schema(meta.response, defs, "serialization")}}
            responses: dict[str, Any] = {str(meta.status): ok}
            for code, text in meta.responses.items():
                responses.setdefault(str(code), {**ok, "description": text} if code < 300 else
                                     {"description": text, "content": problem})
            for code, text in ERRORS.items():
                responses.setdefault(code, {"description": text, "content": problem})
            op["responses"] = responses
            if meta.auth:
                op["security"] = [{"bearer": []}]
            paths.setdefault(route.path, {})[method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "Consent service", "version": __version__},
        "paths": paths,
        "components": {"schemas": defs, "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }


async def openapi_handler(request: Request) -> Response:
    app = request.app
    if not hasattr(app.state, "openapi"):
        app.state.openapi = build_openapi(app.routes)
    return JSONResponse(app.state.openapi)
