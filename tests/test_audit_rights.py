"""As-of answers against a hand-built timeline, the access export, erasure (then export,
verify and check) and retention, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import jwt
import pytest
import sqlalchemy as sa

from consent.audit import retention
from consent.cli.main import main
from consent.store.models import utcnow
from consent.web.http import parse_time

from .helpers import ADMIN, Tenant, make_tenant
from .test_audit_export import export, jwks_file, verify


def imported(t: Tenant, decision: str, at: str, purpose: str = "marketing_email", **subject: str) -> dict:
    return t.record(purpose, decision, source="import", recorded_at=at, policy_version="v1",
                    **(subject or {"email": "tl@example.com"}))


def test_as_of_answers_follow_the_timeline(client) -> None:
    t = make_tenant(client)
    r1 = imported(t, "granted", "2025-01-01T00:00:00Z")
    r2 = imported(t, "withdrawn", "2025-03-01T00:00:00Z")
    r3 = imported(t, "granted", "2025-06-01T00:00:00Z")
    r0 = imported(t, "denied", "2024-06-01T00:00:00Z")  # imported last, happened first

    def at(when: str, **who: str) -> dict:
        return t.check(at=when, **(who or {"email": "tl@example.com"}))

    assert at("2024-01-01T00:00:00Z")["status"] == "none"
    c = at("2024-07-01T00:00:00Z")
    assert (c["status"], c["record_id"], c["receipt"]) == ("denied", r0["id"], r0["receipt"])
    c = at("2025-01-01T00:00:00Z")  # inclusive
    assert (c["status"], c["allowed"], c["record_id"], c["receipt"]) == ("granted", True, r1["id"], r1["receipt"])
    assert at("2025-02-15T12:00:00+01:00")["record_id"] == r1["id"]
    c = at("2025-04-01T00:00:00Z")
    assert (c["status"], c["allowed"], c["record_id"]) == ("withdrawn", False, r2["id"])
    assert at("2025-07-01T00:00:00Z")["record_id"] == r3["id"]
    assert t.check(email="tl@example.com")["status"] == "granted"  # now, the hot path
    sid = c["subject"]
    assert at("2025-04-01T00:00:00Z", subject=sid)["status"] == "withdrawn"
    # staleness as of T: a material version counts only once in effect
    v2 = t.publish("v2", material=True)  # notice_days=0: effective now
    assert t.check(email="tl@example.com")["status"] == "stale"
    assert at("2025-07-01T00:00:00Z")["status"] == "granted"
    after = (parse_time("x", v2["effective_at"]) + timedelta(microseconds=1)).isoformat()
    assert at(after)["status"] == "stale"
    # the whole subject as of T, with a receipt naming the time
    r = t.get(f"/v1/subjects/{sid}/consents", params={"at": "2025-04-01T00:00:00Z"})
    assert r.status_code == 200
    states = {s["purpose"]: s for s in r.json()["purposes"]}
    assert states["marketing_email"]["status"] == "withdrawn" and states["marketing_email"]["receipt"] == r2["receipt"]
    assert states["analytics"]["status"] == "none"
    claims = jwt.decode(r.json()["receipt"], options={"verify_signature": False})
    assert claims["as_of"] == "2025-04-01T00:00:00.000000Z"
    assert t.get(f"/v1/subjects/{sid}/consents").json()["purposes"][1]["status"] in ("stale", "none")
    for bad in ("tomorrow", "2025-01-01T00:00:00", (utcnow() + timedelta(days=1)).isoformat()):
        r = t.get("/v1/check", params={"purpose": "marketing_email", "email": "tl@example.com", "at": bad})
        assert r.status_code == 422 and r.json()["errors"][0]["field"] == "at", bad
    assert t.get(f"/v1/subjects/{sid}/consents", params={"at": "x"}).status_code == 422


def test_access_export_json_and_markdown(tenant: Tenant) -> None:
    rec = tenant.record(email="Ada@Example.com", user_id="ada-1", evidence={"ip": "203.0.113.9", "user_agent": "UA/9"})
    tenant.record("strictly_necessary", "acknowledged", user_id="ada-1")
    r = tenant.get("/v1/subjects/email:ada@example.com/export")
    assert r.status_code == 200
    data = r.json()
    assert {(i["kind"], i["value"]) for i in data["identifiers"]} == {("email", "ada@example.com"), ("user", "ada-1")}
    assert data["records"][0]["id"] == rec["id"]
    assert data["records"][0]["evidence"] == {"ip": "203.0.113.0", "user_agent": "UA/9"}
    assert data["records"][1]["disclosures"][0]["name"] == "session"
    assert data["records"][0]["receipt"] == rec["receipt"] and data["state_receipt"]
    assert {s["purpose"]: s["status"] for s in data["state"]}["strictly_necessary"] == "acknowledged"
    assert data["chain_head"] == data["records"][-1]["record_hash"]
    md = tenant.get("/v1/subjects/ada-1/export", headers={"Accept": "text/markdown"})
    assert md.status_code == 200 and md.headers["content-type"].startswith("text/markdown")
    text = md.text
    assert text.startswith("# Data held about subject") and "ada@example.com" in text and "UA/9" in text
    assert "## Every recorded decision" in text and rec["receipt"] in text
    assert tenant.get("/v1/subjects/email:nobody@example.com/export").status_code == 404


def test_erasure_then_export_verify_and_check(tenant: Tenant, db_url: str, tmp_path: Path, capsys) -> None:
    tenant.record(email="eve@example.com", user_id="eve-1", anonymous_id="anon-eve",
                  evidence={"ip": "198.51.100.7", "user_agent": "UA/eve"})
    tenant.record("analytics", email="eve@example.com")
    tenant.record(email="bob@example.com")
    before = tenant.check(email="eve@example.com")
    sid = before["subject"]
    r = tenant.delete("/v1/subjects/email:eve@example.com")
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["subject"] == sid and out["identifiers_removed"] == 3 and out["evidence_cleared"] == 2
    assert out["record"]["prev_hash"] and out["record"]["receipt"]
    for who in ({"email": "eve@example.com"}, {"subject": "eve-1"}, {"anonymous_id": "anon-eve"}):
        c = tenant.check(**who)
        assert c["status"] == "none" and c["subject"] is None, who
    assert tenant.get("/v1/subjects/email:eve@example.com/export").status_code == 404
    assert tenant.check(email="bob@example.com")["status"] == "granted"
    # erasing again is a no-op answered 200; the erasure record is not repeated
    again = tenant.delete(f"/v1/subjects/{sid}")
    assert again.status_code == 200 and again.json()["record"]["id"] == out["record"]["id"]
    assert tenant.delete("/v1/subjects/email:eve@example.com").status_code == 404
    data = tenant.get(f"/v1/subjects/{sid}/export").json()
    assert data["identifiers"] == [] and data["erased_at"]
    assert all(x["evidence"] is None for x in data["records"][:-1])
    assert data["records"][-1]["decision"] == "erased" and data["records"][-1]["evidence"] == {}
    assert "eve@example.com" not in json.dumps(data) and "UA/eve" not in json.dumps(data)
    engine = sa.create_engine(db_url)
    with engine.connect() as conn:
        held = conn.execute(sa.text("SELECT count(*) FROM subject_identifier WHERE subject_id = :s"), {"s": sid}).scalar()
        ev = conn.execute(sa.text("SELECT count(*) FROM consent_record WHERE subject_id = :s AND evidence IS NOT NULL"),
                          {"s": sid}).scalar()
    engine.dispose()
    assert held == 0 and ev == 1  # only the erasure record's own empty evidence
    path = export(tenant, tmp_path)
    text = path.read_text()
    assert "eve" not in text and data["pseudonym"] in text
    code, out_, err = verify(path, jwks_file(tenant, tmp_path), capsys)
    assert code == 0 and json.loads(out_)["records"] == 4, err
    # the same email later is a new person with a fresh chain
    new = tenant.record(email="eve@example.com")
    assert new["subject"] != sid and new["prev_hash"] is None


def test_retention_purges_evidence_idempotently(client, settings, tmp_path: Path, monkeypatch, capsys) -> None:
    t = make_tenant(client)
    old = (utcnow() - timedelta(days=60)).isoformat()
    a = t.record(source="import", recorded_at=old, policy_version="v1", email="r@example.com", evidence={"ip": "192.0.2.1", "user_agent": "Old"})
    b = t.record("analytics", email="r@example.com", evidence={"ip": "192.0.2.1", "user_agent": "New"})
    r = t.put("/v1/tenant/retention", json={"evidence_retention_days": 30})
    assert r.status_code == 200 and r.json()["evidence_retention_days"] == 30
    assert t.get("/v1/tenant/retention").json()["record_retention_years"] is None
    assert t.put("/v1/tenant/retention", json={"evidence_retention_days": 0}).status_code == 422
    assert t.put("/v1/tenant/retention", json={"keep": 1}).status_code == 422
    monkeypatch.setenv("CONSENT_DATABASE_URL", settings.database_url)
    assert main(["retention", "run", "--batch", "1"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["evidence_purged"] >= 1 and first["skipped"] is False
    records = {x["id"]: x for x in t.get("/v1/subjects/email:r@example.com/export").json()["records"]}
    assert records[a["id"]]["evidence"] is None and records[a["id"]]["evidence_sha256"]
    assert records[b["id"]]["evidence"]["user_agent"] == "New"
    engine = client.app.state.services.engine
    assert retention.run(engine).evidence_purged == 0  # idempotent
    assert t.check(email="r@example.com")["status"] == "granted"  # decisions are kept
    code, _, err = verify(export(t, tmp_path), jwks_file(t, tmp_path), capsys)
    assert code == 0, err


def test_retention_drops_closed_tenants_after_years(client, tmp_path: Path, capsys) -> None:
    closed, kept = make_tenant(client), make_tenant(client)
    for t in (closed, kept):
        t.record(email="c@example.com")
        t.record(email="c@example.com", decision="withdrawn")
        t.put("/v1/tenant/retention", json={"record_retention_years": 1})
    assert client.post(f"/v1/tenants/{closed.id}/close", headers=closed.h).status_code == 403
    r = client.post(f"/v1/tenants/{closed.id}/close", headers=ADMIN)
    assert r.status_code == 200 and r.json()["closed_at"]
    assert client.post("/v1/tenants/ten_nope/close", headers=ADMIN).status_code == 404
    engine = client.app.state.services.engine
    assert retention.run(engine).tenants_dropped == 0  # closed only just now
    result = retention.run(engine, now=utcnow() + timedelta(days=800), batch=1)
    assert result.tenants_dropped >= 1 and result.records_dropped >= 2
    assert retention.run(engine, now=utcnow() + timedelta(days=800)).records_dropped == 0
    assert closed.get("/v1/tenant").status_code == 401  # closing stopped every key it had
    with engine.connect() as conn:
        left = conn.execute(sa.text("SELECT count(*) FROM consent_record WHERE tenant_id = :t"),
                            {"t": closed.id}).scalar()
    assert left == 0
    assert kept.check(email="c@example.com")["status"] == "withdrawn"
    path = export(kept, tmp_path)
    code, out, err = verify(path, jwks_file(kept, tmp_path), capsys)
    assert code == 0 and json.loads(out)["records"] == 2, err


def test_retention_runs_once_across_hosts(client, backend: str) -> None:
    if backend != "postgresql":
        pytest.skip("SQLite serialises writers; the advisory lock is PostgreSQL's")
    engine = client.app.state.services.engine
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.pg_try_advisory_lock(retention.LOCK_KEY))).scalar()
        try:
            assert retention.run(engine).skipped is True
        finally:
            conn.execute(sa.select(sa.func.pg_advisory_unlock(retention.LOCK_KEY)))
            conn.commit()
    assert retention.run(engine).skipped is False
