"""uvicorn's httptools protocol with the two bounds it lacks on what a client
sends before its request reaches the app: the size of the request line and
headers, and the time they may take.

httptools and uvicorn append the URL and headers without a limit, and
uvicorn's only timer is the keep-alive one, armed after a response: a client
could send a 200 MB URL (the server's memory grew by three times that) or
open connections that send nothing, or half their headers, and hold a file
descriptor each until the process ran out (probes then got resets). Here the
URL and header bytes are counted (as the parser hands them over, and each
read that is all header bytes whole: httptools keeps a header value until
it ends), and past `max_header_bytes` the client gets 431 and the
connection closes; a request whose headers have not all arrived
`header_timeout_s` after its first byte gets 408 and the connection closes,
and a connection that sent no byte of a request in that time is closed. The
answers are in the API's error shape, and wait for the answer to an earlier
pipelined request on the connection. A stalled body is the edge's to time
out (edge.py), since the app reads the body."""

from __future__ import annotations

import asyncio
from typing import Any, Optional

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .errors import ApiError

DEFAULT_MAX_HEADER_BYTES = 64 * 1024  # nginx's large_client_header_buffers: 4 x 8 KB; h11's 16 KB
DEFAULT_CLIENT_TIMEOUT_S = 30.0

_REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}
LINGER_S = 2.0  # a refused connection's reads are drained this long before it closes (nginx: lingering_time)


class GuardedProtocol(HttpToolsProtocol):
    """HttpToolsProtocol with the header bound and timer (guarded() sets them)."""

    max_header_bytes = DEFAULT_MAX_HEADER_BYTES
    header_timeout_s: Optional[float] = DEFAULT_CLIENT_TIMEOUT_S
    # The server's metrics (a Metrics), where its refusals are counted as the
    # edge counts the answers it gives: route and method "other" (the
    # request line may not have arrived whole).
    metrics: Optional[Any] = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._refused = False
        self._pending: Optional[ApiError] = None  # a refusal waiting for the answer before it
        self._in_headers = True  # between a request's first byte (or the connection's start) and its headers' end
        self._begun = False  # a byte of the current request has arrived
        self._header_bytes = 0  # counted from the parser's callbacks
        self._raw_bytes = 0  # reads that were all header bytes (httptools keeps a header value whole)
        self._headers_done = 0  # requests whose headers ended, on this connection
        self._header_timer: Optional[asyncio.TimerHandle] = None
        self._arm()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        inside, done = self._in_headers, self._headers_done
        super().data_received(data)
        if inside and self._headers_done == done and not self._refused:  # the whole read was header bytes
            self._raw_bytes += len(data)
            if self._raw_bytes > self.max_header_bytes:
                self._too_large()

    # The parser's callbacks: every one is a no-op once the request is refused
    # (the rest of the read being parsed is dropped with the connection).
    def on_message_begin(self) -> None:
        if self._refused:
            return
        super().on_message_begin()
        self._in_headers, self._begun = True, True
        self._header_bytes = self._raw_bytes = 0
        self._arm()  # a keep-alive connection's next request: from its first byte

    def on_url(self, url: bytes) -> None:
        if self._counted(len(url)):
            super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._counted(len(name) + len(value)):
            super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        self._in_headers = self._begun = False
        self._headers_done += 1
        self._disarm()
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if not self._refused:
            super().on_message_complete()

    # uvicorn's own answers to what the parser meets after a refusal in the
    # same read (invalid bytes: a 400; an Upgrade header: the websocket
    # path, which reads a scope the refusal never finished): none once refused.
    def send_400_response(self, msg: str) -> None:
        if not self._refused:
            super().send_400_response(msg)

    def handle_websocket_upgrade(self) -> None:
        if not self._refused:
            super().handle_websocket_upgrade()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # starts the next pipelined request, if one is waiting
        if self._pending is not None and (self.cycle is None or self.cycle.response_complete):
            error, self._pending = self._pending, None  # refused behind the answers before it: now its turn
            self._answer_and_close(error)

    def _counted(self, n: int) -> bool:
        if self._refused:
            return False
        self._header_bytes += n
        if self._header_bytes <= self.max_header_bytes:
            return True
        self._too_large()
        return False

    def _too_large(self) -> None:
        self._refuse(ApiError(431, f"the request's URL and headers exceed {self.max_header_bytes} bytes",
                              code="headers_too_large"))

    def _arm(self) -> None:
        if self._header_timer is None and self.header_timeout_s is not None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._on_header_timeout)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _on_header_timeout(self) -> None:
        self._header_timer = None
        if not self._begun and (self.cycle is None or self.cycle.response_complete):
            # Not a byte of a request: nothing to answer (a connection opened
            # ahead of use, or one that only holds a descriptor). Closed, as
            # nginx closes an idle connection.
            self._refused = True
            self.transport.close()
            return
        self._refuse(ApiError(408, f"the request's headers did not arrive within {self.header_timeout_s:g} s",
                              type="timeout_error", code="request_timeout"))

    def _refuse(self, error: ApiError) -> None:
        """Answer `error` and close the connection: at once, or once the
        answer to an earlier (pipelined) request on it is out."""
        self._refused = True
        self._disarm()
        if self.metrics is not None:
            self.metrics.requests_for("other", "other", str(error.status)).inc()
        if self.cycle is not None and not self.cycle.response_complete:
            self._pending = error
            self.flow.pause_reading()
        else:
            self._answer_and_close(error)

    def _answer_and_close(self, error: ApiError) -> None:
        """Write the answer, then close as nginx does ("lingering close"):
        our side first, then what the client still sends is read and dropped
        for up to LINGER_S. Closing with its bytes unread makes the kernel
        reset the connection, which can destroy the answers not yet read:
        the 431's, and a pipelined answer before it."""
        if self.transport.is_closing():
            return
        reply = error.reply()
        head = [b"HTTP/1.1 %d %s\r\n" % (error.status, _REASONS[error.status])]
        for name, value in self.server_state.default_headers:
            head.append(name + b": " + value + b"\r\n")
        head.append(b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
                    % len(reply.body))
        self.transport.write(b"".join(head) + reply.body)
        if not self.transport.can_write_eof():
            self.transport.close()
            return
        self.transport.write_eof()  # sent once the answers before it are out
        self.flow.resume_reading()  # data_received drops it from here (refused)
        self.loop.call_later(LINGER_S, self.transport.close)


def guarded(max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
            header_timeout_s: Optional[float] = DEFAULT_CLIENT_TIMEOUT_S, metrics: Optional[Any] = None
            ) -> type[GuardedProtocol]:
    """The protocol class for uvicorn.Config(http=...), with these bounds
    (header_timeout_s None: no time bound), counting its 408s and 431s in
    `metrics` (the app's, app.state.metrics)."""
    if max_header_bytes < 1 or (header_timeout_s is not None and not header_timeout_s > 0):
        raise ValueError("max_header_bytes and the client timeout must be positive")
    return type("GuardedProtocol", (GuardedProtocol,),
                {"max_header_bytes": int(max_header_bytes),
                 "header_timeout_s": None if header_timeout_s is None else float(header_timeout_s),
                 "metrics": metrics})
