"""Logging in one place: one JSON object per line on stderr, every line carrying the id of
the request it belongs to. ``consent serve`` passes ``log_config()`` to uvicorn, so workers
configure themselves the same way; the CLI calls ``configure()``.

The event loop only queues each line (an access line as its fields, ``info_fields``: no
LogRecord); one thread per process formats what is queued and writes it in one call per batch
(``BatchWriter``), so an access line per request costs the loop about a microsecond and no
system call.

Secrets never reach a log line: our access log names the route *template* (never the path
or the query string, which may carry ``?key=pk_…`` or ``?email=…``), uvicorn's own access
log is off, and the SQLAlchemy loggers (which would print bound parameters) are pinned at
WARNING whatever the level asked for.
"""

from __future__ import annotations

import contextvars
import logging
import logging.config
import os
import queue
import sys
import threading
import time
from typing import IO, Any

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


_second: tuple[int, str] = (-1, "")  # the last second formatted: most lines share it


def json_line(created: float, level: str, logger: str, msg: str, fields: dict[str, Any],
              request_id: str | None = None) -> str:
    """One line: ``{"ts", "level", "logger", "msg", "request_id", ...fields}``."""
    global _second
    second, stamp = _second
    if int(created) != second:
        second = int(created)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _second = second, stamp
    out: dict[str, Any] = {"ts": f"{stamp}.{int((created - second) * 1000):03d}Z", "level": level,
                           "logger": logger, "msg": msg, "request_id": request_id}
    out.update(fields)
    return orjson.dumps(out, default=str).decode()


class JSONFormatter(logging.Formatter):
    """``json_line`` of a record: its extra attributes are the fields."""

    def format(self, record: logging.LogRecord) -> str:
        fields = {k: v for k, v in vars(record).items() if k not in _STD and not k.startswith("_")}
        if record.exc_info:
            fields["exc"] = self.formatException(record.exc_info)
        return json_line(record.created, record.levelname.lower(), record.name, record.getMessage(), fields,
                         getattr(record, "request_id", None) or request_id_var.get())


def info_fields(logger: logging.Logger, msg: str, fields: dict[str, Any]) -> None:
    """An INFO line of ``msg`` and ``fields`` (``request_id`` among them). Where every handler
    the line reaches is a ``BatchWriter`` with no filter but ``RequestIdFilter`` (what
    ``log_config`` sets up), the line is queued as it is: no LogRecord is built, which is most
    of what a line costs. Otherwise it is logged as any record."""
    if not logger.isEnabledFor(logging.INFO):
        return
    handlers = _handlers(logger)
    if handlers and all(type(h) is BatchWriter and h.level <= logging.INFO
                        and all(type(f) is RequestIdFilter for f in h.filters) for h in handlers):
        created = time.time()
        for h in handlers:
            assert isinstance(h, BatchWriter)
            h.queue_line(created, logger.name, msg, fields)
    else:
        logger.handle(logger.makeRecord(logger.name, logging.INFO, "", 0, msg, (), None, extra=fields))


def _handlers(logger: logging.Logger) -> list[logging.Handler]:
    """The handlers a record of ``logger`` reaches (as ``Logger.callHandlers`` walks them)."""
    found: list[logging.Handler] = []
    at: logging.Logger | None = logger
    while at is not None:
        found.extend(at.handlers)
        at = at.parent if at.propagate else None
    return found


class BatchWriter(logging.Handler):
    """Formats and writes records on a thread of its own; the loggers named in ``batched`` (the
    access log: one line per request) a batch at a time.

    ``emit`` runs on the caller's thread after the filters (so the request id is stamped there)
    and only queues the record. For a batched record it returns at once: every ``interval`` the
    thread formats what is queued and writes it with one ``write`` and one ``flush``, so the
    event loop makes no system call for it. Any other record (startup and shutdown lines,
    warnings, errors: few) is written, after everything queued before it, before ``emit``
    returns, so a process that ends by a re-raised signal, as uvicorn's does, loses none of
    them. At most ``max_queued`` records wait; past that ``emit`` waits for the thread, as a
    blocking write would. ``close`` (run by ``logging.shutdown`` at exit and by a new
    dictConfig) writes what is left. A killed process loses at most its last ``interval`` of
    batched lines.
    """

    def __init__(self, stream: IO[str] | None = None, batched: tuple[str, ...] = ("consent.access",),
                 interval: float = 0.05, max_queued: int = 100_000):
        super().__init__()
        if interval <= 0:
            raise ValueError("interval must be positive (the thread wakes once per interval)")
        self.stream = stream if stream is not None else sys.stderr
        self.batched, self.interval, self.max_queued = frozenset(batched), interval, max_queued
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()  # records, lines, events; None: stop
        self._hurry = threading.Event()  # write now, without waiting for more
        self._thread: threading.Thread | None = None
        self._pid = 0  # the process the thread runs in (a forked child starts its own)

    def handle(self, record: logging.LogRecord) -> bool:
        # No handler lock: the queue is thread-safe, and the thread is the only writer.
        if not self.filter(record):
            return False
        self.emit(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:
        if self._pid != os.getpid():
            self._start()
        if record.args:  # merge now: an argument may change before the thread formats it
            record.msg, record.args = record.getMessage(), None
        self._put(record)
        if record.name not in self.batched:
            self.flush()

    def queue_line(self, created: float, logger: str, msg: str, fields: dict[str, Any]) -> None:
        """A batched line of ``info_fields`` (written as ``json_line`` formats it)."""
        if self._pid != os.getpid():
            self._start()
        self._put((created, logger, msg, fields))
        if logger not in self.batched:
            self.flush()

    def _put(self, item: Any) -> None:
        while self._queue.qsize() >= self.max_queued and self._alive():
            time.sleep(0.001)
        self._queue.put(item)

    def flush(self) -> None:
        """Return once every record queued so far is written."""
        if self._alive() and threading.current_thread() is not self._thread:
            done = threading.Event()
            self._queue.put(done)
            self._hurry.set()
            done.wait(5)

    def close(self) -> None:
        if self._alive():
            assert self._thread is not None
            self._queue.put(None)
            self._hurry.set()
            self._thread.join(5)
        self._thread = None
        super().close()

    def _alive(self) -> bool:
        return self._thread is not None and self._pid == os.getpid() and self._thread.is_alive()

    def _start(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            if self._pid == os.getpid():
                return
            self._queue = queue.SimpleQueue()  # a forked child's copy may hold the parent's records
            self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)
            self._thread.start()
            self._pid = os.getpid()

    def _run(self) -> None:
        q = self._queue
        while True:
            # Wake every interval (or when hurried) rather than block on the queue: a put then
            # never wakes this thread, so it never takes the CPU from the event loop per line.
            self._hurry.wait(self.interval)
            self._hurry.clear()
            batch: list[Any] = []
            while True:
                try:
                    batch.append(q.get_nowait())
                except queue.Empty:
                    break
            if not batch:
                continue
            lines = []
            for item in batch:
                try:
                    if isinstance(item, tuple):
                        created, logger, msg, fields = item
                        lines.append(json_line(created, "info", logger, msg, fields, fields.get("request_id")))
                    elif isinstance(item, logging.LogRecord):
                        lines.append(self.format(item))
                except Exception:  # noqa: BLE001 (as logging.Handler.emit: report it, keep writing)
                    self.handleError(item if isinstance(item, logging.LogRecord) else logging.makeLogRecord({}))
            if lines:
                try:
                    self.stream.write("\n".join(lines) + "\n")
                    self.stream.flush()
                except Exception:  # noqa: BLE001 (as logging.Handler.emit: report it, keep writing)
                    self.handleError(logging.makeLogRecord({"msg": "log write failed"}))
            for item in batch:
                if isinstance(item, threading.Event):
                    item.set()
            if None in batch:
                return


def log_config(level: str = "info") -> dict[str, Any]:
    """The dictConfig used by the service (uvicorn's loggers included)."""
    level = level.upper()
    handler = {"()": BatchWriter, "formatter": "json", "filters": ["request_id"], "stream": "ext://sys.stderr"}
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
