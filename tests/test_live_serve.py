"""`consent serve` started exactly as the README does (the venv's entry point, settings from
the environment) and spoken to over real HTTP. Receipts are verified the way a consumer
would: PyJWT's PyJWKClient against the live JWKS, nothing else."""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives import serialization

from consent import crypto
from consent.store import db

from .conftest import BACKENDS, PG_URL, SECRET_KEYS, free_port
from .helpers import pg_schema_url

CONSENT = Path(sys.executable).parent / "consent"
pytestmark = pytest.mark.slow


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONSENT_")}
    env["CONSENT_SECRET_KEYS"] = SECRET_KEYS  # what private_material() opens the keys with
    env.update(extra)
    return env


class Server:
    """One `consent serve` process; its output is collected by reader threads."""

    def __init__(self, env: dict[str, str], cwd: Path):
        self.port = int(env["CONSENT_PORT"])
        self.base = f"http://127.0.0.1:{self.port}"
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self.proc = subprocess.Popen([str(CONSENT), "serve"], env=env, cwd=cwd, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for stream, sink in ((self.proc.stdout, self.stdout), (self.proc.stderr, self.stderr)):
            threading.Thread(target=lambda s=stream, out=sink: out.extend(iter(s.readline, "")), daemon=True).start()
        self._wait_listening()

    @property
    def output(self) -> str:
        return "".join(self.stdout) + "".join(self.stderr)

    def _wait_listening(self, timeout: float = 60) -> None:
        # A bare TCP connect, no HTTP request: nothing is logged, so the demo keys must be
        # on stdout by now on their own (a user piping `consent serve` must see them).
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"consent serve exited {self.proc.returncode}:\n{self.output}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"consent serve did not listen within {timeout}s:\n{self.output}")

    def demo_keys(self, timeout: float = 5) -> dict[str, str]:
        """stdout is a pipe here (a log): the keys are in a file only this user can read, and
        stdout names the file but carries no secret."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(r"Demo tenant created\. Its keys are shown once, in (\S+) ", "".join(self.stdout))
            if m:
                path = Path(m.group(1))
                assert stat.S_IMODE(path.stat().st_mode) == 0o600, oct(path.stat().st_mode)
                keys = dict(json.loads(path.read_text()))
                assert keys["secret_key"] not in self.output and keys["admin_token"] not in self.output
                return keys
            time.sleep(0.05)
        raise AssertionError(f"no demo keys file named:\n{self.output}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        time.sleep(0.1)  # let the reader threads drain the pipes


def cli(env: dict[str, str], cwd: Path, *args: str) -> str:
    done = subprocess.run([str(CONSENT), *args], check=False, env=env, cwd=cwd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def verify(base: str, token: str) -> dict[str, Any]:
    """Exactly what a consumer does: fetch the signing key from the JWKS, then decode, pinned
    to the tenant the receipt claims (``aud``; a real consumer pins its own tenant id)."""
    signing_key = jwt.PyJWKClient(f"{base}/.well-known/jwks.json").get_signing_key_from_jwt(token)
    aud = jwt.decode(token, options={"verify_signature": False}).get("aud")
    return dict(jwt.decode(token, signing_key, algorithms=["EdDSA"], audience=aud))


def record(http: httpx.Client, sk: str, **subject: str) -> dict[str, Any]:
    r = http.post("/v1/consents", headers={"Authorization": f"Bearer {sk}"}, json={
        "subject": subject or {"user_id": "42", "email": "ada@example.com"},
        "purpose": "marketing_email", "decision": "granted"})
    assert r.status_code == 201, r.text
    return dict(r.json())


def private_material(url: str) -> list[str]:
    """Every private signing key in the database, as PEM body and as the raw JWK ``d``."""
    engine = db.create_db_engine(url)
    try:
        with engine.connect() as conn:
            pems = [crypto.open_secret(conn, p, "signing_key.private_pem")
                    for p in conn.execute(sa.text("SELECT private_pem FROM signing_key")).scalars()]
    finally:
        engine.dispose()
    out = []
    for pem in pems:
        key = serialization.load_pem_private_key(pem.encode(), password=None)
        raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                serialization.NoEncryption())
        out.append(base64.urlsafe_b64encode(raw).decode().rstrip("="))
        out.append("".join(pem.strip().splitlines()[1:-1])[:40])
    return out


def record_and_verify(server: Server, keys: dict[str, str], seen: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    with httpx.Client(base_url=server.base, timeout=10) as http:
        rec = record(http, keys["secret_key"])
        seen.append(json.dumps(rec))
        claims = verify(server.base, rec["receipt"])
        assert claims["tenant"] == keys["tenant_id"] and claims["record_id"] == rec["id"]
        assert claims["record_hash"] == rec["record_hash"] and claims["purposes"][0]["status"] == "granted"
        assert claims["policy"]["version"] == "2026-01" and claims["policy"]["sha256"]
        r = http.get("/v1/check", params={"email": "ada@example.com", "purpose": "marketing_email"},
                     headers={"Authorization": f"Bearer {keys['secret_key']}"})
        assert r.status_code == 200 and r.json()["allowed"] is True and r.json()["record_id"] == rec["id"]
        seen.append(r.text)
        jwks = http.get("/.well-known/jwks.json").json()
        seen.append(json.dumps(jwks))
        assert jwks["keys"] and all("d" not in k for k in jwks["keys"])
        # a tampered receipt does not verify
        head, payload, sig = rec["receipt"].split(".")
        forged = json.loads(base64.urlsafe_b64decode(payload + "=="))
        forged["purposes"][0]["purpose"] = "analytics"
        body = base64.urlsafe_b64encode(json.dumps(forged).encode()).decode().rstrip("=")
        with pytest.raises(jwt.InvalidSignatureError):
            verify(server.base, f"{head}.{body}.{sig}")
    return rec, claims


def test_serve_sqlite_receipts_rotation_and_key_revocation(tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = base_env(CONSENT_DATA_DIR=str(data), CONSENT_PORT=str(free_port()), CONSENT_DEMO="true")
    seen: list[str] = []  # every response body and process output, searched for private keys
    server = Server(env, tmp_path)
    try:
        keys = server.demo_keys()
        assert keys["secret_key"].startswith("sk_") and keys["admin_token"].startswith("adm_")
        for f in data.iterdir():  # the database (and its WAL files) readable by this user only
            if f.name.startswith("consent.db"):
                assert stat.S_IMODE(f.stat().st_mode) == 0o600, (f, oct(f.stat().st_mode))
        rec1, _ = record_and_verify(server, keys, seen)
        kid1 = jwt.get_unverified_header(rec1["receipt"])["kid"]
    finally:
        server.stop()
        seen.append(server.output)

    out = cli(env, tmp_path, "signing-key", "rotate")
    seen.append(out)
    env["CONSENT_PORT"] = str(free_port())
    server = Server(env, tmp_path)
    try:
        with httpx.Client(base_url=server.base, timeout=10) as http:
            assert http.get("/readyz").status_code == 200
            rec2 = record(http, keys["secret_key"], email="grace@example.com")
            seen.append(json.dumps(rec2))
            kid2 = jwt.get_unverified_header(rec2["receipt"])["kid"]
            assert kid2 != kid1 and kid2 in out  # the CLI names the new key
            assert verify(server.base, rec2["receipt"])["record_id"] == rec2["id"]
            # the old receipt still verifies: the retired public key stays in the JWKS
            assert verify(server.base, rec1["receipt"])["record_id"] == rec1["id"]
            jwks = http.get("/.well-known/jwks.json")
            seen.append(jwks.text)
            assert {k["kid"] for k in jwks.json()["keys"]} == {kid1, kid2}

            # `consent keys rotate --leaked` revokes the old secret key at once, even for a running server
            rotated = cli(env, tmp_path, "keys", "rotate", "--tenant", keys["tenant_id"], "--kind", "secret",
                          "--leaked")
            new_sk = json.loads(rotated)["secret_key"]
            old = http.get("/v1/tenant", headers={"Authorization": f"Bearer {keys['secret_key']}"})
            assert old.status_code == 401 and old.headers["content-type"] == "application/problem+json"
            new = http.get("/v1/tenant", headers={"Authorization": f"Bearer {new_sk}"})
            assert new.status_code == 200 and new.json()["id"] == keys["tenant_id"]
            seen += [old.text, new.text]
    finally:
        server.stop()
        seen.append(server.output)
    assert "Demo tenant created" not in server.output  # only on the first start
    secrets = private_material(f"sqlite:///{data / 'consent.db'}")
    assert len(secrets) == 4
    everything = "\n".join(seen)
    for secret in secrets:
        assert secret not in everything


@pytest.mark.skipif("postgresql" not in BACKENDS, reason="PostgreSQL backend not selected")
def test_serve_postgresql_record_and_verify(tmp_path: Path) -> None:
    url = pg_schema_url(PG_URL, "live_serve")
    env = base_env(CONSENT_DATABASE_URL=url, CONSENT_DATA_DIR=str(tmp_path / "data"),
                   CONSENT_PORT=str(free_port()), CONSENT_DEMO="true")
    seen: list[str] = []
    server = Server(env, tmp_path)
    try:
        keys = server.demo_keys()
        record_and_verify(server, keys, seen)
    finally:
        server.stop()
        seen.append(server.output)
    assert not (tmp_path / "data" / "consent.db").exists()  # really on PostgreSQL
    for secret in private_material(url):
        assert secret not in "\n".join(seen)
