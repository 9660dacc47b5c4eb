"""The ``consent`` command line: serve, migrate, tenants, keys, admin tokens, signing keys."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from . import cli_audit, db, receipts, tenants
from .models import Tenant
from .schemas import TenantIn
from .settings import Settings


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def write_private(path: Path, text: str) -> Path:
    """Write ``text`` to a file only this user can read (0600 from creation, never wider)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)  # an older file of wider mode is narrowed too
        f.write(text)
    return path.resolve()


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from .demo import seed_demo
    from .logs import configure, log_config
    from .protocol import GuardedH11Protocol

    configure(settings.log_level)
    if args.workers > 1:
        prepare_multiprocess_metrics(settings)
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
            if sys.stdout.isatty():
                print("Demo tenant created. These keys are shown once; store them now:")
                _print(demo)
                sk = demo["secret_key"]
            else:  # stdout is a log (systemd, docker, a file): no secret goes there
                path = write_private(settings.data_dir / "demo-keys.json", json.dumps(demo, indent=2) + "\n")
                print(f"Demo tenant created. Its keys are shown once, in {path} (readable by this user "
                      "only): store them, then delete the file.")
                sk = "$SK"
            print(f"Try: curl -H 'Authorization: Bearer {sk}' "
                  f"'{base}/v1/check?email=ada@example.com&purpose=marketing_email'")
            print(f"Demo page: {base}/demo?key={demo['publishable_key']}")
        elif first:
            print("No tenants yet: create one with `consent tenants create --name NAME`.")
    engine.dispose()
    os.environ["CONSENT_WORKERS"] = str(args.workers)  # each worker reads it (fastcheck.sqlite_threaded)
    uvicorn.run(
        "consent.app:create_app", factory=True, host=args.host, port=args.port,
        workers=args.workers, log_level=settings.log_level, proxy_headers=True,
        log_config=log_config(settings.log_level),
        access_log=False,  # ours (consent.access) logs route templates, never paths or queries
        # Slow or greedy clients: bounded header size (431/400 past 64 KiB), idle keep-alive
        # connections closed after 5 s, headers and bodies within their deadlines (protocol.py),
        # at most limit_concurrency connections+tasks (503 beyond), in-flight requests get 10 s
        # to finish on SIGTERM. h11, not httptools: only h11 enforces a header-size limit.
        http=GuardedH11Protocol, timeout_graceful_shutdown=10, timeout_keep_alive=5, h11_max_incomplete_event_size=64 * 1024,
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
    if args.downgrade:
        db.downgrade(settings.database_url, args.revision or "base")
    else:
        db.migrate(settings.database_url, args.revision or "head")
    engine = db.create_db_engine(settings.database_url)
    print(f"database at revision {db.current_revision(engine)}")
    engine.dispose()
    return 0


def _session(settings: Settings) -> Any:
    return db.transaction(db.create_db_engine(settings.database_url), write=True)


def cmd_tenants(args: argparse.Namespace, settings: Settings) -> int:
    with _session(settings) as session:
        if args.action == "create":
            spec = TenantIn(name=args.name, allowed_origins=args.origin or [], notice_days=args.notice_days)
            tenant, keys = tenants.create_tenant(session, spec)
            _print({"tenant_id": tenant.id, "name": tenant.name, "secret_key": keys["secret"],
                    "publishable_key": keys["publishable"]})
        else:
            rows = session.execute(sa.select(Tenant.id, Tenant.name, Tenant.created_at)).all()
            _print([{"id": r.id, "name": r.name, "created_at": r.created_at} for r in rows])
    return 0


def cmd_keys(args: argparse.Namespace, settings: Settings) -> int:
    kinds = ["secret", "publishable"] if args.kind == "both" else [args.kind]
    with _session(settings) as session:
        keys = tenants.rotate_keys(session, args.tenant, kinds)
    _print({"tenant_id": args.tenant, **{f"{k}_key": v for k, v in keys.items()}})
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
    m.add_argument("--revision")
    m.add_argument("--downgrade", action="store_true", help="downgrade to --revision (default base)")
    m.set_defaults(func=cmd_migrate)
    t = sub.add_parser("tenants", help="create or list tenants")
    t.add_argument("action", choices=["create", "list"])
    t.add_argument("--name", default="Tenant")
    t.add_argument("--origin", action="append", help="allowed origin for the snippet (repeatable)")
    t.add_argument("--notice-days", type=int, default=30)
    t.set_defaults(func=cmd_tenants)
    k = sub.add_parser("keys", help="rotate a tenant's API keys (old ones are revoked)")
    k.add_argument("action", choices=["rotate"])
    k.add_argument("--tenant", required=True)
    k.add_argument("--kind", choices=["secret", "publishable", "both"], default="both")
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
        raise


if __name__ == "__main__":
    sys.exit(main())
