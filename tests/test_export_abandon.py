"""An export whose client disconnects, or stops reading, lets go of its PostgreSQL connection
and snapshot within seconds (a live ``consent serve``, a real socket, pg_stat_activity)."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from consent.store.db import create_db_engine

from .ledger_factory import generate_ledger, signer_for
from .live import LiveServer

OPEN_TRANSACTIONS = sa.text(
    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
    "AND pid <> pg_backend_pid() AND xact_start IS NOT NULL")


def released_after(engine: sa.Engine, timeout: float) -> float | None:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        with engine.connect() as conn:
            if conn.execute(OPEN_TRANSACTIONS).scalar_one() == 0:
                return time.monotonic() - start
        time.sleep(0.1)
    return None


@pytest.mark.parametrize("how", ["disconnects", "stops_reading"])
def test_abandoned_export_releases_its_snapshot(db_url: str, backend: str, tmp_path: Path, how: str) -> None:
    if backend != "postgresql":
        pytest.skip("the snapshot held is PostgreSQL's")
    engine = create_db_engine(db_url)
    try:
        with LiveServer(db_url, tmp_path, CONSENT_EXPORT_STALL_SECONDS="2", CONSENT_LOG_LEVEL="warning") as srv:
            import httpx

            from .helpers import make_tenant

            with httpx.Client(base_url=srv.base, timeout=30) as h:
                t = make_tenant(h, catalog=False)  # type: ignore[arg-type]
            generate_ledger(engine, t.id, 30_000, signer=signer_for(engine))
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a slow reader's small window
            s.connect(("127.0.0.1", srv.port))
            s.sendall(f"GET /v1/exports/consents HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {t.secret_key}"
                      "\r\n\r\n".encode())
            assert b"200 OK" in s.recv(4096)
            time.sleep(0.5)
            with engine.connect() as conn:
                assert conn.execute(OPEN_TRANSACTIONS).scalar_one() >= 1  # the export's snapshot
            if how == "disconnects":
                s.close()
            took = released_after(engine, 20)
            s.close()
            print(f"export that {how}: snapshot released after {took} s")
            assert took is not None and took < 5, took
            assert "Traceback" not in srv.log()
    finally:
        engine.dispose()
