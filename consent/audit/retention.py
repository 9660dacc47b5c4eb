"""Retention: per-tenant limits, applied by ``consent retention run`` (cron-safe).

- ``evidence_retention_days``: evidence (IP address, user agent, anything else kept with a
  decision) of records older than N days is set to NULL. Decisions, ``evidence_sha256`` and
  hashes stay, so chains and exports still verify.
- ``record_retention_years``: once a tenant has been closed for M years, its subjects,
  identifiers, records and current state are deleted.

A run is idempotent (it only touches rows not yet purged) and works in small batches, each its
own transaction. On PostgreSQL a run holds an advisory lock, so when cron starts it on several
hosts at once, one works and the others report ``skipped``; on SQLite writers are serialised.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from consent.errors import NotFound
from consent.ledger import tenants
from consent.store.db import rowcount, transaction
from consent.store.models import Tenant, utcnow
from consent.store.tables import RECORD as REC
from consent.store.tables import STATE
from consent.store.tables import SUBJECT as SUBJ
from consent.store.tables import SUBJECT_IDENTIFIER as SI
from consent.store.tables import TENANT as TEN

LOCK_KEY = 0x636F6E73656E7401  # "consent" + 1: the retention run's advisory lock


def settings_out(t: Tenant) -> dict[str, Any]:
    return {"evidence_retention_days": t.evidence_retention_days,
            "record_retention_years": t.record_retention_years, "closed_at": t.closed_at}


def set_retention(db: Session, tenant_id: str, *, evidence_days: int | None, record_years: int | None,
                  actor: str = "cli") -> Tenant:
    """Set both limits; a change is kept in the tenant's audit trail."""
    tenant = db.get(Tenant, tenant_id)
    if tenant is None:
        raise NotFound("tenant not found")
    before = {"evidence_retention_days": tenant.evidence_retention_days,
              "record_retention_years": tenant.record_retention_years}
    after = {"evidence_retention_days": evidence_days, "record_retention_years": record_years}
    tenant.evidence_retention_days = evidence_days
    tenant.record_retention_years = record_years
    db.flush()
    changed = [k for k in after if before[k] != after[k]]
    if changed:
        tenants.record_change(db, tenant_id, actor, "retention.update", {k: before[k] for k in changed},
                              {k: after[k] for k in changed})
    return tenant


def close_tenant(db: Session, tenant_id: str, actor: str = "admin") -> Tenant:
    """Mark a tenant closed (idempotent); every key it has stops working at once, and its
    records become subject to record retention."""
    tenant = db.get(Tenant, tenant_id)
    if tenant is None:
        raise NotFound("tenant not found")
    revoked = tenants.revoke_all_keys(db, tenant_id, actor)
    if tenant.closed_at is None:
        tenant.closed_at = utcnow()
        db.flush()
        tenants.record_change(db, tenant_id, actor, "tenant.close", {"closed_at": None},
                              {"closed_at": tenant.closed_at, "keys_revoked": revoked})
    return tenant


def add_years(dt: datetime, years: int) -> datetime:
    try:
        return dt.replace(year=dt.year + years)
    except ValueError:  # 29 February
        return dt.replace(year=dt.year + years, day=28)


@dataclass
class RunResult:
    skipped: bool = False
    evidence_purged: int = 0
    tenants_dropped: int = 0
    records_dropped: int = 0
    subjects_dropped: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@contextmanager
def run_lock(engine: Engine) -> Iterator[bool]:
    """True when this process may run (always on SQLite; advisory lock on PostgreSQL)."""
    if engine.dialect.name != "postgresql":
        yield True
        return
    with engine.connect() as conn:
        got = bool(conn.execute(sa.select(sa.func.pg_try_advisory_lock(LOCK_KEY))).scalar())
        conn.commit()
        try:
            yield got
        finally:
            if got:
                conn.execute(sa.select(sa.func.pg_advisory_unlock(LOCK_KEY)))
                conn.commit()


def purge_evidence(engine: Engine, tenant_id: str, cutoff: datetime, batch: int) -> int:
    total = 0
    while True:
        with transaction(engine, write=True) as db:
            seqs = (sa.select(REC.c.seq).where(REC.c.tenant_id == tenant_id, REC.c.recorded_at < cutoff,
                                               REC.c.evidence.is_not(None)).limit(batch))
            n = rowcount(db.execute(sa.update(REC).where(REC.c.seq.in_(seqs.scalar_subquery()))
                                     .values(evidence=sa.null())))
        total += n
        if n < batch:
            return total


def drop_tenant_records(engine: Engine, tenant_id: str, batch: int, result: RunResult) -> None:
    while True:
        with transaction(engine, write=True) as db:
            ids = list(db.execute(sa.select(SUBJ.c.id).where(SUBJ.c.tenant_id == tenant_id).limit(batch)).scalars())
            if not ids:
                return
            db.execute(sa.delete(STATE).where(STATE.c.tenant_id == tenant_id, STATE.c.subject_id.in_(ids)))
            result.records_dropped += rowcount(db.execute(
                sa.delete(REC).where(REC.c.tenant_id == tenant_id, REC.c.subject_id.in_(ids))))
            db.execute(sa.delete(SI).where(SI.c.tenant_id == tenant_id, SI.c.subject_id.in_(ids)))
            result.subjects_dropped += rowcount(db.execute(sa.delete(SUBJ).where(SUBJ.c.id.in_(ids))))


def run(engine: Engine, *, now: datetime | None = None, batch: int = 1000) -> RunResult:
    """Apply every tenant's retention settings once."""
    now = now or utcnow()
    result = RunResult()
    with run_lock(engine) as got:
        if not got:
            result.skipped = True
            return result
        with transaction(engine) as db:
            tenants = db.execute(sa.select(TEN.c.id, TEN.c.evidence_retention_days, TEN.c.record_retention_years,
                                           TEN.c.closed_at)).all()
        for t in tenants:
            if t.closed_at is not None and t.record_retention_years is not None \
                    and add_years(t.closed_at, t.record_retention_years) <= now:
                before = result.records_dropped + result.subjects_dropped
                drop_tenant_records(engine, t.id, max(1, batch // 10), result)
                result.tenants_dropped += (result.records_dropped + result.subjects_dropped) > before
            elif t.evidence_retention_days is not None:
                cutoff = now - timedelta(days=t.evidence_retention_days)
                result.evidence_purged += purge_evidence(engine, t.id, cutoff, batch)
    return result


def plan(engine: Engine, *, now: datetime | None = None) -> RunResult:
    """What ``run`` would do now, counted without changing anything (for a dry run or to ask
    before a run). ``subjects_dropped`` and ``tenants_dropped`` count what would go."""
    now = now or utcnow()
    result = RunResult()
    with transaction(engine) as db:
        for t in db.execute(sa.select(TEN.c.id, TEN.c.evidence_retention_days, TEN.c.record_retention_years,
                                      TEN.c.closed_at)).all():
            if t.closed_at is not None and t.record_retention_years is not None \
                    and add_years(t.closed_at, t.record_retention_years) <= now:
                records = db.execute(sa.select(sa.func.count()).select_from(REC)
                                     .where(REC.c.tenant_id == t.id)).scalar_one()
                subjects = db.execute(sa.select(sa.func.count()).select_from(SUBJ)
                                      .where(SUBJ.c.tenant_id == t.id)).scalar_one()
                result.records_dropped += records
                result.subjects_dropped += subjects
                result.tenants_dropped += (records + subjects) > 0
            elif t.evidence_retention_days is not None:
                cutoff = now - timedelta(days=t.evidence_retention_days)
                result.evidence_purged += db.execute(sa.select(sa.func.count()).select_from(REC).where(
                    REC.c.tenant_id == t.id, REC.c.recorded_at < cutoff, REC.c.evidence.is_not(None))).scalar_one()
    return result
