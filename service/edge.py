"""What every HTTP request meets before its route, in one ASGI middleware.

In order: the API key (``X-API-Key`` or ``Authorization: Bearer``), the query string's
encoding, admission (``max_in_flight``), the declared body size; then the route runs with
a ``receive`` that enforces the body limit and timeout as the body streams in. Refusals
happen before the body is read, so an unauthenticated or oversized request costs the
server no memory. Every answer is timed and counted (``service.metrics``), logged without
its query string unless ``log_queries`` is set, and an unexpected exception becomes the
generic 500 body (the detail goes to the log only). A request still running at the shutdown
deadline, cancelled by uvicorn, is answered 503 ``not_ready`` with ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from urllib.parse import unquote_to_bytes

from fastapi.responses import JSONResponse
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.deps import UNAUTHORIZED_MESSAGE, ServiceState, any_key_is_valid
from service.errors import (
    INTERNAL,
    INTERNAL_MESSAGE,
    InvalidRequest,
    NotReady,
    Overloaded,
    PayloadTooLarge,
    RequestTimeout,
    ServiceError,
    Unauthorized,
    error_body,
    error_kind,
)
from service.logs import REQUEST_ID_HEADER, new_request_id, request_id
from service.metrics import NO_DIM

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("mrl.access")

UNGUARDED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})  # no API key, never refused as overloaded
DOCS_PATHS = ("/docs", "/redoc", "/openapi.json")  # behind the key too, unless public_docs
SHUTTING_DOWN_MESSAGE = "the server is shutting down and did not finish this request; retry it"


def is_docs_path(path: str) -> bool:
    return any(path == docs or path.startswith(docs + "/") for docs in DOCS_PATHS)


class EdgeMiddleware:
    """Authenticates, admits and bounds requests; times, counts and logs every answer."""

    def __init__(self, app: ASGIApp, state: ServiceState, routes: list[BaseRoute]) -> None:
        self.app = app
        self.routes = routes  # the app's, to label requests refused before routing by their route
        self.state = state
        self.metrics = state.metrics
        self.settings = state.settings
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = _headers(scope)  # read once: the request id and the refusals below both need them
        token = request_id.set(new_request_id(headers.get(REQUEST_ID_HEADER)))
        try:
            send = _with_request_id(send)
            guarded = scope["path"] not in UNGUARDED_PATHS
            refusal = self._refusal(scope, headers, guarded)
            if refusal is not None:
                exc, headers = refusal
                status = await self._answer(scope, receive, send, exc, headers)
            else:
                status = await self._call(scope, self._bounded(receive), send, guarded)
            self._observe(scope, status, started)
        finally:
            request_id.reset(token)

    # --- before the route -----------------------------------------------------------------
    def _refusal(
        self, scope: Scope, headers: dict[str, str], guarded: bool
    ) -> tuple[ServiceError, dict[str, str]] | None:
        if guarded and self._needs_key(scope["path"]) and not any_key_is_valid(self.settings, headers):
            return Unauthorized(UNAUTHORIZED_MESSAGE), {"WWW-Authenticate": "Bearer"}
        undecodable = _undecodable_part(scope)
        if undecodable:
            return InvalidRequest(f"the {undecodable} is not valid UTF-8 once percent-decoded"), {}
        if guarded and self.in_flight >= self.settings.max_in_flight:
            return Overloaded(f"more than {self.settings.max_in_flight} requests in flight; retry shortly"), {
                "Retry-After": "1"
            }
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.settings.max_body_bytes:
            return self._too_large(), {}
        return None

    def _needs_key(self, path: str) -> bool:
        if self.settings.api_key is None:
            return False
        return not (self.settings.public_docs and is_docs_path(path))

    def _too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(f"the request body is over the limit of {self.settings.max_body_bytes} bytes")

    def _bounded(self, receive: Receive) -> Receive:
        """``receive`` that refuses a body over ``max_body_bytes`` or slower than ``body_timeout_s``.

        The route's body parser sees the error as an exception of ``receive``; the app's error
        handler answers it with its own status (413 or 408).
        """
        received = 0
        complete = False

        async def bounded_receive() -> Message:
            nonlocal received, complete
            if complete:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.settings.body_timeout_s)
            except asyncio.TimeoutError:
                raise RequestTimeout(
                    f"the request body did not arrive within {self.settings.body_timeout_s:g} seconds"
                ) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.settings.max_body_bytes:
                    raise self._too_large()
                complete = not message.get("more_body", False)
            return message

        return bounded_receive

    # --- the route, the last-resort 500, and the 503 at the shutdown deadline -----------------
    async def _call(self, scope: Scope, receive: Receive, send: Send, guarded: bool) -> int:
        status = INTERNAL.status
        started_response = False

        async def send_and_note(message: Message) -> None:
            nonlocal status, started_response
            if message["type"] == "http.response.start":
                status, started_response = message["status"], True
            await send(message)

        self.in_flight += guarded
        self.metrics.in_flight.inc(guarded)
        try:
            await self.app(scope, receive, send_and_note)
        except asyncio.CancelledError:
            if started_response:
                raise
            # uvicorn cancels what still runs at the shutdown deadline (shutdown_timeout_s) and would answer a
            # plain 500 with an error log; the client is better told to retry, on a replica that stays up.
            logger.warning("shutdown deadline: answering %s %s with 503", scope.get("method"), scope.get("path"))
            status = await self._answer(scope, receive, send, NotReady(SHUTTING_DOWN_MESSAGE), {"Retry-After": "1"})
        except Exception as exc:
            kind = error_kind(exc)
            if kind is INTERNAL:
                logger.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            status = await self._answer(scope, receive, send, exc, {}) if not started_response else INTERNAL.status
        finally:
            self.in_flight -= guarded
            self.metrics.in_flight.dec(guarded)
        return status

    async def _answer(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        exc: Exception,
        headers: dict[str, str],
    ) -> int:
        """The error body for ``exc``: its own message for a ServiceError, the generic one for anything else."""
        kind = error_kind(exc)
        self.metrics.failures.labels(type=kind.type).inc()
        body = error_body(kind.type, INTERNAL_MESSAGE if kind is INTERNAL else self.state.redact(str(exc)))
        response = JSONResponse(body, status_code=kind.status, headers=headers or None)
        await response(scope, receive, send)
        return kind.status

    # --- after ------------------------------------------------------------------------------
    def _observe(self, scope: Scope, status: int, started: float) -> None:
        seconds = time.perf_counter() - started
        route = scope.get("route") or self._route_of(scope)
        endpoint = getattr(route, "path", None) or "unmatched"
        dim = (scope.get("state") or {}).get("metric_dim") or NO_DIM
        self.metrics.observe_request(endpoint, dim, status, seconds)
        if access_logger.isEnabledFor(logging.INFO):
            path = scope.get("path", "")
            query = scope.get("query_string", b"")
            if self.settings.log_queries and query:
                path = f"{path}?{query.decode('latin-1')}"
            client = scope.get("client")
            where = f"{client[0]}:{client[1]}" if client else "-"
            access_logger.info("%s %s %s %d %.1fms", where, scope.get("method"), path, status, 1000 * seconds)

    def _route_of(self, scope: Scope) -> BaseRoute | None:
        for route in self.routes:
            match, _ = route.matches(scope)
            if match is Match.FULL:
                return route
        return None


def _with_request_id(send: Send) -> Send:
    """``send`` that adds the request's id to the response head (``X-Request-ID``)."""

    async def send_with_id(message: Message) -> None:
        if message["type"] == "http.response.start":
            current = request_id.get()
            if current is not None:
                headers = [*message.get("headers", []), (REQUEST_ID_HEADER.encode(), current.encode())]
                message = {**message, "headers": headers}
        await send(message)

    return send_with_id


def _headers(scope: Scope) -> dict[str, str]:
    """Request headers by lower-case name (the last value of a repeated one)."""
    return {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope.get("headers", [])}


def _undecodable_part(scope: Scope) -> str | None:
    """``"query string"`` or ``"path"`` if it does not percent-decode to UTF-8, else None.

    Starlette would turn such bytes into U+FFFD silently, and the query searched would not be
    the one sent.
    """
    raw_path = scope.get("raw_path")
    parts = [("query string", scope.get("query_string", b"").replace(b"+", b" "))]
    if raw_path is not None:
        parts.append(("path", raw_path))
    for name, raw in parts:
        try:
            unquote_to_bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            return name
    return None
