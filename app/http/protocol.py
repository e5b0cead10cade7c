"""The server's HTTP connection: uvicorn's httptools protocol with a deadline on a request's
headers.

An ASGI application sees a request only once its headers are complete, and uvicorn has no
deadline on them (its keep-alive timeout covers only the silence between requests): a connection
that sends its headers a byte at a time, or connects and sends nothing, stays open as long as the
client likes, each one a socket, a parser and a wake-up of the event loop per byte. Here the
headers of each request must be complete within `header_timeout_s` of the connection being made
(for the first request) or of the request's first byte (for the next ones on a kept-alive
connection); past that the connection gets 408 `headers_too_slow` and is closed. Body pace is the
admission gate's (`app.http.slow_bodies`), once the application has the request.

`pneumonia-serve` (`app.main.run`, the container's command) runs uvicorn with this protocol.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

HEADERS_TOO_SLOW = "headers_too_slow"

logger = logging.getLogger("app.http")


class HeaderDeadlineProtocol(HttpToolsProtocol):
    """`HttpToolsProtocol` with the header deadline; subclass it with `with_header_timeout`."""

    header_timeout_s: ClassVar[float] = 5.0
    on_headers_too_slow: ClassVar[tuple[Callable[[], None], ...]] = ()  # told of each cut-off
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_deadline()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm_header_deadline()  # a no-op for the first request: armed on connecting

    def on_headers_complete(self) -> None:
        self._disarm_header_deadline()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_deadline()
        super().connection_lost(exc)

    def _arm_header_deadline(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _disarm_header_deadline(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # A pipelined request's first bytes came while the one before it is being answered:
            # its headers are due a deadline after that.
            self._arm_header_deadline()
            return
        for listener in self.on_headers_too_slow:
            listener()
        logger.debug("request headers incomplete after %.1f s: closed", self.header_timeout_s)
        message = f"request headers not complete within {self.header_timeout_s:g} s"
        body = json.dumps({"error": {"code": HEADERS_TOO_SLOW, "message": message}}).encode()
        self.transport.write(
            b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body
        )
        self.transport.close()


def with_header_timeout(
    seconds: float, on_headers_too_slow: Callable[[], None] | None = None
) -> type[HeaderDeadlineProtocol]:
    """The protocol class for uvicorn's `http=`, with this header deadline, calling
    `on_headers_too_slow` (on the event loop) for each connection it cuts off."""
    attributes = {
        "header_timeout_s": seconds,
        "on_headers_too_slow": (on_headers_too_slow,) if on_headers_too_slow else (),
    }
    return type("HeaderDeadlineProtocol", (HeaderDeadlineProtocol,), attributes)
