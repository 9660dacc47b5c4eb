"""Secrets at rest: every stored secret is sealed under the key-encryption key
(CONSENT_SECRET_KEYS, or SQLite's generated key file), on SQLite and PostgreSQL; rotating the
key keeps everything readable; a ciphertext moved to another column does not open; PostgreSQL
without a key does not start; the migration seals rows written before it."""

from __future__ import annotations

import dataclasses
import os
import stat
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session
from starlette.testclient import TestClient

from consent import crypto
from consent.cli import main
from consent.errors import ConsentError
from consent.integrations import email_links, webhooks
from consent.integrations.consumer import WebhookError, verify_webhook
from consent.ledger import receipts, subject_tokens, tenants
from consent.ledger.schemas import TenantIn
from consent.settings import Settings
from consent.store import db
from consent.store.models import Tenant as TenantRow
from consent.web.app import create_app

from .conftest import PG_URL, create_run_database, reset_postgres, settings_for
from .helpers import ADMIN, Tenant, make_tenant
from .receiver import Receiver

PEM_MARK = "PRIVATE KEY"


def raw_secrets(url: str) -> dict[tuple[str, str, str], str]:
    """(table, column, row id) -> the text stored, read with no key at all."""
    engine = sa.create_engine(url)
    out = {}
    try:
        with engine.connect() as conn:
            for table, pk, column in db.SEALED_COLUMNS:
                for key, value in conn.execute(sa.text(f"SELECT {pk}, {column} FROM {table}")):
                    if value is not None:
                        out[(table, column, key)] = value
    finally:
        engine.dispose()
    return out


def separate_database(backend: str, tmp_path: Path, name: str) -> str:
    """An empty database of its own (a key change here never touches the shared one)."""
    if backend == "postgresql":
        url = create_run_database(name)
        reset_postgres(url)
        return url
    return f"sqlite:///{tmp_path / 'own.db'}"


def fill(c: TestClient, receiver_url: str) -> tuple[Tenant, dict[str, str]]:
    """A tenant with every kind of secret: link secrets, a subject-token secret, a webhook."""
    t = make_tenant(c)
    t.record(email="ada@example.com")
    assert t.post("/v1/email-links/secrets/rotate").status_code == 200
    token = t.get("/v1/subject-tokens/secret").json()["secret"]
    wh = t.post("/v1/webhooks", json={"url": receiver_url})
    assert wh.status_code == 201, wh.text
    return t, {"subject_token": token, "webhook": wh.json()["secret"]}


def test_every_secret_is_sealed_in_the_database(client, settings: Settings, db_url: str) -> None:
    _, plain = fill(client, "http://127.0.0.1:9/hook")
    stored = raw_secrets(db_url)
    kinds = {(table, column) for table, column, _ in stored}
    assert kinds >= {("tenant", "hash_key"), ("tenant", "token_secret"), ("signing_key", "private_pem"),
                     ("subject_token_key", "secret"), ("email_link_secret", "secret"),
                     ("webhook_endpoint", "secret")}
    for (table, column, _), value in stored.items():
        assert value.startswith(crypto.SEALED_PREFIX), f"{table}.{column} is stored in plain text"
        assert PEM_MARK not in value and plain["subject_token"] not in value and plain["webhook"] not in value
    # what the service reads is the plaintext: the values the API handed out
    engine = db.create_db_engine(db_url)
    try:
        with engine.connect() as conn:
            opened = {crypto.open_secret(conn, v, f"{t}.{c}") for (t, c, _), v in stored.items()}
    finally:
        engine.dispose()
    assert plain["subject_token"] in opened and plain["webhook"] in opened
    assert any(PEM_MARK in v for v in opened)


def test_a_ciphertext_moved_to_another_column_or_altered_does_not_open(client, tenant: Tenant, db_url: str) -> None:
    engine = db.create_db_engine(db_url)
    try:
        with engine.begin() as conn:
            hash_key = conn.execute(sa.text("SELECT hash_key FROM tenant WHERE id = :t"),
                                    {"t": tenant.id}).scalar_one()
            ring = crypto.keyring_of(conn)
            assert len(ring.open(hash_key, "tenant.hash_key")) == 64
            with pytest.raises(crypto.SecretKeyError, match="tenant.token_secret"):
                ring.open(hash_key, "tenant.token_secret")
            altered = hash_key[:-2] + ("A" if hash_key[-2] != "A" else "B") + hash_key[-1]
            with pytest.raises(crypto.SecretKeyError):
                ring.open(altered, "tenant.hash_key")
            # in the database: the hash key copied over the link secret of the same row
            conn.execute(sa.text("UPDATE tenant SET token_secret = hash_key WHERE id = :t"), {"t": tenant.id})
        with Session(engine) as s, pytest.raises(crypto.SecretKeyError, match="copied from another column"):
            s.get(TenantRow, tenant.id)
    finally:
        engine.dispose()


def test_rotating_the_key_keeps_everything_readable(backend: str, tmp_path: Path, monkeypatch) -> None:
    url = separate_database(backend, tmp_path, "_kek")
    old, new = crypto.new_kek_text(), crypto.new_kek_text()
    receiver = Receiver().start()
    try:
        with TestClient(create_app(settings_for(url, secret_keys=(old,)))) as c:
            t, plain = fill(c, receiver.url)
            t.record(email="bob@example.com", decision="denied")
        before = raw_secrets(url)
        # the new key first: everything sealed under the old one still opens
        monkeypatch.setenv("CONSENT_DATABASE_URL", url)
        monkeypatch.setenv("CONSENT_SECRET_KEYS", f"{new},{old}")
        with TestClient(create_app(settings_for(url, secret_keys=(new, old)))) as c:
            t = dataclasses.replace(t, client=c)
            assert t.check(email="ada@example.com")["status"] == "granted"
            assert c.get("/v1/tenant", headers=t.h).status_code == 200
        assert main.main(["secrets", "rotate"]) == 0
        after = raw_secrets(url)
        assert after.keys() == before.keys() and all(after[k] != before[k] for k in before)
        only_new, only_old = crypto.Keyring([crypto.parse_kek(new)]), crypto.Keyring([crypto.parse_kek(old)])
        for (table, column, _), value in after.items():
            only_new.open(value, f"{table}.{column}")
            with pytest.raises(crypto.SecretKeyError):
                only_old.open(value, f"{table}.{column}")
        assert main.main(["secrets", "rotate"]) == 0 and raw_secrets(url) == after  # nothing left to do
        # the old key gone: the service works as before, hashes and signatures unchanged
        with TestClient(create_app(settings_for(url, secret_keys=(new,)))) as c:
            t = dataclasses.replace(t, client=c)
            assert t.check(email="ada@example.com")["status"] == "granted"
            assert t.check(email="bob@example.com")["status"] == "denied"
            assert t.get("/v1/subject-tokens/secret").json()["secret"] == plain["subject_token"]
            t.record(email="ada@example.com", decision="withdrawn")
            webhooks.deliver_once(c.app.state.services.engine, c.app.state.services.settings)
            got = receiver.wait_for(1)
            assert got and verify_webhook(plain["webhook"], got[-1].headers, got[-1].body)
        # a key that sealed values and is no longer given: a clear error, not a wrong answer
        with pytest.raises(crypto.SecretKeyError, match="CONSENT_SECRET_KEYS"), \
                TestClient(create_app(settings_for(url, secret_keys=(old,)))):
            pass
    finally:
        receiver.stop()


def test_postgresql_without_a_key_does_not_start(monkeypatch, capsys) -> None:
    settings = settings_for(PG_URL, secret_keys=())
    with pytest.raises(ConsentError, match="CONSENT_SECRET_KEYS is not set"):
        create_app(settings)
    monkeypatch.delenv("CONSENT_SECRET_KEYS")
    monkeypatch.setenv("CONSENT_DATABASE_URL", PG_URL)
    assert main.main(["tenants", "list"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: CONSENT_SECRET_KEYS is not set") and err.count("\n") == 1
    monkeypatch.setenv("CONSENT_SECRET_KEYS", "not-a-key")
    assert main.main(["tenants", "list"]) == 2
    assert "32 bytes in base64" in capsys.readouterr().err


def test_sqlite_default_generates_a_0600_key_file_and_reuses_it(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("CONSENT_SECRET_KEYS")
    data = tmp_path / "data"
    settings = Settings.from_env({"CONSENT_DATA_DIR": str(data), "CONSENT_DEMO": "false",
                                  "CONSENT_ADMIN_TOKEN": ADMIN["Authorization"].split()[1],
                                  "CONSENT_ISSUER": "http://testserver", "CONSENT_TLOG_SECONDS": "0",
                                  "CONSENT_WEBHOOK_WORKER": "false"})
    assert settings.is_sqlite and not settings.secret_keys
    with TestClient(create_app(settings)) as c:
        t = make_tenant(c)
        t.record(email="ada@example.com")
    database, key_file = data / "consent.db", data / "consent.db.kek"
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(database).st_mode) == 0o600
    key = key_file.read_text()
    crypto.parse_kek(key.strip())
    stored = raw_secrets(f"sqlite:///{database}")
    assert stored and all(v.startswith(crypto.SEALED_PREFIX) for v in stored.values())
    with TestClient(create_app(settings)) as c:  # a restart reads the same key
        t = dataclasses.replace(t, client=c)
        assert t.check(email="ada@example.com")["status"] == "granted"
    assert key_file.read_text() == key


def _plain_fill(url: str) -> dict[tuple[str, str, str], str]:
    """At revision 0014: a tenant with every kind of secret, stored in plain text (as code of
    that revision wrote them). Returns what was stored."""
    engine = db.create_db_engine(url)
    try:
        with Session(engine) as s, s.begin():
            tenant, _ = tenants.create_tenant(s, TenantIn(name="Before"))
            receipts.ensure_signing_key(s)
            subject_tokens.current_key(s, tenant.id)
            email_links.rotate_secret(s, tenant)
            tenant_id = tenant.id
        with engine.begin() as conn:
            conn.execute(sa.text(
                "INSERT INTO webhook_endpoint (id, tenant_id, url, event_types, description, secret, enabled, "
                "consecutive_failures, created_at) VALUES ('wh_before', :t, 'http://127.0.0.1:9/hook', '[]', '', "
                ":s, true, 0, CURRENT_TIMESTAMP)"), {"t": tenant_id, "s": crypto.new_webhook_secret()})
            for table, pk, column in db.SEALED_COLUMNS:
                if column == "previous_secret":
                    continue  # added by 0015
                for key, value in conn.execute(sa.text(f"SELECT {pk}, {column} FROM {table}")).all():
                    conn.execute(sa.text(f"UPDATE {table} SET {column} = :v WHERE {pk} = :k"),
                                 {"v": crypto.open_secret(conn, value, f"{table}.{column}"), "k": key})
    finally:
        engine.dispose()
    stored = raw_secrets_at_0014(url)
    assert len(stored) == 6 and not any(v.startswith(crypto.SEALED_PREFIX) for v in stored.values())
    return stored


def raw_secrets_at_0014(url: str) -> dict[tuple[str, str, str], str]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return {(t, c, k): v for t, pk, c in db.SEALED_COLUMNS if c != "previous_secret"
                    for k, v in conn.execute(sa.text(f"SELECT {pk}, {c} FROM {t}"))}
    finally:
        engine.dispose()


def test_the_migration_seals_rows_written_before_it(backend: str, tmp_path: Path) -> None:
    url = separate_database(backend, tmp_path, "_seal")
    db.migrate(url, "0014")
    plain = _plain_fill(url)
    db.migrate(url)
    sealed = raw_secrets(url)
    assert sealed.keys() == plain.keys()
    ring = db.keyring_for(url)
    for (table, column, key), value in sealed.items():
        assert value.startswith(crypto.SEALED_PREFIX) and value != plain[(table, column, key)]
        assert ring.open(value, f"{table}.{column}") == plain[(table, column, key)]
    db.downgrade(url, "0014")  # and back: plain text again, the same secrets
    assert raw_secrets_at_0014(url) == plain
    db.migrate(url)
    with TestClient(create_app(settings_for(url))) as c:  # the service reads the sealed rows
        assert c.get("/.well-known/jwks.json").status_code == 200
        t = make_tenant(c)
        assert t.record(email="ada@example.com")["status"] == "granted"


def test_webhook_secret_rotation_signs_with_both_until_the_grace_ends(client, tenant: Tenant, settings) -> None:
    receiver = Receiver().start()
    try:
        wh = tenant.post("/v1/webhooks", json={"url": receiver.url}).json()
        r = tenant.post(f"/v1/webhooks/{wh['id']}/secret/rotate")
        assert r.status_code == 200, r.text
        new = r.json()["secret"]
        assert new != wh["secret"] and new.startswith("whsec_") and r.json()["id"] == wh["id"]
        tenant.record(email="rot@example.com")
        engine = client.app.state.services.engine
        fast = dataclasses.replace(settings, webhook_timeout_seconds=2.0)
        webhooks.deliver_once(engine, fast)
        got = receiver.wait_for(1)[-1]
        assert len(got.headers["webhook-signature"].split()) == 2
        verify_webhook(new, got.headers, got.body)
        verify_webhook(wh["secret"], got.headers, got.body)  # a receiver not yet switched
        # no grace: the old secret stops signing at once
        newest = tenant.post(f"/v1/webhooks/{wh['id']}/secret/rotate", params={"grace_hours": 0}).json()["secret"]
        tenant.record(email="rot@example.com", decision="denied")
        webhooks.deliver_once(engine, fast)
        got = receiver.wait_for(2)[-1]
        verify_webhook(newest, got.headers, got.body)
        with pytest.raises(WebhookError):
            verify_webhook(new, got.headers, got.body)
        bad = tenant.post(f"/v1/webhooks/{wh['id']}/secret/rotate", params={"grace_hours": -1})
        assert bad.status_code == 422 and bad.headers["content-type"] == "application/problem+json"
        assert tenant.post("/v1/webhooks/wh_nope/secret/rotate").status_code == 404
    finally:
        receiver.stop()


def test_retired_link_secrets_stop_verifying(client, tenant: Tenant) -> None:
    def unsubscribe_path() -> str:
        r = tenant.post("/v1/email-links", json={"subject": {"email": "ret@example.com"},
                                                 "purpose": "marketing_email"})
        assert r.status_code == 200, r.text
        return str(r.json()["unsubscribe_url"]).removeprefix("http://testserver")

    tenant.record(email="ret@example.com")
    old = unsubscribe_path()
    assert tenant.post("/v1/email-links/secrets/rotate").json() == {"secrets": 2}
    new = unsubscribe_path()
    assert client.get(old, headers={"Accept": "application/json"}).status_code == 200
    r = tenant.post("/v1/email-links/secrets/retire")
    assert r.status_code == 200 and r.json() == {"secrets": 1}
    gone = client.get(old, headers={"Accept": "application/json"})
    assert gone.status_code >= 400 and gone.headers["content-type"] == "application/problem+json"
    assert client.get(new, headers={"Accept": "application/json"}).status_code == 200
    assert unsubscribe_path() != new  # links keep being made, with the one secret left
    assert client.get(unsubscribe_path(), headers={"Accept": "application/json"}).status_code == 200
