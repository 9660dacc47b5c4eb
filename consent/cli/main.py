"""The ``consent`` command line: serve, migrate, tenants, keys, admin tokens, signing keys."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from pydantic import ValidationError
from sqlmodel import col

from consent import crypto
from consent.cli import audit, tlog
from consent.ledger import receipts, tenants
from consent.ledger.schemas import TenantIn, TenantOut, TenantPatch
from consent.settings import Settings
from consent.store import db
from consent.store.models import Tenant


class CliError(Exception):
    """A mistake on the command line: printed as one line, exit status 2."""


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

    from consent.cli.demo import seed_demo
    from consent.logs import configure

    configure(settings.log_level)
    announce_issuer(args.host, args.port)
    if settings.is_sqlite:
        print(f"database: {settings.database_url}", file=sys.stderr)
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
    os.environ["CONSENT_WORKERS"] = str(args.workers)  # each worker sizes its SQLite check reader by it
    uvicorn.run("consent.web.app:create_app", **uvicorn_options(settings, args.host, args.port, args.workers))
    return 0


def uvicorn_options(settings: Settings, host: str, port: int, workers: int) -> dict[str, Any]:
    """The uvicorn settings of ``consent serve``."""
    from consent.logs import log_config
    from consent.web.protocol import GuardedHttpToolsProtocol

    return {
        "factory": True, "host": host, "port": port, "workers": workers, "log_level": settings.log_level,
        "proxy_headers": False,  # the app reads forwarded headers itself (CONSENT_TRUSTED_PROXIES)
        "log_config": log_config(settings.log_level),
        "access_log": False,  # ours (consent.access) logs route templates, never paths or queries
        # Slow or greedy clients: bounded header size (431 past 64 KiB), idle keep-alive
        # connections closed after 5 s, headers and bodies within their deadlines (protocol.py),
        # at most limit_concurrency connections+tasks (503 beyond), in-flight requests get 10 s
        # to finish on SIGTERM.
        "http": GuardedHttpToolsProtocol, "timeout_graceful_shutdown": 10, "timeout_keep_alive": 5,
        "limit_concurrency": settings.limit_concurrency, "backlog": 2048,
        # A new worker answers the supervisor's first health check only once it has imported
        # the service: on a busy machine that took longer than uvicorn's 5 s, and workers were
        # killed and respawned in a loop.
        "timeout_worker_healthcheck": 30,
    }


WILDCARD_HOSTS = ("0.0.0.0", "::", "")


def announce_issuer(host: str, port: int) -> None:
    """Receipts name their issuer: unless CONSENT_ISSUER says otherwise, the address served (set
    in the environment, which every worker reads), with a warning when others cannot reach it."""
    if os.environ.get("CONSENT_ISSUER"):
        return
    shown = "127.0.0.1" if host in WILDCARD_HOSTS else host
    issuer = f"http://{shown}:{port}"
    os.environ["CONSENT_ISSUER"] = issuer
    if host in WILDCARD_HOSTS or shown not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: CONSENT_ISSUER is not set, so receipts name {issuer} as their issuer and "
              "links point there; set CONSENT_ISSUER to the service's public URL", file=sys.stderr)


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


def masked(url: str) -> str:
    """A database URL fit to print (no password)."""
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:  # not even a URL: say so without echoing it
        return "(unparseable URL)"


def check_database(settings: Settings, *, creating: bool = False, serving: bool = False) -> None:
    """Refuse, in one line, what would fail with a traceback or quietly make a new empty
    database: a URL without a usable driver, a SQLite file that is not there (``creating``:
    its directory; ``serving``: made as needed), a server that cannot be reached, a database
    never migrated."""
    creating = creating or serving
    url = settings.database_url
    scheme = url.split("://", 1)[0].lower()
    if scheme in ("postgres", "postgresql", "postgresql+psycopg2"):
        raise CliError(f"CONSENT_DATABASE_URL starts with {scheme}://; write postgresql+psycopg://user:password@host/db")
    try:
        parsed = sa.engine.make_url(url)
    except sa.exc.ArgumentError:
        raise CliError("CONSENT_DATABASE_URL is not a database URL (sqlite:///path or "
                       "postgresql+psycopg://user:password@host/db)") from None
    if parsed.get_backend_name() == "sqlite":
        path = Path(parsed.database or "")
        if parsed.database in (None, "", ":memory:"):
            raise CliError("an in-memory SQLite database holds nothing between commands; set CONSENT_DATABASE_URL")
        if serving:
            return
        if creating and not path.parent.is_dir():
            raise CliError(f"data directory {path.parent} does not exist (CONSENT_DATA_DIR or CONSENT_DATABASE_URL)")
        if not creating and not path.is_file():
            raise CliError(f"no database at {path.absolute()} (looked there from CONSENT_DATABASE_URL / "
                           "CONSENT_DATA_DIR); `consent serve` or `consent migrate` creates it")
    elif parsed.get_backend_name() != "postgresql":
        raise CliError(f"unsupported database {parsed.get_backend_name()!r}: use SQLite or PostgreSQL")
    engine = db.create_db_engine(url, connect_args={"connect_timeout": 5}) if not url.startswith("sqlite") \
        else db.create_db_engine(url)
    try:
        with engine.connect():
            pass
        if not creating and db.current_revision(engine) is None:
            raise CliError(f"the database at {masked(url)} has no consent tables; run `consent migrate` first")
    except sa.exc.SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0][:300]
        raise CliError(f"cannot connect to the database at {masked(url)}: {reason}") from None
    finally:
        engine.dispose()


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
            rows = session.execute(sa.select(col(Tenant.id), col(Tenant.name), col(Tenant.created_at))).all()
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
    kinds = tenants.rotation_kinds(args.kind)
    grace = tenants.grace_periods(args.publishable_grace_days, args.secret_grace_hours)
    with _session(settings) as session:
        keys = tenants.rotate_keys(session, args.tenant, kinds, actor="cli", leaked=args.leaked, grace=grace)
        live = tenants.live_keys(session, args.tenant)
    _print({"tenant_id": args.tenant, **{f"{k}_key": v for k, v in keys.items()}, "keys": live})
    return 0


def cmd_admin_token(args: argparse.Namespace, settings: Settings) -> int:
    with _session(settings) as session:
        print(tenants.create_admin_token(session))
    return 0


def cmd_secrets(args: argparse.Namespace, settings: Settings) -> int:
    """Seal every stored secret under the newest key of CONSENT_SECRET_KEYS (one transaction)."""
    engine = db.create_db_engine(settings.database_url, secret_keys=settings.secret_keys or None)
    try:
        with engine.begin() as conn:
            changed = db.reseal(conn)
    finally:
        engine.dispose()
    print(f"{changed} secrets sealed under the newest key; older keys may now leave CONSENT_SECRET_KEYS")
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
    s.add_argument("--host", default=None, help="address to listen on (default CONSENT_HOST, 127.0.0.1)")
    s.add_argument("--port", type=int, default=None, help="port to listen on (default CONSENT_PORT, 8000)")
    s.add_argument("--workers", type=int, default=None, help="worker processes (default CONSENT_WORKERS, 1)")
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
    sk.add_argument("action", choices=["rotate"], help="retire the active key and make a new one")
    sk.set_defaults(func=cmd_signing_key)
    se = sub.add_parser("secrets", help="re-seal every stored secret under the newest key-encryption key")
    se.add_argument("action", choices=["rotate"], help="after putting a new key first in CONSENT_SECRET_KEYS")
    se.set_defaults(func=cmd_secrets)
    audit.add_commands(sub)  # export, verify, retention
    c = sub.add_parser("completion", help="print a shell completion script: "
                       "eval \"$(consent completion bash)\" (bash or zsh)")
    c.add_argument("shell", choices=["bash", "zsh"], help="the shell to complete in")
    c.set_defaults(func=cmd_completion)
    tlog.add_commands(sub)  # tlog build, checkpoint fetch
    return p


def cmd_completion(args: argparse.Namespace, settings: Settings) -> int:
    print(completion_script(build_parser()))
    return 0


def completion_script(parser: argparse.ArgumentParser) -> str:
    """A bash completion function (zsh runs it through bashcompinit) built from the parser:
    commands, their options and the choices of their arguments."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    cases = []
    for name, cmd in sub.choices.items():
        words = []
        for action in cmd._actions:
            words += [o for o in action.option_strings if o.startswith("--")]
            if not action.option_strings and action.choices:
                words += list(action.choices)
        cases.append(f'    {name}) words="{" ".join(words)}" ;;')
    return "\n".join([
        "# consent shell completion: eval \"$(consent completion bash)\"",
        "[ -n \"$ZSH_VERSION\" ] && autoload -U +X bashcompinit && bashcompinit",
        "_consent() {",
        '  local cur="${COMP_WORDS[COMP_CWORD]}" words',
        "  if [ \"$COMP_CWORD\" -eq 1 ]; then",
        f'    COMPREPLY=($(compgen -W "{" ".join(sub.choices)} --help" -- "$cur")); return',
        "  fi",
        '  case "${COMP_WORDS[1]}" in',
        *cases,
        "    *) words= ;;",
        "  esac",
        '  COMPREPLY=($(compgen -W "$words --help" -- "$cur"))',
        "}",
        "complete -o default -F _consent consent",
    ])


# What each command needs of the database: made if missing (serve: a reachable server or any
# SQLite path), made in an existing directory (migrate), already there and migrated (the rest);
# None: no database.
DATABASE_NEEDS = {"serve": "serve", "verify": None, "completion": None, "migrate": "create"}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.command == "serve":
        args.host = args.host or settings.host
        args.port = args.port or settings.port
        args.workers = args.workers or settings.workers
    try:
        needs = DATABASE_NEEDS.get(args.command, "existing")
        if needs is not None and not settings.is_sqlite and not settings.secret_keys:
            raise CliError(db.NO_KEK)
        if needs is not None:
            check_database(settings, creating=needs == "create", serving=needs == "serve")
        return int(args.func(args, settings))
    except Exception as exc:  # a CLI prints one line, not a traceback, for known failures
        from consent.errors import ConsentError

        if isinstance(exc, ConsentError):
            print(f"error: {exc.detail}", file=sys.stderr)
            return 2
        if isinstance(exc, (CliError, crypto.SecretKeyError)):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if isinstance(exc, ValidationError):
            print(f"error: {_validation_message(exc)}", file=sys.stderr)
            return 2
        if isinstance(exc, sa.exc.SQLAlchemyError):
            reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0][:300]
            print(f"error: database: {reason}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
