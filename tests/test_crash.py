"""Crash safety and concurrent writers on a live service (SQLite and PostgreSQL).

Several clients record with an Idempotency-Key and retry on any error until they get a 2xx;
meanwhile the service is SIGKILLed and restarted. Afterwards every acknowledged record is in
the ledger exactly once, nothing is there that was never sent, and every chain verifies.
Then two service processes on one database write to the same subjects at once."""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import Counter
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from consent.ledger.recorder import compute_record_hash
from consent.store import db
from consent.store.models import ConsentRecord, Subject

from .helpers import make_tenant
from .live import LiveServer

pytestmark = pytest.mark.slow

LOAD_SECONDS = 9.0
KILLS = 3
CLIENTS = 6
EMAILS = [f"crash{i}@example.com" for i in range(8)]
FIGURES: dict[str, Any] = {}


class Recorder:
    """One client: records decisions, retrying each (same key, same body) until a 2xx."""

    def __init__(self, bases: list[str], secret_key: str, seed: int):
        self.bases, self.rng = bases, random.Random(seed)
        self.headers = {"Authorization": f"Bearer {secret_key}"}
        self.sent: dict[str, dict[str, Any]] = {}
        self.acked: dict[str, str] = {}
        self.attempts = 0
        self.errors = Counter[str]()

    def body(self) -> dict[str, Any]:
        return {"subject": {"email": self.rng.choice(EMAILS)},
                "purpose": self.rng.choice(["marketing_email", "analytics"]),
                "decision": self.rng.choice(["granted", "denied", "withdrawn"])}

    def send(self, client: httpx.Client, key: str, body: dict[str, Any], deadline: float) -> None:
        while time.monotonic() < deadline:
            base = self.rng.choice(self.bases)
            self.attempts += 1
            try:
                r = client.post(base + "/v1/consents", json=body, headers={**self.headers, "Idempotency-Key": key})
            except httpx.HTTPError as exc:
                self.errors[type(exc).__name__] += 1
                time.sleep(0.05)
                continue
            if r.status_code in (200, 201):
                rec_id = r.json()["id"]
                assert self.acked.setdefault(key, rec_id) == rec_id, "a replay returned another record"
                return
            assert r.status_code >= 500, f"unexpected {r.status_code}: {r.text}"  # 4xx would be a bug here
            self.errors[str(r.status_code)] += 1
            time.sleep(0.02)

    def run(self, stop: threading.Event, deadline: float, fixed: list[tuple[str, dict[str, Any]]] | None = None) -> None:
        with httpx.Client(timeout=5) as client:
            for key, body in fixed or iter(lambda: (str(uuid.uuid4()), self.body()), None):  # type: ignore[call-overload]
                if stop.is_set():
                    return
                self.sent[key] = body
                self.send(client, key, body, deadline)


def verify_ledger(db_url: str, tenant_id: str, sent: set[str], acked: dict[str, str]) -> dict[str, int]:
    """Lost / duplicated / phantom records and chain checks, straight from the database."""
    engine = db.create_db_engine(db_url)
    try:
        with engine.connect() as conn:
            from sqlalchemy.orm import Session

            with Session(bind=conn) as s:
                records = list(s.execute(sa.select(ConsentRecord).where(ConsentRecord.tenant_id == tenant_id)
                                         .order_by(ConsentRecord.seq)).scalars())  # type: ignore[arg-type]
                subjects = {x.id: x for x in s.execute(sa.select(Subject).where(Subject.tenant_id == tenant_id)).scalars()}
    finally:
        engine.dispose()
    keys = Counter(r.idempotency_key for r in records)
    duplicates = sum(n - 1 for n in keys.values())
    by_key = {r.idempotency_key: r.id for r in records}
    lost = [k for k, rec_id in acked.items() if by_key.get(k) != rec_id]
    phantom = [k for k in keys if k not in sent]
    assert duplicates == 0, f"{duplicates} duplicated records"
    assert not lost, f"{len(lost)} acknowledged records missing: {lost[:5]}"
    assert not phantom, f"records that were never sent: {phantom[:5]}"
    chains: dict[str, list[ConsentRecord]] = {}
    for r in records:
        chains.setdefault(r.subject_id, []).append(r)
    for sid, chain in chains.items():
        subject = subjects[sid]
        prevs = Counter(r.prev_hash for r in chain)
        assert max(prevs.values()) == 1, f"fork in the chain of {sid}"
        prev = None
        for r in chain:
            assert r.prev_hash == prev, f"broken link in {sid} at {r.id}"
            assert compute_record_hash(r, subject.pseudonym) == r.record_hash, f"bad hash {r.id}"
            prev = r.record_hash
        assert subject.head_hash == prev, f"head of {sid} is not its last record"
    return {"records": len(records), "subjects": len(chains), "lost": len(lost), "duplicates": duplicates}


def tenant_on(base: str) -> Any:
    client = httpx.Client(base_url=base, timeout=10)
    return make_tenant(client)  # type: ignore[arg-type]  # httpx.Client speaks the TestClient API


def test_sigkill_mid_load_loses_nothing(db_url, backend, tmp_path) -> None:
    server = LiveServer(db_url, tmp_path).start()
    try:
        tenant = tenant_on(server.base)
        stop = threading.Event()
        deadline = time.monotonic() + LOAD_SECONDS + 40  # retries may outlive the load phase
        clients = [Recorder([server.base], tenant.secret_key, seed) for seed in range(CLIENTS)]
        threads = [threading.Thread(target=c.run, args=(stop, deadline)) for c in clients]
        for t in threads:
            t.start()
        started = time.monotonic()
        kills = 0
        for i in range(KILLS):
            time.sleep(max(0.0, started + (i + 1) * LOAD_SECONDS / (KILLS + 1) - time.monotonic()))
            server.kill()
            kills += 1
            time.sleep(0.2)
            server.start()
        time.sleep(max(0.0, started + LOAD_SECONDS - time.monotonic()))
        stop.set()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads)
        sent = {k for c in clients for k in c.sent}
        acked = {k: v for c in clients for k, v in c.acked.items()}
        assert len(acked) == len(sent), "a client gave up on a record"  # every record got its 2xx
        result = verify_ledger(db_url, tenant.id, sent, acked)
        errors = sum((c.errors for c in clients), Counter[str]())
        FIGURES[backend] = {**result, "requests": sum(c.attempts for c in clients), "kills": kills,
                            "acked": len(acked), "errors_seen": dict(errors)}
        print(f"\ncrash test [{backend}]: {FIGURES[backend]}")
        assert kills >= 2 and errors, "the kills did not hit the load"  # the test did exercise failures
        assert result["records"] == len(acked) > 50
    finally:
        server.stop()


def test_two_processes_same_subjects(db_url, backend, tmp_path) -> None:
    """Two service processes on one database: linear chains, idempotency across processes."""
    a = LiveServer(db_url, tmp_path).start()
    b = LiveServer(db_url, tmp_path).start()
    try:
        tenant = tenant_on(a.base)
        stop = threading.Event()
        deadline = time.monotonic() + 30
        # Every key is sent to both processes at the same moment by two clients.
        rng = random.Random(7)
        shared = [(str(uuid.uuid4()), {"subject": {"email": rng.choice(EMAILS[:3])}, "purpose": "analytics",
                                       "decision": rng.choice(["granted", "denied"])}) for _ in range(40)]
        pairs = [Recorder([a.base], tenant.secret_key, 1), Recorder([b.base], tenant.secret_key, 2)]
        mixed = [Recorder([a.base, b.base], tenant.secret_key, 10 + i) for i in range(4)]
        threads = [threading.Thread(target=pairs[0].run, args=(stop, deadline, shared)),
                   threading.Thread(target=pairs[1].run, args=(stop, deadline, shared))]
        threads += [threading.Thread(target=c.run, args=(stop, deadline)) for c in mixed]
        for t in threads:
            t.start()
        threads[0].join(30)
        threads[1].join(30)
        time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join(30)
        everyone = pairs + mixed
        acked: dict[str, str] = {}
        for c in everyone:
            for k, v in c.acked.items():
                assert acked.setdefault(k, v) == v, "the two processes acknowledged different records for one key"
        sent = {k for c in everyone for k in c.sent}
        assert all(k in pairs[0].acked and k in pairs[1].acked for k, _ in shared)
        result = verify_ledger(db_url, tenant.id, sent, acked)
        print(f"\ntwo processes [{backend}]: {result}, requests {sum(c.attempts for c in everyone)}")
        assert result["records"] == len(acked)
    finally:
        a.stop()
        b.stop()
