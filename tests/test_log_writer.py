"""The log writer of ``consent serve``: access lines are queued and written in batches off the
caller's thread, in order, with the request id of the caller's context; any other line is
written, after everything queued before it, before the logging call returns; close writes the
rest; a full queue makes the caller wait rather than grow without bound."""

from __future__ import annotations

import io
import json
import logging
import threading
import time
from collections.abc import Iterator

import pytest

from consent.logs import BatchWriter, JSONFormatter, RequestIdFilter, info_fields, request_id_var


class SlowStream(io.StringIO):
    """A stream whose writes wait until ``release`` is set (a log collector that stalls)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def write(self, s: str) -> int:
        self.release.wait(10)
        return super().write(s)


@pytest.fixture
def loggers() -> Iterator[tuple[logging.Logger, logging.Logger]]:
    batched, other = logging.getLogger("test.writer.access"), logging.getLogger("test.writer.other")
    for log in (batched, other):
        log.setLevel(logging.INFO)
        log.propagate = False
    yield batched, other
    for log in (batched, other):
        for h in list(log.handlers):
            log.removeHandler(h)
            h.close()


def attach(handler: BatchWriter, *logs: logging.Logger) -> BatchWriter:
    handler.setFormatter(JSONFormatter())
    handler.addFilter(RequestIdFilter())
    for log in logs:
        log.addHandler(handler)
    return handler


def test_batched_lines_wait_other_lines_are_written_at_once(loggers: tuple[logging.Logger, logging.Logger]) -> None:
    batched, other = loggers
    stream = io.StringIO()
    handler = attach(BatchWriter(stream, batched=(batched.name,), interval=5), batched, other)
    token = request_id_var.set("req-1")
    try:
        for i in range(100):
            batched.info("request", extra={"n": i, "route": "/v1/check"})
    finally:
        request_id_var.reset(token)
    time.sleep(0.2)
    assert stream.getvalue() == ""  # queued: the thread waits for more
    other.warning("shutting down %s", "now")
    lines = [json.loads(x) for x in stream.getvalue().splitlines()]
    assert [x["n"] for x in lines[:100]] == list(range(100))
    assert all(x["request_id"] == "req-1" and x["route"] == "/v1/check" and x["logger"] == batched.name
               for x in lines[:100])
    assert lines[100]["msg"] == "shutting down now" and lines[100]["level"] == "warning" and len(lines) == 101
    for i in range(10):
        batched.info("request", extra={"n": 100 + i})
    handler.close()
    lines = [json.loads(x) for x in stream.getvalue().splitlines()]
    assert [x["n"] for x in lines if "n" in x] == list(range(110))


def test_a_stalled_stream_makes_the_caller_wait(loggers: tuple[logging.Logger, logging.Logger]) -> None:
    batched, _ = loggers
    stream = SlowStream()
    attach(BatchWriter(stream, batched=(batched.name,), interval=0.01, max_queued=5), batched)
    batched.info("first")  # the thread takes it and waits in write
    time.sleep(0.2)
    for i in range(5):
        batched.info("queued %d", i)
    done = threading.Event()

    def one_more() -> None:
        batched.info("one too many")
        done.set()

    caller = threading.Thread(target=one_more)
    caller.start()
    assert not done.wait(0.5)  # the queue is full: the caller waits
    stream.release.set()
    assert done.wait(5)
    caller.join(5)


def test_info_fields_writes_what_a_record_would(loggers: tuple[logging.Logger, logging.Logger]) -> None:
    """An access line queued as its fields (no LogRecord) reads exactly as the same line logged
    as a record; through any other handler it is logged as a record."""
    batched, other = loggers
    stream = io.StringIO()
    handler = attach(BatchWriter(stream, batched=(batched.name,), interval=5), batched)
    fields = {"request_id": "req-9", "method": "GET", "route": "/v1/check", "status": 200, "duration_ms": 0.5}
    info_fields(batched, "request", fields)
    batched.handle(batched.makeRecord(batched.name, logging.INFO, "", 0, "request", (), None, extra=fields))
    handler.flush()
    fast, slow = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert fast.pop("ts")[:19] == slow.pop("ts")[:19] and fast == slow, (fast, slow)
    assert fast == {"level": "info", "logger": batched.name, "msg": "request", **fields}

    plain = io.StringIO()
    sh = logging.StreamHandler(plain)
    sh.setFormatter(JSONFormatter())
    other.addHandler(sh)
    info_fields(other, "request", fields)
    line = json.loads(plain.getvalue())
    assert line["route"] == "/v1/check" and line["request_id"] == "req-9" and line["logger"] == other.name

    other.setLevel(logging.WARNING)  # a logger not enabled for INFO writes nothing
    info_fields(other, "request", fields)
    assert len(plain.getvalue().splitlines()) == 1
