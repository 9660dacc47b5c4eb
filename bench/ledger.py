"""Generate a realistic, valid ledger for the benchmark, fast, with bulk Core inserts.

One tenant, 3 purposes, 2 policy versions, N subjects (each with an email and half with a
user id) and about 5 records per subject; or, with ``history=False`` (the 1,000,000-subject
ledger of bench/bulk_bench.py, which would not fit on the disk otherwise), one record per
subject, on ``marketing_email``. Every row is what the service itself would have
written: identifier hashes under the tenant's key, hash-chained records (``seal_record``: hash and export line),
receipts signed by the database's own signing key, consent_state in step with the newest record.
The catalog (tenant, keys, purposes, versions) is made through the domain layer; only the bulk
rows are computed here. SQLite and PostgreSQL get the same shape of ledger (one process each).
"""

from __future__ import annotations

import hashlib
import random
import types
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from consent import crypto
from consent.ledger import catalog, receipts, tenants
from consent.ledger.receipts import record_claims
from consent.ledger.recorder import seal_record, status_of_record
from consent.ledger.schemas import PolicyVersionIn, PurposeIn, TenantIn
from consent.store import db
from consent.store.models import ConsentRecord, ConsentState, SigningKey, Subject, SubjectIdentifier

PURPOSES = ("marketing_email", "analytics", "personalization")
ISSUER = "http://127.0.0.1"
DOC_SHA = hashlib.sha256(b"bench policy").hexdigest()
BATCH = 5000  # subjects per insert batch


def email_of(i: int) -> str:
    return f"user{i}@bench.example"


def reset(url: str) -> None:
    """An empty database at that URL, migrated to head."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[1]
        import os

        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(path + suffix):
                os.remove(path + suffix)
    else:
        engine = sa.create_engine(url)
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP SCHEMA IF EXISTS public CASCADE")
            conn.exec_driver_sql("CREATE SCHEMA public")
        engine.dispose()
    db.migrate(url)


def make_catalog(engine: Engine, signing: SigningKey | None) -> dict[str, Any]:
    """Tenant, keys, purposes and two policy versions through the domain layer."""
    with db.transaction(engine, write=True) as s:
        if signing is None:
            signing = receipts.ensure_signing_key(s)
        else:
            s.add(SigningKey(kid=signing.kid, private_pem=signing.private_pem,
                             public_jwk=signing.public_jwk, created_at=signing.created_at))
        tenant, keys = tenants.create_tenant(s, TenantIn(name="Bench", allowed_origins=["http://127.0.0.1"],
                                                         notice_days=0))
        for key in PURPOSES:
            catalog.put_purpose(s, tenant.id, key, PurposeIn(kind="consent", legal_basis="consent",
                                                              title=key.replace("_", " ").title()))
        versions = []
        for v in ("v1", "v2"):
            versions.append(catalog.publish_version(s, tenant.id, 0, "privacy", PolicyVersionIn(
                version=v, document_url=f"https://bench.example/privacy/{v}", document_sha256=DOC_SHA,
                material=False, purposes=list(PURPOSES))))
        out = {"tenant_id": tenant.id, "hash_key": tenant.hash_key, "secret_key": keys["secret"],
               "publishable_key": keys["publishable"],
               "versions": [(v.id, v.version, v.document_url) for v in versions],
               "signing": {"kid": signing.kid, "private_pem": signing.private_pem,
                           "public_jwk": signing.public_jwk, "created_at": signing.created_at}}
    return out


def generate(meta: dict[str, Any], subjects: int, seed: int = 7,
             history: bool = True) -> Iterator[dict[str, list[dict[str, Any]]]]:
    """Batches of rows (subject, subject_identifier, consent_record, consent_state)."""
    rng = random.Random(seed)
    signer = crypto.Signer(meta["signing"]["kid"], meta["signing"]["private_pem"])
    tid, hk = meta["tenant_id"], meta["hash_key"]
    versions = meta["versions"]
    start = datetime(2025, 1, 1, tzinfo=UTC)
    seq = 0
    for base in range(0, subjects, BATCH):
        rows: dict[str, list[dict[str, Any]]] = {"subject": [], "si": [], "rec": [], "state": []}
        for i in range(base, min(base + BATCH, subjects)):
            sid = f"sub_{i:024x}"
            pseudonym = crypto.keyed_hash(hk, "subject", sid)
            created = start + timedelta(minutes=i % 500_000)
            email = email_of(i)
            rows["si"].append({"tenant_id": tid, "kind": "email", "value_hash": crypto.keyed_hash(hk, "email", email),
                               "value": email, "subject_id": sid, "created_at": created})
            if i % 2 == 0:
                uid = f"u{i}"
                rows["si"].append({"tenant_id": tid, "kind": "user", "value_hash": crypto.keyed_hash(hk, "user", uid),
                                   "value": uid, "subject_id": sid, "created_at": created})
            # ~5 records: one per purpose, then two later changes of mind.
            plan = [(p, rng.random() < 0.6) for p in PURPOSES] + [
                (rng.choice(PURPOSES), rng.random() < 0.5) for _ in range(2)] if history else [
                (PURPOSES[0], rng.random() < 0.6)]
            prev = None
            at = created
            latest: dict[str, dict[str, Any]] = {}
            for n, (purpose, grant) in enumerate(plan):
                seq += 1
                at = at + timedelta(days=rng.randint(1, 40), seconds=rng.randint(0, 86399))
                vid, vname, vurl = versions[0] if n < 3 else versions[1]
                evidence = {"ip": "203.0.113.0", "user_agent": "Mozilla/5.0 (bench)"}
                rec = types.SimpleNamespace(
                    seq=seq, id=f"rec_{seq:024x}", tenant_id=tid, subject_id=sid, purpose=purpose,
                    decision="granted" if grant else "denied", confirmed=True, policy_key="privacy",
                    policy_version_id=vid, policy_version=vname, source="api", evidence=evidence,
                    evidence_sha256=crypto.sha256_hex(crypto.canonical_json(evidence)), disclosures=None,
                    recorded_at=at, idempotency_key=None, request_sha256=None, prev_hash=prev,
                    leaf_index=seq - 1,  # the tenant's transparency-log index: one tenant, in seq order
                )
                seal_record(rec, pseudonym)  # type: ignore[arg-type]
                status = status_of_record(rec)  # type: ignore[arg-type]
                rec.receipt = signer.sign(record_claims(
                    issuer=ISSUER, tenant_id=tid, subject_id=sid,
                    policy={"key": "privacy", "version": vname, "sha256": DOC_SHA, "url": vurl},
                    record={"id": rec.id, "record_hash": rec.record_hash, "source": "api",
                            "recorded_at": crypto.iso(at)},
                    purposes=[{"purpose": purpose, "status": status, "legal_basis": "consent", "kind": "consent"}],
                ))
                prev = rec.record_hash
                row = dict(vars(rec))
                rows["rec"].append(row)
                latest[purpose] = row
            rows["subject"].append({"id": sid, "tenant_id": tid, "pseudonym": pseudonym, "head_hash": prev,
                                    "created_at": created, "erased_at": None})
            for purpose, r in latest.items():
                rows["state"].append({
                    "tenant_id": tid, "subject_id": sid, "purpose": purpose, "record_seq": r["seq"],
                    "decision": r["decision"], "confirmed": True, "policy_key": "privacy",
                    "policy_version_id": r["policy_version_id"], "policy_version": r["policy_version"],
                    "recorded_at": r["recorded_at"], "receipt_seq": r["seq"], "record_id": r["id"],
                    "receipt": r["receipt"]})
        yield rows


def _fill(url: str, meta: dict[str, Any], subjects: int, history: bool = True) -> int:
    engine = db.create_db_engine(url)
    records = 0
    for rows in generate(meta, subjects, history=history):
        with engine.begin() as conn:
            for name, model in TABLES:
                conn.execute(sa.insert(model.__table__), rows[name])  # type: ignore[attr-defined]
        records += len(rows["rec"])
    with engine.begin() as conn:
        # The tenant's next transparency-log index follows the generated ones.
        conn.execute(sa.text("INSERT INTO event_counter (tenant_id, last_position, leaves) VALUES (:t, 0, :n)"),
                     {"t": meta["tenant_id"], "n": records})
        if engine.dialect.name == "postgresql":
            conn.exec_driver_sql("SELECT setval(pg_get_serial_sequence('consent_record', 'seq'), "
                                 "(SELECT max(seq) FROM consent_record))")
        else:
            conn.exec_driver_sql("ANALYZE")
    engine.dispose()
    vacuum(url)
    return records


def vacuum(url: str) -> None:
    """PostgreSQL: ``VACUUM ANALYZE``, as autovacuum would have by then (visibility map, hint bits,
    statistics). After the ledger is made and at the start of every run that reuses it: the record
    rows of earlier runs update ~40,000 states each, and with autovacuum off (as on this kind of
    machine) index-only scans then visit the heap for every changed page. Not run between the
    record and bulk cells of one run."""
    if not url.startswith("postgresql"):
        return
    engine = sa.create_engine(url)
    try:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM ANALYZE")
    finally:
        engine.dispose()


TABLES = (("subject", Subject), ("si", SubjectIdentifier), ("rec", ConsentRecord), ("state", ConsentState))


def build(urls: list[str], subjects: int, log: Any = print, history: bool = True) -> dict[str, Any]:
    """Fill every database in ``urls`` with a ledger of that size (``history``: see the module
    docstring); returns each one's meta (keys etc.)."""
    for url in urls:
        reset(url)
    engines = [db.create_db_engine(u) for u in urls]
    metas = []
    signing = None
    for engine in engines:
        m = make_catalog(engine, signing)
        signing = types.SimpleNamespace(**m["signing"])  # type: ignore[assignment]
        metas.append(m)
        engine.dispose()
    # Each database has its own tenant (ids and keys differ), so rows are generated per database;
    # the two databases are filled by two processes at once.
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(len(urls)) as pool:
        counts = pool.starmap(_fill, [(url, meta, subjects, history) for url, meta in zip(urls, metas)])
    for url in urls:
        log(f"  {url}: {subjects} subjects loaded")
    records = counts[0]
    for m in metas:
        m["signing"] = {"kid": m["signing"]["kid"]}  # the private key stays in the database only
        m["records"] = records
        m["subjects"] = subjects
    return {url: m for url, m in zip(urls, metas)}
