"""The transparency log: per tenant, one append-only RFC 9162 Merkle tree over the records in
commit order, signed checkpoints (C2SP tlog-checkpoint notes) and proofs (docs/transparency.md).

A record's leaf index is taken in the record's own transaction, from the tenant's counter row
held to the commit (``events.next_leaf``; the group commit claims a batch's at once), stored on the
record (``consent_record.leaf_index``) and named in its receipt (``tlog_index``), so a holder
fetches its proof later by that index with no secret. Indexes are gap-free and in commit order.
The tree itself is built by a *sequencer*: every few seconds (``CONSENT_TLOG_SECONDS``) each
service process's ``Sequencer`` appends the records from the tree's size on, by stored index,
and signs a checkpoint. So the record path pays one counter increment and no tree work, and the
sequencer never chooses an order. ``consent tlog build`` runs the same appends at once.

Storage: each leaf hash by index (``tlog_leaf``) and the hash of every complete subtree of at
least ``2**NODE_LEVEL`` leaves (``tlog_node``, one row per 16 leaves in all), so any tree head or
proof is O(log n) rows read in one statement. Erasure never touches a leaf: the leaf data is
the record hash, which names the subject only by pseudonym and the evidence only by its hash.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import orjson
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from consent.audit import merkle
from consent.crypto import Signer
from consent.errors import NotFound, ValidationFailed
from consent.ledger.events import COUNTER
from consent.settings import Settings
from consent.store.db import transaction
from consent.store.models import (
    utcnow,
)
from consent.store.tables import RECORD as REC
from consent.store.tables import SIGNING_KEY
from consent.store.tables import TLOG_CHECKPOINT as CHECKPOINT
from consent.store.tables import TLOG_LEAF as LEAF
from consent.store.tables import TLOG_NODE as NODE
from consent.store.tables import TLOG_STATE as STATE

NODE_LEVEL = 4  # complete subtrees of 16 leaves or more are stored; smaller ones are hashed from leaves
CHUNK = 20_000  # leaves appended per transaction
log = logging.getLogger("consent.audit.tlog")


def origin(settings: Settings, tenant_id: str) -> str:
    """The checkpoint origin line of a tenant's log."""
    return f"{key_name(settings)}/tenants/{tenant_id}"


def key_name(settings: Settings) -> str:
    """The signed-note key name: the issuer's host (and port)."""
    return urlsplit(settings.issuer).netloc or "consent"


def leaf_data(record_hash: str) -> bytes:
    """The bytes a record's leaf hashes: its record hash, as the 64 hex characters."""
    return record_hash.encode()


def _jti(receipt: str | None) -> str | None:
    try:
        payload = receipt.split(".")[1]  # type: ignore[union-attr]
        jti = orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))).get("jti")
    except (AttributeError, IndexError, ValueError, binascii.Error, orjson.JSONDecodeError):
        return None
    return jti if isinstance(jti, str) and len(jti) <= 40 else None


# --- reading the tree ---------------------------------------------------------------------------


def _hashes(db: Session, tenant_id: str, keys: Iterable[tuple[int, int]]) -> dict[tuple[int, int], bytes]:
    """The hashes of complete subtrees: stored ones read, small ones hashed from their leaves."""
    keys = set(keys)
    stored = [k for k in keys if k[0] >= NODE_LEVEL]
    small = [k for k in keys if k[0] < NODE_LEVEL]
    out: dict[tuple[int, int], bytes] = {}
    # One statement, as text with only integers inline: building it as SQLAlchemy expressions
    # cost more than running it (~2 ms of a 3 ms proof). A primary-key lookup per stored
    # subtree (a row-value IN list was planned as a scan of every subtree on PostgreSQL), and
    # the leaves of the small ones (level -1 in the answer).
    parts = [f"SELECT level, idx, hash FROM tlog_node WHERE tenant_id = :t AND level = {int(lvl)} "
             f"AND idx = {int(idx)}" for lvl, idx in stored]
    wanted = sorted({i for lvl, idx in small for i in range(idx << lvl, (idx + 1) << lvl)})
    if wanted:
        parts.append(f"SELECT -1, idx, hash FROM tlog_leaf WHERE tenant_id = :t "
                     f"AND idx IN ({','.join(map(str, wanted))})")
    leaves: dict[int, bytes] = {}
    for lvl, idx, h in db.execute(sa.text(" UNION ALL ".join(parts)), {"t": tenant_id}) if parts else ():
        if lvl < 0:
            leaves[idx] = bytes(h)
        else:
            out[(lvl, idx)] = bytes(h)
    for lvl, idx in small:
        block = [leaves[i] for i in range((idx << lvl), (idx + 1) << lvl) if i in leaves]
        if len(block) == 1 << lvl:
            out[(lvl, idx)] = merkle.root(merkle.from_leaves(block), len(block))
    missing = keys - out.keys()
    if missing:
        raise LookupError(f"transparency log of {tenant_id} is missing subtrees {sorted(missing)[:3]}")
    return out


def _run(db: Session, tenant_id: str, fn: Any) -> Any:
    """Run a merkle function over the stored tree with every read done in one statement."""
    table = _hashes(db, tenant_id, merkle.needed(fn))
    return fn(lambda level, idx: table[(level, idx)])


def tree_size(db: Session, tenant_id: str) -> int:
    return int(db.execute(sa.select(STATE.c.size).where(STATE.c.tenant_id == tenant_id)).scalar() or 0)


def root_at(db: Session, tenant_id: str, size: int) -> bytes:
    return bytes(_run(db, tenant_id, lambda g: merkle.root(g, size)))


# --- appending ----------------------------------------------------------------------------------


def _insert(db: Session, table: Any, rows: list[dict[str, Any]]) -> None:
    for i in range(0, len(rows), 5000):
        db.execute(sa.insert(table), rows[i:i + 5000])


def append(db: Session, tenant_id: str, size: int, rows: list[tuple[str, str | None, bytes]]) -> int:
    """Append leaves (record id, jti, leaf hash) after ``size`` leaves; store the complete
    subtrees they finish. The new size."""
    if not rows:
        return size
    end = size + len(rows)
    _insert(db, LEAF, [{"tenant_id": tenant_id, "idx": size + i, "record_id": rid, "jti": jti, "hash": h}
                       for i, (rid, jti, h) in enumerate(rows)])
    lo = (size >> NODE_LEVEL) << NODE_LEVEL
    old = [bytes(h) for h in db.execute(sa.select(LEAF.c.hash).where(
        LEAF.c.tenant_id == tenant_id, LEAF.c.idx >= lo, LEAF.c.idx < size).order_by(LEAF.c.idx)).scalars()]
    hashes = old + [h for _, _, h in rows]
    width = 1 << NODE_LEVEL
    nodes: dict[tuple[int, int], bytes] = {}
    for i in range(size >> NODE_LEVEL, end >> NODE_LEVEL):
        block = hashes[(i << NODE_LEVEL) - lo:((i + 1) << NODE_LEVEL) - lo]
        nodes[(NODE_LEVEL, i)] = merkle.root(merkle.from_leaves(block), width)
    level = NODE_LEVEL + 1
    while (1 << level) <= end:
        for i in range(size >> level, end >> level):
            left = nodes.get((level - 1, 2 * i))
            if left is None:  # finished before this append: stored
                left = bytes(db.execute(sa.select(NODE.c.hash).where(
                    NODE.c.tenant_id == tenant_id, NODE.c.level == level - 1, NODE.c.idx == 2 * i)).scalar_one())
            nodes[(level, i)] = merkle.node_hash(left, nodes[(level - 1, 2 * i + 1)])
        level += 1
    _insert(db, NODE, [{"tenant_id": tenant_id, "level": lvl, "idx": i, "hash": h} for (lvl, i), h in nodes.items()])
    return end


def _upsert(db: Session) -> Any:
    return postgresql.insert if db.get_bind().dialect.name == "postgresql" else sqlite.insert


def _lock_state(db: Session, tenant_id: str, wait: bool = True) -> Any:
    """The tenant's sequencer row, locked (created on first use)."""
    q = sa.select(STATE).where(STATE.c.tenant_id == tenant_id)
    if db.get_bind().dialect.name == "postgresql":
        q = q.with_for_update(skip_locked=not wait)
    row = db.execute(q).one_or_none()
    if row is not None:
        return row
    db.execute(_upsert(db)(STATE).values(tenant_id=tenant_id, size=0, signed_size=0, updated_at=utcnow())
               .on_conflict_do_nothing())
    return db.execute(q).one_or_none()


def sequence(db: Session, tenant_id: str, *, limit: int = CHUNK, wait: bool = True) -> int:
    """Append up to ``limit`` records to the tenant's log, by their stored leaf index from the
    tree's size on. Indexes are taken in commit order (events.next_leaf), so every index below
    a committed one is committed too: the run read is gap-free. A gap means a record that was
    deleted before it was appended; the log stops there rather than renumber (it is reported).
    Leaves appended; the caller commits."""
    state = _lock_state(db, tenant_id, wait)
    if state is None:  # another process holds it
        return 0
    size = state.size
    rows = db.execute(sa.select(REC.c.leaf_index, REC.c.id, REC.c.record_hash, REC.c.receipt).where(
        REC.c.tenant_id == tenant_id, REC.c.leaf_index >= size).order_by(REC.c.leaf_index).limit(limit)).all()
    run = [r for i, r in enumerate(rows) if r.leaf_index == size + i]
    if rows and not run:
        log.error("transparency log of %s: leaf %d has no record (deleted before it was appended)",
                  tenant_id, size)
    new = [(r.id, _jti(r.receipt), merkle.leaf_hash(leaf_data(r.record_hash))) for r in run]
    if new:
        db.execute(STATE.update().where(STATE.c.tenant_id == tenant_id).values(
            size=append(db, tenant_id, size, new), updated_at=utcnow()))
    return len(new)


def build(engine: Engine, tenant_id: str, progress: Any = None) -> int:
    """Append every record of the tenant that is not in its log yet, now (``consent tlog
    build``), instead of waiting for the sequencer. Leaves appended."""
    total = 0
    while True:
        with transaction(engine, write=True) as db:
            n = sequence(db, tenant_id)
        total += n
        if progress:
            progress(total)
        if n < CHUNK:
            return total


# --- checkpoints ----------------------------------------------------------------------------------


def checkpoint_text(settings: Settings, tenant_id: str, size: int, root: bytes) -> str:
    """The note body of a checkpoint: origin, size, base64 root hash, each line ending in a newline."""
    return f"{origin(settings, tenant_id)}\n{size}\n{base64.b64encode(root).decode()}\n"


def sign_checkpoint(db: Session, settings: Settings, signer: Signer, tenant_id: str) -> Any:
    """Sign and keep a checkpoint of the tenant's current tree if it grew since the last one."""
    state = db.execute(sa.select(STATE).where(STATE.c.tenant_id == tenant_id)).one_or_none()
    if state is None or state.size == 0 or state.size <= state.signed_size:
        return None
    root = root_at(db, tenant_id, state.size)
    note = signer.sign_note(key_name(settings), checkpoint_text(settings, tenant_id, state.size, root))
    db.execute(_upsert(db)(CHECKPOINT).values(tenant_id=tenant_id, size=state.size, root=root, note=note,
                                              created_at=utcnow()).on_conflict_do_nothing())
    db.execute(STATE.update().where(STATE.c.tenant_id == tenant_id).values(signed_size=state.size))
    return state.size


def checkpoint(db: Session, tenant_id: str, size: int | None = None, *, missing_ok: bool = False) -> Any:
    """A kept checkpoint (the newest without ``size``)."""
    q = sa.select(CHECKPOINT).where(CHECKPOINT.c.tenant_id == tenant_id)
    q = q.where(CHECKPOINT.c.size == size) if size is not None else q.order_by(CHECKPOINT.c.size.desc()).limit(1)
    row = db.execute(q).one_or_none()
    if row is None and not missing_ok:
        raise NotFound("no such checkpoint", code="checkpoint_not_found")
    return row


def verifier_keys(db: Session, settings: Settings) -> list[str]:
    """The note verifier keys of every signing key (retired ones too), newest first."""
    from consent.crypto import note_vkey

    keys = SIGNING_KEY
    jwks = db.execute(sa.select(keys.c.public_jwk).order_by(keys.c.created_at.desc())).scalars()
    return [note_vkey(key_name(settings), jwk) for jwk in jwks]


def pending_tenants(db: Session) -> list[str]:
    """Tenants whose log is behind the leaf indexes handed out, or not checkpointed."""
    s, c = STATE.alias("s"), COUNTER.alias("c")
    behind = sa.select(c.c.tenant_id).outerjoin(s, s.c.tenant_id == c.c.tenant_id).where(
        c.c.leaves > sa.func.coalesce(s.c.size, 0))
    unsigned = sa.select(STATE.c.tenant_id).where(STATE.c.size > STATE.c.signed_size)
    return sorted(set(db.execute(behind).scalars()) | set(db.execute(unsigned).scalars()))


def run_once(engine: Engine, settings: Settings, signer: Signer, *, wait: bool = False) -> int:
    """One pass of the sequencer over every tenant that needs it: leaves appended."""
    with transaction(engine, read_only=True) as db:
        tenants = pending_tenants(db)
    total = 0
    for tenant_id in tenants:
        while True:
            with transaction(engine, write=True) as db:
                n = sequence(db, tenant_id, wait=wait)
            total += n
            if n < CHUNK:
                break
        with transaction(engine, write=True) as db:
            if _lock_state(db, tenant_id, wait) is not None:
                sign_checkpoint(db, settings, signer, tenant_id)
    return total


# --- proofs ---------------------------------------------------------------------------------------


@dataclass
class Inclusion:
    leaf_index: int
    tree_size: int
    record_id: str
    record_hash: str
    hashes: list[bytes]
    checkpoint: str | None  # the signed note at tree_size, when one was kept


def _size(db: Session, tenant_id: str, size: int | None) -> tuple[int, Any]:
    """The tree size a proof is made against: the newest checkpoint's by default, else any size
    up to it (the auditor's kept checkpoint need not be one this database still has); and the
    newest checkpoint."""
    newest = checkpoint(db, tenant_id)
    if size is not None and size > newest.size:
        raise NotFound(f"the newest checkpoint has {newest.size} records", code="checkpoint_not_found")
    return (int(newest.size) if size is None else size), newest


def inclusion(db: Session, tenant_id: str, *, record_id: str | None = None, jti: str | None = None,
              leaf_index: int | None = None, tree_size: int | None = None) -> Inclusion:
    """The inclusion proof of a record (by id, receipt jti or the receipt's ``tlog_index``)
    against a checkpoint."""
    value: Any
    if leaf_index is not None:
        col, value = LEAF.c.idx, leaf_index
    else:
        col, value = (LEAF.c.record_id, record_id) if record_id is not None else (LEAF.c.jti, jti)
    leaf = db.execute(sa.select(LEAF.c.idx, LEAF.c.record_id, REC.c.record_hash)
                      .outerjoin(REC, REC.c.id == LEAF.c.record_id)
                      .where(LEAF.c.tenant_id == tenant_id, col == value)).one_or_none()
    if leaf is None:
        raise NotFound("the record is not in the log (yet: leaves are appended within seconds)",
                       code="tlog_record_not_found")
    size, newest = _size(db, tenant_id, tree_size)
    if leaf.idx >= size:
        raise NotFound("the record was appended after that checkpoint", code="tlog_record_not_found")
    if leaf.record_hash is None:  # its tenant's ledger was deleted by retention; the leaf stays
        raise NotFound("the record is no longer in the ledger", code="tlog_record_not_found")
    hashes = _run(db, tenant_id, lambda g: merkle.inclusion_path(g, leaf.idx, size))
    kept = newest if newest.size == size else checkpoint(db, tenant_id, size, missing_ok=True)
    return Inclusion(leaf.idx, size, leaf.record_id, leaf.record_hash, hashes,
                     kept.note if kept is not None else None)


def consistency(db: Session, tenant_id: str, first: int, second: int | None = None) -> tuple[int, list[bytes]]:
    """The consistency proof between two tree sizes up to the newest checkpoint (RFC 9162
    §2.1.4); ``second`` defaults to the newest checkpoint's size. (second, hashes)."""
    second, _ = _size(db, tenant_id, second)
    if not 0 < first <= second:
        raise ValidationFailed.field("first", "must be at least 1 and at most second")
    return second, list(_run(db, tenant_id, lambda g: merkle.consistency_path(g, first, second)))


def b64(hashes: list[bytes]) -> list[str]:
    return [base64.b64encode(h).decode() for h in hashes]


# --- the sequencer loop of a service process ------------------------------------------------------


class Sequencer:
    """Appends new records and signs a checkpoint every ``CONSENT_TLOG_SECONDS``."""

    def __init__(self, engine: Engine, settings: Settings, signer: Signer):
        self.engine, self.settings, self.signer = engine, settings, signer
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> Sequencer:
        self._task = asyncio.create_task(self._run(), name="tlog-sequencer")
        return self

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, timeout=30)
            except (TimeoutError, asyncio.CancelledError):
                self._task.cancel()

    async def _run(self) -> None:
        from starlette.concurrency import run_in_threadpool

        while not self._stop.is_set():
            try:
                await run_in_threadpool(run_once, self.engine, self.settings, self.signer)
            except Exception:  # a bad pass must not end the loop (DB restart, etc.)
                log.exception("transparency log pass failed")
            try:
                await asyncio.wait_for(self._stop.wait(), timeout=self.settings.tlog_seconds)
            except TimeoutError:
                pass


def start_sequencer(engine: Engine, settings: Settings, signer: Signer) -> Sequencer | None:
    """Start this process's sequencer unless ``CONSENT_TLOG_SECONDS`` is 0."""
    return Sequencer(engine, settings, signer).start() if settings.tlog_seconds > 0 else None
