"""One person, one subject: the email rule (NFKC, case folding, zero-width and surrounding
whitespace removed, IDNA A-label domain; dots and +tags kept) as a property against spellings a
person would call the same address, through the API on SQLite and PostgreSQL, and the 0013
migration on a database filled at 0012 with colliding spellings."""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import idna
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from consent import crypto
from consent.cli.main import main
from consent.ledger import catalog, receipts, recorder, tenants
from consent.ledger.schemas import ConsentIn, PolicyVersionIn, PurposeIn, TenantIn
from consent.store import db
from consent.web.app import create_app

from .conftest import create_run_database, reset_postgres, settings_for
from .helpers import ADMIN, DOC_SHA, Tenant, make_tenant
from .test_migrations_data import snapshot

ZERO_WIDTH = "\u200b\u200c\u200d\u2060\ufeff"
LOCAL_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789éüßkø"
DOMAIN_CHARS = "abcdefghijklmnopqrstuvwxyzäöüé"


@st.composite
def addresses(draw: Any) -> tuple[str, str, str]:
    """(local, domain label, tld) of an address whose domain IDNA accepts."""
    local = draw(st.text(LOCAL_CHARS, min_size=1, max_size=10))
    if draw(st.booleans()):
        local += "." + draw(st.text(LOCAL_CHARS, min_size=1, max_size=5))
    if draw(st.booleans()):
        local += "+" + draw(st.text(LOCAL_CHARS, min_size=1, max_size=5))
    label = draw(st.text(DOMAIN_CHARS, min_size=2, max_size=10))
    return local, label, draw(st.sampled_from(["de", "com", "example"]))


def fullwidth(c: str) -> str:
    return chr(ord(c) - 0x21 + 0xFF01) if "!" <= c <= "~" else c


@st.composite
def spelling(draw: Any, address: tuple[str, str, str]) -> str:
    """A way a person might type the same address: any case, composed or decomposed, full-width
    characters, the Kelvin sign for k, zero-width characters anywhere, surrounding spaces, the
    domain as U-label or A-label."""
    local, label, tld = address
    domain = f"{label}.{tld}"
    if draw(st.booleans()):
        domain = idna.encode(domain, uts46=True).decode()
    text = f"{local}@{domain}"
    out = []
    for c in text:
        if c == "k" and draw(st.booleans()):
            c = "\u212a"
        elif draw(st.booleans()):
            c = c.upper() if len(c.upper()) == 1 else c
        if c.isascii() and draw(st.integers(0, 4)) == 0:
            c = fullwidth(c)
        out.append(c)
        if draw(st.integers(0, 6)) == 0:
            out.append(draw(st.sampled_from(ZERO_WIDTH)))
    form = draw(st.sampled_from(["NFC", "NFD", None]))
    text = unicodedata.normalize(form, "".join(out)) if form else "".join(out)
    pad = draw(st.sampled_from(["", " ", "\t", "\u3000", " \u200b"]))
    return pad + text + draw(st.sampled_from(["", " ", "\n"]))


def other_addresses(address: tuple[str, str, str]) -> list[str]:
    """Spellings the rule must keep apart: a dot or a +tag is part of the address."""
    local, label, tld = address
    out = []
    if "." in local:
        out.append(local.replace(".", "", 1) + f"@{label}.{tld}")
    if "+" in local:
        out.append(local.split("+")[0] + f"@{label}.{tld}")
    return out


@settings(max_examples=150, deadline=None)
@given(data=st.data(), address=addresses())
def test_the_rule_joins_spellings_of_one_address_and_nothing_else(data: Any, address: tuple[str, str, str]) -> None:
    base = crypto.normalize_email(f"{address[0]}@{address[1]}.{address[2]}")
    assert base == crypto.normalize_email(base)  # one spelling: normalising it again changes nothing
    assert base.isascii() or "@" in base and base.rpartition("@")[2].isascii()  # A-label domain
    for _ in range(3):
        variant = data.draw(spelling(address))
        assert crypto.normalize_email(variant) == base, (variant, base)
        assert crypto.normalize_emails([variant, "x@y.z"]) == [base, "x@y.z"]
    for other in other_addresses(address):
        assert crypto.normalize_email(other) != base


@given(st.text(st.characters(max_codepoint=127), max_size=40))
def test_ascii_takes_the_short_way_to_the_same_answer(text: str) -> None:
    """normalize_email's ASCII shortcut gives what the whole rule gives."""
    # A non-ASCII zero-width character forces the long way without changing the address.
    assert crypto.normalize_email(text) == crypto.normalize_email(text + "\u200b")
    assert crypto.normalize_emails([text]) == [crypto.normalize_email(text)]


@pytest.fixture(scope="module")
def email_tenant(client: TestClient) -> Tenant:
    return make_tenant(client)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), address=addresses())
def test_every_entry_point_finds_one_subject(email_tenant: Tenant, data: Any, address: tuple[str, str, str]) -> None:
    """Record under one spelling; single check (fast path), bulk by email, bulk by subject
    reference, as-of, access export and email links all find the same subject by any other."""
    t = email_tenant
    first, *others = (data.draw(spelling(address)) for _ in range(6))
    rec = t.record("marketing_email", "granted", email=first)
    subject = rec["subject"]
    one = t.check(email=others[0])
    assert (one["subject"], one["status"]) == (subject, "granted")
    assert t.check(subject=f"email:{others[1]}")["subject"] == subject
    bulk = t.post("/v1/check", json={"purpose": "marketing_email", "emails": [others[2]]})
    assert bulk.json()["results"][0]["status"] == "granted"
    for other in other_addresses(address):  # a dot or a +tag makes another address
        assert t.check(email=other)["subject"] != subject
    by_ref = t.post("/v1/check", json={"purpose": "marketing_email", "subjects": [f"email:{others[3]}"]})
    assert by_ref.json()["results"][0]["status"] == "granted"
    # (a URL path carries no surrounding newline: the client trims it)
    assert t.get(f"/v1/subjects/email:{others[4].strip()}/export").json()["subject"] == subject
    links = t.post("/v1/email-links", json={"subject": {"email": others[4]}, "purpose": "marketing_email"})
    assert links.json()["subject"] == subject


def test_a_record_of_an_email_the_rule_empties_is_refused(tenant: Tenant) -> None:
    r = tenant.post("/v1/consents", json={"subject": {"email": "\u200b@example.com"}, "purpose": "marketing_email",
                                          "decision": "granted"})
    assert r.status_code == 422 and r.json()["errors"][0]["field"].endswith("email")
    ok = tenant.record(email="ａｄａ＠ｅｘａｍｐｌｅ.com")  # full-width: the same address as ada@example.com
    assert ok["subject"] == tenant.check(email="ada@example.com")["subject"]


# -- the 0013 migration ----------------------------------------------------------------------

# Spellings that the old rule (strip().lower()) kept apart and the new one joins, in the
# order they are recorded: (email, user id or None, purpose, decision).
COLLIDING = [
    ("Ada@Example.com", "u-ada", "marketing_email", "granted"),
    ("ada\u200b@example.com", None, "marketing_email", "withdrawn"),  # later: the person's last word
    ("ＡＤＡ@example.com", "u-ada-2", "analytics", "granted"),
    ("Jose\u0301@x.com", None, "marketing_email", "granted"),
    ("Jos\u00e9@x.com", None, "marketing_email", "denied"),
    ("a@BÜCHER.de", None, "analytics", "granted"),
    ("a@xn--bcher-kva.de", None, "marketing_email", "granted"),
    ("bob@example.com", None, "marketing_email", "granted"),  # nobody to merge with
]


def _old_rule(email: str) -> str:
    return email.strip().lower()


@pytest.fixture
def db_at_0012(backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, str]]:
    """A database at revision 0012 holding COLLIDING as the code of 0012 keyed them."""
    if backend == "postgresql":
        url = create_run_database("_identity")
        reset_postgres(url)
    else:
        url = f"sqlite:///{tmp_path / 'at0012.db'}"
    db.migrate(url, "0012")
    engine = db.create_db_engine(url)
    try:
        added = (("subject", "merged_into varchar(40)"), ("consent_record", "gpc boolean"),
                 ("consent_state", "gpc boolean"), ("consent_record", "leaf_index bigint"),
                 ("event_counter", "leaves bigint NOT NULL DEFAULT 0"))
        with engine.begin() as conn:  # the head model's columns, present only while writing
            for table, column in added:
                conn.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN {column}")
        with monkeypatch.context() as m:
            m.setattr(crypto, "normalize_email", _old_rule)
            tenant_id = _fill(engine)
        with engine.begin() as conn:
            for table, column in added:
                conn.exec_driver_sql(f"ALTER TABLE {table} DROP COLUMN {column.split()[0]}")
    finally:
        engine.dispose()
    yield url, tenant_id


def _fill(engine: sa.Engine) -> str:
    with db.transaction(engine, write=True) as s:
        key = receipts.ensure_signing_key(s)
        signer = crypto.Signer(key.kid, key.private_pem)
        t, _ = tenants.create_tenant(s, TenantIn(name="at 0012", notice_days=0))
        for purpose in ("marketing_email", "analytics"):
            catalog.put_purpose(s, t.id, purpose, PurposeIn(title=purpose))
        catalog.publish_version(s, t.id, 0, "privacy", PolicyVersionIn(
            version="v1", document_url="https://acme.test/p", document_sha256=DOC_SHA,
            purposes=["marketing_email", "analytics"]))
    for email, user, purpose, decision in COLLIDING:
        with db.transaction(engine, write=True) as s:
            tenant = tenants.get_tenant(s, t.id)
            subject = {"email": email, **({"user_id": user} if user else {})}
            recorder.record_decision(s, tenant, ConsentIn.model_validate(
                {"subject": subject, "purpose": purpose, "decision": decision}),
                signer=signer, issuer="http://testserver")
    return str(t.id)


def test_migration_merges_colliding_subjects_keeping_every_chain(db_at_0012: tuple[str, str], tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    url, tenant_id = db_at_0012
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            before = conn.execute(sa.text("SELECT count(*) FROM subject")).scalar()
            old = dict(conn.execute(sa.text("SELECT id, record_hash FROM consent_record")).all())
    finally:
        engine.dispose()
    assert before == len(COLLIDING)
    db.migrate(url)
    after = snapshot(url)  # every chain, export line and state copy verifies
    assert all(after[i] == h for i, h in old.items())  # no record rewritten
    assert len(after) == len(old) + 4 * 2 + 4  # 4 merges: a record on each chain; 4 decisions copied
    with TestClient(create_app(settings_for(url))) as c:
        r = c.post(f"/v1/tenants/{tenant_id}/keys/rotate", headers=ADMIN, json={"kind": "both"})
        assert r.status_code in (200, 201), r.text
        t = Tenant(c, tenant_id, r.json()["secret_key"], r.json()["publishable_key"])
        ada = {e: t.check("marketing_email", email=e) for e, *_ in COLLIDING[:3]}
        assert len({a["subject"] for a in ada.values()}) == 1
        assert {a["status"] for a in ada.values()} == {"withdrawn"}  # the newest decision counts
        assert t.check("analytics", email="ada@example.com")["status"] == "granted"
        assert t.check("marketing_email", subject="u-ada-2")["subject"] == ada["Ada@Example.com"]["subject"]
        assert t.check("marketing_email", email="josé@x.com")["status"] == "denied"
        idn = t.check("analytics", email="a@bücher.de")
        assert idn["status"] == "granted" and idn == t.check("analytics", email="A@XN--BCHER-KVA.DE")
        assert t.check("marketing_email", email="a@bücher.de")["status"] == "granted"
        survivor = ada["Ada@Example.com"]["subject"]
        export = t.get(f"/v1/subjects/{survivor}/export").json()
        merged = [r for r in export["records"] if r["decision"] == "merged"]
        assert len(merged) == 2 and {r["source"] for r in merged} == {"merge"}
        absorbed = [r["evidence"]["merged_from"] for r in merged]
        for sid in absorbed:  # the absorbed ids lead to the survivor; their own chains end in a merge
            assert t.get(f"/v1/subjects/{sid}/consents").json()["subject"] == survivor
        copies = [r for r in export["records"] if r["source"] == "merge" and r["decision"] != "merged"]
        assert {r["evidence"]["merged_from"] for r in copies} <= set(absorbed) and len(copies) == 2
        # The whole ledger still verifies offline, merge records included.
        path = tmp_path / "recorder.jsonl"
        path.write_bytes(t.get("/v1/exports/consents").content)
        jwks = tmp_path / "jwks.json"
        jwks.write_text(c.get("/.well-known/jwks.json").text)
        assert main(["verify", str(path), "--jwks", str(jwks)]) == 0, capsys.readouterr().err
        assert json.loads(capsys.readouterr().out)["records"] == len(after)
        # Erasing the person erases every subject that was them.
        assert t.delete(f"/v1/subjects/{survivor}").status_code == 200
        for sid in absorbed:
            assert t.get(f"/v1/subjects/{sid}/export").json()["erased_at"] is not None
