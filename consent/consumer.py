"""Helpers for services that consume consent: verify a receipt offline and verify a webhook.

No server needed: ``from consent.consumer import verify_receipt, verify_webhook``.

    claims = verify_receipt(receipt, "https://consent.example.com/.well-known/jwks.json",
                            issuer="https://consent.example.com", audience="ten_...")
    event = verify_webhook(WHSEC, request.headers, raw_body)

Receipts: only EdDSA (Ed25519) is accepted, whatever the token's header says, so ``alg: none``
and the HS256-with-the-public-key confusion are refused. JWKS are cached per source for
``JWKS_TTL`` seconds and re-read once (at most every ``JWKS_MIN_REFRESH`` s) for an unknown kid.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import jwt

from . import crypto
from .errors import BadToken

__all__ = ["ReceiptError", "WebhookError", "clear_jwks_cache", "verify_receipt", "verify_webhook"]

JWKS_TTL = 300.0
JWKS_MIN_REFRESH = 30.0
_cache: dict[str, tuple[float, dict[str, Any]]] = {}
_lock = threading.Lock()


class ReceiptError(ValueError):
    """The receipt is not a valid, EdDSA-signed receipt from this issuer."""


class WebhookError(ValueError):
    """The webhook is not signed with this secret, or is outside the timestamp tolerance."""


def clear_jwks_cache() -> None:
    with _lock:
        _cache.clear()


def _load_jwks(source: str | Path) -> dict[str, Any]:
    text = str(source)
    if text.startswith(("http://", "https://")):
        r = httpx.get(text, timeout=5.0, follow_redirects=False)
        r.raise_for_status()
        data = r.json()
    else:
        data = json.loads(Path(source).read_text())
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ReceiptError("not a JWKS document (no 'keys' list)")
    return data


def _jwks(source: str | Path, *, kid: str | None) -> dict[str, Any]:
    key = str(source)
    now = time.monotonic()
    with _lock:
        cached = _cache.get(key)
    if cached is not None:
        fetched_at, jwks = cached
        known = any(k.get("kid") == kid for k in jwks["keys"])
        if now - fetched_at < JWKS_TTL and (known or now - fetched_at < JWKS_MIN_REFRESH):
            return jwks
    try:
        jwks = _load_jwks(source)
    except (OSError, ValueError, httpx.HTTPError) as exc:
        if cached is not None:  # keep verifying with what we had when the source is down
            return cached[1]
        raise ReceiptError(f"cannot load JWKS from {key}: {exc}") from exc
    with _lock:
        _cache[key] = (now, jwks)
    return jwks


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
    jwks = _jwks(jwks_url_or_path, kid=header.get("kid"))
    # Only Ed25519 public keys may verify: an 'oct' (HMAC) or private key in the set is ignored.
    usable = {"keys": [k for k in jwks["keys"] if k.get("kty") == "OKP" and k.get("crv") == "Ed25519"
                       and "d" not in k]}
    try:
        claims = crypto.verify_jwt(token, usable)
    except BadToken as exc:
        raise ReceiptError(exc.detail) from exc
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
