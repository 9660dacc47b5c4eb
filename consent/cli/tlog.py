"""Transparency-log commands: ``consent tlog build`` (append the records not in the tree yet and
sign a checkpoint now, instead of waiting for the sequencer) and ``consent checkpoint fetch``
(an auditor or the tenant keeps checkpoints, each checked consistent with the one kept before:
docs/transparency.md)."""

from __future__ import annotations

import argparse
import base64
import json
import sys
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa

from consent import crypto
from consent.audit import merkle, tlog
from consent.errors import BadToken
from consent.ledger import receipts
from consent.settings import Settings
from consent.store import db
from consent.store.tables import TENANT


def cmd_build(args: argparse.Namespace, settings: Settings) -> int:
    engine = db.create_db_engine(settings.database_url)
    try:
        with db.transaction(engine, write=True) as session:
            key = receipts.ensure_signing_key(session)
            signer = crypto.Signer(key.kid, key.private_pem)
            ids = [args.tenant] if args.tenant else list(session.execute(sa.select(TENANT.c.id)).scalars())
        out = []
        for tenant_id in ids:
            added = tlog.build(engine, tenant_id)
            tlog.run_once(engine, settings, signer, wait=True)  # the feed's newest records and a checkpoint
            with db.transaction(engine) as session:
                size = tlog.tree_size(session, tenant_id)
            out.append({"tenant": tenant_id, "appended": added, "tree_size": size})
    finally:
        engine.dispose()
    print(json.dumps(out, indent=2))
    return 0


def _parse(note: str, vkeys: list[str]) -> tuple[str, int, bytes]:
    origin, size, root = crypto.open_note(note, vkeys).split("\n")[:3]
    return origin, int(size), base64.b64decode(root, validate=True)


def fetch_checkpoint(base_url: str, tenant_id: str, directory: Path, vkeys: list[str] | None = None,
                     client: Any = None) -> dict[str, Any]:
    """Fetch the newest checkpoint, check its signature and its consistency with the newest one
    kept in ``directory`` (RFC 9162 §2.1.4), and keep it there as ``<size>.note``."""
    http = client or httpx.Client(base_url=base_url.rstrip("/"), timeout=30, trust_env=False)
    try:
        keys = vkeys or http.get("/v1/tlog/key").raise_for_status().text.split()
        note = http.get(f"/v1/tlog/{tenant_id}/checkpoint").raise_for_status().text
        origin, size, root = _parse(note, keys)
        if not origin.endswith(f"/tenants/{tenant_id}"):
            raise BadToken(f"checkpoint is for another log ({origin})")
        folder = directory / tenant_id
        kept = sorted((int(p.stem), p) for p in folder.glob("*.note")) if folder.exists() else []
        previous = None
        if kept:
            old_size, path = kept[-1]
            old_origin, _, old_root = _parse(path.read_text(encoding="utf-8"), keys)
            if old_origin != origin or size < old_size:
                raise BadToken(f"the log shrank or moved: kept {old_origin} at {old_size}, now {origin} at {size}")
            if size > old_size:
                proof = http.get(f"/v1/tlog/{tenant_id}/proof/consistency",
                                 params={"first": old_size, "second": size}).raise_for_status().json()
                hashes = [base64.b64decode(h) for h in proof["hashes"]]
                if not merkle.verify_consistency(old_size, size, old_root, root, hashes):
                    raise BadToken(f"checkpoint {size} is not consistent with the kept checkpoint {old_size}")
            elif root != old_root:
                raise BadToken(f"two different roots for size {size}")
            previous = old_size
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{size}.note").write_text(note, encoding="utf-8")
        return {"tenant": tenant_id, "origin": origin, "tree_size": size,
                "root": base64.b64encode(root).decode(), "consistent_with": previous,
                "saved": str(folder / f"{size}.note")}
    finally:
        if client is None:
            http.close()


def cmd_checkpoint(args: argparse.Namespace, settings: Settings) -> int:
    try:
        result = fetch_checkpoint(args.url or settings.issuer, args.tenant, Path(args.dir), args.key)
    except BadToken as exc:
        print(f"FAILED: {exc.detail}", file=sys.stderr)
        return 1
    except (httpx.HTTPError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


def add_commands(sub: Any) -> None:
    """Register the transparency-log commands on the ``consent`` parser."""
    t = sub.add_parser("tlog", help="transparency log: build the tree of records not in it yet")
    t.add_argument("action", choices=["build"], help="build: append every record not in its tenant's log yet")
    t.add_argument("--tenant", help="one tenant (default: every tenant)")
    t.set_defaults(func=cmd_build)
    c = sub.add_parser("checkpoint", help="fetch a tenant's newest checkpoint, check it against the ones kept, keep it")
    c.add_argument("action", choices=["fetch"], help="fetch: get, check and keep the newest checkpoint")
    c.add_argument("--tenant", required=True, help="the tenant whose log to follow")
    c.add_argument("--url", help="the service's base URL (default CONSENT_ISSUER)")
    c.add_argument("--dir", default="checkpoints", help="where checkpoints are kept (DIR/<tenant>/<size>.note)")
    c.add_argument("--key", action="append", help="pin a note verifier key (default: fetched from /v1/tlog/key)")
    c.set_defaults(func=cmd_checkpoint)
