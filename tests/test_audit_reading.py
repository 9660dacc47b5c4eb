"""An auditor holding only an export file (JSONL or CSV) reads who saw which cookie text under
which policy version and when, and `consent verify` proves every piece of it. Nothing here asks
the API anything after the export is written."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from pathlib import Path

from consent.cli.main import main

from .helpers import Tenant


def make_history(t: Tenant) -> dict[str, str]:
    """Two people acknowledge the necessary cookies, one under v1 and one under v2, whose
    cookie text changed; returns their subject ids."""
    alice = t.record("strictly_necessary", "acknowledged", email="alice@example.com")["subject"]
    r = t.put("/v1/cookies/session", json={"provider": "acme.test", "purpose": "strictly_necessary",
                                           "http_only": True, "secure": True, "same_site": "Lax",
                                           "lifetime": "session", "description": "Keeps you signed in for 8 hours"})
    assert r.status_code == 200, r.text
    t.publish("v2", material=True, purposes=["strictly_necessary", "marketing_email", "analytics",
                                             "product_updates"])
    bob = t.record("strictly_necessary", "acknowledged", email="bob@example.com")["subject"]
    t.record("marketing_email", "granted", email="bob@example.com")
    return {"alice": alice, "bob": bob}


def pseudonyms(t: Tenant, people: dict[str, str]) -> dict[str, str]:
    """Whom a pseudonym stands for: what the tenant tells the auditor (the access export)."""
    return {t.get(f"/v1/subjects/{sid}/export").json()["pseudonym"]: name for name, sid in people.items()}


def test_an_auditor_reads_who_saw_which_text_from_the_jsonl_alone(tenant: Tenant, tmp_path: Path, capsys) -> None:
    people = make_history(tenant)
    who = pseudonyms(tenant, people)
    path = tmp_path / "ledger.jsonl"
    path.write_bytes(tenant.get("/v1/exports/consents").content)
    jwks = tmp_path / "jwks.json"
    jwks.write_text(tenant.client.get("/.well-known/jwks.json").text)

    # The auditor's reading: the file alone.
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    documents = {(x["policy_document"]["key"], x["policy_document"]["version"]): x["policy_document"]
                 for x in lines if "policy_document" in x}
    snapshots = {x["disclosure"]["sha256"]: x["disclosure"]["cookies"] for x in lines if "disclosure" in x}
    seen = []
    for x in lines:
        if x.get("decision") == "acknowledged":
            doc = documents[(x["policy"]["key"], x["policy"]["version"])]
            texts = {c["name"]: c["description"] for c in snapshots[x["disclosures_sha256"]]}
            seen.append((who[x["subject"]], x["policy"]["version"], doc["url"], texts["session"], x["recorded_at"]))
    assert [s[:4] for s in seen] == [
        ("alice", "v1", "https://acme.test/privacy/v1", "Keeps you signed in"),
        ("bob", "v2", "https://acme.test/privacy/v2", "Keeps you signed in for 8 hours"),
    ]
    assert all(s[4].endswith("Z") for s in seen)
    assert len(documents) == 2 and len(snapshots) == 2  # each once, however many records point to it

    # ... and every piece of that reading is proven by `consent verify`.
    assert main(["verify", str(path), "--jwks", str(jwks)]) == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["references"] == 4
    text = path.read_text()
    forged = tmp_path / "forged.jsonl"
    forged.write_text(text.replace("Keeps you signed in for 8 hours", "Keeps you signed in for 1 hour"))
    assert main(["verify", str(forged), "--jwks", str(jwks)]) == 1
    assert "disclosure does not hash to its sha256" in capsys.readouterr().err
    dropped = [x for x in text.splitlines(keepends=True) if '"disclosure"' not in x]
    forged.write_text("".join(dropped))
    assert main(["verify", str(forged), "--jwks", str(jwks)]) == 1
    assert "is not in the export" in capsys.readouterr().err


def test_an_auditor_reads_the_csv_columns(tenant: Tenant, tmp_path: Path, capsys) -> None:
    people = make_history(tenant)
    who = pseudonyms(tenant, people)
    r = tenant.get("/v1/exports/consents", params={"format": "csv"})
    path = tmp_path / "ledger.csv"
    path.write_bytes(r.content)
    manifest = tenant.get(f"/v1/exports/{r.headers['consent-export-id']}/manifest").json()
    (tmp_path / "ledger.csv.manifest").write_text(json.dumps(manifest))
    jwks = tmp_path / "jwks.json"
    jwks.write_text(tenant.client.get("/.well-known/jwks.json").text)

    rows = list(csv.DictReader(io.StringIO(path.read_text())))
    acks = [(who[r["subject"]], r["policy_version"], r["policy_url"], r["disclosed_cookies"],
             json.loads(r["disclosures"])[0]["description"]) for r in rows if r["decision"] == "acknowledged"]
    assert acks == [("alice", "v1", "https://acme.test/privacy/v1", "session", "Keeps you signed in"),
                    ("bob", "v2", "https://acme.test/privacy/v2", "session", "Keeps you signed in for 8 hours")]
    for r in rows:
        if r["disclosures"]:
            assert hashlib.sha256(r["disclosures"].encode()).hexdigest() == r["disclosures_sha256"]
    grant = next(r for r in rows if r["decision"] == "granted" and who.get(r["subject"]) == "bob")
    assert grant["policy_sha256"] and grant["disclosed_cookies"] == "" and grant["gpc"] == ""

    assert main(["verify", str(path), "--jwks", str(jwks)]) == 0, capsys.readouterr().err
    capsys.readouterr()
    forged = tmp_path / "forged.csv"
    forged.write_text(path.read_text().replace("https://acme.test/privacy/v2", "https://acme.test/privacy/v9", 1))
    (tmp_path / "forged.csv.manifest").write_text(json.dumps(manifest))
    assert main(["verify", str(forged), "--jwks", str(jwks)]) == 1
    assert "policy document of version v2 differs" in capsys.readouterr().err
