"""Helpers for services that consume consent: verify a receipt offline and verify a webhook.

No server needed: ``from consent.integrations.consumer import verify_receipt, verify_webhook``.

    claims = verify_receipt(receipt, "https://consent.example.com/.well-known/jwks.json",
                            issuer="https://consent.example.com", audience="ten_...")
    event = verify_webhook(WHSEC, request.headers, raw_body)

Receipts: only EdDSA (Ed25519) is accepted, whatever the token's header says, so ``alg: none``
and the HS256-with-the-public-key confusion are refused. A JWKS URL is read through PyJWT's
``PyJWKClient``, one per URL: the set is cached for ``JWKS_TTL`` seconds and re-read for an
unknown kid at most every ``JWKS_MIN_REFRESH`` s. A JWKS file is read at each call.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from consent import crypto
from consent.errors import BadToken

__all__ = ["ReceiptError", "WebhookError", "clear_jwks_cache", "verify_receipt", "verify_webhook"]

JWKS_TTL = 300.0
JWKS_MIN_REFRESH = 30.0
JWKS_TIMEOUT = 5.0
_clients: dict[str, jwt.PyJWKClient] = {}
_lock = threading.Lock()


class ReceiptError(ValueError):
    """The receipt is not a valid, EdDSA-signed receipt from this issuer."""


class WebhookError(ValueError):
    """The webhook is not signed with this secret, or is outside the timestamp tolerance."""


def clear_jwks_cache() -> None:
    with _lock:
        _clients.clear()


def _client(url: str) -> jwt.PyJWKClient:
    with _lock:
        client = _clients.get(url)
        if client is None:
            client = _clients[url] = jwt.PyJWKClient(
                url, cache_jwk_set=True, lifespan=JWKS_TTL, cooldown_duration=JWKS_MIN_REFRESH,
                timeout=JWKS_TIMEOUT)
        return client


def _signing_key(source: str | Path, kid: Any) -> jwt.PyJWK:
    """The key named ``kid`` in the JWKS at ``source`` (a URL or a file)."""
    if not isinstance(kid, str) or not kid:
        raise ReceiptError("unknown key id: the receipt header names none")
    text = str(source)
    if text.startswith(("http://", "https://")):
        client = _client(text)
        try:
            client.get_signing_keys()  # the cached set, or a first read that must succeed
        except jwt.PyJWTError as exc:
            raise ReceiptError(f"cannot load JWKS from {text}: {exc}") from exc
        try:
            return client.get_signing_key(kid)  # re-reads the set once for an unknown kid
        except jwt.PyJWTError as exc:
            raise ReceiptError(f"unknown key id {kid!r}: {exc}") from exc
    try:
        data = json.loads(Path(source).read_text())
        keys = jwt.PyJWKSet.from_dict(data if isinstance(data, dict) else {}).keys
    except (OSError, ValueError, jwt.PyJWTError) as exc:
        raise ReceiptError(f"cannot load JWKS from {text}: {exc}") from exc
    for key in keys:
        if key.key_id == kid:
            return key
    raise ReceiptError(f"unknown key id {kid!r}")


def verify_receipt(token: str, jwks_url_or_path: str | Path, *, issuer: str, audience: str,
                   subject: str | None = None) -> dict[str, Any]:
    """Verify a consent receipt (EdDSA JWT) against a JWKS URL or file; returns its claims.

    ``issuer`` is the service's URL and ``audience`` your tenant id: both are required because
    one service signs receipts for every tenant with the same keys, so a signature alone does
    not say the receipt is proof for you. ``subject`` (a ``sub_…`` id), when given, must match.
    """
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as exc:
        raise ReceiptError(f"not a JWT: {exc}") from exc
    if header.get("alg") != crypto.ALGORITHM:
        raise ReceiptError(f"algorithm {header.get('alg')!r} is not accepted; receipts are EdDSA")
    key = _signing_key(jwks_url_or_path, header.get("kid"))
    # Only an Ed25519 public key may verify: an 'oct' (HMAC) or private key under the kid is
    # refused.
    if not isinstance(key.key, Ed25519PublicKey):
        raise ReceiptError(f"key {header.get('kid')!r} is not an Ed25519 public key")
    try:
        claims: dict[str, Any] = jwt.decode(token, key, algorithms=[crypto.ALGORITHM],
                                            options={"verify_aud": False})
    except jwt.PyJWTError as exc:
        raise ReceiptError(str(exc)) from exc
    if claims.get("iss") != issuer.rstrip("/"):
        raise ReceiptError(f"issuer {claims.get('iss')!r} is not {issuer!r}")
    # Receipts signed before ``aud`` existed name their tenant only in the (signed) ``tenant``.
    aud = claims.get("aud", claims.get("tenant"))
    if aud != audience and not (isinstance(aud, list) and audience in aud):
        raise ReceiptError(f"receipt is for tenant {aud!r}, not {audience!r}")
    if subject is not None and claims.get("sub") != subject:
        raise ReceiptError(f"receipt is for subject {claims.get('sub')!r}, not {subject!r}")
    return claims


def _header(headers: Mapping[str, str], name: str) -> str:
    for k, v in headers.items():
        if k.lower() == name:
            return v
    raise WebhookError(f"missing {name} header")


def verify_webhook(secret: str, headers: Mapping[str, str], body: bytes | str,
                   tolerance: int = 300) -> dict[str, Any]:
    """Verify a Standard Webhooks delivery (id, timestamp, v1 HMAC-SHA256); returns the parsed body."""
    raw = body.encode() if isinstance(body, str) else bytes(body)
    msg_id = _header(headers, "webhook-id")
    stamp = _header(headers, "webhook-timestamp")
    signature = _header(headers, "webhook-signature")
    try:
        ts = int(stamp)
    except ValueError:
        raise WebhookError("webhook-timestamp is not an integer") from None
    if abs(time.time() - ts) > tolerance:
        raise WebhookError(f"webhook-timestamp is more than {tolerance}s away from now (replay?)")
    try:
        ok = crypto.webhook_signature_matches(secret, msg_id, ts, raw, signature)
    except BadToken as exc:
        raise WebhookError(exc.detail) from exc
    if not ok:
        raise WebhookError("no webhook-signature matches this secret and body")
    try:
        payload = json.loads(raw)
    except ValueError as exc:
        raise WebhookError("body is not JSON") from exc
    if not isinstance(payload, dict):
        raise WebhookError("body is not a JSON object")
    return payload
