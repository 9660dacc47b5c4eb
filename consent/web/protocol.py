"""uvicorn's httptools protocol with the limits it lacks. ``consent serve`` runs uvicorn with
this class.

- **Header size.** llhttp (under httptools) buffers a header block of any size. Here at most
  ``MAX_HEAD_BYTES`` of a request's header block reach the parser: past that the client gets a
  431 and the connection is closed. The count starts with each request's first byte; bytes that
  follow a finished request in the same read are counted from the next read on, so a pipelining
  client can pass the limit by at most one read's worth, never without bound.
- **Deadlines.** A connection must finish its request headers within
  ``header_timeout_seconds`` of opening (or of its first byte after a keep-alive pause), and a
  request body must arrive within ``body_timeout_seconds`` of its headers. Past either deadline
  the connection is closed (a handler waiting for the body sees a disconnect), at the next sweep
  of the process's one deadline timer (``_Sweeper``). So idle sockets,
  slow headers and slow bodies each hold a connection slot for a bounded time, however many.

httptools rather than h11: it parses a request in a fraction of h11's time, which is most of
the framework's own cost per request.
"""

from __future__ import annotations

import asyncio
import functools

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_HEAD_BYTES = 64 * 1024
REFUSED = (b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain; charset=utf-8\r\n"
           b"content-length: 32\r\nconnection: close\r\n\r\nRequest header fields too large\n")

HEAD, BODY = "head", "body"  # what the running deadline waits for


@functools.lru_cache(maxsize=1)
def deadlines() -> tuple[float, float]:
    from consent.settings import Settings

    s = Settings.from_env()
    return s.header_timeout_seconds, s.body_timeout_seconds


class _Sweeper:
    """The deadlines of one process's guarded connections, checked by one timer: a request then
    costs a field write and a set operation, not a timer armed and cancelled. A deadline is
    enforced within a quarter of the shorter timeout (at most a second) after it passes."""

    def __init__(self) -> None:
        self.guarded: set[GuardedHttpToolsProtocol] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def add(self, conn: GuardedHttpToolsProtocol) -> None:
        self.guarded.add(conn)
        if self._timer is None or self._loop is not conn.loop:  # none yet, or a server before ours
            self._loop = conn.loop
            self._timer = conn.loop.call_later(self.interval(), self._sweep, conn.loop)

    @staticmethod
    def interval() -> float:
        armed = [t for t in deadlines() if t > 0]
        return min(1.0, max(0.05, min(armed) / 4)) if armed else 1.0

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        if loop is not self._loop:
            return
        now = loop.time()
        for conn in [c for c in self.guarded if c._deadline <= now]:
            conn._expire()
        self._timer = loop.call_later(self.interval(), self._sweep, loop) if self.guarded else None


_SWEEPER = _Sweeper()


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    # Bytes of the current request's header block seen so far; None from the end of its
    # headers to the end of its body.
    _head: int | None = 0
    _deadline = 0.0  # loop time by which what is awaited must have arrived (while guarding)
    _guarding: str | None = None
    _upgraded = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._watch()

    def data_received(self, data: bytes) -> None:
        head = self._head
        if head is None:
            super().data_received(data)
        elif len(data) <= MAX_HEAD_BYTES - head:
            self._head = head + len(data)
            super().data_received(data)
        else:
            # Feed only what the header block may still take; if the headers end within it,
            # the rest is the body or the next request.
            room = MAX_HEAD_BYTES - head
            self._head = MAX_HEAD_BYTES
            if room > 0:
                super().data_received(data[:room])
            if self._head == MAX_HEAD_BYTES:  # still the same unfinished header block
                self._refuse()
                return
            if not self.transport.is_closing():
                self.data_received(data[room:])
            return
        self._watch()

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._head = None

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._head = 0

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._stop_guard()  # idle now: uvicorn's keep-alive timeout takes over

    def handle_websocket_upgrade(self) -> None:
        self._upgraded = True  # the connection is no longer HTTP/1.1's: its deadlines end here
        self._stop_guard()
        super().handle_websocket_upgrade()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_guard()
        super().connection_lost(exc)

    def _refuse(self) -> None:
        self.logger.warning("Request header block larger than %d bytes.", MAX_HEAD_BYTES)
        if self.cycle is None or self.cycle.response_complete:  # else a response is being written
            self.transport.write(REFUSED)
        self.transport.close()

    def _watch(self) -> None:
        """Set the deadline of what the client owes; a wait keeps its first deadline, so
        trickling bytes never extends it."""
        if self._upgraded:
            return
        if self._head is None:
            self._arm(BODY, deadlines()[1])
        elif self.cycle is None or self.cycle.response_complete:
            self._arm(HEAD, deadlines()[0])
        else:  # the request is in, the response is not out yet
            self._stop_guard()

    def _arm(self, waiting_for: str, seconds: float) -> None:
        if self._guarding == waiting_for:
            return
        if seconds > 0:
            self._guarding = waiting_for
            self._deadline = self.loop.time() + seconds
            _SWEEPER.add(self)
        else:
            self._stop_guard()

    def _stop_guard(self) -> None:
        if self._guarding is not None:
            self._guarding = None
            _SWEEPER.guarded.discard(self)

    def _expire(self) -> None:
        self._stop_guard()
        if not self.transport.is_closing():
            self.transport.close()
