"""A live ``consent serve`` process for the multi-process tests (loopback, free port)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Self

import httpx

from .conftest import free_port
from .helpers import ADMIN_TOKEN


class LiveServer:
    """``python -m consent.cli.main serve`` on 127.0.0.1:port, started, killed and restarted at will."""

    def __init__(self, url: str, tmp: Path, *, port: int | None = None, workers: int = 1, **env: str):
        self.db_url, self.tmp, self.workers = url, tmp, workers
        self.port = port or free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / f"server-{self.port}.log"
        self.env = {**os.environ, "CONSENT_DATABASE_URL": url, "CONSENT_ADMIN_TOKEN": ADMIN_TOKEN,
                    "CONSENT_DEMO": "false", "CONSENT_DATA_DIR": str(tmp / f"data-{self.port}"),
                    "CONSENT_ISSUER": "http://testserver",
                    # the test receivers listen on 127.0.0.1 over http
                    "CONSENT_WEBHOOK_ALLOW_PRIVATE": "true", **env}
        self.env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, timeout: float = 90) -> Self:
        # 90 s: on a busy shared machine a spawned worker has taken 35 s to import the service.
        with open(self.log_path, "ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "consent.cli.main", "serve", "--port", str(self.port),
                 "--workers", str(self.workers)],
                env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.starts += 1
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log()[-3000:]}")
            try:
                if httpx.get(self.base + "/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        tail = self.log()[-3000:]
        self.stop()  # a server that never became ready must not outlive the test
        raise RuntimeError(f"server did not become ready: {tail}")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, sig)  # the process group we created (uvicorn workers included)

    def kill(self) -> None:
        """SIGKILL, no goodbye: the crash we test for."""
        self.signal(signal.SIGKILL)
        assert self.proc is not None
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
