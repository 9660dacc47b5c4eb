"""API shapes of the snippet routes, subject tokens and subject linking (see docs/snippet.md)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, StrictInt, model_validator

from consent.integrations.snippet_texts import TEXT_KEYS
from consent.ledger.schemas import Key, Lang, Strict

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
    dir: Literal["ltr", "rtl"]
    policy: SnippetPolicy
    purposes: list[SnippetPurpose]
    cookies: list[dict[str, Any]] = Field(description="disclosures; lifetime_text is the lifetime in words")
    texts: dict[str, str]
    theme: dict[str, Any]
    cooldown_days: int = Field(description="after a refusal, no new question for this many days "
                                           "unless a material version asks again")
    settings_version: int = Field(description="version of the tenant's snippet settings (0: built-in)")


TextKey = Literal[TEXT_KEYS]  # type: ignore[valid-type]
Text = Annotated[str, Field(min_length=1, max_length=2000)]


def _luminance(hex_colour: str) -> float:
    def channel(c: int) -> float:
        v = c / 255
        return v / 12.92 if v <= 0.03928 else ((v + 0.055) / 1.055) ** 2.4
    r, g, b = (int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))
    return 0.2126 * channel(r) + 0.7152 * channel(g) + 0.0722 * channel(b)


class SnippetTheme(Strict):
    mode: Literal["auto", "light", "dark"] = Field(default="auto", description="auto follows prefers-color-scheme")
    layout: Literal["box", "bar"] = "box"
    brand: str = Field(default="#0b57d0", pattern=r"^#[0-9a-fA-F]{6}$",
                       description="buttons and links; white text on it needs 4.5:1 contrast")
    radius: StrictInt = Field(default=8, ge=0, le=24, description="corner radius in px")
    font: str | None = Field(default=None, max_length=200, pattern=r"^[A-Za-z0-9 ,'\"-]+$",
                             description="CSS font-family list; default system-ui")

    @model_validator(mode="after")
    def _contrast(self) -> SnippetTheme:
        # white button text on the brand colour must stay readable (WCAG AA, 4.5:1)
        if 1.05 / (_luminance(self.brand) + 0.05) < 4.5:
            raise ValueError(f"brand {self.brand} is too light: white text on it is under 4.5:1 contrast")
        return self


class SnippetSettingsIn(Strict):
    texts: dict[Lang, dict[TextKey, Text]] = Field(default_factory=dict, max_length=50,
                                                   description="per language, overrides of the built-in texts")
    theme: SnippetTheme = Field(default_factory=SnippetTheme)
    refusal_cooldown_days: StrictInt = Field(default=182, ge=0, le=730)


class SnippetSettingsOut(BaseModel):
    version: int = Field(description="0 while the built-in defaults apply; every PUT adds one")
    texts: dict[str, dict[str, str]]
    theme: dict[str, Any]
    refusal_cooldown_days: int
    created_at: datetime | None
    languages: list[str] = Field(description="languages with built-in texts")


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
