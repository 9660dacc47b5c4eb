"""One error hierarchy, rendered as RFC 9457 problem+json.

    ConsentError (500 internal)
    ├── BadRequest (400 bad_request)
    │   ├── MalformedJSON (400 malformed_json)
    │   └── BadToken (400 bad_token)
    ├── Unauthorized (401 unauthorized)
    ├── Forbidden (403 forbidden)
    │   └── OriginNotAllowed (403 origin_not_allowed)
    ├── NotFound (404 not_found)
    ├── MethodNotAllowed (405 method_not_allowed)
    ├── Conflict (409 conflict)
    │   └── IdempotencyConflict (409 idempotency_conflict)
    ├── Gone (410 gone)
    ├── PayloadTooLarge (413 payload_too_large)
    ├── UnsupportedMediaType (415 unsupported_media_type)
    ├── ValidationFailed (422 validation_failed, with per-field ``errors``)
    ├── RateLimited (429 rate_limited, with Retry-After)
    └── Unavailable (503 unavailable)

Domain code raises these; the app turns them into responses in one place.
"""

from __future__ import annotations

from typing import Any

PROBLEM_BASE = "https://consent.dev/problems/"


class ConsentError(Exception):
    """Base of every error the service reports to a caller."""

    status = 500
    code = "internal"
    title = "Internal error"

    def __init__(self, detail: str = "", *, headers: dict[str, str] | None = None, **extra: Any):
        super().__init__(detail or self.title)
        if "code" in extra:  # a more specific stable code for this occurrence
            self.code = extra.pop("code")
        self.detail = detail or self.title
        self.headers = headers or {}
        self.extra = extra

    def to_problem(self, instance: str | None = None) -> dict[str, Any]:
        """The RFC 9457 body for this error."""
        body: dict[str, Any] = {
            "type": PROBLEM_BASE + self.code,
            "title": self.title,
            "status": self.status,
            "code": self.code,
            "detail": self.detail,
        }
        if instance:
            body["instance"] = instance
        body.update(self.extra)
        return body


class BadRequest(ConsentError):
    status, code, title = 400, "bad_request", "Bad request"


class MalformedJSON(BadRequest):
    code, title = "malformed_json", "Malformed JSON"


class BadToken(BadRequest):
    code, title = "bad_token", "Invalid or tampered token"


class Unauthorized(ConsentError):
    status, code, title = 401, "unauthorized", "Missing or invalid credentials"

    def __init__(self, detail: str = "", **extra: Any):
        super().__init__(detail, headers={"WWW-Authenticate": 'Bearer realm="consent"'}, **extra)


class Forbidden(ConsentError):
    status, code, title = 403, "forbidden", "Forbidden"


class OriginNotAllowed(Forbidden):
    code, title = "origin_not_allowed", "Origin not allowed"


class NotFound(ConsentError):
    status, code, title = 404, "not_found", "Not found"


class MethodNotAllowed(ConsentError):
    status, code, title = 405, "method_not_allowed", "Method not allowed"


class Conflict(ConsentError):
    status, code, title = 409, "conflict", "Conflict"


class IdempotencyConflict(Conflict):
    code, title = "idempotency_conflict", "Idempotency key reused with a different request"


class Gone(ConsentError):
    status, code, title = 410, "gone", "Gone"


class PayloadTooLarge(ConsentError):
    status, code, title = 413, "payload_too_large", "Payload too large"


class UnsupportedMediaType(ConsentError):
    status, code, title = 415, "unsupported_media_type", "Unsupported media type"


class ValidationFailed(ConsentError):
    status, code, title = 422, "validation_failed", "Validation failed"

    def __init__(self, errors: list[dict[str, str]], detail: str = ""):
        first = errors[0] if errors else {}
        super().__init__(
            detail or (f"{first.get('field')}: {first.get('message')}" if first else ""),
            errors=errors,
        )
        self.errors = errors

    @classmethod
    def field(cls, name: str, message: str) -> ValidationFailed:
        """A validation error about one field."""
        return cls([{"field": name, "message": message}])


class RateLimited(ConsentError):
    status, code, title = 429, "rate_limited", "Too many requests"

    def __init__(self, retry_after: int, detail: str = ""):
        super().__init__(detail, headers={"Retry-After": str(retry_after)})


class Unavailable(ConsentError):
    status, code, title = 503, "unavailable", "Service unavailable"
