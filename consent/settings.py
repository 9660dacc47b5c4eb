"""Settings: one frozen object, read once from the environment (``CONSENT_*``)."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

from starlette.config import Config
from starlette.datastructures import Secret

DEFAULT_DATA_DIR = "consent-data"  # ..., under the user's data directory (default_data_dir)


def default_data_dir(environ: dict[str, str]) -> Path:
    """$XDG_DATA_HOME/consent-data (~/.local/share/consent-data): the same place whatever the
    current directory, so a command run from elsewhere (or cron) finds the same database."""
    base = environ.get("XDG_DATA_HOME") or str(Path(environ.get("HOME") or Path.home()) / ".local" / "share")
    return Path(base) / DEFAULT_DATA_DIR


@dataclass(frozen=True)
class Settings:
    """Everything the service reads from its environment."""

    database_url: str = ""
    admin_token: Secret | None = None
    issuer: str = "http://127.0.0.1:8000"
    data_dir: Path = Path(DEFAULT_DATA_DIR)  # from_env: absolute, default_data_dir()
    demo: bool = True
    migrate_on_start: bool = True
    max_body_bytes: int = 16 * 1024 * 1024
    max_bulk: int = 100_000
    log_level: str = "info"
    workers: int = 1
    host: str = "127.0.0.1"
    port: int = 8000
    rate_limit_per_minute: int = 600
    rate_limit_ip_per_minute: int = 300
    rate_limit_routes: tuple[str, ...] = ()
    limit_concurrency: int = 1000
    # integrations: email links and the webhook delivery worker
    email_confirm_days: int = 7
    webhook_worker: bool = True
    webhook_poll_seconds: float = 1.0
    webhook_timeout_seconds: float = 5.0
    webhook_backoff_seconds: float = 5.0
    webhook_backoff_max_seconds: float = 3600.0
    webhook_retry_seconds: int = 86400
    webhook_disable_after: int = 30
    # proxies whose X-Forwarded-For / -Proto are believed (IPs or networks; "*": any; (): none)
    trusted_proxies: tuple[str, ...] = ("127.0.0.1",)
    tlog_seconds: float = 2.0  # transparency log: sequencer and checkpoint interval (0: no sequencer)
    # dashboard: cookie signing secrets (newest last; empty: derived) and idle timeout
    dashboard_secrets: tuple[Secret, ...] = ()
    dashboard_idle_seconds: int = 1800
    dashboard_overview_seconds: int = 60
    # hostile callers: timeouts, pools and caps
    webhook_allow_private: bool = False  # http and internal addresses as webhook targets (dev/tests only)
    header_timeout_seconds: float = 10.0  # consent serve: request headers complete within this
    body_timeout_seconds: float = 30.0  # consent serve: a request body complete within this
    db_connect_timeout_seconds: float = 3.0
    db_statement_timeout_seconds: float = 10.0
    db_request_timeout_seconds: float = 10.0  # a request's database work, then 503
    db_pool_size: int = 20  # the service engine's connections per process (no overflow)
    disk_min_free_mb: int = 100  # /readyz is 503 below this much free disk
    feed_max_waits_per_tenant: int = 20  # concurrent change-feed long-polls per tenant and process
    export_stall_seconds: float = 10.0  # an export chunk the client does not take in this long ends it
    # key-encryption keys of the stored secrets, newest first (empty: SQLite's key file beside
    # the database; PostgreSQL refuses to start)
    secret_keys: tuple[Secret, ...] = ()
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: object) -> Settings:
        """Read settings from ``environ`` (default: the process environment)."""
        config = Config(environ=dict(os.environ if environ is None else environ))
        env = dict(os.environ if environ is None else environ)
        data_dir = Path(config("CONSENT_DATA_DIR", default=str(default_data_dir(env)))).expanduser().absolute()
        default_db = f"sqlite:///{data_dir / 'consent.db'}"
        token = config("CONSENT_ADMIN_TOKEN", cast=Secret, default=None)
        values: dict[str, object] = dict(
            database_url=config("CONSENT_DATABASE_URL", default=default_db),
            admin_token=token if token and str(token) else None,
            # default: the local address of the port served (`consent serve` sets it, and warns
            # when that is not an address others can reach)
            issuer=config("CONSENT_ISSUER", default=f"http://127.0.0.1:{config('CONSENT_PORT', default='8000')}")
            .rstrip("/"),
            data_dir=data_dir,
            demo=config("CONSENT_DEMO", cast=bool, default=True),
            migrate_on_start=config("CONSENT_MIGRATE_ON_START", cast=bool, default=True),
            max_body_bytes=config("CONSENT_MAX_BODY_BYTES", cast=int, default=16 * 1024 * 1024),
            max_bulk=config("CONSENT_MAX_BULK", cast=int, default=100_000),
            log_level=config("CONSENT_LOG_LEVEL", default="info"),
            workers=config("CONSENT_WORKERS", cast=int, default=1),
            host=config("CONSENT_HOST", default="127.0.0.1"),
            port=config("CONSENT_PORT", cast=int, default=8000),
            rate_limit_per_minute=config("CONSENT_RATE_LIMIT_PER_MINUTE", cast=int, default=600),
            rate_limit_ip_per_minute=config("CONSENT_RATE_LIMIT_IP_PER_MINUTE", cast=int, default=300),
            rate_limit_routes=tuple(n.strip() for n in config("CONSENT_RATE_LIMIT_ROUTES", default="").split(",")
                                    if n.strip()),
            limit_concurrency=config("CONSENT_LIMIT_CONCURRENCY", cast=int, default=1000),
            email_confirm_days=config("CONSENT_EMAIL_CONFIRM_DAYS", cast=int, default=7),
            webhook_worker=config("CONSENT_WEBHOOK_WORKER", cast=bool, default=True),
            webhook_poll_seconds=config("CONSENT_WEBHOOK_POLL_SECONDS", cast=float, default=1.0),
            webhook_timeout_seconds=config("CONSENT_WEBHOOK_TIMEOUT_SECONDS", cast=float, default=5.0),
            webhook_backoff_seconds=config("CONSENT_WEBHOOK_BACKOFF_SECONDS", cast=float, default=5.0),
            webhook_backoff_max_seconds=config("CONSENT_WEBHOOK_BACKOFF_MAX_SECONDS", cast=float, default=3600.0),
            webhook_retry_seconds=config("CONSENT_WEBHOOK_RETRY_SECONDS", cast=int, default=86400),
            webhook_disable_after=config("CONSENT_WEBHOOK_DISABLE_AFTER", cast=int, default=30),
            trusted_proxies=tuple(p.strip() for p in config("CONSENT_TRUSTED_PROXIES", default="127.0.0.1").split(",")
                                  if p.strip()),
            tlog_seconds=config("CONSENT_TLOG_SECONDS", cast=float, default=2.0),
            dashboard_secrets=tuple(Secret(s.strip()) for s in
                                    str(config("CONSENT_DASHBOARD_SECRETS", cast=Secret, default="")).split(",")
                                    if s.strip()),
            dashboard_idle_seconds=config("CONSENT_DASHBOARD_IDLE_SECONDS", cast=int, default=1800),
            dashboard_overview_seconds=config("CONSENT_DASHBOARD_OVERVIEW_SECONDS", cast=int, default=60),
            webhook_allow_private=config("CONSENT_WEBHOOK_ALLOW_PRIVATE", cast=bool, default=False),
            header_timeout_seconds=config("CONSENT_HEADER_TIMEOUT_SECONDS", cast=float, default=10.0),
            body_timeout_seconds=config("CONSENT_BODY_TIMEOUT_SECONDS", cast=float, default=30.0),
            db_connect_timeout_seconds=config("CONSENT_DB_CONNECT_TIMEOUT_SECONDS", cast=float, default=3.0),
            db_statement_timeout_seconds=config("CONSENT_DB_STATEMENT_TIMEOUT_SECONDS", cast=float, default=10.0),
            db_request_timeout_seconds=config("CONSENT_DB_REQUEST_TIMEOUT_SECONDS", cast=float, default=10.0),
            db_pool_size=config("CONSENT_DB_POOL_SIZE", cast=int, default=20),
            disk_min_free_mb=config("CONSENT_DISK_MIN_FREE_MB", cast=int, default=100),
            feed_max_waits_per_tenant=config("CONSENT_FEED_MAX_WAITS_PER_TENANT", cast=int, default=20),
            export_stall_seconds=config("CONSENT_EXPORT_STALL_SECONDS", cast=float, default=10.0),
            secret_keys=tuple(Secret(k.strip()) for k in
                              str(config("CONSENT_SECRET_KEYS", cast=Secret, default="")).split(",") if k.strip()),
        )
        values.update(overrides)
        from .crypto import parse_kek

        for k in values["secret_keys"]:  # type: ignore[attr-defined]
            parse_kek(str(k))  # ValueError naming the setting
        for proxy in values["trusted_proxies"]:  # type: ignore[attr-defined]
            try:
                if proxy != "*":
                    ipaddress.ip_network(proxy, strict=False)
            except ValueError:
                raise ValueError(f"CONSENT_TRUSTED_PROXIES: {proxy!r} is not an IP address or network") from None
        return cls(**values)  # type: ignore[arg-type]
