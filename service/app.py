"""``create_app(settings)``: the FastAPI app, its lifespan, error handlers and request metrics.

The lifespan builds the :class:`~service.engine.Searcher` (model + index) and closes it
on shutdown; routes reach it through dependencies. Every error leaves in the one body
shape of :mod:`service.errors`; an unexpected exception becomes a generic 500 whose
detail is logged, never sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mrl import __version__
from service.deps import ServiceState
from service.encoders import load_encoder
from service.engine import EncoderLoader, Searcher
from service.errors import (
    INTERNAL,
    INTERNAL_MESSAGE,
    Overloaded,
    ServiceError,
    describe_validation_errors,
    error_body,
    error_kind,
)
from service.metrics import NO_DIM, ServiceMetrics
from service.routes import admin_router, ops_router, search_router
from service.settings import ServiceSettings

logger = logging.getLogger(__name__)

UNGUARDED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})  # no API key, never refused as overloaded


def create_app(settings: ServiceSettings | None = None, *, encoder_loader: EncoderLoader = load_encoder) -> FastAPI:
    """Build the service for ``settings`` (default: from ``MRL_*`` environment variables).

    Args:
        settings: The service settings; ``None`` reads them from the environment (for ``uvicorn --factory``).
        encoder_loader: How the query encoder is loaded; tests pass a fake one.
    """
    settings = settings if settings is not None else ServiceSettings()
    state = ServiceState(settings, ServiceMetrics())
    app = FastAPI(
        title="mrl-retrieval",
        version=__version__,
        description="Search a corpus at any Matryoshka dimension, and embed texts (OpenAI-compatible).",
        lifespan=_lifespan(state, encoder_loader),
    )
    app.state.service = state
    app.add_middleware(RequestMetricsMiddleware, state=state)
    _add_error_handlers(app, state.metrics)
    app.include_router(search_router)
    app.include_router(admin_router)
    app.include_router(ops_router)
    return app


# --- lifespan -----------------------------------------------------------------------------


def _lifespan(state: ServiceState, encoder_loader: EncoderLoader):
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if state.settings.load_in_background:
            loading = asyncio.create_task(_load(state, encoder_loader, reraise=False))
            yield
            loading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loading
        else:
            await _load(state, encoder_loader, reraise=True)
            yield
        searcher, state.searcher = state.searcher, None  # readyz says 503 from here on
        if searcher is not None:
            await searcher.close()

    return lifespan


async def _load(state: ServiceState, encoder_loader: EncoderLoader, *, reraise: bool) -> None:
    try:
        state.searcher = await Searcher.open(state.settings, state.metrics, encoder_loader)
    except Exception as exc:
        state.load_error = f"loading failed: {exc}"
        logger.error("cannot serve %s: %s", state.settings.index, exc)
        if reraise:
            raise


# --- errors -------------------------------------------------------------------------------


def _add_error_handlers(app: FastAPI, metrics: ServiceMetrics) -> None:
    def answer(status: int, error_type: str, message: str) -> JSONResponse:
        metrics.failures.labels(type=error_type).inc()
        return JSONResponse(error_body(error_type, message), status_code=status)

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        kind = error_kind(exc)
        return answer(kind.status, kind.type, str(exc))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return answer(422, "invalid_request", describe_validation_errors(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error_type = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return answer(exc.status_code, error_type, str(exc.detail))


# --- request metrics, admission, last-resort 500 --------------------------------------------


class RequestMetricsMiddleware:
    """Times every request (labelled by route, dim and status class), bounds requests in flight, and
    turns an unexpected exception into the generic 500 body (the detail goes to the log only)."""

    def __init__(self, app: ASGIApp, state: ServiceState) -> None:
        self.app = app
        self.metrics = state.metrics
        self.max_in_flight = state.settings.max_in_flight
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        guarded = scope["path"] not in UNGUARDED_PATHS
        if guarded and self.in_flight >= self.max_in_flight:
            await self._refuse(scope, receive, send)
            self._observe(scope, 429, started)
            return
        status = await self._call(scope, receive, send, guarded)
        self._observe(scope, status, started)

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
        except Exception:
            logger.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            if not started_response:
                self.metrics.failures.labels(type=INTERNAL.type).inc()
                response = JSONResponse(error_body(INTERNAL.type, INTERNAL_MESSAGE), status_code=INTERNAL.status)
                await response(scope, receive, send)
            status = INTERNAL.status
        finally:
            self.in_flight -= guarded
            self.metrics.in_flight.dec(guarded)
        return status

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        exc = Overloaded(f"more than {self.max_in_flight} requests in flight; retry shortly")
        kind = error_kind(exc)
        self.metrics.failures.labels(type=kind.type).inc()
        response = JSONResponse(error_body(kind.type, str(exc)), status_code=kind.status, headers={"Retry-After": "1"})
        await response(scope, receive, send)

    def _observe(self, scope: Scope, status: int, started: float) -> None:
        route = scope.get("route")
        endpoint = getattr(route, "path", None) or "unmatched"
        dim = (scope.get("state") or {}).get("metric_dim") or NO_DIM
        self.metrics.observe_request(endpoint, dim, status, time.perf_counter() - started)
