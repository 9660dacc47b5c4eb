"""The group-commit executor of ``POST /v1/consents`` on PostgreSQL: records that arrive
together are read together and written together, three statements per batch.

The route (``api.RecordConsent``) parses and validates the request, then gives every record that
can take it (one identifier, the newest version in effect, no ``recorded_at``) to the process's
``Writer``; an idle autocommit connection takes every record waiting (one tenant, at most
``BATCH_MAX``) and sends:

1. ``statements.RECORD_READ``: for each record, in one snapshot, whether its key is a live
   secret key, the tenant's evidence settings, the purpose, the newest version covering it, the
   subject and its chain head, an earlier record with the same Idempotency-Key, and the
   tenant's webhook endpoints;
2. ``statements.CLAIM_SQL``, opening a transaction: lock the subjects whose chain heads are
   still the ones read, in subject order, and take one transparency-log leaf index each from
   the tenant's counter row (held to the COMMIT). The receipts name their index, so they are
   signed now. A record whose head another writer moved in between is not claimed and is read
   again in the next batch;
3. ``statements.RECORD_WRITE`` and its COMMIT, sent together (data-modifying CTEs): move the
   claimed records' chain heads by the chain's one rule (``statements.MOVE_HEAD``: only from
   the head read), insert the records, upsert ``consent_state``, take the change-feed
   positions and insert the events and their webhook outbox rows.

At one client a batch is one record; under load one claim, one write, one commit and one WAL
flush serve many records. A batch holds distinct identifiers and Idempotency-Keys, and no identifier
of a batch under way. Rows are written in subject order, so concurrent batches lock subjects in
one order.

The record is built by the same functions as the per-request writer's (``recorder.checked_version``,
``new_record``, ``sign_record``, ``events.event_for``), and errors are raised where they are found
(an invalid decision for the purpose, an unknown purpose, a revoked key). A record the batch
cannot write is handed back to the route's per-request writer (``PerRequest``, before anything
is written): a subject not yet known (the per-request writer creates it), an Idempotency-Key seen
before (it replays or refuses it), a subject whose head kept moving. A connection lost *while
the write is in flight* is a 503 telling the caller to retry with an Idempotency-Key (the
records may exist), as a lost COMMIT of the per-request writer would be.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import orjson
from sqlalchemy.engine import Engine

from consent import crypto
from consent.errors import Unauthorized, Unavailable, ValidationFailed
from consent.ledger import events, recorder, statements
from consent.ledger.batch_reads import pg_connect, pg_connect_args, settle
from consent.ledger.schemas import ConsentIn
from consent.ledger.state import derive_status
from consent.store.models import utcnow

log = logging.getLogger("consent.ledger.batch_writes")

CONNECTIONS = 1  # per process: one batch at a time makes the biggest batches
BATCH_MAX = 32  # records per batch
RETRIES = 3  # reads of a subject whose chain head moved under us before the per-request writer takes it
DECISIONS = ("granted", "denied", "withdrawn")


class PerRequest(Exception):
    """This record is for the per-request writer (nothing of it was written)."""


def takes(spec: ConsentIn) -> bool:
    """Whether a validated request can go to the group commit at all (its subject named by one
    identifier, the newest version in effect, recorded now)."""
    ref = spec.subject
    return (spec.decision in DECISIONS and spec.policy_version is None and spec.recorded_at is None
            and (ref.user_id is not None) + (ref.email is not None) + (ref.anonymous_id is not None) == 1)


class Job:
    """One record waiting for a batch: what it asks, and the future its request awaits."""

    __slots__ = ("fut", "ident", "read", "reads", "spec", "tenant_id")

    def __init__(self, spec: ConsentIn, tenant_id: str, read: dict[str, Any], fut: asyncio.Future[Any]) -> None:
        self.spec, self.tenant_id, self.read, self.fut = spec, tenant_id, read, fut
        self.ident = (read["kind"], read["h"])  # the subject's identifier (kind, keyed hash)
        self.reads = 0  # how often its subject's head was read (a moved head means reading again)


class Writer:
    """The connections, the waiting records and the key cache of one process (see the module doc).

    A record waits in ``_pending``; an idle connection takes a batch of them (one tenant,
    distinct identifiers and Idempotency-Keys, at most ``BATCH_MAX``) and keeps draining until
    nothing waits: at one client a batch is one record, under load one read and one write (one
    commit) serve many (group commit)."""

    def __init__(self, connect_args: dict[str, Any], services: Any, connections: int = CONNECTIONS) -> None:
        self._connect_args = connect_args
        self._services = services
        self._idle: list[Any] = [None] * connections  # connection slots (None: not yet open)
        self._pending: list[Job] = []
        self._writing: set[tuple[str, str]] = set()  # identifiers in a batch under way
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self.recorded = 0  # records written by group commit (tests, debugging)
        self.batches = 0  # write statements sent (each writes a whole batch)

    def _build(self, spec: ConsentIn, tenant_id: str, idempotency_key: str | None, at: Any,
               row: Any) -> tuple[recorder.NewRecord, str, dict[str, Any], Callable[[], None]]:
        """The record (not yet signed: its receipt names its log index, claimed later), its
        status, the write's parameters (``endpoints``: the webhook endpoints the event goes to)
        and the function that signs it, from the read's row; the error the row means (a revoked
        key, an unknown purpose, a decision the purpose does not take); PerRequest for a subject
        not yet known or an Idempotency-Key seen before."""
        if row is None or not row[0]:  # the key was revoked since it was cached, or the tenant is gone
            raise Unauthorized("unknown or revoked API key")
        (_, store_full_ip, store_user_agent, p_key, p_kind, p_basis, p_doi, v_id, v_policy, v_version,
         v_purposes, v_cookies, v_sha, v_url, subject_id, pseudonym, head, replay, endpoints) = row
        if p_key is None:
            raise ValidationFailed.field("purpose", f"unknown purpose {spec.purpose!r}")
        if subject_id is None or replay:
            raise PerRequest
        tenant = SimpleNamespace(id=tenant_id, store_full_ip=store_full_ip, store_user_agent=store_user_agent)
        purpose = SimpleNamespace(key=p_key, kind=p_kind, legal_basis=p_basis, double_opt_in=p_doi)
        version = None if v_id is None else SimpleNamespace(
            id=v_id, policy_key=v_policy, version=v_version, purposes=v_purposes, cookies=v_cookies,
            document_sha256=v_sha, document_url=v_url)
        version = recorder.checked_version(spec, purpose, version, at)
        record = recorder.new_record(
            tenant, spec, purpose, version, subject_id=subject_id, pseudonym=pseudonym, prev_hash=head,
            at=at, confirmed=None, idempotency_key=idempotency_key, request_sha256=recorder.request_digest(spec),
            ip=None, user_agent=None)
        status = derive_status(record.decision, confirmed=record.confirmed, stale=False)
        services = self._services

        def sign() -> None:
            recorder.sign_record(record, purpose, version, status, signer=services.signer,
                               issuer=services.settings.issuer)

        event = events.event_for(record, status)
        hooks = [e_id for e_id, types in endpoints or () if events.type_matches(types, event["type"])]
        params = {k: getattr(record, k) for k in statements.WRITE_COLUMNS}
        params.update(recorded_at=record.recorded_at.isoformat(),
                      export_line=base64.b64encode(record.export_line or b"").decode(),
                      event_id=event["id"], event_type=event["type"], event_data=event["data"], endpoints=hooks)
        return record, status, params, sign

    async def _after_failure(self, conn: Any, exc: BaseException,
                             writing: bool) -> tuple[Any, BaseException]:
        """The connection to keep (None: closed) and what a failure means for the records at
        hand: the failure itself (nothing was written: the route logs and counts it and writes
        them per request) or Unavailable (the connection broke while the write was in flight:
        the records may exist)."""
        import psycopg

        if conn is not None and conn.broken:
            await conn.close()
        if conn is not None and not conn.closed \
                and conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            try:  # a claim or write that failed: give back its locks and leaf indexes
                await conn.execute("ROLLBACK")
            except psycopg.Error:
                await conn.close()
        if conn is not None and conn.closed:
            conn = None
        if writing and isinstance(exc, psycopg.Error) and exc.sqlstate is None \
                and not isinstance(exc, psycopg.ProgrammingError):
            # No SQLSTATE: the server did not answer (connection lost), maybe after committing.
            log.warning("group commit: connection failed (%s); the outcome is unknown", type(exc).__name__)
            return conn, Unavailable("the database connection failed while recording; retry with an "
                                     "Idempotency-Key", headers={"Retry-After": "1"})
        return conn, exc

    def _park(self, conn: Any) -> None:
        if self._closed:
            if conn is not None:
                asyncio.get_running_loop().create_task(conn.close())
        else:
            self._idle.append(conn)

    def _start(self, conn: Any) -> None:
        task = asyncio.get_running_loop().create_task(self._drain(conn))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def record(self, tenant_id: str, hash_key: str, key_digest: str, spec: ConsentIn,
                     idempotency_key: str | None) -> tuple[recorder.NewRecord, str]:
        """Record ``spec`` (``takes(spec)``) for the tenant of a secret key known to the route:
        the record and its status, or the error it meets, or PerRequest (nothing written)."""
        if self._closed:
            raise PerRequest
        (kind, value), = [(k, v) for k, v in (("user", spec.subject.user_id), ("email", spec.subject.email),
                                                ("anon", spec.subject.anonymous_id)) if v]
        h = crypto.keyed_hash(hash_key, kind, crypto.normalize_email(value) if kind == "email" else value)
        read = {"kh": key_digest, "kind": kind, "h": h, "ik": idempotency_key, "p": spec.purpose, "k": spec.policy}
        job = Job(spec, tenant_id, read, asyncio.get_running_loop().create_future())
        self._pending.append(job)
        if self._idle:
            self._start(self._idle.pop())
        return await job.fut

    def _next_batch(self) -> list[Job]:
        """Up to BATCH_MAX waiting records of one tenant, with distinct identifiers and
        Idempotency-Keys, none of whose identifiers is in another batch under way (a record of
        the same subject waits for the next batch rather than race it for the chain head); the
        rest stay in order. Empty when everything waiting waits for a batch under way."""
        tenant = None
        batch: list[Job] = []
        rest: list[Job] = []
        ikeys: set[str] = set()
        writing = self._writing
        for job in self._pending:
            ikey = job.read["ik"]
            if (len(batch) >= BATCH_MAX or job.ident in writing or (tenant is not None and job.tenant_id != tenant)
                    or (ikey is not None and ikey in ikeys)):
                rest.append(job)
                continue
            tenant = job.tenant_id
            batch.append(job)
            writing.add(job.ident)
            if ikey is not None:
                ikeys.add(ikey)
        self._pending = rest
        return batch

    async def _drain(self, conn: Any) -> None:
        """Write batches on one connection until nothing waits."""
        batch: list[Job] = []
        try:
            while self._pending and not self._closed:
                batch = self._next_batch()
                if not batch:
                    break  # what waits, waits for a batch under way; that drain takes it next
                try:
                    conn, retry = await self._write_batch(conn, batch)
                finally:
                    self._writing.difference_update(job.ident for job in batch)
                self._pending[:0] = retry
                batch = []
        except BaseException:  # cancelled mid-batch (shutdown): the outcome is unknown
            settle([(job.fut, Unavailable("the service stopped while recording; retry with an Idempotency-Key",
                                          headers={"Retry-After": "1"})) for job in batch])
            raise
        finally:
            self._park(conn)

    async def _write_batch(self, conn: Any, batch: list[Job]) -> tuple[Any, list[Job]]:
        """Read, build and write one batch. Settles every record written or declined; returns
        the connection to keep and the records to read again (their subject's head moved)."""
        tenant_id = batch[0].tenant_id
        built: list[tuple[Job, recorder.NewRecord, str, dict[str, Any], Callable[[], None]]] = []
        retry: list[Job] = []
        writing = False
        try:
            if conn is None or conn.closed:
                conn = None
                conn = await pg_connect(self._connect_args)
            at = utcnow()
            inputs = orjson.dumps([{"i": n, **job.read} for n, job in enumerate(batch)]).decode()
            found = {row[0]: row[1:] for row in await (await conn.execute(
                statements.RECORD_READ, {"q": inputs, "t": tenant_id, "at": at})).fetchall()}
            subjects: set[str] = set()
            for n, job in enumerate(batch):
                job.reads += 1
                try:
                    record, status, params, sign = self._build(job.spec, tenant_id, job.read["ik"], at, found.get(n))
                except Exception as exc:  # noqa: BLE001 - its request raises it (the route logs a failure)
                    settle([(job.fut, exc)])
                    continue
                if record.subject_id in subjects:  # one subject named by two identifiers: next batch
                    retry.append(job)
                    continue
                subjects.add(record.subject_id)
                built.append((job, record, status, params, sign))
            if not built:
                return conn, retry
            built.sort(key=lambda b: b[1].subject_id)  # one lock order for every batch
            # The receipts name the records' log indexes, so those are claimed before signing
            # (statements.CLAIM_SQL, opening the transaction): sign, then write and COMMIT.
            claim = orjson.dumps([{"i": n, "subject_id": b[1].subject_id, "prev_hash": b[1].prev_hash}
                                  for n, b in enumerate(built)]).decode()
            async with conn.pipeline():
                await conn.execute("BEGIN")
                cur = await conn.execute(statements.CLAIM_SQL, {"q": claim, "t": tenant_id})
            claimed = await cur.fetchall()
            written: dict[int, int] = {}
            if not claimed:  # every head moved: read again below
                await conn.execute("ROLLBACK")
            else:
                first = claimed[-1][1] - len(claimed)
                rows_out = []
                for k, (n, _) in enumerate(claimed):
                    record, params = built[n][1], built[n][3]
                    record.leaf_index = first + k
                    built[n][4]()
                    params.update(leaf_index=record.leaf_index, receipt=record.receipt)
                    rows_out.append({"i": n, **params})
                rows = orjson.dumps(rows_out).decode()
                self.batches += 1
                writing = True
                async with conn.pipeline():
                    cur = await conn.execute(statements.RECORD_WRITE,
                                             {"q": rows, "t": tenant_id, "now": utcnow()})
                    await conn.execute("COMMIT")
                written = dict(await cur.fetchall())
        except Exception as exc:  # noqa: BLE001 - every record of the batch raises it (logged, counted)
            conn, failure = await self._after_failure(conn, exc, writing)
            settle([(job.fut, failure) for job in batch if job not in retry])
            return conn, retry
        hooks_any = False
        for n, (job, record, status, params, _) in enumerate(built):
            seq = written.get(n)
            if seq is not None:
                record.seq = seq
                self.recorded += 1
                hooks_any = hooks_any or bool(params["endpoints"])
                settle([(job.fut, (record, status))])
            elif job.reads >= RETRIES:
                settle([(job.fut, PerRequest())])  # a hot subject: it waits its turn on the row lock
            else:
                retry.append(job)  # another record of this subject moved the head: read again
        if hooks_any:
            events.wake_delivery_loops()
        if written:
            events.feed_changed(tenant_id)
        return conn, retry

    async def close(self) -> None:
        self._closed = True
        for job in self._pending:
            settle([(job.fut, PerRequest())])
        self._pending = []
        for conn in self._idle:
            if conn is not None:
                await conn.close()
        self._idle = []


def open_writer(engine: Engine, services: Any) -> Writer | None:
    """The group-commit writer for this engine's database (PostgreSQL only), or None."""
    if engine.dialect.name != "postgresql":
        return None
    return Writer(pg_connect_args(engine), services)
