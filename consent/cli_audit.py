"""``consent export``, ``consent verify`` and ``consent retention run``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from . import db, exports, receipts, retention
from .crypto import Signer
from .errors import ConsentError, ValidationFailed
from .http import parse_time
from .models import Tenant
from .settings import Settings
from .verify import VerifyError, load_keys, read_manifest, verify_file


def _time(name: str) -> Any:
    def parse(raw: str) -> datetime:
        try:
            return parse_time(name, raw)
        except ValidationFailed as exc:
            raise argparse.ArgumentTypeError(f"{raw!r}: {exc.errors[0]['message']}") from None
    return parse


class Progress:
    """A one-line progress bar on stderr, only when stderr is a terminal."""

    def __init__(self, total: int, stream: Any = None):
        self.total = max(total, 1)
        self.stream = stream or sys.stderr
        self.enabled = bool(getattr(self.stream, "isatty", lambda: False)())

    def __call__(self, done: int) -> None:
        if self.enabled:
            width = 30
            filled = int(width * done / self.total)
            self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} records")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")


def cmd_export(args: argparse.Namespace, settings: Settings) -> int:
    engine = db.create_db_engine(settings.database_url)
    try:
        with db.transaction(engine, write=True) as session:
            tenant_id = args.tenant
            if tenant_id is None:
                ids = list(session.execute(sa.select(Tenant.id).limit(2)).scalars())
                if len(ids) != 1:
                    raise ConsentError("give --tenant ID (the database holds several tenants, or none)")
                tenant_id = ids[0]
            elif session.get(Tenant, tenant_id) is None:
                raise ConsentError(f"no tenant {tenant_id!r}")
            key = receipts.ensure_signing_key(session)
            signer = Signer(key.kid, key.private_pem)
        flt = exports.ExportFilter(tenant_id, args.start, args.end, args.purpose, args.policy_version)
        progress = Progress(exports.count_records(engine, flt))
        export_id = exports.new_export_id()
        tmp = f"{args.out}.partial"
        with open(tmp, "wb") as out:
            for chunk in exports.stream_export(engine, flt, args.format, signer=signer, issuer=settings.issuer,
                                               export_id=export_id, progress=progress):
                out.write(chunk)
        os.replace(tmp, args.out)  # never leave a half-written file under the final name
        progress.close()
        with db.transaction(engine) as session:
            m = exports.get_manifest(session, tenant_id, export_id)
            assert m is not None
            if args.format == "csv":
                with open(f"{args.out}.manifest", "w", encoding="utf-8") as f:
                    f.write(m.manifest + "\n")
        extra = f" (manifest in {args.out}.manifest)" if args.format == "csv" else ""
        print(f"exported {m.count} records to {args.out}{extra}; export id {export_id}", file=sys.stderr)
    finally:
        engine.dispose()
    return 0


def cmd_verify(args: argparse.Namespace, settings: Settings) -> int:
    try:
        keys = load_keys(args.jwks)
        manifest = read_manifest(args.manifest) if args.manifest else None
        if manifest is None and os.path.exists(f"{args.export}.manifest"):
            manifest = read_manifest(f"{args.export}.manifest")
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: cannot read keys or manifest: {exc}", file=sys.stderr)
        return 2
    try:
        report = verify_file(args.export, keys, manifest)
    except VerifyError as exc:
        print(f"FAILED {args.export}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    m = report.manifest
    print(json.dumps({"ok": True, "records": report.records, "subjects": report.subjects,
                      "receipts_verified": report.receipts, "references": report.references, "tenant": m.get("tenant"),
                      "filters": m.get("filters"), "partial": m.get("partial"), "export_id": m.get("jti"),
                      "signed_by": m.get("iss")}, indent=2))
    return 0


def cmd_retention(args: argparse.Namespace, settings: Settings) -> int:
    engine = db.create_db_engine(settings.database_url)
    try:
        result = retention.run(engine, batch=args.batch)
    finally:
        engine.dispose()
    print(json.dumps(result.as_dict()))
    return 0


def add_commands(sub: Any) -> None:
    """Register the audit commands on the ``consent`` parser."""
    e = sub.add_parser("export", help="write a verifiable ledger export (JSONL or CSV) to a file")
    e.add_argument("--out", required=True, help="file to write")
    e.add_argument("--tenant", help="tenant id (optional when the database holds one tenant)")
    e.add_argument("--from", dest="start", type=_time("from"), help="recorded_at at or after (RFC 3339)")
    e.add_argument("--to", dest="end", type=_time("to"), help="recorded_at before (RFC 3339)")
    e.add_argument("--purpose")
    e.add_argument("--policy-version")
    e.add_argument("--format", choices=exports.FORMATS, default="jsonl")
    e.set_defaults(func=cmd_export)
    v = sub.add_parser("verify", help="verify an export offline: hashes, chains, receipts, signed manifest")
    v.add_argument("export", help="the export file (JSONL or CSV)")
    v.add_argument("--jwks", required=True, help="JWKS URL (…/.well-known/jwks.json) or file")
    v.add_argument("--manifest", help="manifest file (needed for CSV; default EXPORT.manifest if present)")
    v.set_defaults(func=cmd_verify)
    r = sub.add_parser("retention", help="apply retention settings (idempotent; safe from cron on several hosts)")
    r.add_argument("action", choices=["run"])
    r.add_argument("--batch", type=int, default=1000, help="rows per transaction")
    r.set_defaults(func=cmd_retention)
