"""``consent serve`` as shipped, over raw sockets: a request's header block is bounded (431 and
the connection closed past 64 KiB, however it arrives), while header blocks under the limit and
bodies of any size pass; the access log has one JSON line per request, with its fields, also for
the requests answered just before a graceful stop."""

from __future__ import annotations

import json
import re
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from consent.web.protocol import MAX_HEAD_BYTES

from .live import LiveServer

ACCESS_FIELDS = {"ts", "level", "logger", "msg", "request_id", "method", "route", "status", "duration_ms"}


@pytest.fixture(scope="module")
def served(db_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with LiveServer(db_url, tmp_path_factory.mktemp("serve")) as s:
        yield s


def answer(port: int, *pieces: bytes, pause: float = 0.0) -> bytes:
    """Send ``pieces`` on one connection, then read until the server closes it (or 5 s pass)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        try:
            for piece in pieces:
                s.sendall(piece)
                time.sleep(pause)
        except OSError:
            pass  # refused and closed while we were still sending
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except (TimeoutError, ConnectionResetError):
            pass
        return out


def statuses(raw: bytes) -> list[int]:
    return [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", raw)]


def test_an_oversized_header_block_is_refused(served: LiveServer) -> None:
    port = served.port
    # one header that never ends, in one write
    raw = answer(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (MAX_HEAD_BYTES + 10_000))
    assert statuses(raw) == [431], raw[:200]
    # many small headers, finished, sent a kilobyte at a time
    block = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"".join(
        b"X-H%d: %s\r\n" % (i, b"v" * 1000) for i in range(MAX_HEAD_BYTES // 1000 + 5)) + b"\r\n"
    raw = answer(port, *(block[i:i + 1024] for i in range(0, len(block), 1024)))
    assert statuses(raw) == [431], raw[:200]
    # a long request line
    raw = answer(port, b"GET /healthz?q=" + b"a" * MAX_HEAD_BYTES + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert statuses(raw) == [431], raw[:200]
    # a good request, then (pipelined, after its answer) an oversized one on the same connection
    raw = answer(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
                 b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (MAX_HEAD_BYTES + 10), pause=0.3)
    assert statuses(raw) == [200, 431], raw[:400]
    assert httpx.get(served.base + "/healthz", timeout=5).status_code == 200
    assert "Traceback" not in served.log()


def test_header_blocks_under_the_limit_and_large_bodies_pass(served: LiveServer) -> None:
    port = served.port
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
    closing = head + b"\r\n"
    filler = b"X-Fill: " + b"f" * (MAX_HEAD_BYTES - len(head) - 200) + b"\r\n\r\n"
    assert statuses(answer(port, head + filler)) == [200]
    assert statuses(answer(port, *(bytes([b]) for b in b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"), closing)) \
        == [200, 200]  # a header block trickled a byte at a time, then a second request
    # a body far larger than the header limit, in the same writes as its headers
    body = json.dumps({"purpose": "analytics", "emails": [f"u{i}@example.com" for i in range(20_000)]}).encode()
    assert len(body) > 4 * MAX_HEAD_BYTES
    request = (b"POST /v1/check HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n"
               b"Authorization: Bearer sk_live_not_a_key\r\nContent-Length: %d\r\n\r\n" % len(body)) + body
    assert statuses(answer(port, request)) == [401]
    # two requests in one write, the second with a body: both answered
    two = (b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
           b"POST /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 100000\r\n\r\n" + b"x" * 100_000)
    assert statuses(answer(port, two)) == [200, 405]


def access_lines(log: str) -> list[dict[str, object]]:
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    return [x for x in lines if x["logger"] == "consent.access"]


def test_one_access_line_per_request_up_to_a_graceful_stop(db_url: str, tmp_path: Path) -> None:
    server = LiveServer(db_url, tmp_path).start()
    try:
        ids = [f"line-{i:03d}" for i in range(60)]
        with httpx.Client(base_url=server.base, timeout=10) as c:
            for rid in ids[:30]:
                assert c.get("/healthz", headers={"X-Request-Id": rid}).status_code == 200
            for rid in ids[30:]:  # another route, other statuses
                assert c.get("/v1/check", params={"purpose": "x", "email": "a@example.com"},
                             headers={"X-Request-Id": rid}).status_code == 401
        server.signal(signal.SIGTERM)  # at once: the last lines may still wait to be written
        assert server.proc is not None and server.proc.wait(20) in (0, -signal.SIGTERM)
    finally:
        server.stop()
    log = server.log()
    lines = [x for x in access_lines(log) if str(x["request_id"]).startswith("line-")]
    assert sorted(str(x["request_id"]) for x in lines) == ids, log[-3000:]
    assert all(set(x) == ACCESS_FIELDS for x in lines), lines[0]
    assert {(x["route"], x["status"], x["method"], x["msg"], x["level"]) for x in lines} == {
        ("/healthz", 200, "GET", "request", "info"), ("/v1/check", 401, "GET", "request", "info")}
    assert "Finished server process" in log  # uvicorn's last line, written after the access lines
