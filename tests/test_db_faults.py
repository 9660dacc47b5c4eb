"""Database faults answer fast: a black-holed PostgreSQL (connections accepted, nothing ever
answered) gives 503 problem+json within the request deadline and /readyz says so; a nearly
full disk makes /readyz 503; the service engine's connection budget is capped."""

from __future__ import annotations

import re
import socket
import threading
import time

import pytest
from starlette.testclient import TestClient

from consent.web.app import create_app

from .conftest import PG_URL, free_port, settings_for
from .helpers import make_tenant


class BlackHole:
    """A loopback TCP proxy to PostgreSQL that can start swallowing everything: existing
    connections stop forwarding, new ones are accepted and never answered."""

    def __init__(self, target: tuple[str, int]):
        self.target, self.port = target, free_port()
        self.holding = threading.Event()
        self.socks: list[socket.socket] = []
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", self.port))
        self.listener.listen(100)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.socks.append(client)
            if self.holding.is_set():
                continue  # accepted, never answered
            upstream = socket.create_connection(self.target)
            self.socks.append(upstream)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                if not self.holding.is_set():
                    dst.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        self.listener.close()
        for s in self.socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


def test_black_holed_database_answers_503_within_seconds(backend: str) -> None:
    if backend != "postgresql":
        pytest.skip("SQLite is a file: it cannot be black-holed")
    m = re.match(r"(.*@)([\d.]+|localhost):(\d+)(/.*)", PG_URL)
    assert m, PG_URL
    hole = BlackHole((m.group(2), int(m.group(3))))
    url = f"{m.group(1)}127.0.0.1:{hole.port}{m.group(4)}"
    s = settings_for(url, db_request_timeout_seconds=2.0, db_connect_timeout_seconds=1.0)
    try:
        with TestClient(create_app(s)) as c:
            t = make_tenant(c)
            assert c.get("/readyz").status_code == 200
            hole.holding.set()
            timings = []
            for call in (lambda: t.get("/v1/tenant"), lambda: t.record(email="bh@example.com", expect=503),
                         lambda: c.get("/readyz")):
                start = time.monotonic()
                r = call()
                timings.append(time.monotonic() - start)
                status = r.status_code if hasattr(r, "status_code") else 503
                assert status == 503, getattr(r, "text", r)
            print("black hole: answers in " + ", ".join(f"{x:.1f} s" for x in timings))
            assert max(timings) < 4, timings
            r = c.get("/readyz")
            assert r.status_code == 503 and r.json()["checks"]["database"] == "unreachable"
    finally:
        hole.close()


def test_readyz_reports_a_full_disk(settings) -> None:
    import dataclasses

    with TestClient(create_app(dataclasses.replace(settings, disk_min_free_mb=10**12))) as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["checks"]["disk"] == "full", r.text
    with TestClient(create_app(dataclasses.replace(settings, disk_min_free_mb=1))) as c:
        r = c.get("/readyz")
        assert r.status_code == 200 and r.json()["checks"]["disk"] == "ok", r.text


def test_service_engine_connection_budget(settings, backend: str) -> None:
    with TestClient(create_app(settings)) as c:
        pool = c.app.state.services.engine.pool
        if backend == "postgresql":
            assert pool.size() == settings.db_pool_size and pool._max_overflow == 0
