"""Logging in one place: one JSON object per line on stderr, every line carrying the id of
the request it belongs to. ``consent serve`` passes ``uvicorn_log_config()`` to uvicorn, so
workers configure themselves the same way; tests and the CLI call ``configure()``.

Secrets never reach a log line: our access log names the route *template* (never the path
or the query string, which may carry ``?key=pk_…`` or ``?email=…``), uvicorn's own access
log is off, and the SQLAlchemy loggers (which would print bound parameters) are pinned at
WARNING whatever the level asked for.
"""

from __future__ import annotations

import contextvars
import logging
import logging.config
import time
from typing import Any

import orjson

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("consent_request_id", default=None)

# LogRecord attributes that are not "extra" fields.
_STD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "request_id",
                                                                  "color_message"}  # uvicorn's ANSI copy of msg
QUIET = ("sqlalchemy", "sqlalchemy.engine", "sqlalchemy.pool", "alembic", "uvicorn.access", "hpack", "httpx",
         "httpcore")


class RequestIdFilter(logging.Filter):
    """Stamp each record with the current request id (a contextvar set by the middleware)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = request_id_var.get()
        return True


class JSONFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "msg", "request_id", ...extra}`` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "request_id": getattr(record, "request_id", None) or request_id_var.get(),
        }
        for key, value in vars(record).items():
            if key not in _STD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


def log_config(level: str = "info") -> dict[str, Any]:
    """The dictConfig used by the service (uvicorn's loggers included)."""
    level = level.upper()
    handler = {"class": "logging.StreamHandler", "formatter": "json", "filters": ["request_id"],
               "stream": "ext://sys.stderr"}
    loggers: dict[str, Any] = {
        "consent": {"level": level, "handlers": ["default"], "propagate": False},
        "uvicorn": {"level": level, "handlers": ["default"], "propagate": False},
        "uvicorn.error": {"level": level, "handlers": ["default"], "propagate": False},
    }
    for name in QUIET:
        loggers[name] = {"level": "WARNING", "handlers": ["default"], "propagate": False}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_id": {"()": RequestIdFilter}},
        "formatters": {"json": {"()": JSONFormatter}},
        "handlers": {"default": handler},
        "loggers": loggers,
        "root": {"level": "WARNING", "handlers": ["default"]},
    }


def configure(level: str = "info") -> None:
    """Apply ``log_config(level)`` to this process."""
    logging.config.dictConfig(log_config(level))
