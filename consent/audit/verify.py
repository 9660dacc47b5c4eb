"""Offline verification of a ledger export (``consent verify``): needs only the export and the
service's public keys (JWKS), never a secret.

Every line is checked as it is read, so the first bad line is the one reported:
its bytes must be the canonical encoding of its fields; ``n`` must be its position among the
records (a removed, duplicated or moved line breaks the count exactly there); its record hash
must be the SHA-256 of its content; its ``prev_hash`` must be the hash of the subject's
previous line when ``linked``, or point outside the export (an anchor) only when the export is
filtered; its receipt must be an EdDSA JWT from a known key naming this record and hash.
At the end the signed manifest must match: count, SHA-256 of the body, and the digest of every
subject's chain (anchor, head, count). When the manifest names a transparency-log checkpoint
(docs/transparency.md) and the export is whole, every leaf below the checkpoint's size must be a
line (``leaf``), and the tree over their record hashes must have the checkpoint's signed root; each
checkpoint an auditor saved earlier must be the tree over the first leaves of that one (a removed,
inserted or reordered record anywhere in history changes it, whatever the service signs now).

Receipt signatures are most of the work (an Ed25519 check each), so large exports check them in
worker processes, in batches, while this process walks the lines; the first bad line reported is
the same as with one process (see ``Walker``).
"""

from __future__ import annotations

import base64
import binascii
import csv
import hashlib
import json
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import orjson

from consent import crypto
from consent.audit import merkle
from consent.audit.exports import (
    CONTENT_KEYS,
    CSV_COLUMNS,
    CSV_COLUMNS_V1,
    DISCLOSURE_LINE,
    GPC_LINE_KEYS,
    LINE_KEYS,
    MANIFEST_TYPE,
    POLICY_LINE,
    csv_bytes,
    head_digest_line,
)
from consent.errors import BadToken


class VerifyError(Exception):
    """The export does not verify; ``line`` is the 1-based line number (None: the whole file)."""

    def __init__(self, line: int | None, message: str):
        super().__init__(f"line {line}: {message}" if line else message)
        self.line = line
        self.message = message


@dataclass
class Report:
    records: int = 0
    subjects: int = 0
    receipts: int = 0
    manifest: dict[str, Any] = field(default_factory=dict)
    references: int = 0  # policy-document and disclosure lines checked
    tlog_size: int | None = None  # the checkpoint whose root was recomputed
    checkpoints: list[int] = field(default_factory=list)  # sizes of the saved checkpoints matched


RECEIPT_BATCH = 2000  # receipts per job for a worker process
MAX_PENDING = 8  # batches in flight
PARALLEL_MIN_BYTES = 8 << 20  # exports smaller than this are checked in one process
CANONICAL = orjson.OPT_SORT_KEYS  # same bytes as crypto.canonical_json for JSON values (no floats in a line)


def canonical(value: Any) -> bytes:
    """``crypto.canonical_json``, faster: orjson writes the same bytes for every string, int,
    bool, null, object and array (tests/test_export_format.py); a float never appears in a valid
    line, and a line holding one fails its hash or canonical-form check either way."""
    try:
        return orjson.dumps(value, option=CANONICAL)
    except TypeError:  # e.g. an integer beyond 64 bits: no valid line holds one
        return crypto.canonical_json(value)


def receipt_problem(keys: crypto.KeySet, token: Any, record_hash: Any, record_id: Any, tenant: Any) -> str | None:
    """Why a line's receipt does not vouch for it, or None when it does."""
    try:
        claims = keys.verify(token)
    except BadToken as exc:
        return f"receipt does not verify: {exc.detail}"
    if (claims.get("record_hash"), claims.get("record_id"), claims.get("tenant")) != (record_hash, record_id, tenant):
        return "receipt names another record, hash or tenant"
    if claims.get("aud", tenant) != tenant:  # receipts signed before ``aud`` existed have none
        return "receipt is addressed to another tenant"
    return None


_WORKER_KEYS: dict[str, crypto.KeySet] = {}


def _check_receipts(jwks_json: str, batch: list[tuple[int, Any, Any, Any, Any]]) -> tuple[int, str] | None:
    """In a worker process: the first (line, problem) of a batch of receipts, or None."""
    keys = _WORKER_KEYS.get(jwks_json)
    if keys is None:
        _WORKER_KEYS.clear()
        keys = _WORKER_KEYS[jwks_json] = crypto.KeySet(json.loads(jwks_json))
    for no, *receipt in batch:
        problem = receipt_problem(keys, *receipt)
        if problem is not None:
            return no, problem
    return None


class Walker:
    """Checks record lines one at a time, keeping one entry per subject (its chain so far).

    With ``pool``, receipts are checked in batches by worker processes while the walk goes
    on. Order of checks within a line: shape, position, hash, tenant, receipt, chain; so when
    the walk finds a problem at line k, a receipt problem on an earlier line (or on line k, if
    the walk's problem is a chain one) is reported instead, exactly as a sequential check would.
    A receipt a worker rejects is checked again here (this key set may fetch rotated keys).
    """

    def __init__(self, keys: crypto.KeySet, pool: Executor | None = None, saved: list[str] | None = None):
        self.keys = keys
        self.saved = saved or []  # checkpoints (signed notes) an auditor kept
        self.leaves = bytearray()  # 32-byte leaf hashes by leaf index
        self.seen = bytearray()  # 1 where a line carried that leaf index
        self.count = 0
        self.tenant: str | None = None
        self.chains: dict[str, list[Any]] = {}  # pseudonym -> [anchor, head, count]
        self.needs_partial: tuple[int, str] | None = None  # first line only a filtered export allows
        self.receipts = 0
        self.pool = pool
        # What the records point to (first line naming each), and the reference lines seen.
        self.wants: dict[tuple[str, Any], int] = {}
        self.has: set[tuple[str, Any]] = set()
        self.csv_docs: dict[Any, tuple[str, str]] = {}
        self._batch: list[tuple[int, Any, Any, Any, Any]] = []
        self._pending: list[tuple[int, Future[Any], list[tuple[int, Any, Any, Any, Any]]]] = []

    def record(self, no: int, line: Any) -> None:
        if not isinstance(line, dict):
            raise VerifyError(no, "not a record line (fields missing or unexpected)")
        keys = set(line) | {"leaf"}  # exports made before the transparency log have no "leaf"
        if keys != LINE_KEYS and not (keys == GPC_LINE_KEYS and line["gpc"] is True):
            raise VerifyError(no, "not a record line (fields missing or unexpected)")
        n = line["n"]
        if type(n) is not int or n != self.count + 1:
            raise VerifyError(no, f"expected record n={self.count + 1}, found n={n!r}: "
                                  "a line was removed, duplicated or moved")
        self.count = n
        policy = line["policy"]
        if not isinstance(policy, dict) or set(policy) != {"key", "version"}:
            raise VerifyError(no, "policy must be {key, version}")
        if self.has:
            raise VerifyError(no, "record line after the policy-document and disclosure lines")
        content = {k: line[k] for k in CONTENT_KEYS}
        if "gpc" in line:
            content["gpc"] = True
        if policy["version"] is not None:
            self.wants.setdefault((POLICY_LINE, (policy["key"], policy["version"])), no)
        if line["disclosures_sha256"] is not None:
            self.wants.setdefault((DISCLOSURE_LINE, line["disclosures_sha256"]), no)
        record_hash = line["record_hash"]
        if crypto.sha256_hex(canonical(content)) != record_hash:
            raise VerifyError(no, f"record hash does not match the content of record {line['id']}")
        if self.tenant is None:
            self.tenant = line["tenant"]
        elif line["tenant"] != self.tenant:
            raise VerifyError(no, "record of another tenant")
        self._receipt(no, line)  # first: a valid receipt vouches for the content's types too
        leaf = line.get("leaf")
        if leaf is not None:
            self._leaf(no, leaf, record_hash)
        try:
            self._chain(no, line)
        except VerifyError:
            self.settle(no)  # a receipt problem on this line or before comes first
            raise
        except TypeError:  # content of odd types (an unhashable subject): its receipt cannot be valid
            self.settle(no)
            raise VerifyError(no, "malformed subject or prev_hash") from None

    def _leaf(self, no: int, leaf: Any, record_hash: str) -> None:
        if type(leaf) is not int or not 0 <= leaf < 2**40:
            raise VerifyError(no, "leaf must be a log index or null")
        if leaf >= len(self.seen):
            grow = max(leaf + 1, 2 * len(self.seen)) - len(self.seen)
            self.seen.extend(bytes(grow))
            self.leaves.extend(bytes(32 * grow))
        if self.seen[leaf]:
            raise VerifyError(no, f"leaf {leaf} of the transparency log appears twice")
        self.seen[leaf] = 1
        self.leaves[32 * leaf:32 * leaf + 32] = merkle.leaf_hash(record_hash.encode())

    def _chain(self, no: int, line: dict[str, Any]) -> None:
        subject, prev, linked = line["subject"], line["prev_hash"], line["linked"]
        if type(linked) is not bool:
            raise VerifyError(no, "linked must be true or false")
        chain = self.chains.get(subject)
        if linked:
            if chain is None or prev != chain[1]:
                raise VerifyError(no, f"prev_hash does not link to the previous record of subject {subject}")
        else:
            if chain is not None and prev == chain[1]:
                raise VerifyError(no, "record links to the previous line but is marked unlinked")
            if (prev is not None or chain is not None) and self.needs_partial is None:
                self.needs_partial = (no, "chain continues outside the export")
        if chain is None:
            self.chains[subject] = [None if linked else prev, line["record_hash"], 1]
        else:
            chain[1] = line["record_hash"]
            chain[2] += 1

    def _receipt(self, no: int, line: dict[str, Any]) -> None:
        receipt = (line["receipt"], line["record_hash"], line["id"], line["tenant"])
        if self.pool is None:
            problem = receipt_problem(self.keys, *receipt)
            if problem is not None:
                raise VerifyError(no, problem)
            self.receipts += 1
            return
        self._batch.append((no, *receipt))
        if len(self._batch) >= RECEIPT_BATCH:
            self._submit()

    def _submit(self) -> None:
        if self._batch:
            assert self.pool is not None  # receipts are batched only for a pool
            jwks = json.dumps(self.keys.known_jwks(), sort_keys=True)
            future = self.pool.submit(_check_receipts, jwks, self._batch)
            self._pending.append((self._batch[0][0], future, self._batch))
            self._batch = []
        while len(self._pending) > MAX_PENDING:  # bounded memory
            self._settle_first()

    def _settle_first(self, upto: int | None = None) -> None:
        _, future, batch = self._pending.pop(0)
        failed = future.result()
        if failed is None:
            self.receipts += len(batch)
            return
        start = [b[0] for b in batch].index(failed[0])
        self.receipts += start
        for no, *receipt in batch[start:]:  # checked again here, on: raises unless this key set knows better
            if upto is not None and no > upto:
                return
            problem = receipt_problem(self.keys, *receipt)
            if problem is not None:
                self._pending.clear()
                raise VerifyError(no, problem)
            self.receipts += 1

    def settle(self, upto: int | None = None) -> None:
        """Wait for the receipts of the lines up to ``upto`` (all when None) and raise the first
        receipt problem among them."""
        if self.pool is None:
            return
        if upto is None:
            self._submit()
        while self._pending and (upto is None or self._pending[0][0] <= upto):
            self._settle_first(upto)
        if upto is not None:
            for no, *receipt in self._batch:
                if no > upto:
                    break
                problem = receipt_problem(self.keys, *receipt)
                if problem is not None:
                    raise VerifyError(no, problem)

    def reference(self, no: int, obj: dict[str, Any]) -> None:
        """A policy-document or disclosure line: well-formed, content-addressed, once each."""
        (kind, body), = obj.items()
        if kind == DISCLOSURE_LINE:
            if not isinstance(body, dict) or set(body) != {"sha256", "cookies"} \
                    or not isinstance(body["cookies"], list) or not body["cookies"]:
                raise VerifyError(no, "malformed disclosure line")
            if crypto.sha256_hex(canonical(body["cookies"])) != body["sha256"]:
                raise VerifyError(no, "disclosure does not hash to its sha256")
            key: tuple[str, Any] = (kind, body["sha256"])
        else:
            fields = {"key", "version", "url", "sha256", "effective_at", "material"}
            if not isinstance(body, dict) or set(body) != fields \
                    or not all(isinstance(body[k], str) for k in fields - {"material"}) \
                    or type(body["material"]) is not bool:
                raise VerifyError(no, "malformed policy_document line")
            key = (kind, (body["key"], body["version"]))
        if key in self.has:
            raise VerifyError(no, f"{kind} listed twice")
        if key not in self.wants:
            raise VerifyError(no, f"{kind} that no record points to")
        self.has.add(key)

    def csv_readable(self, no: int, d: dict[str, str]) -> None:
        """The readable CSV columns agree with the record: the disclosure cell is the JSON the
        record's ``disclosures_sha256`` hashes (and names its cookies); one document per version."""
        digest, text = d["disclosures_sha256"], d["disclosures"]
        if bool(digest) != bool(text):
            raise VerifyError(no, "disclosures column does not match disclosures_sha256")
        if text:
            try:
                cookies = json.loads(text)
            except ValueError:
                raise VerifyError(no, "disclosures column is not JSON") from None
            if canonical(cookies).decode() != text or crypto.sha256_hex(text.encode()) != digest:
                raise VerifyError(no, "disclosures column does not hash to disclosures_sha256")
            names = "; ".join(str(c.get("name")) if isinstance(c, dict) else "?" for c in cookies)
            if d["disclosed_cookies"] != names:
                raise VerifyError(no, "disclosed_cookies does not name the disclosed cookies")
        elif d["disclosed_cookies"]:
            raise VerifyError(no, "disclosed_cookies without a disclosure")
        version = (d["policy_key"], d["policy_version"])
        doc = (d["policy_url"], d["policy_sha256"])
        if not d["policy_version"]:
            if any(doc):
                raise VerifyError(no, "policy document without a policy version")
        elif self.csv_docs.setdefault(version, doc) != doc or not all(doc):
            raise VerifyError(no, f"policy document of version {d['policy_version']} differs or is missing")

    def finish(self, no: int | None, token: str, body_sha256: str, fmt: str) -> Report:
        """Check the signed manifest against everything read; ``no`` is the manifest's line."""
        self.settle()
        try:
            claims = self.keys.verify(token)
        except BadToken as exc:
            raise VerifyError(no, f"manifest signature does not verify: {exc.detail}") from None
        if claims.get("typ") != MANIFEST_TYPE or claims.get("format") != fmt:
            raise VerifyError(no, f"not a {fmt} export manifest")
        if self.tenant is not None and claims.get("tenant") != self.tenant:
            raise VerifyError(no, "manifest is for another tenant")
        listed = claims.get("references")
        if listed is None:  # an export made before reference lines: nothing to require
            if self.has:
                raise VerifyError(no, "reference lines, but the manifest does not list them")
        else:
            if fmt == "jsonl":
                for (kind, key), first in sorted(self.wants.items(), key=lambda w: w[1]):
                    if (kind, key) not in self.has:
                        raise VerifyError(first, f"the {kind} this record points to ({key}) is not in the export")
            if listed != len(self.has):
                raise VerifyError(no, f"manifest lists {listed} reference lines, the file has {len(self.has)}")
        if claims.get("count") != self.count:
            raise VerifyError(no, f"manifest counts {claims.get('count')} records, the file has {self.count}")
        if claims.get("body_sha256") != body_sha256:
            raise VerifyError(no, "SHA-256 of the body does not match the manifest")
        if self.needs_partial and not claims.get("partial"):
            raise VerifyError(self.needs_partial[0], f"{self.needs_partial[1]}, but the export is not filtered")
        heads = hashlib.sha256()
        for pseudonym in sorted(self.chains):
            anchor, head, count = self.chains[pseudonym]
            heads.update(head_digest_line(pseudonym, anchor, head, count))
        if claims.get("subjects") != len(self.chains) or claims.get("heads_sha256") != heads.hexdigest():
            raise VerifyError(no, "subject chains (anchors, heads, counts) do not match the manifest")
        report = Report(self.count, len(self.chains), self.receipts, claims, len(self.has))
        self._tree(no, claims, fmt, report)
        return report

    def _tree(self, no: int | None, claims: dict[str, Any], fmt: str, report: Report) -> None:
        """Recompute the log's root from the lines' leaves; check it, and every saved checkpoint."""
        tlog = claims.get("tlog")
        if tlog is None:
            if self.saved:
                raise VerifyError(no, "the export names no transparency-log checkpoint to compare with")
            return
        if claims.get("partial") or fmt != "jsonl":  # the tree needs every leaf: a whole JSONL export
            if self.saved:
                raise VerifyError(no, "saved checkpoints are checked against a whole (unfiltered) JSONL export")
            return
        origin, size, root = open_checkpoint(self.keys, tlog.get("checkpoint"), no, "the export's checkpoint")
        if size != tlog.get("size") or origin.rsplit("/", 1)[-1] != claims.get("tenant"):
            raise VerifyError(no, "the export's checkpoint is for another log or size")
        if len(self.seen) < size:
            self.leaves.extend(bytes(32 * (size - len(self.seen))))
            self.seen.extend(bytes(size - len(self.seen)))
        missing = self.seen.find(0, 0, size)
        if missing != -1:
            raise VerifyError(no, f"leaf {missing} of the transparency log (size {size}) is not in the export: "
                                  "a record was removed")
        saved = {}
        for note in self.saved:
            s_origin, s_size, s_root = open_checkpoint(self.keys, note, None, "a saved checkpoint")
            if s_origin != origin:
                raise VerifyError(None, f"a saved checkpoint is for another log ({s_origin})")
            if s_size > size:
                raise VerifyError(None, f"a saved checkpoint has {s_size} records, the export's log only {size}: "
                                        "records were removed from the log")
            saved[s_size] = s_root
        acc = merkle.RootAccumulator()
        view = memoryview(self.leaves)
        for i in range(size):
            acc.add(bytes(view[32 * i:32 * i + 32]))
            if acc.size in saved:
                if acc.root() != saved[acc.size]:
                    raise VerifyError(None, f"the log's first {acc.size} records no longer hash to the saved "
                                            "checkpoint: a record was removed, inserted or reordered")
                report.checkpoints.append(acc.size)
        if acc.root() != root:
            raise VerifyError(no, "the records' transparency-log root does not match the export's checkpoint")
        report.tlog_size = size


def open_checkpoint(keys: crypto.KeySet, note: Any, no: int | None, what: str) -> tuple[str, int, bytes]:
    """(origin, size, root) of a checkpoint note signed by a key of the JWKS."""
    if not isinstance(note, str):
        raise VerifyError(no, f"{what} is not a signed note")
    names = {line.split(" ")[1] for line in note.split("\n\n", 1)[-1].splitlines() if line.count(" ") == 2}
    vkeys = [crypto.note_vkey(name, jwk) for name in names for jwk in keys.known_jwks().get("keys", [])
             if jwk.get("crv") == "Ed25519"]
    try:
        text = crypto.open_note(note, vkeys)
        origin, size, root = text.split("\n")[:3]
        return origin, int(size), base64.b64decode(root, validate=True)
    except (BadToken, ValueError, binascii.Error) as exc:
        raise VerifyError(no, f"{what} does not verify: {exc}") from None


def verify_jsonl(lines: Iterable[bytes], keys: crypto.KeySet, manifest: str | None = None,
                 pool: Executor | None = None, saved: list[str] | None = None) -> Report:
    """Verify a JSONL export given as raw lines (each ending in a newline); ``pool`` checks
    the receipts in worker processes; ``saved``: checkpoints kept by an auditor."""
    walker = Walker(keys, pool, saved)
    try:
        return _walk_jsonl(walker, lines, manifest)
    except VerifyError as exc:
        if exc.line:
            walker.settle(exc.line - 1)  # a receipt problem on an earlier line comes first
        raise


def _walk_jsonl(walker: Walker, lines: Iterable[bytes], manifest: str | None) -> Report:
    body = hashlib.sha256()
    report: Report | None = None
    no = 0
    for no, raw in enumerate(lines, 1):  # no is read after the loop as well
        if report is not None:
            raise VerifyError(no, "data after the manifest")
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise VerifyError(no, "not valid JSON") from None
        if raw[-1:] != b"\n" or canonical(obj) != raw[:-1]:
            raise VerifyError(no, "not in canonical form (a byte was changed)")
        if isinstance(obj, dict) and len(obj) == 1 and next(iter(obj)) in (POLICY_LINE, DISCLOSURE_LINE):
            walker.reference(no, obj)
            body.update(raw)
            continue
        if isinstance(obj, dict) and set(obj) == {"manifest"}:
            token = obj["manifest"]
            if not isinstance(token, str) or (manifest is not None and manifest != token):
                raise VerifyError(no, "manifest differs from the one given")
            report = walker.finish(no, token, body.hexdigest(), "jsonl")
            continue
        walker.record(no, obj)
        body.update(raw)
    if report is None:
        if manifest is None:
            raise VerifyError(no + 1, "no manifest: the export is truncated")
        report = walker.finish(None, manifest, body.hexdigest(), "jsonl")
    return report


def _csv_line(no: int, row: list[str], columns: tuple[str, ...] = CSV_COLUMNS,
              walker: Walker | None = None) -> dict[str, Any]:
    if len(row) != len(columns):
        raise VerifyError(no, f"expected {len(columns)} columns, found {len(row)}")
    d = dict(zip(columns, row))
    if d.get("gpc", "") not in ("", "true"):
        raise VerifyError(no, "malformed gpc")
    opt = {k: (d[k] or None) for k in ("policy_key", "policy_version", "disclosures_sha256", "prev_hash")}
    bools = {"true": True, "false": False}
    if not d["n"].isdigit() or d["v"] != "1" or d["linked"] not in bools or d["confirmed"] not in bools:
        raise VerifyError(no, "malformed n, v, linked or confirmed")
    line: dict[str, Any] = {k: d[k] for k in CSV_COLUMNS if k in LINE_KEYS}
    line.update(n=int(d["n"]), v=1, linked=bools[d["linked"]], confirmed=bools[d["confirmed"]],
                policy={"key": opt["policy_key"], "version": opt["policy_version"]},
                disclosures_sha256=opt["disclosures_sha256"], prev_hash=opt["prev_hash"])
    if d.get("gpc") == "true":
        line["gpc"] = True
    if walker is not None and "disclosures" in d:
        walker.csv_readable(no, d)
    return line


def verify_csv(lines: Iterable[bytes], keys: crypto.KeySet, manifest: str,
               pool: Executor | None = None, saved: list[str] | None = None) -> Report:
    """Verify a CSV export against its manifest (fetched from the manifest route)."""
    walker = Walker(keys, pool, saved)
    try:
        return _walk_csv(walker, lines, manifest)
    except VerifyError as exc:
        if exc.line:
            walker.settle(exc.line - 1)
        raise


def _walk_csv(walker: Walker, lines: Iterable[bytes], manifest: str) -> Report:
    body = hashlib.sha256()
    columns: tuple[str, ...] = CSV_COLUMNS
    for no, raw in enumerate(lines, 1):  # no is read after the loop as well
        body.update(raw)
        try:
            row = next(csv.reader([raw.decode()]))
        except (UnicodeDecodeError, csv.Error, StopIteration):
            raise VerifyError(no, "not a CSV row") from None
        if csv_bytes([row]) != raw:
            raise VerifyError(no, "not in canonical form (a byte was changed)")
        if no == 1:
            if tuple(row) not in (CSV_COLUMNS, CSV_COLUMNS_V1):
                raise VerifyError(1, "unexpected CSV header")
            columns = tuple(row)
            continue
        walker.record(no, _csv_line(no, row, columns, walker))
    return walker.finish(None, manifest, body.hexdigest(), "csv")


def load_keys(source: str) -> crypto.KeySet:
    """Public keys from a JWKS URL (http/https) or a JWKS file."""
    if source.startswith(("http://", "https://")):
        return crypto.KeySet(url=source)
    with open(source, "rb") as f:
        return crypto.KeySet(json.load(f))


def read_manifest(path: str) -> str:
    """A manifest token from a file: the bare JWT, or the JSON of the manifest route."""
    with open(path, encoding="utf-8") as f:
        text = f.read().strip()
    if text.startswith("{"):
        return str(json.loads(text)["manifest"])
    return text


def receipt_pool(workers: int) -> ProcessPoolExecutor:
    """Worker processes for receipt checks (spawned: safe whatever threads this process runs)."""
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))


def verify_file(path: str, keys: crypto.KeySet, manifest: str | None = None, *,
                workers: int | None = None, progress: Callable[[int], None] | None = None,
                saved: list[str] | None = None) -> Report:
    """Verify an export file (CSV when it starts with the CSV header, else JSONL). Receipts
    are checked in ``workers`` processes (default: one per CPU for files of 8 MiB and more,
    none for smaller ones; 0: none)."""
    if workers is None:
        workers = (os.cpu_count() or 1) if os.path.getsize(path) >= PARALLEL_MIN_BYTES else 0
    pool = receipt_pool(workers) if workers > 0 else None
    try:
        with open(path, "rb") as f:
            is_csv = f.read(len(CSV_COLUMNS[0]) + 1) == f"{CSV_COLUMNS[0]},".encode()
            f.seek(0)
            lines = f if progress is None else _reporting(f, progress)
            if is_csv:
                if manifest is None:
                    raise VerifyError(None, "a CSV export needs its manifest (--manifest FILE)")
                return verify_csv(lines, keys, manifest, pool, saved)
            return verify_jsonl(lines, keys, manifest, pool, saved)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def _reporting(lines: Iterable[bytes], progress: Callable[[int], None], every: int = 8192) -> Iterator[bytes]:
    """The lines, calling ``progress`` with the bytes read so far every ``every`` lines and at the end."""
    done = 0
    for n, line in enumerate(lines, 1):
        done += len(line)
        if n % every == 0:
            progress(done)
        yield line
    progress(done)
