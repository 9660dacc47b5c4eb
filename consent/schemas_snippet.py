"""API shapes of the snippet routes, subject tokens and subject linking (see docs/snippet.md)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from .schemas import Key, Strict

ANON_PATTERN = r"^[A-Za-z0-9_-]+$"


class SnippetChoice(Strict):
    purpose: Key
    decision: Literal["granted", "denied", "acknowledged", "withdrawn"]
    idempotency_key: str | None = Field(default=None, min_length=8, max_length=100,
                                        pattern=r"^[A-Za-z0-9_.:-]+$")


class SnippetConsentsIn(Strict):
    anonymous_id: str | None = Field(default=None, min_length=1, max_length=200, pattern=ANON_PATTERN)
    subject_token: str | None = Field(default=None, min_length=1, max_length=4000)
    policy: Key = "privacy"
    policy_version: str | None = Field(default=None, min_length=1, max_length=64)
    gpc: bool = Field(default=False, description="navigator.globalPrivacyControl as the page saw it")
    choices: list[SnippetChoice] = Field(min_length=1, max_length=50)

    @model_validator(mode="after")
    def _who(self) -> SnippetConsentsIn:
        if not (self.anonymous_id or self.subject_token):
            raise ValueError("give anonymous_id, subject_token or both")
        if len({c.purpose for c in self.choices}) != len(self.choices):
            raise ValueError("choices must not repeat a purpose")
        return self


class SnippetRecord(BaseModel):
    purpose: str
    decision: str
    status: str
    source: str
    record_id: str
    created: bool = Field(description="false when an idempotency key replayed, or a GPC opt-out was already on record")
    receipt: str


class SnippetConsentsOut(BaseModel):
    subject: str
    subject_token: Literal["none", "valid"]
    records: list[SnippetRecord]


class SnippetPurpose(BaseModel):
    key: str
    kind: str
    legal_basis: str
    double_opt_in: bool
    gpc: bool
    ask: str = Field(description="version label whose answer counts; a new label means ask again")
    title: str
    description: str


class SnippetPolicy(BaseModel):
    key: str
    version: str
    url: str
    sha256: str
    effective_at: datetime


class SnippetConfig(BaseModel):
    tenant: str
    lang: str
    policy: SnippetPolicy
    purposes: list[SnippetPurpose]
    cookies: list[dict[str, Any]]
    texts: dict[str, str]


class SubjectTokenIn(Strict):
    user_id: str = Field(min_length=1, max_length=200)
    ttl_seconds: int = Field(default=600, ge=10, le=600)


class SubjectTokenOut(BaseModel):
    token: str
    kid: str
    expires_at: datetime


class SubjectTokenSecretOut(BaseModel):
    kid: str
    secret: str
    algorithm: str
    max_age_seconds: int
    audience: str = Field(description="optional aud claim value (the tenant id)")
    previous_kid: str | None = Field(description="still accepted until the next rotation")


class LinkIn(Strict):
    anonymous_id: str = Field(min_length=1, max_length=200, pattern=ANON_PATTERN)
    user_id: str = Field(min_length=1, max_length=200)


class CarriedOver(BaseModel):
    purpose: str
    decision: str
    from_record: str
    record_id: str


class LinkOut(BaseModel):
    subject: str
    outcome: Literal["created", "attached", "already_linked", "merged"]
    carried_over: list[CarriedOver]


class GpcJson(BaseModel):
    gpc: bool
    lastUpdate: str


class GpcPurpose(BaseModel):
    purpose: str
    status: str
    gpc: bool = Field(description="the status was set by a decision made with the signal on")
    opted_out: bool = Field(description="status is denied or withdrawn")


class SnippetGpcOut(BaseModel):
    signal: bool = Field(description="this request carried the signal (Sec-GPC: 1, or gpc=true from the page)")
    honored: bool = Field(description="signal on, and every purpose marked gpc is opted out for this visitor")
    message: str | None = Field(description='"Opt-Out Preference Signal Honored" when honored, else null')
    purposes: list[GpcPurpose]
