"""``consent export``, ``consent verify`` and ``consent retention run``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from consent.audit import exports, retention
from consent.audit.verify import VerifyError, load_keys, read_manifest, verify_file
from consent.crypto import Signer
from consent.errors import ConsentError, ValidationFailed
from consent.ledger import receipts
from consent.settings import Settings
from consent.store import db
from consent.store.models import Tenant
from consent.store.tables import TENANT
from consent.web.http import parse_time


def _time(name: str) -> Any:
    def parse(raw: str) -> datetime:
        try:
            return parse_time(name, raw)
        except ValidationFailed as exc:
            raise argparse.ArgumentTypeError(f"{raw!r}: {exc.errors[0]['message']}") from None
    return parse


class Progress:
    """A one-line progress bar on stderr, only when stderr is a terminal."""

    def __init__(self, total: int, stream: Any = None, unit: str = "records"):
        self.total = max(total, 1)
        self.stream = stream or sys.stderr
        self.unit = unit
        self.enabled = bool(getattr(self.stream, "isatty", lambda: False)())

    def __call__(self, done: int) -> None:
        if self.enabled:
            width = 30
            filled = int(width * min(done, self.total) / self.total)
            self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} {self.unit}")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")


def choose_tenant(session: Any) -> str:
    """The only tenant, or on a terminal the one the user picks from the list; otherwise an
    error naming them."""
    t = TENANT
    rows = session.execute(sa.select(t.c.id, t.c.name).order_by(t.c.created_at)).all()
    if not rows:
        raise ConsentError("the database holds no tenant yet")
    if len(rows) == 1:
        return str(rows[0].id)
    if not (sys.stdin.isatty() and sys.stderr.isatty()):
        shown = ", ".join(f"{r.id} ({r.name})" for r in rows[:10]) + (" ..." if len(rows) > 10 else "")
        raise ConsentError(f"several tenants: give --tenant ID, one of {shown}")
    for n, r in enumerate(rows, 1):
        print(f"{n:>4}  {r.id}  {r.name}", file=sys.stderr)
    sys.stderr.write("Export which tenant? (number or id) ")
    sys.stderr.flush()
    answer = sys.stdin.readline().strip()
    for n, r in enumerate(rows, 1):
        if answer in (str(n), r.id):
            return str(r.id)
    raise ConsentError(f"no tenant {answer!r} in the list")


def cmd_export(args: argparse.Namespace, settings: Settings) -> int:
    engine = db.create_db_engine(settings.database_url)
    try:
        with db.transaction(engine, write=True) as session:
            tenant_id = args.tenant
            if tenant_id is None:
                tenant_id = choose_tenant(session)
            elif session.get(Tenant, tenant_id) is None:
                raise ConsentError(f"no tenant {tenant_id!r} (see `consent tenants list`)")
            key = receipts.ensure_signing_key(session)
            signer = Signer(key.kid, key.private_pem)
        flt = exports.ExportFilter(tenant_id, args.start, args.end, args.purpose, args.policy_version)
        progress = Progress(exports.count_records(engine, flt))
        export_id = exports.new_export_id()
        tmp = f"{args.out}.partial"
        with open(tmp, "wb") as out:
            out.writelines(exports.stream_export(engine, flt, args.format, signer=signer, issuer=settings.issuer,
                                                 export_id=export_id, progress=progress))
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
        saved = [Path(c).read_text(encoding="utf-8") for c in args.checkpoint or []]
        progress = Progress(os.path.getsize(args.export), unit="bytes")
        report = verify_file(args.export, keys, manifest, progress=progress, saved=saved)
        progress.close()
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
                      "signed_by": m.get("iss"), "tlog_size": report.tlog_size,
                      "saved_checkpoints_matched": report.checkpoints}, indent=2))
    return 0


def describe_plan(p: retention.RunResult) -> str:
    return (f"would purge the evidence of {p.evidence_purged} records and delete {p.records_dropped} records "
            f"of {p.subjects_dropped} subjects in {p.tenants_dropped} closed tenants")


def cmd_retention(args: argparse.Namespace, settings: Settings) -> int:
    engine = db.create_db_engine(settings.database_url)
    try:
        planned = retention.plan(engine)
        print(describe_plan(planned), file=sys.stderr)
        if args.dry_run:
            print(json.dumps({"dry_run": True, **planned.as_dict()}))
            return 0
        nothing = not (planned.evidence_purged or planned.records_dropped or planned.subjects_dropped)
        # Cron has no terminal and runs as configured; a person at one confirms what goes.
        if not args.yes and not nothing and sys.stdin.isatty():
            sys.stderr.write("Proceed? This cannot be undone. [y/N] ")  # stdout stays JSON
            sys.stderr.flush()
            answer = sys.stdin.readline().strip().lower()
            if answer not in ("y", "yes"):
                print("nothing done", file=sys.stderr)
                return 1
        result = retention.run(engine, batch=args.batch)
    finally:
        engine.dispose()
    print(json.dumps(result.as_dict()))
    return 0


def add_commands(sub: Any) -> None:
    """Register the audit commands on the ``consent`` parser."""
    e = sub.add_parser("export", help="write a verifiable ledger export (JSONL or CSV) to a file")
    e.add_argument("--out", required=True, help="file to write")
    e.add_argument("--tenant", help="tenant id (else: the only one, or asked on a terminal)")
    e.add_argument("--from", dest="start", type=_time("from"), help="recorded_at at or after (RFC 3339)")
    e.add_argument("--to", dest="end", type=_time("to"), help="recorded_at before (RFC 3339)")
    e.add_argument("--purpose", help="only records of this purpose")
    e.add_argument("--policy-version", help="only records given under this policy version")
    e.add_argument("--format", choices=exports.FORMATS, default="jsonl", help="file format (default jsonl)")
    e.set_defaults(func=cmd_export)
    v = sub.add_parser("verify", help="verify an export offline: hashes, chains, receipts, signed manifest")
    v.add_argument("export", help="the export file (JSONL or CSV)")
    v.add_argument("--jwks", required=True, help="JWKS URL (…/.well-known/jwks.json) or file")
    v.add_argument("--manifest", help="manifest file (needed for CSV; default EXPORT.manifest if present)")
    v.add_argument("--checkpoint", action="append",
                   help="a transparency-log checkpoint kept earlier (repeatable): the log must still extend it")
    v.set_defaults(func=cmd_verify)
    r = sub.add_parser("retention", help="apply retention settings (idempotent; safe from cron on several hosts)")
    r.add_argument("action", choices=["run"], help="apply the retention settings once")
    r.add_argument("--batch", type=int, default=1000, help="rows per transaction")
    r.add_argument("--dry-run", action="store_true", help="count what would be purged; change nothing")
    r.add_argument("--yes", action="store_true", help="do not ask for confirmation on a terminal")
    r.set_defaults(func=cmd_retention)
