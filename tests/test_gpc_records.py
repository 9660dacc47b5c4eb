"""GPC in every record it touched, through HTTP on SQLite and PostgreSQL: the record hash, the
receipt, check and state answers (fast path and route alike), exports (JSONL and CSV, verified
offline), an explicit opt-in over the signal kept and marked, and GET /v1/snippet/gpc."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest
from starlette.testclient import TestClient

from consent import crypto
from consent.cli.main import main
from consent.store.models import utcnow
from consent.web.app import create_app

from .conftest import settings_for
from .helpers import Tenant, make_tenant
from .test_snippet_api import ORIGIN, choice, submit


@pytest.fixture(scope="module")
def route_client(db_url: str) -> Iterator[TestClient]:
    with TestClient(create_app(settings_for(db_url))) as c:
        yield c


def gpc_status(t: Tenant, anon: str, *, signal: bool) -> dict:
    r = t.client.get("/v1/snippet/gpc", params={"key": t.publishable_key, "anonymous_id": anon},
                     headers={"Origin": ORIGIN, **({"Sec-GPC": "1"} if signal else {})})
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == ORIGIN
    return dict(r.json())


def both_checks(t: Tenant, route: TestClient, purpose: str, anon: str) -> dict:
    fast = t.check(purpose, anonymous_id=anon)
    slow = route.get("/v1/check", params={"purpose": purpose, "anonymous_id": anon}, headers=t.h).json()
    assert fast == slow
    return fast


def test_gpc_is_recorded_hashed_signed_answered_and_exported(client: TestClient, route_client: TestClient,
                                                              tmp_path: Path, capsys) -> None:
    t = make_tenant(client)
    anon = "a_gpc_rec1"
    assert gpc_status(t, anon, signal=True) == {
        "signal": True, "honored": False, "message": None,
        "purposes": [{"purpose": "analytics", "status": "none", "gpc": False, "opted_out": False},
                     {"purpose": "marketing_email", "status": "none", "gpc": False, "opted_out": False}]}
    # The signal is on: the snippet's GPC denial, and an explicit opt-in the visitor made anyway.
    r = submit(t, [choice("marketing_email", "denied"), choice("analytics", "granted")], anon=anon,
               headers={"Sec-GPC": "1"})
    assert r.status_code == 201, r.text
    records = {x["purpose"]: x for x in r.json()["records"]}
    assert records["marketing_email"]["source"] == "gpc" and records["analytics"]["source"] == "snippet"
    for rec in records.values():
        assert jwt.decode(rec["receipt"], options={"verify_signature": False})["gpc"] is True
    denied = both_checks(t, route_client, "marketing_email", anon)
    assert (denied["status"], denied["gpc"]) == ("denied", True)
    kept = both_checks(t, route_client, "analytics", anon)
    assert (kept["status"], kept["allowed"], kept["gpc"]) == ("granted", True, True)  # kept, and marked
    states = {s["purpose"]: s for s in t.get(f"/v1/subjects/{kept['subject']}/consents").json()["purposes"]}
    assert states["analytics"]["gpc"] is True and states["strictly_necessary"]["gpc"] is False
    at = t.check("analytics", anonymous_id=anon, at=crypto.iso(utcnow()))
    assert at["gpc"] is True
    status = gpc_status(t, anon, signal=True)
    assert status["honored"] is False and status["message"] is None  # the visitor opted in to analytics
    # The visitor withdraws the opt-in (signal still on): now the signal is honoured.
    submit(t, [choice("analytics", "withdrawn")], anon=anon, headers={"Sec-GPC": "1"})
    status = gpc_status(t, anon, signal=True)
    assert status["honored"] is True and status["message"] == "Opt-Out Preference Signal Honored"
    assert all(p["opted_out"] and p["gpc"] for p in status["purposes"])
    assert gpc_status(t, anon, signal=False)["honored"] is False
    # A later decision without the signal clears the mark (the route and the fast record path).
    rec = t.record("marketing_email", "granted", anonymous_id=anon)
    assert "gpc" not in jwt.decode(rec["receipt"], options={"verify_signature": False})
    assert both_checks(t, route_client, "marketing_email", anon)["gpc"] is False
    t.record("marketing_email", "granted", anonymous_id="a_plain")

    # Exports: "gpc": true is part of the hashed line of exactly the GPC records; both verify.
    jwks = tmp_path / "jwks.json"
    jwks.write_text(client.get("/.well-known/jwks.json").text)
    path = tmp_path / "e.jsonl"
    path.write_bytes(t.get("/v1/exports/consents").content)
    lines = [json.loads(x) for x in path.read_bytes().splitlines()]
    flagged = [x for x in lines if x.get("gpc")]
    assert {x["source"] for x in flagged} == {"gpc", "snippet"} and len(flagged) == 3
    assert main(["verify", str(path), "--jwks", str(jwks)]) == 0, capsys.readouterr().err
    capsys.readouterr()
    raw = path.read_bytes().replace(b',"gpc":true', b"", 1)  # deny the signal was there
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(raw)
    assert main(["verify", str(bad), "--jwks", str(jwks)]) == 1
    assert "record hash does not match" in capsys.readouterr().err
    r = t.get("/v1/exports/consents", params={"format": "csv"})
    csv_path = tmp_path / "e.csv"
    csv_path.write_bytes(r.content)
    manifest = t.get(f"/v1/exports/{r.headers['consent-export-id']}/manifest")
    (tmp_path / "e.csv.manifest").write_text(json.dumps(manifest.json()))
    header, *rows = csv_path.read_text().splitlines()
    gpc_col = header.split(",").index("gpc")
    assert sum(row.split(",")[gpc_col] == "true" for row in rows) == 3
    assert main(["verify", str(csv_path), "--jwks", str(jwks)]) == 0, capsys.readouterr().err


def test_gpc_status_needs_an_allowed_origin(tenant: Tenant) -> None:
    r = tenant.client.get("/v1/snippet/gpc", params={"key": tenant.publishable_key, "anonymous_id": "a_x"},
                          headers={"Origin": "https://evil.example", "Sec-GPC": "1"})
    assert r.status_code == 403 and r.json()["code"] == "origin_not_allowed"
    r = tenant.client.get("/v1/snippet/gpc", params={"key": tenant.publishable_key, "gpc": "maybe"},
                          headers={"Origin": ORIGIN})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "gpc"
    r = tenant.client.get("/v1/snippet/gpc", params={"key": tenant.publishable_key, "gpc": "true"},
                          headers={"Origin": ORIGIN})
    assert r.json()["signal"] is True and r.json()["honored"] is False  # no visitor, nothing opted out yet
