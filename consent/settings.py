"""Settings: one frozen object, read once from the environment (``CONSENT_*``).

Each setting is declared once, as a field of ``Settings``: its type, its default, and through
``doc()`` its one-line documentation. Its environment variable is ``CONSENT_`` and the
field name in upper case; ``from_env`` parses it by the field's type, and the README's
configuration table is generated from the same fields (``readme_table``; a test compares them).
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import os
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.datastructures import Secret

DEFAULT_DATA_DIR = "consent-data"  # ..., under the user's data directory (default_data_dir)
ENV_PREFIX = "CONSENT_"


def default_data_dir(environ: Mapping[str, str]) -> Path:
    """$XDG_DATA_HOME/consent-data (~/.local/share/consent-data): the same place whatever the
    current directory, so a command run from elsewhere (or cron) finds the same database."""
    home = Path(environ.get("HOME") or Path.home())
    base = environ.get("XDG_DATA_HOME") or str(home / ".local" / "share")
    return Path(base) / DEFAULT_DATA_DIR


def doc(text: str, *, shown: str | None = None,
        parse: Callable[[str], Any] | None = None) -> dict[str, Any]:
    """A setting's field metadata: its README line; ``shown``, the default as the README states
    it where the value is computed from the environment at start; ``parse``, to replace the
    parsing by the field's type."""
    return {"doc": text, "shown": shown, "parse": parse}


def _proxies(text: str) -> tuple[str, ...]:
    proxies = _names(text)
    for proxy in proxies:
        try:
            if proxy != "*":
                ipaddress.ip_network(proxy, strict=False)
        except ValueError:
            raise ValueError(f"lists {proxy!r}, which is not an IP address or network") from None
    return proxies


def _names(text: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in text.split(",") if n.strip())


def _keks(text: str) -> tuple[Secret, ...]:
    from consent.crypto import parse_kek

    keys = tuple(Secret(k) for k in _names(text))
    for k in keys:
        parse_kek(str(k))  # ValueError naming the setting
    return keys


@dataclass(frozen=True)
class Settings:
    """Everything the service reads from its environment."""

    database_url: str = field(default="", metadata=doc(
        "SQLite file or `postgresql+psycopg://…` (not `postgres://`)",
        shown="`sqlite:///$CONSENT_DATA_DIR/consent.db`"))
    admin_token: Secret | None = field(default=None, metadata=doc(
        "admin token for `POST /v1/tenants`; otherwise `consent admin-token` prints one"))
    issuer: str = field(default="http://127.0.0.1:8000", metadata=doc(
        "`iss` of receipts and base of links; `consent serve` follows `--port` and warns at start"
        " when the default is not an address others can reach",
        shown="`http://127.0.0.1:$CONSENT_PORT`", parse=lambda text: text.rstrip("/")))
    data_dir: Path = field(default=Path(DEFAULT_DATA_DIR), metadata=doc(
        "where the embedded SQLite file lives: the same wherever a command runs (cron too)",
        shown="`$XDG_DATA_HOME/consent-data` (`~/.local/share/consent-data`)",
        parse=lambda text: Path(text).expanduser().absolute()))
    demo: bool = field(default=True, metadata=doc("create the demo tenant on first start"))
    migrate_on_start: bool = field(default=True, metadata=doc(
        "apply migrations when a process starts"))
    migrations_dir: str = field(default="", metadata=doc(
        "where the Alembic scripts are (package files, shipped in the wheel)",
        shown="the package's `consent/store/migrations`"))
    snippet_path: str = field(default="", metadata=doc(
        "the built snippet served at `/snippet.js` (a link to `client-snippet/dist/snippet.js`; "
        "the wheel carries a copy)",
        shown="the package's `consent/web/static/snippet.js`"))
    max_body_bytes: int = field(default=16 * 1024 * 1024, metadata=doc(
        "request body limit (413 above)"))
    max_bulk: int = field(default=100_000, metadata=doc("addresses per bulk check"))
    log_level: str = field(default="info", metadata=doc("log level"))
    workers: int = field(default=1, metadata=doc(
        "uvicorn worker processes (`consent serve`); set it too where uvicorn is started some "
        "other way with `--workers`: the check's SQLite reader is sized by it"))
    host: str = field(default="127.0.0.1", metadata=doc(
        "the address uvicorn listens on (`consent serve`)"))
    port: int = field(default=8000, metadata=doc("the port uvicorn listens on (`consent serve`)"))
    rate_limit_per_minute: int = field(default=600, metadata=doc(
        "per key-and-IP limit on public routes (429 + Retry-After), shared by all processes"))
    rate_limit_ip_per_minute: int = field(default=300, metadata=doc(
        "per-IP limit on public routes (429 + Retry-After), shared by all processes"))
    rate_limit_routes: tuple[str, ...] = field(default=(), metadata=doc(
        "more route names to rate-limit, comma-separated"))
    limit_concurrency: int = field(default=1000, metadata=doc(
        "uvicorn's cap on concurrent connections per process (503 above)"))
    # integrations: email links and the webhook delivery worker
    email_confirm_days: int = field(default=7, metadata=doc(
        "lifetime of double-opt-in confirm links"))
    webhook_worker: bool = field(default=True, metadata=doc(
        "run the webhook delivery loop in each service process"))
    webhook_poll_seconds: float = field(default=1.0, metadata=doc(
        "webhook delivery loop poll interval"))
    webhook_timeout_seconds: float = field(default=5.0, metadata=doc(
        "total deadline of one webhook delivery attempt"))
    webhook_backoff_seconds: float = field(default=5.0, metadata=doc(
        "first webhook retry delay (exponential, with jitter)"))
    webhook_backoff_max_seconds: float = field(default=3600.0, metadata=doc(
        "the cap of the webhook retry delay"))
    webhook_retry_seconds: int = field(default=86400, metadata=doc(
        "give up on a webhook delivery after this long"))
    webhook_disable_after: int = field(default=30, metadata=doc(
        "disable a webhook endpoint after this many failures in a row"))
    trusted_proxies: tuple[str, ...] = field(default=("127.0.0.1",), metadata=doc(
        "comma-separated proxy addresses or networks (`10.0.0.0/8`) whose `X-Forwarded-For` / "
        "`-Proto` are believed, for per-IP rate limits and IP evidence; `*` any, empty none "
        "([docs/reliability.md](docs/reliability.md))",
        parse=_proxies))
    tlog_seconds: float = field(default=2.0, metadata=doc(
        "transparency log: how often each process appends new records to the tenants' logs and "
        "signs checkpoints; `0` runs no sequencer ([docs/transparency.md](docs/transparency.md))"))
    dashboard_secrets: tuple[Secret, ...] = field(default=(), metadata=doc(
        "secrets that sign the dashboard's session cookie, comma-separated, newest last (older "
        "ones still verify, so they rotate); unset: one derived from the first receipt signing "
        "key, shared by every process on the database",
        shown="(derived)"))
    dashboard_idle_seconds: int = field(default=1800, metadata=doc(
        "a dashboard session ends after this long without a request"))
    dashboard_overview_seconds: int = field(default=60, metadata=doc(
        "the dashboard overview's numbers are recomputed (after the page is sent) when older than"
        " this"))
    webhook_allow_private: bool = field(default=False, metadata=doc(
        "allow `http://` and internal (loopback, private, link-local…) webhook targets: "
        "development and tests only"))
    header_timeout_seconds: float = field(default=10.0, metadata=doc(
        "`consent serve`: close a connection whose request headers are not complete within this"))
    body_timeout_seconds: float = field(default=30.0, metadata=doc(
        "`consent serve`: close a connection whose request body is not complete within this"))
    db_connect_timeout_seconds: float = field(default=3.0, metadata=doc(
        "PostgreSQL: connect timeout"))
    db_statement_timeout_seconds: float = field(default=10.0, metadata=doc(
        "PostgreSQL: server-side statement timeout"))
    db_request_timeout_seconds: float = field(default=10.0, metadata=doc(
        "a request's database work, then 503 (`Retry-After: 1`)"))
    db_pool_size: int = field(default=20, metadata=doc(
        "PostgreSQL connections of the service engine per process (no overflow; +3 for the fast "
        "paths)"))
    disk_min_free_mb: int = field(default=100, metadata=doc(
        "`/readyz` is 503 below this much free disk"))
    feed_max_waits_per_tenant: int = field(default=20, metadata=doc(
        "concurrent change-feed long-polls of one tenant per process (429 `too_many_waits` "
        "beyond)"))
    export_stall_seconds: float = field(default=10.0, metadata=doc(
        "end an export whose client does not take a chunk within this (releases its snapshot)"))
    secret_keys: tuple[Secret, ...] = field(default=(), metadata=doc(
        "key-encryption keys that seal every stored secret (signing keys, hash keys, link, "
        "subject-token and webhook secrets): comma-separated base64 32-byte keys, newest first "
        "(the first seals, all open; `consent secrets rotate` re-seals under the first). Unset on"
        " SQLite: one is generated into `<database>.kek` (0600) beside the database; unset on "
        "PostgreSQL: the service and the CLI refuse to start. See docs/reliability.md",
        shown="(SQLite: generated key file; PostgreSQL: required)", parse=_keks))
    extra: dict[str, str] = field(default_factory=dict)  # not from the environment

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Read settings from ``environ`` (default: the process environment); a value that does
        not parse is a ValueError naming its variable."""
        env = dict(os.environ if environ is None else environ)
        values: dict[str, object] = {}
        for f in declared():
            name = env_name(f)
            if name in env:
                try:
                    values[f.name] = _parser(f)(env[name])
                except ValueError as exc:
                    said = str(exc)
                    raise ValueError(said if said.startswith(name) else f"{name} {said}") from None
        # Defaults that depend on the environment: the data directory, the database in it, and
        # the issuer at the port served.
        data_dir = values.setdefault("data_dir", default_data_dir(env).expanduser().absolute())
        values.setdefault("database_url", f"sqlite:///{Path(str(data_dir)) / 'consent.db'}")
        values.setdefault("issuer", f"http://127.0.0.1:{env.get(ENV_PREFIX + 'PORT', '8000')}")
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]


def env_setting(name: str) -> Any:
    """One setting as ``Settings.from_env`` reads it from the process environment, for code that
    runs without a Settings object (where the Alembic scripts and the snippet file are)."""
    return getattr(Settings.from_env(), name)


def declared() -> list[dataclasses.Field[Any]]:
    """The settings read from the environment, in declaration order."""
    return [f for f in dataclasses.fields(Settings) if "doc" in f.metadata]


def env_name(f: dataclasses.Field[Any]) -> str:
    return ENV_PREFIX + f.name.upper()


@functools.cache
def _types() -> dict[str, Any]:
    return typing.get_type_hints(Settings)


_BOOLS = {"true": True, "1": True, "false": False, "0": False}


def _bool(text: str) -> bool:
    try:
        return _BOOLS[text.strip().lower()]
    except KeyError:
        raise ValueError(f"is {text!r}, not true or false (or 1 or 0)") from None


def _number(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            return kind(text)
        except ValueError:
            raise ValueError(f"is {text!r}, not a valid {kind.__name__}") from None

    return parse


def _parser(f: dataclasses.Field[Any]) -> Callable[[str], Any]:
    """How the field's variable is read: its own ``parse``, else by its type."""
    custom = f.metadata.get("parse")
    if custom is not None:
        return custom
    kind = _types()[f.name]
    if kind is bool:
        return _bool
    if kind in (int, float):
        return _number(kind)
    if kind is str:
        return str
    if kind == Secret | None:
        return lambda text: Secret(text) if text else None
    if kind == tuple[str, ...]:
        return _names
    if kind == tuple[Secret, ...]:
        return lambda text: tuple(Secret(s) for s in _names(text))
    raise TypeError(f"setting {f.name}: no parser for {kind}")


def _shown(f: dataclasses.Field[Any]) -> str:
    """The default as the README states it: the declared text, else the value as it is written
    in the variable."""
    if f.metadata.get("shown"):
        return str(f.metadata["shown"])
    value = f.default
    if value is None or value == () or value == "":
        return "(none)"
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, float) and value.is_integer():
        text = str(int(value))
    elif isinstance(value, tuple):
        text = ",".join(str(v) for v in value)
    else:
        text = str(value)
    return f"`{text}`"


def readme_table() -> str:
    """The README's configuration table, as the declarations give it."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for f in declared():
        rows.append(f"| `{env_name(f)}` | {_shown(f)} | {f.metadata['doc']} |")
    return "\n".join(rows) + "\n"
