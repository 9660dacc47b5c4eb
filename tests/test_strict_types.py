"""Strict input types on every body: a boolean or a string where a number is expected (and a
number or a string where a boolean is) is a 422 naming the field, and nothing changes. The walk
covers every route of the routes table that declares a body, so bodies added later are covered."""

from __future__ import annotations

import typing
from typing import Any

from starlette.testclient import TestClient

from .helpers import Tenant, make_tenant
from .test_error_shape import assert_problem, endpoints, key_for

ORIGIN = "http://127.0.0.1:8000"


def kinds(annotation: Any) -> set[type]:
    """The scalar types a field's annotation admits (through Optional, Annotated, unions)."""
    if annotation in (int, bool, float):
        return {annotation}
    out: set[type] = set()
    for arg in typing.get_args(annotation):
        if typing.get_origin(annotation) is typing.Annotated and arg is not typing.get_args(annotation)[0]:
            continue
        out |= kinds(arg)
    return out


WRONG = {int: [True, False, "5", "1", 5.5, [1], {"n": 1}], bool: [1, 0, "true", "yes", None]}


def test_every_body_refuses_wrong_scalar_types(client: TestClient) -> None:
    checked = 0
    for method, path, meta in endpoints(client.app):
        model = getattr(meta, "body", None)
        if model is None:
            continue
        for name, info in model.model_fields.items():
            for kind in kinds(info.annotation) & set(WRONG):
                t = make_tenant(client, catalog=False)
                headers = {**key_for(meta, t), "Origin": ORIGIN}
                for value in WRONG[kind]:
                    if value is None and type(None) in set(typing.get_args(info.annotation)):
                        continue  # null is a declared value of an optional field
                    r = client.request(method, path, json={name: value}, headers=headers)
                    where = f"{method} {path} {name}={value!r}"
                    body = assert_problem(r, where)
                    if r.status_code == 404:
                        continue  # the path names nothing (checked with real paths below)
                    assert r.status_code == 422, f"{where}: {r.status_code} {body}"
                    assert any(e["field"].split(".")[0] == name for e in body["errors"]), f"{where}: {body}"
                    checked += 1
    assert checked >= 40  # the walk really met the numbers and booleans of the bodies


def test_retention_true_or_text_is_refused_and_nothing_changes(tenant: Tenant) -> None:
    assert tenant.put("/v1/tenant/retention", json={"evidence_retention_days": 90}).status_code == 200
    for value in (True, "5", 5.0, "90"):
        r = tenant.put("/v1/tenant/retention", json={"evidence_retention_days": value})
        assert r.status_code == 422, (value, r.text)
        assert r.json()["errors"][0]["field"] == "evidence_retention_days"
        assert tenant.get("/v1/tenant/retention").json()["evidence_retention_days"] == 90
    r = tenant.put("/v1/tenant/retention", json={"record_retention_years": False})
    assert r.status_code == 422 and tenant.get("/v1/tenant/retention").json()["record_retention_years"] is None


def test_real_paths_refuse_wrong_types_and_keep_their_state(tenant: Tenant) -> None:
    before = tenant.get("/v1/purposes").json()
    r = tenant.put("/v1/purposes/marketing_email", json={"double_opt_in": 1, "title": "x"})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "double_opt_in"
    assert tenant.get("/v1/purposes").json() == before
    r = tenant.put("/v1/cookies/session", json={"provider": "Acme", "purpose": "strictly_necessary",
                                                "lifetime": "3600"})
    assert r.status_code == 422 and r.json()["errors"][0]["field"].startswith("lifetime")
    r = tenant.post("/v1/email-links", json={"subject": {"email": "a@b.c"}, "purpose": "marketing_email",
                                             "confirm_days": "7"})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "confirm_days"
    # a time is still RFC 3339 text
    r = tenant.record(source="import", recorded_at="2025-01-01T00:00:00Z", policy_version="v1",
                      email="t@example.com")
    assert r["recorded_at"].startswith("2025-01-01")
