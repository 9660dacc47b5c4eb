"""A real HTTP receiver on 127.0.0.1 for webhook tests: records every request; can fail the
first N requests (then recover), fail always, or serve a fixed JSON document (a JWKS).

Hostile modes (``mode``): ``trickle`` (one byte of the answer every ``pace`` seconds),
``hang`` (reads the request, never answers), ``gzip_bomb`` (a small gzip body that inflates to
``bomb_bytes``), ``plain_bomb`` (``bomb_bytes`` of body), ``redirect`` (302 to ``location``)."""

from __future__ import annotations

import gzip
import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receiver:
    fail_first: int = 0
    fail_always: bool = False
    document: Any = None
    requests: list[Received] = field(default_factory=list)
    hits: int = 0
    gets: int = 0  # GETs of the document
    server: ThreadingHTTPServer | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    path: str = field(default_factory=lambda: f"/hook/{secrets.token_hex(6)}")
    mode: str = ""
    pace: float = 0.5
    bomb_bytes: int = 400 * 1024 * 1024
    location: str = "http://127.0.0.1:9/"
    sent_bytes: int = 0
    release: threading.Event = field(default_factory=threading.Event)

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}{self.path}"

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                with receiver.lock:
                    receiver.gets += 1
                body = json.dumps(receiver.document).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                if self.path != receiver.path:  # another test's endpoint on a reused port
                    self.send_response(404)
                    self.send_header("content-length", "0")
                    self.end_headers()
                    return
                with receiver.lock:
                    receiver.hits += 1
                    fail = receiver.fail_always or receiver.hits <= receiver.fail_first
                    if not fail:
                        receiver.requests.append(Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                if receiver.mode:
                    try:
                        self.hostile()
                    except OSError:  # the caller gave up: that is the point
                        pass
                    return
                self.send_response(500 if fail else 204)
                self.send_header("content-length", "0")
                self.end_headers()

            def hostile(self) -> None:
                mode = receiver.mode
                if mode == "hang":
                    receiver.release.wait(120)
                elif mode == "trickle":
                    head = b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n" + b"x" * 100000
                    for i in range(len(head)):
                        if receiver.release.wait(receiver.pace):
                            return
                        self.wfile.write(head[i:i + 1])
                        self.wfile.flush()
                        receiver.sent_bytes += 1
                elif mode == "redirect":
                    self.send_response(302)
                    self.send_header("location", receiver.location)
                    self.send_header("content-length", "0")
                    self.end_headers()
                elif mode in ("gzip_bomb", "plain_bomb"):
                    body = gzip_bomb(receiver.bomb_bytes) if mode == "gzip_bomb" else None
                    self.send_response(200)
                    self.send_header("content-type", "application/json")
                    if body is not None:
                        self.send_header("content-encoding", "gzip")
                    self.send_header("content-length", str(len(body) if body is not None else receiver.bomb_bytes))
                    self.end_headers()
                    if body is not None:
                        self.wfile.write(body)
                        receiver.sent_bytes += len(body)
                        return
                    chunk = b"0" * (1 << 20)
                    for _ in range(receiver.bomb_bytes >> 20):
                        self.wfile.write(chunk)
                        receiver.sent_bytes += len(chunk)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.release.set()
            self.server.shutdown()
            self.server.server_close()

    def wait_for(self, n: int, timeout: float = 10.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.requests) >= n:
                    return list(self.requests)
            time.sleep(0.02)
        with self.lock:
            return list(self.requests)


_BOMBS: dict[int, bytes] = {}


def gzip_bomb(size: int) -> bytes:
    """``size`` zero bytes, gzipped (about 1/1000 of it), made once per size."""
    if size not in _BOMBS:
        _BOMBS[size] = gzip.compress(bytes(size), compresslevel=9)
    return _BOMBS[size]
