"""uvicorn's h11 protocol with the deadlines it lacks: a connection must finish its request
headers within ``header_timeout_seconds`` of opening (or of its first byte after a
keep-alive pause), and a request body must arrive within ``body_timeout_seconds`` of its
headers. Past either deadline the connection is closed (a handler waiting for the body sees a
disconnect). So idle sockets, slow headers and slow bodies each hold a connection slot for a
bounded time, however many there are. ``consent serve`` runs uvicorn with this class."""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


@functools.lru_cache(maxsize=1)
def deadlines() -> tuple[float, float]:
    from .settings import Settings

    s = Settings.from_env()
    return s.header_timeout_seconds, s.body_timeout_seconds


class GuardedH11Protocol(H11Protocol):
    _guard: asyncio.TimerHandle | None = None
    _guarding: Any = None  # the client state the running deadline is for

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._watch()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._stop_guard()  # idle now: uvicorn's keep-alive timeout takes over

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_guard()
        super().connection_lost(exc)

    def _watch(self) -> None:
        """Arm the deadline of the state the client is in; a state keeps its first deadline,
        so trickling bytes never extends it."""
        state = self.conn.their_state
        if state is h11.IDLE and (self.cycle is None or self.cycle.response_complete):
            self._arm(state, deadlines()[0])
        elif state is h11.SEND_BODY:
            self._arm(state, deadlines()[1])
        else:
            self._stop_guard()

    def _arm(self, state: Any, seconds: float) -> None:
        if self._guarding is state and self._guard is not None:
            return
        self._stop_guard()
        if seconds > 0:
            self._guarding = state
            self._guard = self.loop.call_later(seconds, self._expire)

    def _stop_guard(self) -> None:
        if self._guard is not None:
            self._guard.cancel()
        self._guard, self._guarding = None, None

    def _expire(self) -> None:
        self._guard, self._guarding = None, None
        if not self.transport.is_closing():
            self.transport.close()
