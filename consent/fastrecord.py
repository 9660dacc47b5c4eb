"""``POST /v1/consents`` on PostgreSQL for the common case: records that arrive together are
read together and written together, two statements per batch (group commit).

The route (``api.record_consent`` → ``ledger.record_decision``) sends about ten statements
through the ORM session: ~4 ms of Python per record. ``handle`` (run before any middleware by
``app.ConsentApp``, PostgreSQL only) records a decision of an *existing* subject named by *one*
identifier, under the newest policy version in effect. The request waits in the process's
``Writer``; an idle autocommit connection takes every record waiting (one tenant, at most
``BATCH_MAX``) and sends:

1. one read returning for each record, in one snapshot, whether its key is a live secret key,
   the tenant's evidence settings, the purpose, the newest version covering it, the subject and
   its chain head, an earlier record with the same Idempotency-Key, and the tenant's webhook
   endpoints;
2. one claim, opening a transaction (``events.CLAIM_SQL``): lock the subjects whose chain heads
   are still the ones read, in subject order, and take one transparency-log leaf index each
   from the tenant's counter row (held to the COMMIT, as in ``events.next_leaf``). The receipts
   name their index, so they are signed now. A record whose head another writer moved in
   between is not claimed and is read again in the next batch: chains stay linear;
3. one write and its COMMIT, sent together (data-modifying CTEs): move the claimed records'
   chain heads, insert the records, upsert ``consent_state``, take the tenant's next
   change-feed positions (the same counter row) and insert the events and their webhook
   outbox rows.

At one client a batch is one record (the latency of three round trips);
under load one claim, one write, one commit and one WAL flush serve many records, which halved the
CPU per record in both the workers and PostgreSQL. A batch
holds distinct identifiers and Idempotency-Keys, and no identifier of a batch under way: a
second record of the same subject waits for the next batch instead of racing the first for the
chain head. Rows are written in subject order, so concurrent batches lock subjects in one order.

The record itself is built by the same functions as the route's (``ledger.checked_version``,
``new_record``, ``sign_record``, ``events.event_for``), so the two paths write the same
rows; ``tests/test_fastrecord.py`` compares them. Anything else is *declined* before any
write and goes to the route unchanged (its body is replayed): a new subject or several
identifiers, a named ``policy_version`` or ``recorded_at``, a notice purpose, an Idempotency-Key
seen before (or lost to a concurrent twin: the whole batch is declined), any invalid input (the
route makes every error), a revoked key, a database error. A connection lost *while the write is
in flight* is not declined (the records may exist): each record of that batch gets a 503 telling
the caller to retry with an Idempotency-Key, as the route's own lost COMMIT would be.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import time
from types import SimpleNamespace
from typing import Any

import orjson
from pydantic import ValidationError
from sqlalchemy.engine import Engine
from starlette.types import Message, Receive, Scope, Send

from . import crypto, events, ledger
from .errors import Unavailable, ValidationFailed
from .fastcheck import (
    _KEY_SQL,
    Declined,
    KeyCache,
    bearer_token,
    pg_connect,
    pg_connect_args,
    send_json,
    settle,
)
from .http import dumps, problem_response
from .middleware import BASE_HEADERS, finish_request, incoming_request_id, new_request_id
from .models import utcnow
from .schemas import ConsentIn
from .state import derive_status
from .tenants import key_live_sql

log = logging.getLogger("consent.fastrecord")

ROUTE = "/v1/consents"
BODY_MAX = 16 * 1024  # larger bodies go to the route (which allows up to max_body_bytes)
CONNECTIONS = 1  # per process: one batch at a time makes the biggest batches
BATCH_MAX = 32  # records per batch
RETRIES = 3  # reads of a subject whose chain head moved under us before the route takes over
# What the write takes of a NewRecord (its tenant is the batch's).
WRITE_COLUMNS = tuple(c for c in ledger.RECORD_COLUMNS if c != "tenant_id")
DECISIONS = ("granted", "denied", "withdrawn")

# One read for a whole batch (one tenant): per input row ``i``, in one snapshot, whether its key
# is a live secret key, the tenant's evidence settings, the purpose, the newest version covering
# it, the subject and its chain head, an earlier record with the same Idempotency-Key, and the
# tenant's webhook endpoints. The inputs travel as ONE JSON text (as the check's: no per-element
# array dumping in psycopg). A row is missing only where the tenant is gone.
_READ = f"""
SELECT q.i,
  EXISTS (SELECT 1 FROM api_key k WHERE k.key_hash = q.kh AND k.tenant_id = t.id
          AND {key_live_sql("k", "%(at)s")} AND k.kind = 'secret'),
  t.store_full_ip, t.store_user_agent,
  pu.key, pu.kind, pu.legal_basis, pu.double_opt_in,
  v.id, v.policy_key, v.version, v.purposes, v.cookies, v.document_sha256, v.document_url,
  subj.id, subj.pseudonym, subj.head_hash,
  EXISTS (SELECT 1 FROM consent_record r WHERE r.tenant_id = t.id AND r.idempotency_key = q.ik),
  (SELECT json_agg(json_build_array(e.id, e.event_types)) FROM webhook_endpoint e
   WHERE e.tenant_id = t.id AND e.enabled AND e.deleted_at IS NULL)
FROM json_to_recordset(%(q)s::json) AS q(i int, kh text, kind text, h text, ik text, p text, k text)
JOIN tenant t ON t.id = %(t)s
LEFT JOIN purpose pu ON pu.tenant_id = t.id AND pu.key = q.p
LEFT JOIN LATERAL (
  SELECT pv.id FROM policy_version pv JOIN policy_purpose pp ON pp.policy_version_id = pv.id
  WHERE pv.tenant_id = t.id AND pv.policy_key = q.k AND pv.effective_at <= %(at)s AND pp.purpose = q.p
  ORDER BY pv.id DESC LIMIT 1) lv ON true
LEFT JOIN policy_version v ON v.id = lv.id
LEFT JOIN LATERAL (
  SELECT s.id, s.pseudonym, s.head_hash FROM subject s
  JOIN subject_identifier si ON si.subject_id = s.id
  WHERE si.tenant_id = t.id AND si.kind = q.kind AND si.value_hash = q.h) subj ON true
ORDER BY q.i
"""

# One write for a whole batch (one tenant, distinct subjects), committed as one statement: move
# each chain head *only if it is still the one read*, and for exactly those records insert the
# record, upsert ``consent_state``, take the tenant's next change-feed positions (the counter row,
# held to the commit as in ``events._allocate``: one increment by the number written) and insert
# the events and their webhook outbox rows. Returns ``(i, seq)`` of the records written; a
# record whose head moved is not written and is read again. Rows come in subject order, so
# concurrent batches lock subjects in the same order.
_WRITE = """
WITH v AS MATERIALIZED (
  SELECT * FROM json_to_recordset(%(q)s::json) AS v(i int, id text, subject_id text, purpose text,
    decision text, confirmed boolean, policy_key text, policy_version_id bigint, policy_version text,
    source text, evidence json, evidence_sha256 text, disclosures json, recorded_at timestamptz,
    idempotency_key text, request_sha256 text, prev_hash text, record_hash text, receipt text,
    export_line text, leaf_index bigint, event_id text, event_type text, event_data json, endpoints json)
), head AS (
  UPDATE subject s SET head_hash = v.record_hash FROM v
  WHERE s.id = v.subject_id AND s.head_hash IS NOT DISTINCT FROM v.prev_hash
  RETURNING v.i
), w AS MATERIALIZED (
  SELECT v.*, row_number() OVER (ORDER BY v.i) AS rn, count(*) OVER () AS n FROM v JOIN head USING (i)
), rec AS (
  INSERT INTO consent_record (id, tenant_id, subject_id, purpose, decision, confirmed, policy_key,
    policy_version_id, policy_version, source, evidence, evidence_sha256, disclosures, recorded_at,
    idempotency_key, request_sha256, prev_hash, record_hash, receipt, export_line, leaf_index)
  SELECT w.id, %(t)s, w.subject_id, w.purpose, w.decision, w.confirmed, w.policy_key,
    w.policy_version_id, w.policy_version, w.source, w.evidence, w.evidence_sha256, w.disclosures,
    w.recorded_at, w.idempotency_key, w.request_sha256, w.prev_hash, w.record_hash, w.receipt,
    decode(w.export_line, 'base64'), w.leaf_index
  FROM w ORDER BY w.i
  RETURNING seq, id
), state AS (
  INSERT INTO consent_state (tenant_id, subject_id, purpose, record_seq, decision, confirmed, policy_key,
    policy_version_id, policy_version, recorded_at, receipt_seq, record_id, receipt)
  SELECT %(t)s, w.subject_id, w.purpose, rec.seq, w.decision, w.confirmed, w.policy_key,
    w.policy_version_id, w.policy_version, w.recorded_at, rec.seq, w.id, w.receipt FROM w JOIN rec ON rec.id = w.id
  ON CONFLICT (tenant_id, subject_id, purpose) DO UPDATE SET record_seq = EXCLUDED.record_seq,
    decision = EXCLUDED.decision, confirmed = EXCLUDED.confirmed, policy_key = EXCLUDED.policy_key,
    policy_version_id = EXCLUDED.policy_version_id, policy_version = EXCLUDED.policy_version,
    recorded_at = EXCLUDED.recorded_at, receipt_seq = EXCLUDED.receipt_seq, record_id = EXCLUDED.record_id,
    receipt = EXCLUDED.receipt, gpc = EXCLUDED.gpc
  WHERE consent_state.recorded_at <= EXCLUDED.recorded_at
), counter AS (
  INSERT INTO event_counter (tenant_id, last_position) SELECT %(t)s, count(*) FROM rec HAVING count(*) > 0
  ON CONFLICT (tenant_id) DO UPDATE SET last_position = event_counter.last_position + EXCLUDED.last_position
  RETURNING last_position
), ev AS (
  INSERT INTO event (tenant_id, position, id, type, record_id, subject_id, data, created_at)
  SELECT %(t)s, counter.last_position - w.n + w.rn, w.event_id, w.event_type, w.id, w.subject_id,
    w.event_data, %(now)s FROM w, counter
  RETURNING position, id
), outbox AS (
  INSERT INTO webhook_delivery (tenant_id, endpoint_id, event_id, event_position, event_type, status,
    attempts, next_attempt_at, created_at)
  SELECT %(t)s, e.id, w.event_id, ev.position, w.event_type, 'pending', 0, %(now)s, %(now)s
  FROM w JOIN ev ON ev.id = w.event_id, json_array_elements_text(w.endpoints) AS e(id)
)
SELECT w.i, rec.seq FROM w JOIN rec ON rec.id = w.id JOIN ev ON ev.id = w.event_id
  LEFT JOIN (SELECT pg_notify('consent_feed', %(t)s) FROM counter) AS feed_note ON true
"""


class Job:
    """One record waiting for a batch: what it asks, and the future its request awaits."""

    __slots__ = ("spec", "tenant_id", "read", "ident", "fut", "reads")

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
        self._keys = KeyCache(crypto.keyring_of(services.engine))
        self._lookups: dict[str, asyncio.Future[Any]] = {}  # key digest -> its lookup under way
        self.recorded = 0  # records written here rather than by the route (tests, debugging)
        self.batches = 0  # write statements sent (each writes a whole batch)

    async def _key(self, digest: str) -> tuple[str, str]:
        """The tenant and hash key of a secret key (cached: those never change for a key).
        Records that arrive together with a key not yet known wait for one lookup of it."""
        known = self._keys.get(digest)
        if known is None:
            lookup = self._lookups.get(digest)
            if lookup is None:
                lookup = self._lookups[digest] = asyncio.ensure_future(self._lookup_key(digest))
                lookup.add_done_callback(lambda _: self._lookups.pop(digest, None))
            known = await asyncio.shield(lookup)  # one caller giving up does not stop the others'
        tenant_id, kind, hash_key = known
        if kind != "secret":
            raise Declined  # the route says 403
        return tenant_id, hash_key

    async def _lookup_key(self, digest: str) -> tuple[str, str, str]:
        if self._closed or not self._idle:
            raise Declined  # every connection is busy writing: the route looks this key up
        conn = self._idle.pop()
        row, failure = None, None
        try:
            if conn is None or conn.closed:
                conn = None
                conn = await pg_connect(self._connect_args)
            row = await (await conn.execute(_KEY_SQL.format(kh="%s"), (digest,))).fetchone()
        except Exception as exc:
            conn, failure = await self._after_failure(conn, exc, writing=False)
        finally:
            self._give_back(conn)
        if failure is not None or row is None:
            raise Declined  # unknown or revoked: the route says 401 (or the database is down)
        return self._keys.put(digest, tuple(row))  # type: ignore[arg-type,return-value]

    def _build(self, spec: ConsentIn, tenant_id: str, idempotency_key: str | None, at: Any,
               row: Any) -> tuple[ledger.NewRecord, str, dict[str, Any], Any]:
        """The record (not yet signed: its receipt names its log index, claimed later), its
        status, the write's parameters (``endpoints``: the webhook endpoints the event goes to)
        and the function that signs it; from the read's row. Declined where the route must answer."""
        if row is None:  # the tenant is gone
            raise Declined
        (key_ok, store_full_ip, store_user_agent, p_key, p_kind, p_basis, p_doi, v_id, v_policy, v_version,
         v_purposes, v_cookies, v_sha, v_url, subject_id, pseudonym, head, replay, endpoints) = row
        if not key_ok or p_key is None or subject_id is None or replay:
            raise Declined
        tenant = SimpleNamespace(id=tenant_id, store_full_ip=store_full_ip, store_user_agent=store_user_agent)
        purpose = SimpleNamespace(key=p_key, kind=p_kind, legal_basis=p_basis, double_opt_in=p_doi)
        version = None if v_id is None else SimpleNamespace(
            id=v_id, policy_key=v_policy, version=v_version, purposes=v_purposes, cookies=v_cookies,
            document_sha256=v_sha, document_url=v_url)
        try:
            version = ledger.checked_version(spec, purpose, version, at)
        except ValidationFailed:
            raise Declined from None
        record = ledger.new_record(
            tenant, spec, purpose, version, subject_id=subject_id, pseudonym=pseudonym, prev_hash=head,
            at=at, confirmed=None, idempotency_key=idempotency_key, request_sha256=ledger.request_digest(spec),
            ip=None, user_agent=None)
        status = derive_status(record.decision, confirmed=record.confirmed, stale=False)
        services = self._services

        def sign() -> None:
            ledger.sign_record(record, purpose, version, status, signer=services.signer,
                               issuer=services.settings.issuer)

        event = events.event_for(record, status)
        hooks = [e_id for e_id, types in endpoints or () if events.type_matches(types, event["type"])]
        params = {k: getattr(record, k) for k in WRITE_COLUMNS}
        params.update(recorded_at=record.recorded_at.isoformat(),
                      export_line=base64.b64encode(record.export_line or b"").decode(),
                      event_id=event["id"], event_type=event["type"], event_data=event["data"], endpoints=hooks)
        return record, status, params, sign

    async def _after_failure(self, conn: Any, exc: BaseException,
                             writing: bool) -> tuple[Any, Declined | Unavailable]:
        """The connection to keep (None: closed) and what a failure means for the records at
        hand: Declined (nothing was written: the route takes them) or Unavailable (the
        connection broke while the write was in flight: the records may exist)."""
        import psycopg

        if conn is not None and conn.broken:
            await conn.close()
        if conn is not None and not conn.closed and conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            try:  # a claim or write that failed: give back its locks and leaf indexes
                await conn.execute("ROLLBACK")
            except psycopg.Error:
                await conn.close()
        if conn is not None and conn.closed:
            conn = None
        if writing and isinstance(exc, psycopg.Error) and exc.sqlstate is None \
                and not isinstance(exc, psycopg.ProgrammingError):
            # No SQLSTATE: the server did not answer (connection lost), maybe after committing.
            log.warning("fast record: connection failed (%s); the outcome is unknown", type(exc).__name__)
            return conn, Unavailable("the database connection failed while recording; retry with an "
                                     "Idempotency-Key", headers={"Retry-After": "1"})
        log.debug("fast record declined after %s", type(exc).__name__)
        return conn, Declined()

    def _give_back(self, conn: Any) -> None:
        """A connection back from a key lookup: it drains what waits, else it waits itself."""
        if self._pending and not self._closed:
            self._start(conn)
        else:
            self._park(conn)

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

    async def record(self, token: str, spec: ConsentIn, idempotency_key: str | None) -> bytes:
        """The 201 body of a recorded decision, or Declined (nothing written)."""
        if self._closed:
            raise Declined
        (kind, value), = [(k, v) for k, v in (("user", spec.subject.user_id), ("email", spec.subject.email),
                                                ("anon", spec.subject.anonymous_id)) if v]
        digest = hashlib.sha256(token.encode()).hexdigest()
        tenant_id, hash_key = await self._key(digest)
        if kind == "email":
            value = crypto.normalize_email(value)
        read = {"kh": digest, "kind": kind, "h": crypto.keyed_hash(hash_key, kind, value), "ik": idempotency_key,
                "p": spec.purpose, "k": spec.policy}
        job = Job(spec, tenant_id, read, asyncio.get_running_loop().create_future())
        self._pending.append(job)
        if self._idle:
            self._start(self._idle.pop())
        record, status = await job.fut
        return dumps(ledger.record_out(record, status))

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
        built: list[tuple[Job, ledger.NewRecord, str, dict[str, Any], Any]] = []
        retry: list[Job] = []
        writing = False
        try:
            if conn is None or conn.closed:
                conn = None
                conn = await pg_connect(self._connect_args)
            at = utcnow()
            inputs = orjson.dumps([{"i": n, **job.read} for n, job in enumerate(batch)]).decode()
            found = {row[0]: row[1:] for row in await (await conn.execute(
                _READ, {"q": inputs, "t": tenant_id, "at": at})).fetchall()}
            subjects: set[str] = set()
            for n, job in enumerate(batch):
                job.reads += 1
                try:
                    record, status, params, sign = self._build(job.spec, tenant_id, job.read["ik"], at, found.get(n))
                except Exception as exc:  # Declined, or a bug: the route answers this one
                    if not isinstance(exc, Declined):
                        log.exception("fast record failed; the route answers")
                    settle([(job.fut, Declined())])
                    continue
                if record.subject_id in subjects:  # one subject named by two identifiers: next batch
                    retry.append(job)
                    continue
                subjects.add(record.subject_id)
                built.append((job, record, status, params, sign))
            if not built:
                return conn, retry
            built.sort(key=lambda b: b[1].subject_id)  # one lock order for every batch
            # The receipts name the records' log indexes, so those are claimed before signing:
            # lock the subjects whose heads still hold and take one index each (the counter row,
            # events.CLAIM_SQL), sign, write, COMMIT; the lock is held for the signing and one
            # round trip.
            claim = orjson.dumps([{"i": n, "subject_id": b[1].subject_id, "prev_hash": b[1].prev_hash}
                                  for n, b in enumerate(built)]).decode()
            async with conn.pipeline():
                await conn.execute("BEGIN")
                cur = await conn.execute(events.CLAIM_SQL, {"q": claim, "t": tenant_id})
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
                    cur = await conn.execute(_WRITE, {"q": rows, "t": tenant_id, "now": utcnow()})
                    await conn.execute("COMMIT")
                written = dict(await cur.fetchall())
        except Exception as exc:
            conn, failure = await self._after_failure(conn, exc, writing)
            settle([(job.fut, failure if isinstance(failure, Unavailable) else Declined())
                    for job in batch if job not in retry])
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
                settle([(job.fut, Declined())])  # a hot subject: the route waits its turn on the row lock
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
            settle([(job.fut, Declined())])
        self._pending = []
        for conn in self._idle:
            if conn is not None:
                await conn.close()
        self._idle = []


def open_writer(engine: Engine, services: Any) -> Writer | None:
    """The fast writer for this engine's database (PostgreSQL only), or None."""
    if engine.dialect.name != "postgresql":
        return None
    return Writer(pg_connect_args(engine), services)


def parse(scope: Scope, raw: bytes) -> tuple[str, ConsentIn, str | None]:
    """(bearer token, request, Idempotency-Key) of a request this path takes, else Declined."""
    token = bearer_token(scope)
    ctype = ikey = None
    for name, value in scope["headers"]:
        if name == b"content-type" and ctype is None:
            ctype = value.decode("latin-1").split(";")[0].strip().lower()
        elif name == b"idempotency-key" and ikey is None:
            ikey = value.decode("latin-1")
    if ctype != "application/json" or b"\\u0000" in raw:
        raise Declined
    if ikey is not None and not (0 < len(ikey) <= 200 and ikey.isprintable()):
        raise Declined
    try:
        spec = ConsentIn.model_validate(orjson.loads(raw))
    except (orjson.JSONDecodeError, ValidationError):
        raise Declined from None
    ref = spec.subject
    if (spec.decision not in DECISIONS or spec.policy_version is not None or spec.recorded_at is not None
            or (ref.user_id is not None) + (ref.email is not None) + (ref.anonymous_id is not None) != 1):
        raise Declined
    return token, spec, ikey


async def read_body(scope: Scope, receive: Receive) -> tuple[bytes | None, list[Message]]:
    """The body if it is small and complete, and the messages read (to replay on a decline)."""
    length = None
    for name, value in scope["headers"]:
        if name == b"content-length":
            length = value
            break
    if length is None or not length.isdigit() or int(length) > BODY_MAX:
        return None, []
    messages: list[Message] = []
    chunks = []
    size = 0
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            return None, messages
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > BODY_MAX:
            return None, messages
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks), messages


def replaying(messages: list[Message], receive: Receive) -> Receive:
    """``receive`` that first gives back what was already read."""
    pending = list(messages)

    async def again() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return again


async def handle(services: Any, scope: Scope, receive: Receive, send: Send) -> Receive | None:
    """Record a common ``POST /v1/consents`` (None: answered), or return the ``receive`` to
    hand the request on with (its body replayed). Called by ``app.ConsentApp``."""
    writer = getattr(services, "record_writer", None)
    if writer is None:
        return receive
    start = time.perf_counter()
    raw, messages = await read_body(scope, receive)
    if messages:
        receive = replaying(messages, receive)
    if raw is None:
        return receive
    try:
        token, spec, ikey = parse(scope, raw)
        body = await writer.record(token, spec, ikey)
    except Declined:
        return receive
    except Unavailable as exc:
        request_id = incoming_request_id(scope) or new_request_id()
        response = problem_response(exc, ROUTE, request_id)
        response.headers["x-request-id"] = request_id
        for name, value in BASE_HEADERS:
            response.headers[name.decode()] = value.decode()
        await response(scope, receive, send)
        finish_request("POST", ROUTE, exc.status, start, request_id)
        return None
    except Exception:  # a bug before any write must not cost the caller an answer
        log.exception("fast record failed; the route answers")
        return receive
    await send_json(scope, send, 201, body, ROUTE, start)
    return None
