"""uvicorn's HTTP/1.1 protocol (h11) with the service's error body and a deadline for request heads.

uvicorn answers a request it cannot parse (malformed, or a request line plus headers over
``h11_max_incomplete_event_size``) with a plain-text 400 before the app sees it, and it
waits for a request head for ever: a client that connects and sends nothing, or one byte
at a time, holds its connection open indefinitely. This protocol answers such requests in
the documented JSON body, and closes a connection whose request head has not arrived
within ``header_timeout_s`` of connecting (or of the previous response, plus the
keep-alive time), with a 408.

It also refuses a request that carries both ``Content-Length`` and ``Transfer-Encoding``.
h11 lets ``Transfer-Encoding`` win; a proxy in front that trusts ``Content-Length`` would
then see a different request boundary than the service, and whatever follows the chunked
body would run as a request of its own (request smuggling). RFC 9112 section 6.1 lets a
server reject such a request and requires it to close the connection: a 400, then close.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from service.errors import error_body

logger = logging.getLogger(__name__)


BOTH_FRAMINGS_MESSAGE = "a request may not carry both Content-Length and Transfer-Encoding"


class SingleFramingConnection(h11.Connection):
    """``h11.Connection`` that refuses a request whose body length is given twice (Content-Length and chunked)."""

    def __init__(self, our_role: type[h11._util.Sentinel], max_incomplete_event_size: int) -> None:
        super().__init__(our_role, max_incomplete_event_size=max_incomplete_event_size)
        self.framing_refused = False

    def next_event(self) -> Any:
        event = super().next_event()
        if isinstance(event, h11.Request):
            names = {name for name, _ in event.headers}  # h11 lower-cases header names
            if b"content-length" in names and b"transfer-encoding" in names:
                self.framing_refused = True
                raise h11.RemoteProtocolError(BOTH_FRAMINGS_MESSAGE, error_status_hint=400)
        return event


def raw_error_response(status: int, reason: str, error_type: str, message: str) -> bytes:
    """A complete HTTP/1.1 response carrying the error body, that closes the connection."""
    body = json.dumps(error_body(error_type, message)).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class GuardedH11Protocol(H11Protocol):
    """``H11Protocol`` with JSON 400s, one body framing per request, and a deadline for each request head."""

    def __init__(self, *args: Any, header_timeout_s: float = 10.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # uvicorn's own connection, but refusing double framing; the head size limit it was given is kept.
        self.conn = SingleFramingConnection(h11.SERVER, self.conn._max_incomplete_event_size)
        self.header_timeout_s = header_timeout_s
        self._head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_head(self.header_timeout_s)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the head is complete: the app has the request now
            self._cancel_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._await_head(self.timeout_keep_alive + self.header_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadline()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        if self.conn.framing_refused:
            message = BOTH_FRAMINGS_MESSAGE
        else:
            limit = self.conn._max_incomplete_event_size  # h11 keeps it private; it is the configured limit
            message = f"malformed HTTP request, or a request line plus headers over {limit} bytes"
        self.transport.write(raw_error_response(400, "Bad Request", "bad_request", message))
        self.transport.close()

    def _await_head(self, seconds: float) -> None:
        self._cancel_deadline()
        self._head_deadline = self.loop.call_later(seconds, self._head_timed_out)

    def _cancel_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        logger.info("closing a connection whose request head did not arrive within %gs", self.header_timeout_s)
        message = f"the request line and headers did not arrive within {self.header_timeout_s:g} seconds"
        self.transport.write(raw_error_response(408, "Request Timeout", "request_timeout", message))
        self.transport.close()
