"""Operations: graceful shutdown, readiness that follows the database, JSON logs with a
request id, and Prometheus metrics summed over worker processes."""

from __future__ import annotations

import json
import re
import signal
import socket
import threading
import time

import httpx
import pytest
from starlette.testclient import TestClient

from consent.web.app import create_app

from .conftest import PG_URL, free_port, settings_for
from .helpers import make_tenant
from .live import LiveServer


def http_request_head(path: str, body_len: int, key: str) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {body_len}\r\nX-Request-Id: slow-req-1\r\n\r\n").encode()


@pytest.mark.slow
def test_graceful_shutdown_finishes_in_flight_and_logs_json(db_url, tmp_path) -> None:
    server = LiveServer(db_url, tmp_path).start()
    try:
        tenant = make_tenant(httpx.Client(base_url=server.base, timeout=10))  # type: ignore[arg-type]
        r = httpx.get(server.base + "/healthz", headers={"X-Request-Id": "probe-42"})
        assert r.headers["x-request-id"] == "probe-42"
        body = json.dumps({"purpose": "marketing_email", "emails": [f"u{i}@example.com" for i in range(200)]}).encode()
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        sock.sendall(http_request_head("/v1/check", len(body), tenant.secret_key) + body[:100])
        time.sleep(0.3)  # the request is in flight: headers read, body still arriving
        server.signal(signal.SIGTERM)
        time.sleep(0.7)
        with pytest.raises(httpx.ConnectError):  # no new connections once shutting down
            httpx.get(server.base + "/healthz", timeout=2)
        assert server.proc is not None and server.proc.poll() is None  # still finishing our request
        sock.sendall(body[100:])
        response = b""
        while b"\r\n\r\n" not in response or not response.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            response += chunk
        sock.close()
        assert response.startswith(b"HTTP/1.1 200"), response[:300]
        assert b'"allowed_count":0' in response
        assert server.proc.wait(15) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after a clean stop
    finally:
        server.stop()
    lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    assert lines, server.log()[-2000:]
    access = [x for x in lines if x["logger"] == "consent.access"]
    probe = next(x for x in access if x["request_id"] == "probe-42")
    assert probe["route"] == "/healthz" and probe["status"] == 200 and probe["duration_ms"] >= 0
    slow = next(x for x in access if x["request_id"] == "slow-req-1")
    assert slow["route"] == "/v1/check" and slow["status"] == 200
    assert all({"ts", "level", "logger", "msg", "request_id"} <= set(x) for x in lines)


class TCPProxy:
    """A loopback TCP proxy we can cut (refuse and drop every connection) and restore."""

    def __init__(self, target: tuple[str, int]):
        self.target, self.port = target, free_port()
        self.conns: list[socket.socket] = []
        self.listener: socket.socket | None = None
        self.lock = threading.Lock()

    def open(self) -> None:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(50)
        self.listener = s
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            with self.lock:
                self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        assert self.listener is not None
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(); close alone does not
        except OSError:
            pass
        self.listener.close()
        with self.lock:
            for s in self.conns:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
            self.conns.clear()


def test_readiness_follows_the_database(backend) -> None:
    if backend != "postgresql":
        pytest.skip("SQLite is a file: it cannot become unreachable")
    m = re.match(r"(.*@)([\d.]+|localhost):(\d+)(/.*)", PG_URL)
    assert m, PG_URL
    proxy = TCPProxy((m.group(2), int(m.group(3))))
    proxy.open()
    try:
        url = f"{m.group(1)}127.0.0.1:{proxy.port}{m.group(4)}"
        with TestClient(create_app(settings_for(url))) as c:
            assert c.get("/readyz").status_code == 200
            proxy.cut()
            r = c.get("/readyz")
            assert r.status_code == 503 and r.json()["checks"]["database"] == "unreachable", r.text
            assert c.get("/healthz").status_code == 200  # alive, just not ready
            r = c.get("/v1/tenant", headers={"Authorization": "Bearer sk_x"})
            assert r.status_code == 503 and r.headers["content-type"] == "application/problem+json"
            assert r.headers["retry-after"] == "1"
            proxy.open()
            deadline = time.monotonic() + 10
            while c.get("/readyz").status_code != 200:
                assert time.monotonic() < deadline, "readiness did not come back"
                time.sleep(0.1)
    finally:
        proxy.cut()


def scrape(base: str) -> dict[str, float]:
    text = httpx.get(base + "/metrics", timeout=5).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def test_metrics_text_format(client) -> None:
    for _ in range(3):
        client.get("/healthz")
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert "# TYPE consent_http_requests_total counter" in r.text
    assert "# TYPE consent_http_request_duration_seconds histogram" in r.text
    assert re.search(r'consent_http_requests_total\{method="GET",route="/healthz",status="200"\} \d', r.text)
    assert 'consent_http_request_duration_seconds_bucket{le="0.005",method="GET",route="/healthz"}' in r.text


@pytest.mark.slow
def test_metrics_sum_over_workers(db_url, tmp_path) -> None:
    with LiveServer(db_url, tmp_path, workers=2) as server:
        with httpx.Client(timeout=5) as c:
            for _ in range(30):
                assert c.get(server.base + "/healthz").status_code == 200
        key = 'consent_http_requests_total{method="GET",route="/healthz",status="200"}'
        for _ in range(4):  # whichever worker answers the scrape, it reports all workers' requests
            assert scrape(server.base)[key] >= 30
