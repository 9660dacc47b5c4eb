"""API shapes of the audit and data-subject-rights routes (exports, erasure, retention)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from consent.ledger.schemas import Strict


class RetentionIn(Strict):
    evidence_retention_days: int | None = Field(
        default=None, ge=1, le=36500, description="Drop evidence (IP, user agent) of records older than this; null: keep.")
    record_retention_years: int | None = Field(
        default=None, ge=1, le=100, description="Drop all records this long after the tenant is closed; null: keep.")


class RetentionOut(BaseModel):
    evidence_retention_days: int | None
    record_retention_years: int | None
    closed_at: datetime | None


class TenantClosed(BaseModel):
    id: str
    closed_at: datetime


class ManifestOut(BaseModel):
    id: str
    format: str
    count: int
    body_sha256: str
    created_at: datetime
    manifest: str = Field(description="EdDSA JWT signed by the service key; see docs/audit.md")


class ErasureRecord(BaseModel):
    id: str
    record_hash: str
    prev_hash: str | None
    receipt: str


class ErasureOut(BaseModel):
    subject: str
    pseudonym: str
    erased_at: datetime
    identifiers_removed: int
    evidence_cleared: int
    record: ErasureRecord | None


class AccessExport(BaseModel):
    subject: str
    pseudonym: str
    tenant: str
    created_at: datetime
    erased_at: datetime | None
    generated_at: datetime
    identifiers: list[dict[str, Any]]
    records: list[dict[str, Any]]
    state: list[dict[str, Any]]
    state_receipt: str
    chain_head: str | None
