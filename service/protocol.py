"""uvicorn's HTTP/1.1 protocols (httptools, and h11) with the service's error body and a deadline for request heads.

Two protocols with the same behaviour: :class:`GuardedHttpToolsProtocol` on uvicorn's httptools
protocol (llhttp, the HTTP parser in C that Node.js uses; the default) and :class:`GuardedH11Protocol`
on uvicorn's pure-Python h11 protocol (the fallback where httptools is not installed, or
``--http h11``). :func:`protocol_class` picks one.

uvicorn answers a request it cannot parse (malformed, or a request line plus headers over
``h11_max_incomplete_event_size``) with a plain-text 400 before the app sees it, and it
waits for a request head for ever: a client that connects and sends nothing, or one byte
at a time, holds its connection open indefinitely. This protocol answers such requests in
the documented JSON body, and closes a connection whose request head has not arrived
within ``header_timeout_s`` of connecting (or of the previous response, plus the
keep-alive time), with a 408.

llhttp has no limit of its own on the size of a request head: the httptools protocol counts the
bytes of the head itself and answers 400 past ``max_header_bytes``, as h11 does.

It also refuses a request that carries both ``Content-Length`` and ``Transfer-Encoding``.
h11 lets ``Transfer-Encoding`` win; a proxy in front that trusts ``Content-Length`` would
then see a different request boundary than the service, and whatever follows the chunked
body would run as a request of its own (request smuggling). RFC 9112 section 6.1 lets a
server reject such a request and requires it to close the connection: a 400, then close. h11 is
made to refuse it here; llhttp refuses it itself.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from typing import Any, Literal

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

try:  # the C parser: a dependency, but h11 still serves where a platform has no wheel of it
    import httptools
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # pragma: no cover - httptools is installed with the project
    httptools = None
    HttpToolsProtocol = object  # type: ignore[assignment,misc]

from service.errors import error_body

logger = logging.getLogger(__name__)


BOTH_FRAMINGS_MESSAGE = "a request may not carry both Content-Length and Transfer-Encoding"
HttpProtocol = Literal["auto", "httptools", "h11"]


def httptools_available() -> bool:
    return httptools is not None


def protocol_class(name: HttpProtocol, header_timeout_s: float, max_header_bytes: int) -> Any:
    """The protocol factory uvicorn is given: ``httptools`` (``auto`` where it is installed) or ``h11``.

    Raises:
        ValueError: ``httptools`` asked for where it is not installed.
    """
    if name == "httptools" and httptools is None:
        raise ValueError("--http httptools: the httptools package is not installed (pip install httptools)")
    if name == "h11" or httptools is None:
        return functools.partial(GuardedH11Protocol, header_timeout_s=header_timeout_s)
    return functools.partial(
        GuardedHttpToolsProtocol, header_timeout_s=header_timeout_s, max_header_bytes=max_header_bytes
    )


LINGER_S = 2.0  # after an error answer, how long the rest of a refused request is read and dropped


class HeadGuard:
    """What both protocols add to uvicorn's: a deadline for each request head, and error answers sent the way
    nginx closes ("lingering close").

    The deadline runs from the connection, or from the previous response plus the keep-alive time, until
    the head is complete; a protocol says when a request is under way (:meth:`_request_under_way`).

    Closing a socket whose client is still sending makes the kernel answer with a reset, and a reset can
    discard the error answer before the client reads it. So the answer is sent with a FIN after it
    (half-close), what the client still sends is read and dropped, and the connection is closed when the
    client closes its side or after ``LINGER_S`` seconds.
    """

    header_timeout_s = 10.0
    lingering = False
    _head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._await_head(self.header_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadline()
        super().connection_lost(exc)  # type: ignore[misc]

    def answer_and_close(self, response: bytes) -> None:
        transport = self.transport  # type: ignore[attr-defined]
        if self.lingering or transport.is_closing():
            return
        self.lingering = True
        transport.write(response)
        if transport.can_write_eof():
            transport.write_eof()
            self.loop.call_later(LINGER_S, transport.close)  # type: ignore[attr-defined]
        else:  # pragma: no cover - TLS transports cannot half-close
            transport.close()

    def _request_under_way(self) -> bool:
        """A head has arrived and its request is not answered yet: no deadline applies."""
        raise NotImplementedError

    def _await_head(self, seconds: float) -> None:
        self._cancel_deadline()
        self._head_deadline = self.loop.call_later(seconds, self._head_timed_out)  # type: ignore[attr-defined]

    def _await_next_head(self) -> None:
        """After a response: the keep-alive time, then the head deadline, for the next request's head."""
        if not self.transport.is_closing() and not self._request_under_way():  # type: ignore[attr-defined]
            self._await_head(self.timeout_keep_alive + self.header_timeout_s)  # type: ignore[attr-defined]

    def _cancel_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        if self.transport.is_closing() or self._request_under_way():  # type: ignore[attr-defined]
            return
        logger.info("closing a connection whose request head did not arrive within %gs", self.header_timeout_s)
        self.answer_and_close(head_timeout_response(self.header_timeout_s))


def malformed_message(limit: int) -> str:
    return f"malformed HTTP request, or a request line plus headers over {limit} bytes"


def head_timeout_response(header_timeout_s: float) -> bytes:
    message = f"the request line and headers did not arrive within {header_timeout_s:g} seconds"
    return raw_error_response(408, "Request Timeout", "request_timeout", message)


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


class GuardedH11Protocol(HeadGuard, H11Protocol):
    """``H11Protocol`` with JSON 400s, one body framing per request, and a deadline for each request head."""

    def __init__(self, *args: Any, header_timeout_s: float = 10.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # uvicorn's own connection, but refusing double framing; the head size limit it was given is kept.
        self.conn = SingleFramingConnection(h11.SERVER, self.conn._max_incomplete_event_size)
        self.header_timeout_s = header_timeout_s

    def data_received(self, data: bytes) -> None:
        if self.lingering:  # the rest of a refused request
            return
        super().data_received(data)
        if self._request_under_way():  # the head is complete: the app has the request now
            self._cancel_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._await_next_head()

    def send_400_response(self, msg: str) -> None:
        if self.conn.framing_refused:
            message = BOTH_FRAMINGS_MESSAGE
        else:
            message = malformed_message(self.conn._max_incomplete_event_size)  # h11's private copy of the limit
        self.answer_and_close(raw_error_response(400, "Bad Request", "bad_request", message))

    def _request_under_way(self) -> bool:
        return self.conn.their_state is not h11.IDLE


class GuardedHttpToolsProtocol(HeadGuard, HttpToolsProtocol):
    """``HttpToolsProtocol`` with JSON 400s, a limit on the size of a request head, and a deadline for each head.

    A head is pending from the connection (or the end of the previous request's body) until llhttp has
    parsed its last header. Its size is the request line plus headers as llhttp hands them over; a head
    still incomplete after more than the limit has arrived is refused as well, so that a client cannot
    make llhttp buffer an endless header.
    """

    def __init__(self, *args: Any, header_timeout_s: float = 10.0, max_header_bytes: int = 65536, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.header_timeout_s = header_timeout_s
        self.max_header_bytes = max_header_bytes
        self._head_pending = True  # no head has been parsed on this connection since the last request
        self._head_bytes = 0  # bytes received while a head was pending
        self._head_size = 0  # the pending head's request line and headers, as parsed
        self._refused: str | None = None  # why this protocol refused the request, for send_400_response

    def data_received(self, data: bytes) -> None:
        if self.lingering:  # the rest of a refused request
            return
        if self._head_pending:
            self._head_bytes += len(data)
        self._unset_keepalive_if_required()
        try:  # uvicorn's data_received, keeping the parser's reason for a 400 (uvicorn drops it)
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
        except httptools.HttpParserError as exc:  # llhttp's own, or ours raised in a callback
            logger.info("refused a malformed request: %s", exc.__context__ or exc)
            self.send_400_response(str(exc))
            return
        if self._head_pending and self._head_bytes > self.max_header_bytes and not self.lingering:
            self._refused = malformed_message(self.max_header_bytes)
            self.send_400_response(self._refused)

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        self._count_head(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        super().on_header(name, value)
        self._count_head(len(name) + len(value) + 4)

    def on_headers_complete(self) -> None:
        self._head_pending = False
        self._cancel_deadline()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._head_pending, self._head_bytes, self._head_size = True, 0, 0

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.pipeline:  # a pipelined request has its head already
            self._await_next_head()

    def send_400_response(self, msg: str) -> None:
        if self._refused is not None:
            message = self._refused
        elif "Content-Length" in msg and "Transfer-Encoding" in msg:
            message = BOTH_FRAMINGS_MESSAGE
        else:
            message = malformed_message(self.max_header_bytes)
        self.answer_and_close(raw_error_response(400, "Bad Request", "bad_request", message))

    def _count_head(self, size: int) -> None:
        self._head_size += size
        if self._head_size > self.max_header_bytes:
            # Raised inside llhttp's callback: the parser stops, and data_received answers the 400.
            self._refused = malformed_message(self.max_header_bytes)
            raise ValueError(self._refused)

    def _request_under_way(self) -> bool:
        # a head has arrived and its body is still to come, or a request (pipelined too) is being answered
        return not self._head_pending or (self.cycle is not None and not self.cycle.response_complete)
