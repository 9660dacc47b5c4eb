"""Ledger exports on SQLite and PostgreSQL: streamed, verified offline by `consent verify`,
and rejected, naming the first bad line, after every kind of tampering."""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from consent.audit import exports
from consent.cli.main import main
from consent.crypto import generate_signing_key

from .conftest import free_port
from .helpers import Tenant
from .ledger_factory import generate_ledger


def build_ledger(t: Tenant, generated: int = 300) -> None:
    t.record(email="ada@example.com", evidence={"ip": "203.0.113.9", "user_agent": "UA/1"})
    t.record("strictly_necessary", "acknowledged", email="ada@example.com")
    t.record(decision="withdrawn", email="ada@example.com")
    t.record("analytics", user_id="u-1", anonymous_id="anon-1")
    generate_ledger(t.client.app.state.services.engine, t.id, generated)
    t.record(decision="granted", email="ada@example.com")  # a chain spanning the generated block


def export(t: Tenant, tmp: Path, name: str = "export.jsonl", **params: str) -> Path:
    r = t.get("/v1/exports/consents", params=params)
    assert r.status_code == 200, r.text
    fmt = params.get("format", "jsonl")
    assert r.headers["content-type"].startswith("application/x-ndjson" if fmt == "jsonl" else "text/csv")
    path = tmp / name
    path.write_bytes(r.content)
    if fmt == "csv":
        m = t.get(f"/v1/exports/{r.headers['consent-export-id']}/manifest")
        assert m.status_code == 200
        (tmp / f"{name}.manifest").write_text(json.dumps(m.json()))
    return path


def jwks_file(t: Tenant, tmp: Path) -> Path:
    path = tmp / "jwks.json"
    path.write_text(t.client.get("/.well-known/jwks.json").text)
    return path


def verify(path: Path, jwks: Path | str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["verify", str(path), "--jwks", str(jwks)])
    out, err = capsys.readouterr()
    return code, out, err


def test_export_verifies_then_every_tampering_is_named(tenant: Tenant, tmp_path: Path, capsys) -> None:
    build_ledger(tenant)
    path = export(tenant, tmp_path)
    jwks = jwks_file(tenant, tmp_path)
    code, out, err = verify(path, jwks, capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["records"] == 305 and report["receipts_verified"] == 305 and report["partial"] is False
    lines = path.read_bytes().splitlines(keepends=True)
    refs = report["references"]  # the policy documents (and disclosures) the records point to
    assert refs >= 1 and len(lines) == 305 + refs + 1 and json.loads(lines[-1]).keys() == {"manifest"}
    first = json.loads(lines[0])
    assert first["n"] == 1 and first["prev_hash"] is None and "ada@example.com" not in path.read_text()

    def rejected(new_lines: list[bytes], line: int, why: str = "") -> None:
        bad = tmp_path / "bad.jsonl"
        bad.write_bytes(b"".join(new_lines))
        code, _, err = verify(bad, jwks, capsys)
        assert code == 1 and f"line {line}:" in err and why in err, err

    k = 40  # a line in the middle (0-based index 39)
    for pos in (20, 200, len(lines[k - 1]) // 2, len(lines[k - 1]) - 3):  # field, hash, receipt, signature
        flipped = bytearray(lines[k - 1])
        flipped[pos] ^= 0x01
        rejected(lines[:k - 1] + [bytes(flipped)] + lines[k:], k)
    rejected(lines[:k - 1] + lines[k:], k, "removed, duplicated or moved")  # removed
    rejected(lines[:k] + [lines[k - 1]] + lines[k:], k + 1, "removed, duplicated or moved")  # duplicated
    moved = lines[:k - 1] + lines[k:k + 5] + [lines[k - 1]] + lines[k + 5:]
    rejected(moved, k, "removed, duplicated or moved")
    swapped = lines[:303] + [lines[304], lines[303]] + lines[305:]  # the last two records swapped
    rejected(swapped, 304)
    rejected(lines[:305] + lines[306:], 1, "is not in the export")  # a policy document left out
    rejected(lines[:306] + [lines[305]] + lines[306:], 307, "listed twice")
    rejected(lines[:305] + [lines[305].replace(b"https://", b"http://")] + lines[306:], len(lines), "body")
    rejected(lines[:-1], len(lines), "no manifest")  # truncated
    last = json.loads(lines[-1])
    forged = last["manifest"][:-8] + ("A" if last["manifest"][-8] != "A" else "B") + last["manifest"][-7:]
    rejected(lines[:-1] + [json.dumps({"manifest": forged}, separators=(",", ":")).encode() + b"\n"], len(lines))
    rejected(lines + [lines[0]], len(lines) + 1, "after the manifest")


def test_receipts_need_the_services_keys(tenant: Tenant, tmp_path: Path, capsys) -> None:
    tenant.record(email="k@example.com")
    path = export(tenant, tmp_path)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"keys": [generate_signing_key().public_jwk]}))
    code, _, err = verify(path, other, capsys)
    assert code == 1 and "line 1: receipt does not verify" in err


def test_verify_fetches_jwks_by_url(tenant: Tenant, tmp_path: Path, capsys) -> None:
    tenant.record(email="url@example.com")
    path = export(tenant, tmp_path)
    body = tenant.client.get("/.well-known/jwks.json").content

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", free_port()), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        code, _, err = verify(path, f"http://127.0.0.1:{server.server_port}/.well-known/jwks.json", capsys)
    finally:
        server.shutdown()
        server.server_close()
    assert code == 0, err


def test_filtered_exports_hold_partial_chains(tenant: Tenant, tmp_path: Path, capsys) -> None:
    build_ledger(tenant, generated=120)
    jwks = jwks_file(tenant, tmp_path)
    path = export(tenant, tmp_path, "m.jsonl", purpose="marketing_email")
    code, out, err = verify(path, jwks, capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["partial"] is True and report["filters"]["purpose"] == "marketing_email"
    lines = [x for x in (json.loads(y) for y in path.read_bytes().splitlines()[:-1]) if "n" in x]  # records
    assert {x["purpose"] for x in lines} == {"marketing_email"}
    assert any(x["prev_hash"] and not x["linked"] for x in lines)  # anchors outside the export
    assert any(x["linked"] for x in lines)
    # a time window: generated records are in 2024, API records now
    path = export(tenant, tmp_path, "w.jsonl", **{"from": "2024-01-01T00:00:00.050Z", "to": "2024-01-01T00:00:00.090Z"})
    code, out, err = verify(path, jwks, capsys)
    assert code == 0 and json.loads(out)["records"] == 40, err
    bad = tmp_path / "w-bad.jsonl"
    raw = path.read_bytes().splitlines(keepends=True)
    bad.write_bytes(b"".join(raw[:4] + raw[5:]))
    code, _, err = verify(bad, jwks, capsys)
    assert code == 1 and "line 5:" in err


@pytest.mark.parametrize("purpose", [None, "marketing_email"], ids=["whole", "filtered"])
def test_records_written_while_an_export_streams_are_not_in_it(tenant: Tenant, tmp_path: Path, capsys, monkeypatch,
                                                               purpose: str | None) -> None:
    """An export is the ledger as it was when the export began. A record committed after that
    but before the chain heads are read on their own connection (SQLite cannot share the
    export's snapshot with it; PostgreSQL imports it) moves a chain head that is already in the
    export: neither the lines nor the manifest may show it, and the export verifies."""
    build_ledger(tenant, generated=60)
    params = {"purpose": purpose} if purpose else {}
    before = export(tenant, tmp_path, "before.jsonl", **params).read_bytes().splitlines(keepends=True)
    services = tenant.client.app.state.services
    run_heads = exports._Heads._run

    def write_first(self: exports._Heads, engine: Any, snapshot: str | None) -> None:
        tenant.record(decision="withdrawn", email="ada@example.com")  # ada's chain is in the export
        run_heads(self, engine, snapshot)

    monkeypatch.setattr(exports._Heads, "_run", write_first)
    flt = exports.ExportFilter(tenant.id, purpose=purpose)
    body = b"".join(exports.stream_export(services.engine, flt, "jsonl", signer=services.signer,
                                          issuer=services.settings.issuer, export_id=exports.new_export_id()))
    monkeypatch.setattr(exports._Heads, "_run", run_heads)
    assert body.splitlines(keepends=True)[:-1] == before[:-1]  # the same lines; its own manifest
    path = tmp_path / "during.jsonl"
    path.write_bytes(body)
    jwks = jwks_file(tenant, tmp_path)
    code, out, err = verify(path, jwks, capsys)
    records = sum(x.startswith(b'{"confirmed":') for x in before)
    assert code == 0 and json.loads(out)["records"] == records, err
    after = export(tenant, tmp_path, "after.jsonl", **params)
    code, out, err = verify(after, jwks, capsys)
    assert code == 0 and json.loads(out)["records"] == records + 1, err


def test_csv_export_with_manifest_route(tenant: Tenant, tmp_path: Path, capsys) -> None:
    build_ledger(tenant, generated=50)
    jwks = jwks_file(tenant, tmp_path)
    path = export(tenant, tmp_path, "e.csv", format="csv")
    code, out, err = verify(path, jwks, capsys)
    assert code == 0 and json.loads(out)["records"] == 55, err
    rows = path.read_bytes().splitlines(keepends=True)
    assert rows[0].startswith(b"n,linked,v,id,tenant,subject")
    flipped = bytearray(rows[10])
    flipped[60] ^= 0x02
    (tmp_path / "bad.csv").write_bytes(b"".join(rows[:10] + [bytes(flipped)] + rows[11:]))
    (tmp_path / "bad.csv.manifest").write_text((tmp_path / "e.csv.manifest").read_text())
    code, _, err = verify(tmp_path / "bad.csv", jwks, capsys)
    assert code == 1 and "line 11:" in err
    (tmp_path / "bad.csv").write_bytes(b"".join(rows[:10] + rows[11:]))
    code, _, err = verify(tmp_path / "bad.csv", jwks, capsys)
    assert code == 1 and "line 11:" in err and "removed" in err


def test_cli_export_writes_the_same_file(tenant: Tenant, settings, tmp_path: Path, monkeypatch, capsys) -> None:
    build_ledger(tenant, generated=30)
    monkeypatch.setenv("CONSENT_DATABASE_URL", settings.database_url)
    out = tmp_path / "cli.jsonl"
    assert main(["export", "--out", str(out), "--tenant", tenant.id]) == 0
    assert "exported 35 records" in capsys.readouterr().err  # stderr is not a TTY: no progress bar
    jwks = jwks_file(tenant, tmp_path)
    # the real command line, as an auditor would run it
    proc = subprocess.run([sys.executable, "-m", "consent.cli.main", "verify", str(out), "--jwks", str(jwks)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["records"] == 35
    assert main(["export", "--out", str(tmp_path / "x.csv"), "--tenant", tenant.id, "--format", "csv",
                 "--purpose", "analytics"]) == 0
    capsys.readouterr()
    code, _, err = verify(tmp_path / "x.csv", jwks, capsys)
    assert code == 0, err
    assert main(["export", "--out", str(out), "--tenant", "ten_nope"]) == 2


@pytest.mark.parametrize("params,field", [
    ({"format": "xml"}, "format"),
    ({"from": "yesterday"}, "from"),
    ({"from": "2025-01-02T00:00:00Z", "to": "2025-01-01T00:00:00Z"}, "to"),
    ({"purpose": "nope"}, "purpose"),
])
def test_export_bad_input_is_problem_json(tenant: Tenant, params, field) -> None:
    r = tenant.get("/v1/exports/consents", params=params)
    assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json"
    assert r.json()["errors"][0]["field"] == field


def test_export_auth_and_manifest_isolation(client, tenant: Tenant) -> None:
    from .helpers import make_tenant

    r = client.get("/v1/exports/consents")
    assert r.status_code == 401 and r.headers["content-type"] == "application/problem+json"
    r = client.get("/v1/exports/consents", headers={"Authorization": f"Bearer {tenant.publishable_key}"})
    assert r.status_code == 403
    tenant.record(email="iso@example.com")
    r = tenant.get("/v1/exports/consents")
    export_id = r.headers["consent-export-id"]
    assert tenant.get(f"/v1/exports/{export_id}/manifest").json()["count"] == 1
    other = make_tenant(client)
    assert other.get(f"/v1/exports/{export_id}/manifest").status_code == 404
    assert other.get("/v1/exports/consents").content.count(b"\n") == 1  # only its (empty) manifest


def test_migrations_round_trip_with_export_tables(tmp_path: Path) -> None:
    import sqlalchemy as sa

    from consent.store import db

    url = f"sqlite:///{tmp_path / 'm.db'}"
    db.migrate(url)
    db.downgrade(url, "base")
    db.migrate(url)
    engine = sa.create_engine(url)
    try:
        insp = sa.inspect(engine)
        assert "export_manifest" in insp.get_table_names()
        assert "ix_consent_record_tenant_id_seq" in {i["name"] for i in insp.get_indexes("consent_record")}
    finally:
        engine.dispose()


def test_progress_bar_only_on_a_terminal() -> None:
    import io

    from consent.cli.audit import Progress

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty, pipe = Tty(), io.StringIO()
    for stream in (tty, pipe):
        bar = Progress(200, stream)
        bar(100)
        bar(200)
        bar.close()
    assert "100/200 records" in tty.getvalue() and tty.getvalue().endswith("200/200 records\n")
    assert pipe.getvalue() == ""
