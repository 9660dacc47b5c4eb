"""Fast generation of realistic ledgers for export tests and benchmarks: real hashes, real
chains, real signed receipts, written with bulk inserts (not through the API)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from consent import crypto
from consent.ledger import events, receipts
from consent.ledger.recorder import seal_record
from consent.store.db import transaction
from consent.store.models import ConsentRecord, PolicyVersion, Subject, Tenant

REC = ConsentRecord.__table__  # type: ignore[attr-defined]
SUBJ = Subject.__table__  # type: ignore[attr-defined]
DECISIONS = ("granted", "withdrawn", "granted", "denied")


def signer_for(engine: Engine) -> crypto.Signer:
    with transaction(engine, write=True) as db:
        key = receipts.ensure_signing_key(db)
        return crypto.Signer(key.kid, key.private_pem)


def generate_ledger(engine: Engine, tenant_id: str, records: int, *, per_subject: int = 5, group: int = 100,
                    purposes: tuple[str, ...] = ("marketing_email", "analytics"), issuer: str = "http://testserver",
                    start: datetime | None = None, signer: crypto.Signer | None = None) -> int:
    """Append ``records`` records for new subjects of the tenant (chains interleaved in groups)."""
    signer = signer or signer_for(engine)
    start = start or datetime(2024, 1, 1, tzinfo=UTC)
    with transaction(engine) as db:
        tenant = db.get(Tenant, tenant_id)
        assert tenant is not None
        hash_key = tenant.hash_key
        version = db.execute(sa.select(PolicyVersion).where(PolicyVersion.tenant_id == tenant_id)
                             .order_by(PolicyVersion.id)).scalars().first()
    done = 0
    while done < records:
        n_subj = min(group, max(1, (records - done + per_subject - 1) // per_subject))
        subjects = []
        for _ in range(n_subj):
            sid = crypto.new_id("sub", 12)
            subjects.append({"id": sid, "tenant_id": tenant_id, "created_at": start,
                             "pseudonym": crypto.keyed_hash(hash_key, "subject", sid), "head_hash": None,
                             "erased_at": None})
        rows: list[dict[str, Any]] = []
        k = 0
        while done + len(rows) < records and k < n_subj * per_subject:
            s = subjects[k % n_subj]
            purpose = purposes[(k // n_subj) % len(purposes)]
            at = start + timedelta(milliseconds=done + len(rows))
            evidence = {"ip": "198.51.100.0", "user_agent": "bench/1"}
            rec = SimpleNamespace(  # plain attributes: a SQLModel instance costs ~0.3 ms each
                id=crypto.new_id("rec", 12), tenant_id=tenant_id, subject_id=s["id"], purpose=purpose,
                decision=DECISIONS[(k // n_subj) % len(DECISIONS)], confirmed=True,
                policy_key=version.policy_key if version else None,
                policy_version_id=version.id if version else None,
                policy_version=version.version if version else None, source="import", evidence=evidence,
                evidence_sha256=crypto.sha256_hex(crypto.canonical_json(evidence)), disclosures=None,
                recorded_at=at, prev_hash=s["head_hash"], record_hash="", receipt="",
                idempotency_key=None, request_sha256=None, gpc=None,
            )
            seal_record(rec, s["pseudonym"])  # type: ignore[arg-type]
            rec.receipt = signer.sign({"iss": issuer, "sub": s["id"], "tenant": tenant_id,
                                       "jti": crypto.new_id("rct", 12), "iat": int(at.timestamp()),
                                       "version": "consent-receipt/1", "record_id": rec.id,
                                       "record_hash": rec.record_hash, "recorded_at": crypto.iso(at),
                                       "source": "import", "purposes": [{"purpose": purpose, "status": rec.decision}]})
            s["head_hash"] = rec.record_hash
            rows.append({c.name: getattr(rec, c.name, None) for c in REC.columns if c.name != "seq"})
            k += 1
        with transaction(engine, write=True) as db:
            first = events.next_leaf(db, tenant_id, len(rows))  # their transparency-log indexes
            for i, row in enumerate(rows):
                row["leaf_index"] = None if first is None else first + i
            db.execute(sa.insert(SUBJ), subjects)
            db.execute(sa.insert(REC), rows)
        done += len(rows)
    return done
