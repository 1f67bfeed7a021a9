"""uvicorn's httptools protocol with a bound on what a request may cost before the app sees it.

httptools (llhttp) sets no limit on the request line and headers, and httptools and uvicorn
both grow a buffer for them: a client could make a process hold any amount of memory, or
hold a connection open forever by sending its headers a byte at a time. This protocol
counts the bytes of each request until its headers are complete and answers 431 past
`SMSD_MAX_HEADER_BYTES`, and closes a connection whose headers take longer than
`SMSD_HEADER_TIMEOUT`. Everything after the headers is uvicorn's own code path unchanged,
so the fast parser stays fast (h11, the fallback, has its own limit for the same setting).

Started by `sms-dispatch api` as `http="api.server:BoundedHttpToolsProtocol"`."""

from __future__ import annotations

import asyncio
from typing import Any

import structlog
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from shared.core.settings import get_settings

log = structlog.get_logger(__name__)

HEADERS_TOO_LARGE = b"request line and headers too large"
HEADERS_TOO_SLOW = b"request headers not received in time"


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        settings = get_settings()
        self._header_limit = settings.max_header_bytes
        self._header_timeout = settings.header_timeout.total_seconds()
        self._header_bytes = 0
        self._reading_headers = True
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # From the first moment: a client that connects and sends nothing is cut off too.
        self._start_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        # Fed in slices no larger than what the limit still allows, so the parser's buffers
        # never hold more than the limit. Counted before feeding: bytes of a pipelined next
        # request in the same read may go uncounted, which at most doubles the bound.
        while self._reading_headers and data:
            room = self._header_limit - self._header_bytes
            if room <= 0:
                self._refuse(431, HEADERS_TOO_LARGE, "http.headers_too_large")
                return
            piece, data = data[:room], data[room:]
            self._header_bytes += len(piece)
            super().data_received(piece)
            if self.transport.is_closing():
                return
        if data:
            super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        # A keep-alive connection's next request: its idle time before was uvicorn's to bound.
        if self._header_timer is None:
            self._start_header_timer()

    def on_headers_complete(self) -> None:
        self._reading_headers = False
        self._cancel_header_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._reading_headers = True
        self._header_bytes = 0

    def _start_header_timer(self) -> None:
        if self._header_timeout > 0:
            self._header_timer = self.loop.call_later(self._header_timeout, self._headers_late)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self._reading_headers and not self.transport.is_closing():
            self._refuse(408, HEADERS_TOO_SLOW, "http.headers_too_slow")

    def _refuse(self, status: int, text: bytes, event: str) -> None:
        """Answer and close: the rest of this connection's bytes are never read."""
        self._cancel_header_timer()
        client = self.client[0] if self.client else None
        log.warning(event, client=client, received=self._header_bytes, limit=self._header_limit)
        self.transport.write(
            b"".join(
                [
                    STATUS_LINE[status],
                    b"content-type: text/plain; charset=utf-8\r\n",
                    b"content-length: %d\r\n" % len(text),
                    b"connection: close\r\n\r\n",
                    text,
                ]
            )
        )
        self.transport.close()
