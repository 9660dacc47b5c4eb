"""Unauthenticated and slow traffic against a live ``consent serve``: idle sockets, slow
headers and slow bodies are closed at their deadlines; large bodies with a bogus key are
refused before they are read (peak RSS of the server process measured); random method names
do not grow /metrics."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from starlette.testclient import TestClient

from .live import LiveServer


@pytest.fixture
def server(db_url: str, tmp_path: Path) -> Iterator[LiveServer]:
    with LiveServer(db_url, tmp_path, CONSENT_HEADER_TIMEOUT_SECONDS="1", CONSENT_BODY_TIMEOUT_SECONDS="1",
                    CONSENT_LIMIT_CONCURRENCY="40", CONSENT_LOG_LEVEL="warning") as s:
        yield s


def closed_within(s: socket.socket, seconds: float) -> bool:
    """Whether the server closes the socket (EOF or reset) within ``seconds``."""
    s.settimeout(seconds)
    try:
        while s.recv(4096):
            pass
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def test_idle_and_slow_connections_are_closed(server: LiveServer) -> None:
    port = server.port
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(60)]  # more than the limit
    slow_headers = socket.create_connection(("127.0.0.1", port))
    slow_body = socket.create_connection(("127.0.0.1", port))
    slow_body.sendall(b"POST /v1/consents HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Authorization: Bearer sk_bogus\r\nContent-Length: 1000\r\n\r\n{\"sub")
    start = time.monotonic()
    stop = threading.Event()

    def trickle() -> None:
        for b in b"GET /healthz HTTP/1.1\r\nHost: x\r\n":
            if stop.wait(0.2):
                return
            try:
                slow_headers.send(bytes([b]))
            except OSError:
                return

    threading.Thread(target=trickle, daemon=True).start()
    try:
        assert all(closed_within(s, 3) for s in idle)
        assert closed_within(slow_headers, 3) and closed_within(slow_body, 3)
        took = time.monotonic() - start
        assert took < 3, took
        # and the process serves again at once
        assert httpx.get(server.base + "/healthz", timeout=5).status_code == 200
    finally:
        stop.set()
        for s in [*idle, slow_headers, slow_body]:
            s.close()
    assert "Traceback" not in server.log()


def hwm_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_large_bodies_with_a_bogus_key_are_never_read(server: LiveServer) -> None:
    assert server.proc is not None
    before = hwm_mib(server.proc.pid)
    size = 16 * 1024 * 1024
    codes: list[int] = []

    def send() -> None:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            s.sendall(b"POST /v1/consents HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Authorization: Bearer sk_live_bogus_bogus_bogus\r\n"
                      + f"Content-Length: {size}\r\n\r\n".encode())
            chunk = b" " * (1 << 20)
            try:
                for _ in range(16):
                    s.sendall(chunk)
            except OSError:
                pass  # the server answered and closed: what we want
            try:
                head = s.recv(200)
                codes.append(int(head.split()[1]) if head else 0)
            except OSError:
                codes.append(0)

    threads = [threading.Thread(target=send) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    after = hwm_mib(server.proc.pid)
    print(f"server peak RSS before {before:.0f} MiB, after 20 x 16 MiB bogus-key bodies {after:.0f} MiB; {codes}")
    assert after - before < 60, (before, after)
    assert codes.count(401) >= 15, codes


def test_unknown_methods_share_one_metrics_label(client: TestClient) -> None:
    client.request("XFIRST", "/v1/check")  # the "other" series exist from here on
    before = len(client.get("/metrics").text)
    for i in range(50):
        client.request(f"X{i:04d}" + "M" * 3000, "/v1/check")
    text = client.get("/metrics").text
    assert 'method="other"' in text and "MMMMMMMM" not in text
    assert len(text) - before < 2_000, (before, len(text))  # the same series, only counts moved


def test_a_client_leaving_mid_body_is_no_error(server: LiveServer, client: TestClient) -> None:
    from .helpers import make_tenant

    key = make_tenant(client).secret_key  # the same database: a valid key, so the body is read
    for path in ("/v1/consents", "/v1/consents/bulk", "/v1/purposes/x"):
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
            method = "PUT" if path.startswith("/v1/purposes") else "POST"
            s.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      f"Authorization: Bearer {key}\r\nContent-Length: 200000\r\n\r\n".encode() + b"{" * 1000)
            time.sleep(0.3)
    time.sleep(0.5)
    log = server.log()
    assert "Traceback" not in log and '"level": "ERROR"' not in log, log[-3000:]
    assert httpx.get(server.base + "/healthz", timeout=5).status_code == 200
