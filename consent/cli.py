"""The ``consent`` command line: serve, migrate, tenants, keys, admin tokens, signing keys."""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from pydantic import ValidationError

from . import cli_audit, db, receipts, tenants
from .models import Tenant
from .schemas import TenantIn, TenantOut, TenantPatch
from .settings import Settings


class CliError(Exception):
    """A mistake on the command line: printed as one line, exit status 2."""


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from .demo import seed_demo
    from .logs import configure, log_config

    configure(settings.log_level)
    if args.workers > 1:
        prepare_multiprocess_metrics(settings)
    if settings.migrate_on_start:  # off where one `consent migrate` runs before the replicas
        db.migrate(settings.database_url)
    engine = db.create_db_engine(settings.database_url)
    with db.transaction(engine, write=True) as session:
        receipts.ensure_signing_key(session)
        first = session.execute(sa.select(sa.func.count()).select_from(Tenant)).scalar_one() == 0
        if first and settings.demo:
            base = f"http://{args.host}:{args.port}"
            origins = sorted({base, f"http://127.0.0.1:{args.port}", f"http://localhost:{args.port}"})
            demo = seed_demo(session, origins)
            if not settings.admin_token:
                demo["admin_token"] = tenants.create_admin_token(session)
            print("Demo tenant created. These keys are shown once; store them now:")
            _print(demo)
            print(f"Try: curl -H 'Authorization: Bearer {demo['secret_key']}' "
                  f"'{base}/v1/check?email=ada@example.com&purpose=marketing_email'")
            print(f"Demo page: {base}/demo?key={demo['publishable_key']}")
        elif first:
            print("No tenants yet: create one with `consent tenants create --name NAME`.")
    engine.dispose()
    os.environ["CONSENT_WORKERS"] = str(args.workers)  # each worker reads it (fastcheck.sqlite_threaded)
    uvicorn.run(
        "consent.app:create_app", factory=True, host=args.host, port=args.port,
        workers=args.workers, log_level=settings.log_level,
        proxy_headers=False,  # the app reads forwarded headers itself (CONSENT_TRUSTED_PROXIES)
        log_config=log_config(settings.log_level),
        access_log=False,  # ours (consent.access) logs route templates, never paths or queries
        # Slow or greedy clients: bounded header size (431/400 past 64 KiB), idle keep-alive
        # connections closed after 5 s, at most limit_concurrency connections+tasks (503 beyond),
        # in-flight requests get 10 s to finish on SIGTERM. A slowloris that trickles headers is
        # bounded only by limit_concurrency: put a reverse proxy in front (docs/reliability.md).
        # h11, not httptools: only h11 enforces a header-size limit in uvicorn.
        http="h11", timeout_graceful_shutdown=10, timeout_keep_alive=5, h11_max_incomplete_event_size=64 * 1024,
        limit_concurrency=settings.limit_concurrency, backlog=2048,
    )
    return 0


def prepare_multiprocess_metrics(settings: Settings) -> None:
    """Several workers: prometheus_client multiprocess mode in an emptied directory."""
    import os
    import shutil

    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or str(settings.data_dir / "metrics")
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    from alembic.util import CommandError

    try:
        if args.downgrade:
            if not args.revision:
                raise CliError("a downgrade needs an explicit target: --revision REV (or base); "
                               "add --dry-run to see what it would drop")
            doomed = db.downgrade_plan(settings.database_url, args.revision)
            holding = {t: n for t, n in doomed.items() if n}
            if args.dry_run:
                for table, rows in doomed.items():
                    print(f"would drop table {table} ({rows} rows)", file=sys.stderr)
                print(f"dry run: nothing changed; {len(doomed)} tables would be dropped", file=sys.stderr)
                return 0
            if holding and not args.destroy_data:
                raise CliError(f"refusing to drop {len(holding)} tables holding rows "
                               f"({', '.join(sorted(holding))}); export first, then repeat with --destroy-data")
            db.downgrade(settings.database_url, args.revision)
            if doomed:
                print(f"dropped tables: {', '.join(doomed)}", file=sys.stderr)
        else:
            if args.dry_run:
                raise CliError("--dry-run goes with --downgrade (an upgrade drops nothing)")
            db.migrate(settings.database_url, args.revision or "head")
    except CommandError as exc:
        raise CliError(str(exc).splitlines()[0]) from None
    engine = db.create_db_engine(settings.database_url)
    print(f"database at revision {db.current_revision(engine)}")
    engine.dispose()
    return 0


def _session(settings: Settings) -> Any:
    return db.transaction(db.create_db_engine(settings.database_url), write=True)


def _tenant_patch(args: argparse.Namespace) -> TenantPatch:
    """The settings given on the command line, validated as the API validates them."""
    given: dict[str, Any] = {}
    for name in ("name", "notice_days", "default_lang", "store_full_ip", "store_user_agent"):
        if getattr(args, name, None) is not None:
            given[name] = getattr(args, name)
    if args.origin is not None:
        given["allowed_origins"] = args.origin
    return TenantPatch(**given)


def _validation_message(exc: ValidationError) -> str:
    """A pydantic error as one line naming the option."""
    parts = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"] if not isinstance(p, int))
        msg = str(err["msg"]).removeprefix("Value error, ")
        option = {"allowed_origins": "origin"}.get(loc, loc).replace("_", "-")
        parts.append(f"--{option}: {msg}" if loc else msg)
    return "; ".join(parts)


def cmd_tenants(args: argparse.Namespace, settings: Settings) -> int:
    with _session(settings) as session:
        if args.action == "create":
            spec = TenantIn(name=args.name or "Tenant", allowed_origins=args.origin or [],
                            notice_days=30 if args.notice_days is None else args.notice_days,
                            **{k: getattr(args, k) for k in ("default_lang", "store_full_ip", "store_user_agent")
                               if getattr(args, k) is not None})
            tenant, keys = tenants.create_tenant(session, spec)
            _print({"tenant_id": tenant.id, "name": tenant.name, "secret_key": keys["secret"],
                    "publishable_key": keys["publishable"]})
        elif args.action == "list":
            rows = session.execute(sa.select(Tenant.id, Tenant.name, Tenant.created_at)).all()
            _print([{"id": r.id, "name": r.name, "created_at": r.created_at} for r in rows])
        else:
            if not args.tenant:
                raise CliError(f"`consent tenants {args.action}` needs --tenant ID (see `consent tenants list`)")
            tenant = tenants.get_tenant(session, args.tenant)
            if args.action == "update":
                changed = tenants.update_settings(session, tenant, _tenant_patch(args), actor="cli")
                print(f"changed: {', '.join(changed) or 'nothing'}", file=sys.stderr)
            if args.action == "audit":
                rows, _ = tenants.audit_trail(session, tenant.id, limit=args.limit, cursor=None)
                _print([{"id": r.id, "actor": r.actor, "action": r.action, "changed_at": r.changed_at,
                         "before": r.before, "after": r.after} for r in rows])
            else:
                _print({**{k: getattr(tenant, k) for k in TenantOut.model_fields},
                        "keys": tenants.live_keys(session, tenant.id)})
    return 0


def cmd_keys(args: argparse.Namespace, settings: Settings) -> int:
    kinds = ["secret", "publishable"] if args.kind == "both" else [args.kind]
    grace = {}
    if args.publishable_grace_days is not None:
        grace["publishable"] = timedelta(days=args.publishable_grace_days)
    if args.secret_grace_hours is not None:
        grace["secret"] = timedelta(hours=args.secret_grace_hours)
    with _session(settings) as session:
        keys = tenants.rotate_keys(session, args.tenant, kinds, actor="cli", leaked=args.leaked, grace=grace)
        live = tenants.live_keys(session, args.tenant)
    _print({"tenant_id": args.tenant, **{f"{k}_key": v for k, v in keys.items()}, "keys": live})
    return 0


def cmd_admin_token(args: argparse.Namespace, settings: Settings) -> int:
    with _session(settings) as session:
        print(tenants.create_admin_token(session))
    return 0


def cmd_signing_key(args: argparse.Namespace, settings: Settings) -> int:
    with _session(settings) as session:
        key = receipts.rotate_signing_key(session)
    print(f"new signing key {key.kid}; restart service processes to sign with it "
          "(the old public key stays in /.well-known/jwks.json)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="consent", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="migrate, create the demo tenant on first start, run uvicorn")
    s.add_argument("--host", default=None)
    s.add_argument("--port", type=int, default=None)
    s.add_argument("--workers", type=int, default=None)
    s.set_defaults(func=cmd_serve)
    m = sub.add_parser("migrate", help="bring the database to head (or --revision)")
    m.add_argument("--revision", help="target revision (default head; a downgrade must name one, or base)")
    m.add_argument("--downgrade", action="store_true", help="go down to --revision (asks nothing: see --dry-run)")
    m.add_argument("--dry-run", action="store_true", help="with --downgrade: list the tables it would drop")
    m.add_argument("--destroy-data", action="store_true",
                   help="with --downgrade: allow dropping tables that hold rows (their data is lost)")
    m.set_defaults(func=cmd_migrate)
    t = sub.add_parser("tenants", help="create, list, show, update a tenant, or read its audit trail")
    t.add_argument("action", choices=["create", "list", "show", "update", "audit"],
                   help="update changes only the settings given; every change is audited")
    t.add_argument("--tenant", help="tenant id (show, update, audit)")
    t.add_argument("--name", help="display name (create: default 'Tenant')")
    t.add_argument("--origin", action="append", metavar="ORIGIN",
                   help="allowed origin for the snippet, scheme://host[:port] (repeatable; "
                        "update replaces the whole list)")
    t.add_argument("--notice-days", type=int, help="days between announcing and applying a material "
                   "policy change (create: default 30)")
    t.add_argument("--default-lang", help="language of the snippet when the page names none, e.g. en or de-AT")
    t.add_argument("--store-full-ip", action=argparse.BooleanOptionalAction, default=None,
                   help="keep visitors' full IP address as evidence (default: truncated)")
    t.add_argument("--store-user-agent", action=argparse.BooleanOptionalAction, default=None,
                   help="keep visitors' user agent as evidence (default: yes)")
    t.add_argument("--limit", type=int, default=50, help="audit: how many entries, newest first")
    t.set_defaults(func=cmd_tenants)
    k = sub.add_parser("keys", help="rotate a tenant's API keys (old ones keep working for a grace period)")
    k.add_argument("action", choices=["rotate"], help="issue new keys")
    k.add_argument("--tenant", required=True, help="tenant id")
    k.add_argument("--kind", choices=["secret", "publishable", "both"], default="both", help="which keys")
    k.add_argument("--leaked", action="store_true", help="the old keys stop working at once")
    k.add_argument("--publishable-grace-days", type=int, metavar="DAYS",
                   help="how long the old publishable key keeps working (default 7; 0: at once)")
    k.add_argument("--secret-grace-hours", type=int, metavar="HOURS",
                   help="how long the old secret key keeps working (default 24; 0: at once)")
    k.set_defaults(func=cmd_keys)
    a = sub.add_parser("admin-token", help="create and print an admin token")
    a.set_defaults(func=cmd_admin_token)
    sk = sub.add_parser("signing-key", help="rotate the receipt signing key")
    sk.add_argument("action", choices=["rotate"])
    sk.set_defaults(func=cmd_signing_key)
    cli_audit.add_commands(sub)  # export, verify, retention (issue 5)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = Settings.from_env()
    if args.command == "serve":
        args.host = args.host or settings.host
        args.port = args.port or settings.port
        args.workers = args.workers or settings.workers
    try:
        return int(args.func(args, settings))
    except Exception as exc:  # a CLI prints one line, not a traceback, for known failures
        from .errors import ConsentError

        if isinstance(exc, ConsentError):
            print(f"error: {exc.detail}", file=sys.stderr)
            return 2
        if isinstance(exc, CliError):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if isinstance(exc, ValidationError):
            print(f"error: {_validation_message(exc)}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
