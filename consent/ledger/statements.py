"""Every SQL statement and rule fragment of the hot paths, written once.

Two kinds of executor run them: the per-request ones (``checks``, ``ledger``: SQLAlchemy, in
the request's transaction) and the batched ones (``batch_reads``: many checks per statement;
``batch_writes``: group commit of records on PostgreSQL). Both take their SQL from here, so a
rule (a live key, a stale grant, the chain-head move) cannot differ between them. Statements
written as text are compiled once per dialect and parameter style at import.
"""

from __future__ import annotations

import sqlite3
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from consent.ledger.tenants import key_live_sql
from consent.store.models import (
    IDENTIFIER_COVER_INDEX,
)
from consent.store.tables import POLICY_PURPOSE as PP
from consent.store.tables import RECORD, STATE, SUBJECT

# --- the staleness rule -----------------------------------------------------------------------
# A decision recorded under a version is stale when a NEWER MATERIAL version of the same policy
# covering the same purpose has taken effect by ``now`` (state.derive_status then says
# ``stale`` for a grant or an acknowledgement; a denial or a withdrawal never goes stale).
# Written once, as SQLAlchemy Core: the SQLAlchemy queries use it as it is, the statements
# written as text embed it compiled per dialect (``_sql``).

def _in_effect(tenant_id: Any, purpose: Any, now: Any) -> tuple[Any, ...]:
    """The ``policy_purpose`` rows that can make a decision on ``purpose`` stale at ``now``: the
    material versions covering it in effect."""
    return (PP.c.tenant_id == tenant_id, PP.c.purpose == purpose, PP.c.material,
            PP.c.effective_at <= now)


def _newer(version_id: Any, than: Any) -> Any:
    """``version_id`` is a newer version than ``than`` (ids grow as versions are published)."""
    return version_id > than


def stale(tenant_id: Any, purpose: Any, policy_key: Any, policy_version_id: Any, now: Any) -> Any:
    """The rule for one decision, as an EXISTS (columns or bound values)."""
    return sa.exists().where(*_in_effect(tenant_id, purpose, now), PP.c.policy_key == policy_key,
                             _newer(PP.c.policy_version_id, policy_version_id))


def stale_state(now: Any) -> Any:
    """``stale`` of the ``consent_state`` row being read, labelled ``stale``."""
    return stale(STATE.c.tenant_id, STATE.c.purpose, STATE.c.policy_key, STATE.c.policy_version_id,
                 now).label("stale")


def _newest(tenant_id: Any, purpose: Any, now: Any) -> Any:
    """The rule for every decision on a purpose at once: per policy, its newest version in
    effect (a decision under an older one is stale). One tiny aggregate instead of an EXISTS
    per decision."""
    return (sa.select(PP.c.policy_key, sa.func.max(PP.c.policy_version_id).label("newest"))
            .where(*_in_effect(tenant_id, purpose, now)).group_by(PP.c.policy_key).subquery("n"))


_DIALECTS = {"sqlite": sqlite.dialect(), "postgresql": postgresql.dialect()}


def _sql(expr: Any, dialect: str) -> str:
    """``expr`` as SQL text to embed in a statement written as text, on one line. It holds no
    bound values: the statement's row columns and placeholders go in as ``sa.literal_column``."""
    return str(expr.compile(dialect=_DIALECTS[dialect], compile_kwargs={"literal_binds": True})).replace(" \n", " ")


def _col(name: str) -> Any:
    return sa.literal_column(name)


def _stale_sql(dialect: str, now: str) -> str:
    """``stale`` of the statement's ``consent_state s``."""
    return _sql(stale(_col("s.tenant_id"), _col("s.purpose"), _col("s.policy_key"), _col("s.policy_version_id"),
                      _col(now)), dialect)


# --- API keys ---------------------------------------------------------------------------------
# What a key is, forever: its tenant, its kind and the tenant's identifier hash key (cached per
# process). Whether it still works is never cached: every check statement tests
# ``key_live_sql`` in the snapshot it answers from.
KEY = ("SELECT k.tenant_id, k.kind, t.hash_key FROM api_key k JOIN tenant t ON t.id = k.tenant_id "
       "WHERE k.key_hash = {kh}")


# --- the single check, alone or batched -------------------------------------------------------
# One statement answers any number of checks (one alone on the per-request executor, a batch on
# the batched one). A check is (key digest, tenant id, kind, hash or subject id, purpose), all
# of a statement's in one JSON parameter (shaped per dialect); its answer, as the executors hand
# it back in input order: (key_ok, purpose_ok, subject_id, decision, confirmed, policy_version,
# record_id, receipt, stale, gpc). ``subject_id`` is the subject the identifier names when it is
# known, whether or not it has a decision on the purpose.
#
# The current record's id and receipt come from consent_state's copy where it belongs to the
# state's record (receipt_seq = record_seq, what every writer leaves), else from the record: the
# copy spares a probe of consent_record (and its TOAST table) per check.
def _copied(state_col: str, record_col: str) -> str:
    return (f"CASE WHEN s.receipt_seq = s.record_seq THEN s.{state_col} "
            f"ELSE (SELECT r.{record_col} FROM consent_record r WHERE r.seq = s.record_seq) END")


_RECORD_ID, _RECEIPT_OF = _copied("record_id", "id"), _copied("receipt", "receipt")

# SQLite: one row of two texts: a JSON array of answers, and their receipts. In a batch, nearly
# every check shares its key, tenant, kind and purpose with others, so the input is GROUPED by
# them (``check_input_sqlite``): [[key digest, tenant id, kind, purpose, [hash or subject id,
# ...]], ...]. Per group, once: its fields out of the JSON (``->>`` re-parses the element's text
# on every use), whether the key works and whether the purpose exists. Per check: only the
# identifier by its covering index (named: the planner would take the primary key and read the
# table), its consent_state row, and the staleness rule. Each LEFT JOIN is never reordered, so
# the aggregates see the checks in group order (each answer starts with its group and position,
# and ``check_rows_sqlite`` checks them). A receipt is a compact JWS (never empty, never a space)
# and JSON-quoting its ~1 KB cost more than the rest of its answer: receipts come space-joined in
# their own text, '' for none, and each answer holds null in their place.
_CHECK_SQLITE = f"""
WITH g AS MATERIALIZED (
  SELECT key AS gi, value ->> 1 AS t, value ->> 2 AS kind, value ->> 3 AS p,
         EXISTS (SELECT 1 FROM api_key k WHERE k.key_hash = value ->> 0 AND k.tenant_id = value ->> 1
                 AND {key_live_sql("k", ":now")}) AS key_ok,
         EXISTS (SELECT 1 FROM purpose pu WHERE pu.tenant_id = value ->> 1 AND pu.key = value ->> 3) AS purpose_ok
  FROM json_each(:inputs))
SELECT json_group_array(json_array(g.gi, c.key, g.key_ok, s.subject_id IS NOT NULL OR g.purpose_ok,
         coalesce(si.subject_id, su.id), s.decision, s.confirmed, s.policy_version, {_RECORD_ID},
         NULL, CASE WHEN s.subject_id IS NOT NULL THEN {_stale_sql("sqlite", ":now")} END, s.gpc)),
       group_concat(coalesce({_RECEIPT_OF}, ''), ' ')
FROM g JOIN json_each(:inputs, format('$[%d][4]', g.gi)) c
LEFT JOIN subject_identifier si INDEXED BY {IDENTIFIER_COVER_INDEX}
  ON g.kind <> 'id' AND si.tenant_id = g.t AND si.kind = g.kind AND si.value_hash = c.value
LEFT JOIN subject su ON g.kind = 'id' AND su.id = c.value AND su.tenant_id = g.t
LEFT JOIN consent_state s ON g.key_ok AND s.tenant_id = g.t AND s.purpose = g.p
  AND s.subject_id = coalesce(si.subject_id, su.id)
"""


def check_input_sqlite(items: list[tuple[str, str, str, str, str]]) -> tuple[str, list[tuple[int, int, int]]]:
    """The SQLite statement's input for checks given as (kh, t, kind, h, p), and for each answer
    it gives, in order: its group, its position in the group and its position in ``items``. The
    input is text: bound as bytes it would be a BLOB, which SQLite 3.45+ reads as binary JSONB."""
    groups: dict[tuple[str, str, str, str], tuple[list[str], list[int]]] = {}
    for n, (kh, t, kind, h, p) in enumerate(items):
        group = groups.get((kh, t, kind, p))
        if group is None:
            groups[(kh, t, kind, p)] = group = ([], [])
        group[0].append(h)
        group[1].append(n)
    order = [(gi, i, n) for gi, (_, ns) in enumerate(groups.values()) for i, n in enumerate(ns)]
    return orjson.dumps([[*key, hs] for key, (hs, _) in groups.items()]).decode(), order


_RECEIPT_AT = 9  # the receipt's place in an answer: after group, position and 7 columns


def check_rows_sqlite(answers: str, receipts: str, order: list[tuple[int, int, int]]) -> list[tuple[Any, ...]]:
    """The rows of the SQLite statement's output (its two texts), in the order of the items
    ``check_input_sqlite`` was given: (key_ok, purpose_ok, subject_id, decision, confirmed,
    policy_version, record_id, receipt, stale, gpc) each."""
    rows = orjson.loads(answers)
    receipt = receipts.split(" ")
    if len(rows) != len(order) or len(receipt) != len(order):
        raise sqlite3.DatabaseError(f"{len(rows)} answers and {len(receipt)} receipts for {len(order)} checks")
    out: list[tuple[Any, ...]] = [()] * len(order)
    for r, rc, (gi, i, n) in zip(rows, receipt, order):
        if r[0] != gi or r[1] != i:
            raise sqlite3.DatabaseError(f"answer {r[:2]} where {[gi, i]} was due")
        r[_RECEIPT_AT] = rc or None
        out[n] = tuple(r[2:])
    return out


# PostgreSQL: one row per input, in input order. The inputs travel as ONE JSON text unpacked by
# json_to_recordset in C (no per-element array dumping in the driver); LATERAL keeps every
# lookup an index probe whatever the planner guesses (as EXISTS subqueries, the key and purpose
# tests became hashed subplans that read every tenant's keys and purposes for each batch).
# ``{inputs}`` and ``{now}`` are filled per executor: $1 / $2 for the prepared statement on
# libpq, bound names for SQLAlchemy.
_CHECK_POSTGRES = f"""
SELECT q.i, ko.ok IS NOT NULL, po.ok IS NOT NULL,
  sq.sid, x.decision, x.confirmed, x.policy_version, x.record_id, x.receipt, x.stale, x.gpc
FROM json_to_recordset({{inputs}}) AS q(i int, kh text, t text, kind text, h text, p text)
LEFT JOIN LATERAL (SELECT 1 AS ok FROM api_key k WHERE k.key_hash = q.kh AND k.tenant_id = q.t
                   AND {key_live_sql("k", "{now}")} LIMIT 1) AS ko ON true
LEFT JOIN LATERAL (SELECT 1 AS ok FROM purpose pu WHERE pu.tenant_id = q.t AND pu.key = q.p LIMIT 1) AS po ON true
LEFT JOIN LATERAL (
  SELECT CASE WHEN q.kind = 'id'
              THEN (SELECT su.id FROM subject su WHERE su.id = q.h AND su.tenant_id = q.t)
              ELSE (SELECT si.subject_id FROM subject_identifier si
                    WHERE si.tenant_id = q.t AND si.kind = q.kind AND si.value_hash = q.h) END AS sid
) AS sq ON true
LEFT JOIN LATERAL (
  SELECT s.decision, s.confirmed, s.policy_version, {_RECORD_ID} AS record_id, {_RECEIPT_OF} AS receipt,
         {_stale_sql("postgresql", "{now}")} AS stale, s.gpc
  FROM consent_state s
  WHERE s.tenant_id = q.t AND s.purpose = q.p AND s.subject_id = sq.sid
) AS x ON true
ORDER BY q.i
"""
CHECK_PG_RAW = _CHECK_POSTGRES.replace("{inputs}", "$1::json").replace("{now}", "$2")  # libpq, prepared
CHECK = {  # SQLAlchemy, bound names :inputs and :now
    "sqlite": sa.text(_CHECK_SQLITE),
    "postgresql": sa.text(_CHECK_POSTGRES.replace("{inputs}", "CAST(:inputs AS json)").replace("{now}", ":now")),
}
CHECK_PG_TYPES = ("json", "timestamptz")


def check_input_pg(items: list[tuple[str, str, str, str, str]]) -> bytes:
    """The PostgreSQL statement's input (JSON, as libpq takes a parameter) for checks given as
    (kh, t, kind, h, p)."""
    return orjson.dumps([{"i": i, "kh": kh, "t": t, "kind": kind, "h": h, "p": p}
                         for i, (kh, t, kind, h, p) in enumerate(items)])


# --- the bulk check ---------------------------------------------------------------------------
# The states of one purpose for many keys (identifier hashes of one kind, or subject ids) in ONE
# statement, so one snapshot, all keys in ONE bound parameter. The answer is ONE JSON object:
# key -> code, the code being decision + confirmed (0/1) + stale (0/1); a key with no state on
# the purpose is absent (PostgreSQL) or null (SQLite).
#
# PostgreSQL: the keys are a semi-join (identifier hashes comma-joined and split by
# string_to_array; subject ids, which may hold commas, as a quoted text[] literal). For many keys
# ``checks.bulk_codes`` makes it one pass over the tenant's identifiers and the purpose's states
# with hash joins and a parallel worker; for a few, the planner probes the indexes.
# SQLite: json_each is the outer loop (left of every LEFT JOIN, which SQLite never reorders) and
# drives probes of the covering indexes in the keys' sorted order, so consecutive probes share pages.
_BULK_CODE = {"sqlite": "s.decision || s.confirmed || coalesce({stale}, 0)",
              "postgresql": "s.decision || CASE WHEN s.confirmed THEN '1' ELSE '0' END || "
                            "CASE WHEN {stale} THEN '1' ELSE '0' END"}
_BULK_SQLITE = {
    False: ("SELECT json_group_object(j.value, {code}) FROM json_each(:keys) j "
            "LEFT JOIN subject_identifier si ON si.tenant_id = :t AND si.kind = :k AND si.value_hash = j.value "
            "LEFT JOIN consent_state s ON s.tenant_id = :t AND s.subject_id = si.subject_id AND s.purpose = :p "),
    True: ("SELECT json_group_object(j.value, {code}) FROM json_each(:keys) j "
           "LEFT JOIN consent_state s ON s.tenant_id = :t AND s.subject_id = j.value AND s.purpose = :p "),
}
_BULK_POSTGRES = {
    False: ("SELECT CAST(json_object_agg(si.value_hash, {code}) AS text) FROM subject_identifier si "
            "JOIN consent_state s ON s.tenant_id = :t AND s.subject_id = si.subject_id AND s.purpose = :p "
            "{newest}WHERE si.tenant_id = :t AND si.kind = :k "
            "AND si.value_hash IN (SELECT x FROM unnest(string_to_array(:keys, ',')) x)"),
    True: ("SELECT CAST(json_object_agg(s.subject_id, {code}) AS text) FROM consent_state s "
           "{newest}WHERE s.tenant_id = :t AND s.purpose = :p "
           "AND s.subject_id IN (SELECT x FROM unnest(CAST(:keys AS text[])) x)"),
}
# The rule in bulk: ``_newest`` of the statement's tenant and purpose, joined to the states by
# policy; a state is stale when that newest version is newer than its own.
_NEWEST = _newest(_col(":t"), _col(":p"), _col(":now"))


def _bulk(dialect: str, template: str) -> Any:
    stale_sql = _sql(_newer(_NEWEST.c.newest, _col("s.policy_version_id")), dialect)
    newest = f"LEFT JOIN ({_sql(_NEWEST.element, dialect)}) n ON n.policy_key = s.policy_key "
    return sa.text(template.format(code=_BULK_CODE[dialect].format(stale=stale_sql), newest=newest))


BULK = {(postgres, by_id): _bulk("postgresql", _BULK_POSTGRES[by_id]) if postgres
        else _bulk("sqlite", _BULK_SQLITE[by_id] + "{newest}")
        for postgres in (False, True) for by_id in (False, True)}


def pg_text_array(keys: list[str]) -> str:
    """``keys`` as a PostgreSQL text[] literal, each element quoted: a subject id may hold any
    character but NUL, which no JSON body lets through."""
    return "{" + ",".join('"' + k.replace("\\", "\\\\").replace('"', '\\"') + '"' for k in keys) + "}"


# --- the chain head ---------------------------------------------------------------------------
# The one concurrency rule of every hash chain: a subject's head moves to a record's hash only
# from the head that record links to (compare and swap). The per-request writer holds the
# subject's row lock, so its move always matches; the group writer holds no lock across round
# trips, so a head moved in between makes its move (and so its record) not happen.
MOVE_HEAD = (sa.update(SUBJECT)
             .where(SUBJECT.c.id == sa.bindparam("sid"), SUBJECT.c.head_hash.is_not_distinct_from(sa.bindparam("prev")))
             .values(head_hash=sa.bindparam("head")))
_MOVE_HEAD_CTE = ("UPDATE subject s SET head_hash = v.record_hash FROM v "
                  "WHERE s.id = v.subject_id AND s.head_hash IS NOT DISTINCT FROM v.prev_hash RETURNING v.i")


# --- a record and the state it sets -----------------------------------------------------------
RECORD_COLUMNS = tuple(c.key for c in RECORD.c if c.key != "seq")  # what an INSERT of a record writes
RECORD_INSERT = sa.insert(RECORD).returning(RECORD.c.seq)
STATE_COLUMNS = ("tenant_id", "subject_id", "purpose", "record_seq", "decision", "confirmed", "policy_key",
                 "policy_version_id", "policy_version", "recorded_at", "receipt_seq", "record_id", "receipt", "gpc")
# The newest decision by recorded_at wins per subject and purpose (an import of an older decision
# does not overwrite a newer one).
_STATE_NEWER = "consent_state.recorded_at <= EXCLUDED.recorded_at"


def _state_upsert(insert: Any) -> Any:
    ins = insert(STATE).values({k: sa.bindparam(k, type_=STATE.c[k].type) for k in STATE_COLUMNS})
    update = {k: ins.excluded[k] for k in STATE_COLUMNS if k not in ("tenant_id", "subject_id", "purpose")}
    return ins.on_conflict_do_update(index_elements=["tenant_id", "subject_id", "purpose"], set_=update,
                                     where=sa.text(_STATE_NEWER))


# Built once per dialect (building and cache-keying it per record cost ~1 ms CPU).
STATE_UPSERT = {"postgresql": _state_upsert(postgresql.insert), "sqlite": _state_upsert(sqlite.insert)}
_STATE_SET = ", ".join(f"{k} = EXCLUDED.{k}" for k in STATE_COLUMNS if k not in ("tenant_id", "subject_id", "purpose"))


# --- the group commit (PostgreSQL) ------------------------------------------------------------
# One read for a whole batch (one tenant): per input row ``i``, in one snapshot, whether its key
# is a live secret key, the tenant's evidence settings, the purpose, the newest version covering
# it, the subject and its chain head, an earlier record with the same Idempotency-Key, and the
# tenant's webhook endpoints. A row is missing only where the tenant is gone.
RECORD_READ = f"""
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

# The group commit (PostgreSQL): lock the batch's subjects whose chain head is still the one read, in
# subject order, then take one leaf index per locked subject from the counter row (held to the
# COMMIT that follows the batch's write). Rows ``(i, last leaf taken)``; none when no head held.
CLAIM_SQL = """
WITH v AS (SELECT * FROM json_to_recordset(%(q)s::json) AS v(i int, subject_id text, prev_hash text)),
head AS (
  SELECT v.i FROM v JOIN subject s ON s.id = v.subject_id
  WHERE s.head_hash IS NOT DISTINCT FROM v.prev_hash ORDER BY s.id FOR UPDATE OF s
), counter AS (
  INSERT INTO event_counter (tenant_id, last_position, leaves) SELECT %(t)s, 0, count(*) FROM head
  HAVING count(*) > 0
  ON CONFLICT (tenant_id) DO UPDATE SET leaves = event_counter.leaves + EXCLUDED.leaves
  RETURNING leaves
)
SELECT head.i, counter.leaves FROM head, counter ORDER BY head.i
"""


# What the write takes of a record (its tenant is the batch's).
WRITE_COLUMNS = tuple(c for c in RECORD_COLUMNS if c != "tenant_id")

# One write for a whole batch (one tenant, distinct subjects), in the claim's transaction: move
# each chain head (MOVE_HEAD's rule), and for exactly the records whose head moved insert the
# record, upsert consent_state (STATE_UPSERT's rule), take the tenant's next change-feed
# positions (the counter row, held to the commit as in ``events._allocate``: one increment by
# the number written) and insert the events and their webhook outbox rows. Returns ``(i, seq)``
# of the records written. Rows come in subject order, so concurrent batches lock subjects in the
# same order.
RECORD_WRITE = f"""
WITH v AS MATERIALIZED (
  SELECT * FROM json_to_recordset(%(q)s::json) AS v(i int, id text, subject_id text, purpose text,
    decision text, confirmed boolean, policy_key text, policy_version_id bigint, policy_version text,
    source text, evidence json, evidence_sha256 text, disclosures json, recorded_at timestamptz,
    idempotency_key text, request_sha256 text, prev_hash text, record_hash text, receipt text,
    export_line text, gpc boolean, leaf_index bigint, event_id text, event_type text, event_data json, endpoints json)
), head AS (
  {_MOVE_HEAD_CTE}
), w AS MATERIALIZED (
  SELECT v.*, row_number() OVER (ORDER BY v.i) AS rn, count(*) OVER () AS n FROM v JOIN head USING (i)
), rec AS (
  INSERT INTO consent_record ({", ".join(RECORD_COLUMNS)})
  SELECT {", ".join("%(t)s" if c == "tenant_id" else "decode(w.export_line, 'base64')" if c == "export_line"
                    else f"w.{c}" for c in RECORD_COLUMNS)}
  FROM w ORDER BY w.i
  RETURNING seq, id
), state AS (
  INSERT INTO consent_state ({", ".join(STATE_COLUMNS)})
  SELECT %(t)s, w.subject_id, w.purpose, rec.seq, w.decision, w.confirmed, w.policy_key,
    w.policy_version_id, w.policy_version, w.recorded_at, rec.seq, w.id, w.receipt, w.gpc
  FROM w JOIN rec ON rec.id = w.id WHERE w.decision <> 'notified'
  ON CONFLICT (tenant_id, subject_id, purpose) DO UPDATE SET {_STATE_SET}
  WHERE {_STATE_NEWER}
), counter AS (
  -- the change feed's positions (events._allocate's counter row)
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
