"""``POST /v1/consents`` in two statements on PostgreSQL, for the common case.

The route (``api.record_consent`` → ``ledger.record_decision``) sends about ten statements
through the ORM session: ~4 ms of Python per record. ``handle`` (run before any middleware by
``app.ConsentApp``, PostgreSQL only) records a decision of an *existing* subject named by *one* identifier, under
the newest policy version in effect, with two statements on an autocommit connection:

1. one read returning, in one snapshot, whether the key is a live secret key, the tenant's
   evidence settings, the purpose, the newest version covering it, the subject and its chain
   head, an earlier record with the same Idempotency-Key, and the tenant's webhook endpoints;
2. one write (data-modifying CTEs, committed as one statement): move the chain head *only if
   it is still the one read* (``UPDATE subject ... WHERE head_hash IS NOT DISTINCT FROM
   prev``), and only then insert the record, upsert ``consent_state``, take the tenant's next
   change-feed position (the counter row, held to the commit as in ``events._allocate``) and
   insert the event and its webhook outbox rows. If another record of the subject moved the
   head in between, nothing is written and we read again (optimistic concurrency instead of
   a row lock held across round trips): chains stay linear either way.

The record itself is built by the same functions as the route's (``ledger.checked_version``,
``new_record``, ``sign_record``, ``events.event_for``), so the two paths write the same
rows; ``tests/test_fastrecord.py`` compares them. Anything else is *declined* before any
write and goes to the route unchanged (its body is replayed): a new subject or several
identifiers, a named ``policy_version`` or ``recorded_at``, a notice purpose, an Idempotency-Key
seen before (or lost to a concurrent twin), any invalid input (the route makes every error), a
revoked key, a database error. A connection lost *while the write is in flight* is not
declined (the record may exist): it is a 503 telling the caller to retry with an
Idempotency-Key, as the route's own lost COMMIT would be.
"""

from __future__ import annotations

import asyncio
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
)
from .http import dumps, problem_response
from .middleware import BASE_HEADERS, finish_request, incoming_request_id, new_request_id
from .models import utcnow
from .schemas import ConsentIn
from .state import derive_status

log = logging.getLogger("consent.fastrecord")

ROUTE = "/v1/consents"
BODY_MAX = 16 * 1024  # larger bodies go to the route (which allows up to max_body_bytes)
CONNECTIONS = 4  # per process; a record holds one for its three round trips
RETRIES = 3  # reads of a subject whose chain head moved under us before the route takes over
DECISIONS = ("granted", "denied", "withdrawn")

_READ = """
WITH subj AS (
  SELECT s.id, s.pseudonym, s.head_hash FROM subject s
  JOIN subject_identifier si ON si.subject_id = s.id
  WHERE si.tenant_id = %(t)s AND si.kind = %(kind)s AND si.value_hash = %(h)s
)
SELECT
  EXISTS (SELECT 1 FROM api_key k WHERE k.key_hash = %(kh)s AND k.tenant_id = t.id
          AND k.revoked_at IS NULL AND k.kind = 'secret'),
  t.store_full_ip, t.store_user_agent,
  pu.key, pu.kind, pu.legal_basis, pu.double_opt_in,
  v.id, v.policy_key, v.version, v.purposes, v.cookies, v.document_sha256, v.document_url,
  subj.id, subj.pseudonym, subj.head_hash,
  EXISTS (SELECT 1 FROM consent_record r WHERE r.tenant_id = t.id AND r.idempotency_key = %(ik)s),
  (SELECT json_agg(json_build_array(e.id, e.event_types)) FROM webhook_endpoint e
   WHERE e.tenant_id = t.id AND e.enabled AND e.deleted_at IS NULL)
FROM tenant t
LEFT JOIN purpose pu ON pu.tenant_id = t.id AND pu.key = %(p)s
LEFT JOIN policy_version v ON v.id = (
  SELECT pv.id FROM policy_version pv JOIN policy_purpose pp ON pp.policy_version_id = pv.id
  WHERE pv.tenant_id = t.id AND pv.policy_key = %(k)s AND pv.effective_at <= %(at)s AND pp.purpose = %(p)s
  ORDER BY pv.id DESC LIMIT 1)
LEFT JOIN subj ON true
WHERE t.id = %(t)s
"""

_WRITE = """
WITH head AS (
  UPDATE subject SET head_hash = %(record_hash)s
  WHERE id = %(subject_id)s AND head_hash IS NOT DISTINCT FROM %(prev_hash)s
  RETURNING id
), rec AS (
  INSERT INTO consent_record (id, tenant_id, subject_id, purpose, decision, confirmed, policy_key,
    policy_version_id, policy_version, source, evidence, evidence_sha256, disclosures, recorded_at,
    idempotency_key, request_sha256, prev_hash, record_hash, receipt, export_line)
  SELECT %(id)s, %(tenant_id)s, %(subject_id)s, %(purpose)s, %(decision)s, %(confirmed)s, %(policy_key)s,
    %(policy_version_id)s, %(policy_version)s, %(source)s, %(evidence)s::json, %(evidence_sha256)s,
    %(disclosures)s::json, %(recorded_at)s, %(idempotency_key)s, %(request_sha256)s, %(prev_hash)s,
    %(record_hash)s, %(receipt)s, %(export_line)s FROM head
  RETURNING seq
), state AS (
  INSERT INTO consent_state (tenant_id, subject_id, purpose, record_seq, decision, confirmed, policy_key,
    policy_version_id, policy_version, recorded_at)
  SELECT %(tenant_id)s, %(subject_id)s, %(purpose)s, rec.seq, %(decision)s, %(confirmed)s, %(policy_key)s,
    %(policy_version_id)s, %(policy_version)s, %(recorded_at)s FROM rec
  ON CONFLICT (tenant_id, subject_id, purpose) DO UPDATE SET record_seq = EXCLUDED.record_seq,
    decision = EXCLUDED.decision, confirmed = EXCLUDED.confirmed, policy_key = EXCLUDED.policy_key,
    policy_version_id = EXCLUDED.policy_version_id, policy_version = EXCLUDED.policy_version,
    recorded_at = EXCLUDED.recorded_at
  WHERE consent_state.recorded_at <= EXCLUDED.recorded_at
), counter AS (
  INSERT INTO event_counter (tenant_id, last_position) SELECT %(tenant_id)s, 1 FROM rec
  ON CONFLICT (tenant_id) DO UPDATE SET last_position = event_counter.last_position + 1
  RETURNING last_position
), ev AS (
  INSERT INTO event (tenant_id, position, id, type, record_id, subject_id, data, created_at)
  SELECT %(tenant_id)s, counter.last_position, %(event_id)s, %(event_type)s, %(id)s, %(subject_id)s,
    %(event_data)s::json, %(now)s FROM counter
  RETURNING position
), outbox AS (
  INSERT INTO webhook_delivery (tenant_id, endpoint_id, event_id, event_position, event_type, status,
    attempts, next_attempt_at, created_at)
  SELECT %(tenant_id)s, e.id, %(event_id)s, ev.position, %(event_type)s, 'pending', 0, %(now)s, %(now)s
  FROM ev, unnest(%(endpoints)s::text[]) AS e(id)
)
SELECT rec.seq FROM rec, ev
"""


def _json(value: Any) -> str | None:
    return None if value is None else orjson.dumps(value).decode()


class Writer:
    """The connections and the key cache of one process (see the module doc)."""

    def __init__(self, connect_args: dict[str, Any], services: Any, connections: int = CONNECTIONS) -> None:
        self._connect_args = connect_args
        self._services = services
        self._idle: asyncio.Queue[Any] | None = None
        self._connections = connections
        self._keys = KeyCache()
        self.recorded = 0  # records written here rather than by the route (tests, debugging)

    async def _take(self) -> Any:
        if self._idle is None:
            self._idle = asyncio.Queue()
            for _ in range(self._connections):
                self._idle.put_nowait(None)
        return await self._idle.get()

    async def _key(self, conn: Any, digest: str) -> tuple[str, str]:
        """The tenant and hash key of a secret key (cached: those never change for a key)."""
        known = self._keys.get(digest)
        if known is None:
            row = await (await conn.execute(_KEY_SQL.format(kh="%s"), (digest,))).fetchone()
            if row is None:
                raise Declined  # the route says 401
            known = self._keys.put(digest, tuple(row))  # type: ignore[arg-type]
        tenant_id, kind, hash_key = known
        if kind != "secret":
            raise Declined  # the route says 403
        return tenant_id, hash_key

    def _build(self, spec: ConsentIn, tenant_id: str, idempotency_key: str | None, at: Any,
               row: Any) -> tuple[ledger.NewRecord, str, dict[str, Any], list[str]]:
        """The record, its status, the write's parameters and the matching webhook endpoints,
        from the read's row; Declined where the route must answer."""
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
        ledger.sign_record(record, purpose, version, status, signer=services.signer,
                           issuer=services.settings.issuer)
        event = events.event_for(record, status)
        hooks = [e_id for e_id, types in endpoints or () if events.type_matches(types, event["type"])]
        params = {k: getattr(record, k) for k in ledger.RECORD_COLUMNS}
        params.update(evidence=_json(record.evidence), disclosures=_json(record.disclosures),
                      event_id=event["id"], event_type=event["type"], event_data=_json(event["data"]),
                      now=utcnow(), endpoints=hooks)
        return record, status, params, hooks

    async def _after_failure(self, conn: Any, exc: BaseException, writing: bool) -> Any:
        """Turn a failure into Declined (nothing was written: the route takes the request) or
        Unavailable (the connection broke while the write was in flight: the record may exist).
        Returns the connection to keep (None: closed)."""
        import psycopg

        if conn is not None and conn.broken:
            await conn.close()
        if conn is not None and conn.closed:
            conn = None
        if isinstance(exc, (Declined, asyncio.CancelledError)):
            return conn
        if writing and isinstance(exc, psycopg.Error) and exc.sqlstate is None \
                and not isinstance(exc, psycopg.ProgrammingError):
            # No SQLSTATE: the server did not answer (connection lost), maybe after committing.
            log.warning("fast record: connection failed (%s); the outcome is unknown", type(exc).__name__)
            raise Unavailable("the database connection failed while recording; retry with an Idempotency-Key",
                              headers={"Retry-After": "1"}) from None
        log.debug("fast record declined after %s", type(exc).__name__)
        raise Declined from None

    async def record(self, token: str, spec: ConsentIn, idempotency_key: str | None) -> bytes:
        """The 201 body of a recorded decision, or Declined (nothing written)."""
        (kind, value), = [(k, v) for k, v in (("user", spec.subject.user_id), ("email", spec.subject.email),
                                                ("anon", spec.subject.anonymous_id)) if v]
        digest = hashlib.sha256(token.encode()).hexdigest()
        conn = await self._take()
        writing = False
        try:
            if conn is None or conn.closed:
                conn = None
                conn = await pg_connect(self._connect_args)
            tenant_id, hash_key = await self._key(conn, digest)
            if kind == "email":
                value = crypto.normalize_email(value)
            read = {"t": tenant_id, "kind": kind, "h": crypto.keyed_hash(hash_key, kind, value), "kh": digest,
                    "ik": idempotency_key, "p": spec.purpose, "k": spec.policy}
            for _ in range(RETRIES):
                read["at"] = at = utcnow()
                row = await (await conn.execute(_READ, read)).fetchone()
                record, status, params, hooks = self._build(spec, tenant_id, idempotency_key, at, row)
                writing = True
                written = await (await conn.execute(_WRITE, params)).fetchone()
                writing = False
                if written is not None:
                    record.seq = written[0]
                    break
                # Another record of this subject moved the chain head since our read: read again.
            else:
                raise Declined  # a hot subject: the route waits its turn on the row lock
        except BaseException as exc:
            conn = await self._after_failure(conn, exc, writing)
            raise
        finally:
            assert self._idle is not None
            self._idle.put_nowait(conn)
        if hooks:
            events.wake_delivery_loops()
        self.recorded += 1
        return dumps(ledger.record_out(record, status))

    async def close(self) -> None:
        while self._idle is not None and not self._idle.empty():
            conn = self._idle.get_nowait()
            if conn is not None:
                await conn.close()


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
