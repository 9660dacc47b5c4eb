"""API shapes (request and response bodies), separate from the table models so internal
columns (hash keys, raw identifiers, private keys) never leak. They also feed /openapi.json."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    field_validator,
    model_validator,
)

from consent.crypto import normalize_email

Key = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9_.-]*$")]
Lang = Annotated[str, Field(min_length=2, max_length=16, pattern=r"^[A-Za-z]{2,3}(-[A-Za-z0-9]{1,8})*$")]
Decision = Literal["granted", "denied", "withdrawn", "acknowledged", "notified"]  # notified: told of a policy change; no state change
Source = Literal["snippet", "api", "email_link", "gpc", "import"]
Status = Literal[
    "granted", "denied", "withdrawn", "acknowledged", "stale", "pending_confirmation", "none"
]
EMAIL_RE = re.compile(r"^[^@\s]{1,64}@[^@\s]{1,255}$")
ORIGIN_RE = re.compile(r"^https?://[A-Za-z0-9.-]+(:\d{1,5})?$")
ORIGIN_HOST_RE = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*$")
URL_RE = re.compile(r"^https?://\S+$")


def in_utc_range(value: datetime) -> datetime:
    """The instant in UTC; refuses times that only exist in another zone (year 0 or 10000)."""
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError("timestamp out of range") from None


class Strict(BaseModel):
    """Every request body: unknown fields refused, and no type coercion (``true`` or ``"5"``
    where a number is expected is a 422 naming the field, never 1 or 5). JSON has no time
    type, so time fields are declared ``Time`` (RFC 3339 text, parsed)."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True, strict=True)


Time = Annotated[datetime, Field(strict=False)]


class Translation(Strict):
    title: str | None = Field(default=None, max_length=200)
    description: str | None = Field(default=None, max_length=2000)


def normalise_origin(value: str) -> str:
    """An origin as browsers send it: lowercase scheme and host, no default port; refuses a
    path, a trailing slash, a query or credentials with a message saying what to remove."""
    if not isinstance(value, str) or not value:
        raise ValueError("an origin is scheme://host[:port], e.g. https://www.example.com")
    parsed = urlsplit(value.strip())
    scheme = parsed.scheme.lower()
    if scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError(f"not an origin (scheme://host[:port], http or https): {value!r}")
    if parsed.path == "/" and not parsed.query and not parsed.fragment:
        raise ValueError(f"remove the trailing slash: an origin has no path ({value.rstrip('/')!r})")
    if parsed.path or parsed.query or parsed.fragment:
        raise ValueError(f"an origin has no path, query or fragment: {value!r}")
    if "@" in parsed.netloc:
        raise ValueError(f"an origin has no user name or password: {value!r}")
    try:
        port = parsed.port
    except ValueError:
        raise ValueError(f"not a valid port in {value!r}") from None
    host = (parsed.hostname or "").lower()
    if not ORIGIN_HOST_RE.match(host):
        raise ValueError(f"not a host name or address in {value!r}")
    default = {"http": 80, "https": 443}[scheme]
    return f"{scheme}://{host}" + (f":{port}" if port is not None and port != default else "")


def normalise_origins(values: list[str]) -> list[str]:
    """Each origin normalised, duplicates dropped, order kept."""
    out: list[str] = []
    for v in values:
        origin = normalise_origin(v)
        if origin not in out:
            out.append(origin)
    return out


Origins = Annotated[list[str], Field(max_length=50)]


class TenantIn(Strict):
    name: str = Field(min_length=1, max_length=200)
    allowed_origins: Origins = Field(default_factory=list)
    notice_days: StrictInt = Field(default=30, ge=0, le=365)
    store_full_ip: StrictBool = False
    store_user_agent: StrictBool = True
    default_lang: Lang = "en"

    @field_validator("allowed_origins")
    @classmethod
    def _origins(cls, v: list[str]) -> list[str]:
        return normalise_origins(v)


class TenantPatch(Strict):
    """The settings to change; fields left out keep their value."""

    name: str | None = Field(default=None, min_length=1, max_length=200)
    allowed_origins: Origins | None = Field(
        default=None, description="replaces the whole list; each normalised to scheme://host[:port]")
    notice_days: StrictInt | None = Field(default=None, ge=0, le=365)
    store_full_ip: StrictBool | None = None
    store_user_agent: StrictBool | None = None
    default_lang: Lang | None = None

    @field_validator("allowed_origins")
    @classmethod
    def _origins(cls, v: list[str] | None) -> list[str] | None:
        return None if v is None else normalise_origins(v)

    @model_validator(mode="after")
    def _not_null(self) -> TenantPatch:
        for name in self.model_fields_set:
            if getattr(self, name) is None:
                raise ValueError(f"{name} may not be null; leave it out to keep its value")
        if not self.model_fields_set:
            raise ValueError("give at least one setting to change")
        return self


class TenantOut(BaseModel):
    id: str
    name: str
    allowed_origins: list[str]
    notice_days: int
    store_full_ip: bool
    store_user_agent: bool
    default_lang: str
    created_at: datetime


class KeysOut(BaseModel):
    secret_key: str | None = None
    publishable_key: str | None = None


class TenantCreated(TenantOut):
    keys: KeysOut


class ApiKeyOut(BaseModel):
    id: str
    kind: str
    prefix: str
    created_at: datetime
    expires_at: datetime | None = Field(description="when an old key stops working (null: current key)")


class RotatedKeysOut(KeysOut):
    keys: list[ApiKeyOut] = Field(description="the keys that work now, old ones with their expiry")


class TenantDetail(TenantOut):
    keys: list[ApiKeyOut] = Field(description="the keys that work now, old ones with their expiry")


class RotateKeysIn(Strict):
    kind: Literal["secret", "publishable", "both"] = "both"
    leaked: StrictBool = Field(default=False, description="the old keys stop working at once")
    publishable_grace_days: StrictInt | None = Field(
        default=None, ge=0, le=90, description="how long an old publishable key keeps working (default 7)")
    secret_grace_hours: StrictInt | None = Field(
        default=None, ge=0, le=720, description="how long an old secret key keeps working (default 24)")

    @model_validator(mode="after")
    def _leaked_no_grace(self) -> RotateKeysIn:
        if self.leaked and (self.publishable_grace_days or self.secret_grace_hours):
            raise ValueError("a leaked key is revoked at once: leave out the grace periods")
        return self


class PurposeIn(Strict):
    kind: Literal["consent", "notice"] = "consent"
    legal_basis: Literal["consent", "contract", "legitimate_interest", "legal_obligation"] = "consent"
    double_opt_in: StrictBool = False
    gpc: StrictBool = False
    title: str = Field(default="", max_length=200)
    description: str = Field(default="", max_length=2000)
    translations: dict[Lang, Translation] = Field(default_factory=dict, max_length=50)

    @model_validator(mode="after")
    def _notice_rules(self) -> PurposeIn:
        if self.kind == "notice" and self.double_opt_in:
            raise ValueError("a notice purpose cannot require double opt-in")
        return self


class PurposeOut(BaseModel):
    key: str
    kind: str
    legal_basis: str
    double_opt_in: bool
    gpc: bool
    title: str
    description: str
    translations: dict[str, Any]
    created_at: datetime
    updated_at: datetime


class CookieIn(Strict):
    provider: str = Field(min_length=1, max_length=200)
    purpose: Key
    http_only: StrictBool = False
    secure: StrictBool = True
    same_site: Literal["Strict", "Lax", "None"] = "Lax"
    lifetime: Literal["session"] | Annotated[StrictInt, Field(gt=0, le=10 * 365 * 86400)] = "session"
    description: str = Field(default="", max_length=2000)
    translations: dict[Lang, Translation] = Field(default_factory=dict, max_length=50)


class CookieOut(BaseModel):
    name: str
    provider: str
    purpose: str
    http_only: bool
    secure: bool
    same_site: str
    lifetime: str | int
    description: str
    translations: dict[str, Any]


class PolicyVersionIn(Strict):
    version: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")
    document_url: str = Field(max_length=2000, pattern=URL_RE.pattern)
    document_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    effective_at: Time | None = None
    material: StrictBool = False
    purposes: list[Key] = Field(min_length=1, max_length=100)
    cookies: list[str] | None = Field(default=None, max_length=200)

    @field_validator("effective_at")
    @classmethod
    def _aware(cls, v: datetime | None) -> datetime | None:
        if v is not None and v.tzinfo is None:
            raise ValueError("must carry a time zone (RFC 3339, e.g. 2026-01-01T00:00:00Z)")
        return in_utc_range(v) if v is not None else None


class PolicyVersionOut(BaseModel):
    policy: str
    version: str
    document_url: str
    document_sha256: str
    published_at: datetime
    effective_at: datetime
    material: bool
    purposes: list[str]
    cookies: list[dict[str, Any]]


class Page(BaseModel):
    next_cursor: str | None = None


class PolicyVersionList(Page):
    items: list[PolicyVersionOut]


class SubjectRef(Strict):
    user_id: str | None = Field(default=None, min_length=1, max_length=200)
    email: str | None = Field(default=None, max_length=320)
    anonymous_id: str | None = Field(default=None, min_length=1, max_length=200)

    @field_validator("email")
    @classmethod
    def _email(cls, v: str | None) -> str | None:
        # Judged in the one spelling the service keys it by (a full-width "＠" is an "@").
        if v is not None and not EMAIL_RE.match(normalize_email(v)):
            raise ValueError("not an email address")
        return v

    @model_validator(mode="after")
    def _one(self) -> SubjectRef:
        if not (self.user_id or self.email or self.anonymous_id):
            raise ValueError("give at least one of user_id, email, anonymous_id")
        return self


EVIDENCE_MAX_DEPTH = 32  # nesting of evidence objects/arrays; receipts and exports serialize it


def _depth(value: Any, limit: int) -> int:
    """How deep ``value`` nests, counting no further than ``limit + 1`` (iterative: a hostile
    document must not exhaust the stack)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict | list):
            deepest = max(deepest, d)
            if d > limit:
                return d
            stack.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v))
    return deepest


class Evidence(BaseModel):
    model_config = ConfigDict(extra="allow")
    ip: str | None = Field(default=None, max_length=64)
    user_agent: str | None = Field(default=None, max_length=1000)

    @model_validator(mode="after")
    def _bounded(self) -> Evidence:
        if _depth(self.model_extra or {}, EVIDENCE_MAX_DEPTH) > EVIDENCE_MAX_DEPTH:
            raise ValueError(f"evidence may nest at most {EVIDENCE_MAX_DEPTH} levels deep")
        return self


class ConsentIn(Strict):
    subject: SubjectRef
    purpose: Key
    decision: Decision
    policy: Key = "privacy"
    policy_version: str | None = Field(default=None, min_length=1, max_length=64)
    source: Source = "api"
    evidence: Evidence | None = None
    recorded_at: Time | None = Field(
        default=None, description="Only for source=import: when the decision was originally made."
    )

    @model_validator(mode="after")
    def _import_time(self) -> ConsentIn:
        if self.recorded_at is not None:
            if self.source != "import":
                raise ValueError("recorded_at may only be given with source=import")
            if self.recorded_at.tzinfo is None:
                raise ValueError("recorded_at must carry a time zone")
            self.recorded_at = in_utc_range(self.recorded_at)
        return self


class PolicyRef(BaseModel):
    key: str | None
    version: str | None


class RecordOut(BaseModel):
    id: str
    subject: str
    purpose: str
    decision: str
    status: Status | Literal["notified"]
    policy: PolicyRef
    source: str
    recorded_at: datetime
    record_hash: str
    prev_hash: str | None
    receipt: str


class PurposeState(BaseModel):
    purpose: str
    status: Status
    allowed: bool
    policy_version: str | None
    recorded_at: datetime | None
    record_id: str | None
    receipt: str | None
    gpc: bool = Field(description="The current status was set by a decision made with a Global Privacy "
                      "Control signal (a GPC opt-out, or an explicit choice made while the signal was on).")


class SubjectConsents(BaseModel):
    subject: str
    purposes: list[PurposeState]
    receipt: str | None = Field(description="A receipt over all current states, signed now.")


class CheckOut(BaseModel):
    allowed: bool
    status: Status
    purpose: str
    subject: str | None
    policy_version: str | None
    record_id: str | None
    receipt: str | None
    gpc: bool = Field(description="The current status was set under a Global Privacy Control signal.")


class BulkCheckIn(Strict):
    purpose: Key
    emails: list[str] | None = None
    subjects: list[str] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> BulkCheckIn:
        if (self.emails is None) == (self.subjects is None):
            raise ValueError("give exactly one of emails, subjects")
        return self


class BulkResult(BaseModel):
    id: str
    allowed: bool
    status: Status


class BulkCheckOut(BaseModel):
    purpose: str
    count: int
    allowed_count: int
    results: list[BulkResult]


class Health(BaseModel):
    status: str
    checks: dict[str, Any] = Field(default_factory=dict)


class Jwks(BaseModel):
    keys: list[dict[str, Any]]


class Problem(BaseModel):
    type: str
    title: str
    status: int
    code: str
    detail: str
    instance: str | None = None
    errors: list[dict[str, str]] | None = None


class AuditEntry(BaseModel):
    id: int
    actor: str = Field(description="the key id that made the change, or admin / cli")
    action: str
    changed_at: datetime
    before: dict[str, Any]
    after: dict[str, Any]


class AuditList(Page):
    items: list[AuditEntry]
