"""consent.integrations.consumer: offline receipt verification and webhook verification, including attacks."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from consent import crypto
from consent.integrations import consumer
from consent.integrations.consumer import ReceiptError, WebhookError, verify_receipt, verify_webhook

from .receiver import Receiver

ISS = "https://consent.example"
CLAIMS = {"iss": ISS, "sub": "sub_1", "tenant": "ten_1", "record_id": "rec_1", "iat": 1}


@pytest.fixture(autouse=True)
def _fresh_cache() -> Iterator[None]:
    consumer.clear_jwks_cache()
    yield
    consumer.clear_jwks_cache()


@pytest.fixture
def keys(tmp_path: Path) -> tuple[crypto.Signer, crypto.KeyPair, Path]:
    pair = crypto.generate_signing_key()
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [pair.public_jwk]}))
    return crypto.Signer(pair.kid, pair.private_pem), pair, path


def vr(token: str, source: object, **kw: str) -> dict:
    """verify_receipt pinned to ISS and ten_1 unless told otherwise."""
    return verify_receipt(token, source, **{"issuer": ISS, "audience": "ten_1", **kw})  # type: ignore[arg-type]


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def jwks_server(document: dict) -> Receiver:
    return Receiver(document=document).start()


def jwks_url(server: Receiver) -> str:
    return f"http://127.0.0.1:{server.server.server_address[1]}/.well-known/jwks.json"  # type: ignore[union-attr]


def test_receipt_from_file_and_url(keys) -> None:
    signer, pair, path = keys
    token = signer.sign(CLAIMS)
    assert vr(token, path, issuer=ISS)["record_id"] == "rec_1"
    assert vr(token, str(path))["sub"] == "sub_1"
    server = jwks_server({"keys": [pair.public_jwk]})
    try:
        url = jwks_url(server)
        assert vr(token, url, issuer=ISS + "/")["tenant"] == "ten_1"
        server.document = {"keys": []}  # cached: the source changing does not matter within the TTL
        assert vr(token, url)["tenant"] == "ten_1"
        assert server.gets == 1
    finally:
        server.stop()
    assert vr(token, url)["tenant"] == "ten_1"  # still cached while the source is down


def test_receipt_rotation_refetches_unknown_kid_from_a_file(keys) -> None:
    signer, pair, path = keys
    vr(signer.sign(CLAIMS), path)
    new = crypto.generate_signing_key()
    path.write_text(json.dumps({"keys": [new.public_jwk, pair.public_jwk]}))
    assert vr(crypto.Signer(new.kid, new.private_pem).sign(CLAIMS), path)["iss"] == ISS


def test_receipt_rotation_refetches_unknown_kid_from_a_url(keys, monkeypatch) -> None:
    """A kid the cached set lacks re-reads the set, at most once per JWKS_MIN_REFRESH."""
    signer, pair, _path = keys
    new = crypto.generate_signing_key()
    rotated = crypto.Signer(new.kid, new.private_pem).sign(CLAIMS)
    server = jwks_server({"keys": [pair.public_jwk]})
    try:
        url = jwks_url(server)
        vr(signer.sign(CLAIMS), url)
        server.document = {"keys": [new.public_jwk, pair.public_jwk]}
        with pytest.raises(ReceiptError, match="unknown key"):  # read less than 30 s ago
            vr(rotated, url)
        assert server.gets == 1
        consumer.clear_jwks_cache()
        monkeypatch.setattr(consumer, "JWKS_MIN_REFRESH", 0.0)
        server.document = {"keys": [pair.public_jwk]}
        vr(signer.sign(CLAIMS), url)
        server.document = {"keys": [new.public_jwk, pair.public_jwk]}
        assert vr(rotated, url)["iss"] == ISS
        assert server.gets == 3
        with pytest.raises(ReceiptError, match="unknown key"):
            vr(jwt.encode(CLAIMS, Ed25519PrivateKey.generate(), algorithm="EdDSA", headers={"kid": "nope"}), url)
    finally:
        server.stop()


def test_receipt_from_the_services_own_jwks_url(client, tenant) -> None:
    """A real receipt, checked against the service's /.well-known/jwks.json served over HTTP."""
    rec = tenant.record(email="jwks-url@example.com")
    server = jwks_server(client.get("/.well-known/jwks.json").json())
    try:
        iss = str(client.base_url).rstrip("/")
        claims = verify_receipt(rec["receipt"], jwks_url(server), issuer=iss, audience=tenant.id,
                                subject=rec["subject"])
        assert claims["sub"] == rec["subject"]
    finally:
        server.stop()
    unreachable = jwks_url(server)
    consumer.clear_jwks_cache()
    with pytest.raises(ReceiptError, match="cannot load"):
        verify_receipt(rec["receipt"], unreachable, issuer=iss, audience=tenant.id)


def test_receipt_attacks(keys) -> None:
    signer, pair, path = keys
    good = signer.sign(CLAIMS)
    header, payload, sig = good.split(".")
    # alg none
    none = b64url(json.dumps({"alg": "none", "kid": pair.kid, "typ": "JWT"}).encode()) + "." + payload + "."
    with pytest.raises(ReceiptError, match="not accepted"):
        vr(none, path)
    # HS256 signed with the public key as the HMAC secret (key confusion)
    public_x = pair.public_jwk["x"].encode()
    hs = jwt.encode(CLAIMS, public_x, algorithm="HS256", headers={"kid": pair.kid})
    with pytest.raises(ReceiptError, match="not accepted"):
        vr(hs, path)
    # an 'oct' key slipped into the JWKS under the same kid is never used
    path.write_text(json.dumps({"keys": [{"kty": "oct", "kid": pair.kid, "k": b64url(b"k" * 32)}]}))
    consumer.clear_jwks_cache()
    with pytest.raises(ReceiptError):
        vr(good, path)
    path.write_text(json.dumps({"keys": [pair.public_jwk]}))
    consumer.clear_jwks_cache()
    # tampered claims
    forged = json.loads(base64.urlsafe_b64decode(payload + "=="))
    forged["purposes"] = [{"purpose": "marketing_email", "status": "granted"}]
    with pytest.raises(ReceiptError):
        vr(f"{header}.{b64url(json.dumps(forged).encode())}.{sig}", path)
    # signed by another Ed25519 key claiming our kid
    other = Ed25519PrivateKey.generate()
    fake = jwt.encode(CLAIMS, other, algorithm="EdDSA", headers={"kid": pair.kid})
    with pytest.raises(ReceiptError):
        vr(fake, path)
    # unknown kid, wrong issuer, garbage, unreadable JWKS
    with pytest.raises(ReceiptError, match="unknown key"):
        vr(jwt.encode(CLAIMS, other, algorithm="EdDSA", headers={"kid": "nope"}), path)
    with pytest.raises(ReceiptError, match="issuer"):
        vr(good, path, issuer="https://evil.example")
    with pytest.raises(ReceiptError):
        vr("not.a.jwt", path)
    with pytest.raises(ReceiptError, match="cannot load"):
        vr(good, path.parent / "missing.json")


def signed(secret: str, body: bytes, *, msg_id: str = "evt_1", ts: int | None = None) -> dict[str, str]:
    ts = int(time.time()) if ts is None else ts
    return {"Webhook-Id": msg_id, "Webhook-Timestamp": str(ts),
            "Webhook-Signature": crypto.webhook_signature(secret, msg_id, ts, body)}


def test_webhook_verification() -> None:
    secret = crypto.new_webhook_secret()
    body = b'{"type":"consent.withdrawn","data":{"record_id":"rec_1"}}'
    assert verify_webhook(secret, signed(secret, body), body)["type"] == "consent.withdrawn"
    assert verify_webhook(secret, signed(secret, body), body.decode())["data"]["record_id"] == "rec_1"
    # several signatures (secret rotation on the sender side): any match is enough
    h = signed(secret, body)
    h["Webhook-Signature"] = "v1,AAAA " + h["Webhook-Signature"]
    verify_webhook(secret, h, body)
    # the Standard Webhooks reference vector
    ref_secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    ref_body = b'{"test": 2432232314}'
    assert crypto.webhook_signature(ref_secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, ref_body) == \
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_deliveries_verify_with_the_standard_webhooks_library() -> None:
    """What the delivery worker sends, during a secret rotation too, is what the spec's own
    library accepts; a tolerance wider than its fixed 5 minutes is honoured by ours."""
    from standardwebhooks import Webhook, WebhookVerificationError

    from consent.integrations.webhooks import Job, headers_for

    new, old = crypto.new_webhook_secret(), crypto.new_webhook_secret()
    job = Job(1, "wh_1", "https://example.com/hook", new, "evt_1", b'{"type":"consent.granted"}', old)
    headers = headers_for(job)
    for secret in (new, old):
        assert Webhook(secret).verify(job.body, headers) == {"type": "consent.granted"}
        assert verify_webhook(secret, headers, job.body) == {"type": "consent.granted"}
    with pytest.raises(WebhookVerificationError):
        Webhook(crypto.new_webhook_secret()).verify(job.body, headers)
    late = headers_for(job, now=time.time() - 600)
    with pytest.raises(WebhookVerificationError):
        Webhook(new).verify(job.body, late)
    with pytest.raises(WebhookError):
        verify_webhook(new, late, job.body)
    assert verify_webhook(new, late, job.body, tolerance=900)["type"] == "consent.granted"


@pytest.mark.parametrize("attack", ["wrong_secret", "tampered_body", "old", "future", "missing", "v2_only",
                                    "bad_timestamp", "other_id", "bad_secret", "empty_secret"])
def test_webhook_attacks(attack: str) -> None:
    secret = crypto.new_webhook_secret()
    body = b'{"type":"consent.granted"}'
    h = signed(secret, body)
    verify_secret = secret
    if attack == "wrong_secret":
        verify_secret = crypto.new_webhook_secret()
    elif attack == "tampered_body":
        body = b'{"type":"consent.withdrawn"}'
    elif attack == "old":
        h = signed(secret, body, ts=int(time.time()) - 301)
    elif attack == "future":
        h = signed(secret, body, ts=int(time.time()) + 301)
    elif attack == "missing":
        del h["Webhook-Signature"]
    elif attack == "v2_only":
        h["Webhook-Signature"] = h["Webhook-Signature"].replace("v1,", "v2,")
    elif attack == "bad_timestamp":
        h["Webhook-Timestamp"] = "soon"
    elif attack == "other_id":
        h["Webhook-Id"] = "evt_2"
    elif attack == "bad_secret":
        verify_secret = "whsec_!!!not base64"
    elif attack == "empty_secret":
        verify_secret = "whsec_"
    with pytest.raises(WebhookError):
        verify_webhook(verify_secret, h, body)


def test_a_receipt_is_proof_for_its_own_tenant_only(client, tmp_path: Path) -> None:
    """Real receipts (record, check, state) carry ``aud`` = tenant; a consumer pinned to another
    tenant, issuer or subject refuses them; a receipt from before ``aud`` is judged by ``tenant``."""
    from .helpers import make_tenant

    a, b = make_tenant(client), make_tenant(client)
    path = tmp_path / "jwks.json"
    path.write_text(client.get("/.well-known/jwks.json").text)
    iss = str(client.base_url).rstrip("/")
    rec = a.record(email="aud@example.com")
    states = a.get(f"/v1/subjects/{rec['subject']}/consents").json()
    b.record(email="aud@example.com")
    for token in (rec["receipt"], a.check(email="aud@example.com")["receipt"], states["receipt"]):
        claims = jwt.decode(token, options={"verify_signature": False})
        assert claims["aud"] == a.id == claims["tenant"]
        assert verify_receipt(token, path, issuer=iss, audience=a.id, subject=rec["subject"])["sub"] == rec["subject"]
        with pytest.raises(ReceiptError, match="tenant"):
            verify_receipt(token, path, issuer=iss, audience=b.id)
        with pytest.raises(ReceiptError, match="issuer"):
            verify_receipt(token, path, issuer="https://other.example", audience=a.id)
        with pytest.raises(ReceiptError, match="subject"):
            verify_receipt(token, path, issuer=iss, audience=a.id, subject="sub_someone_else")
    with pytest.raises(TypeError):
        verify_receipt(rec["receipt"], path)  # type: ignore[call-arg]  # no pin, no answer
    # A receipt signed before ``aud`` existed: the signed ``tenant`` claim pins it.
    pair = crypto.generate_signing_key()
    path.write_text(json.dumps({"keys": [pair.public_jwk]}))
    consumer.clear_jwks_cache()
    old = crypto.Signer(pair.kid, pair.private_pem).sign({"iss": iss, "sub": "sub_1", "tenant": a.id})
    assert verify_receipt(old, path, issuer=iss, audience=a.id)["tenant"] == a.id
    with pytest.raises(ReceiptError, match="tenant"):
        verify_receipt(old, path, issuer=iss, audience=b.id)
