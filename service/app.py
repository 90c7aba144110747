"""``create_app(settings)``: the FastAPI app, its lifespan, error handlers and docs.

The lifespan builds the :class:`~service.engine.Searcher` (model + index), or without an
index the :class:`~service.embedder.Embedder` alone (embeddings only), and closes it on
shutdown, unless ``mrl serve`` has already opened it (:func:`open_searcher`) so that a
start-up failure ends in one line. Routes reach them through dependencies. Every
request passes the edge middleware first (API key, admission, body limits, metrics,
access log); every error leaves in the one body shape of :mod:`service.errors`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from core import __version__
from service.deps import ApiKeyDep, ServiceState
from service.docs import add_docs
from service.edge import EdgeMiddleware
from service.embedder import Embedder
from service.encoders import load_encoder
from service.engine import EncoderLoader, Searcher
from service.errors import (
    InvalidRequest,
    ServiceError,
    describe_validation_errors,
    error_body,
    error_kind,
)
from service.metrics import ServiceMetrics
from service.openapi import service_openapi
from service.routes import admin_router, documents_router, ops_router, search_router
from service.settings import ServiceSettings

logger = logging.getLogger(__name__)


def create_app(settings: ServiceSettings | None = None, *, encoder_loader: EncoderLoader = load_encoder) -> FastAPI:
    """Build the service for ``settings`` (default: from ``MRL_*`` environment variables).

    Args:
        settings: The service settings; ``None`` reads them from the environment (for ``uvicorn --factory``).
        encoder_loader: How the query encoder is loaded; tests pass a fake one.
    """
    settings = settings if settings is not None else ServiceSettings()
    state = ServiceState(settings, ServiceMetrics(), encoder_loader=encoder_loader)
    app = FastAPI(
        title="mrl-retrieval",
        version=__version__,
        description="Search a corpus at any Matryoshka dimension, and embed texts (OpenAI-compatible).",
        lifespan=_lifespan(state),
        docs_url=None,
        redoc_url=None,
        # operationIds are the route functions' names (search_get, embeddings, list_models), not FastAPI's
        # search_get_search_get: generated clients get readable method names.
        generate_unique_id_function=lambda route: route.name,
    )
    app.state.service = state
    app.add_middleware(EdgeMiddleware, state=state, routes=app.router.routes)
    _add_error_handlers(app, state)
    # The key is checked by the edge middleware; the dependency puts it in the schema, only when there is one.
    guarded = [ApiKeyDep] if settings.api_key is not None else []
    app.include_router(search_router, dependencies=guarded)
    app.include_router(admin_router, dependencies=guarded)
    app.include_router(documents_router, dependencies=guarded)
    app.include_router(ops_router)
    add_docs(app)
    app.openapi = lambda: service_openapi(app, state)  # type: ignore[method-assign]
    return app


async def open_searcher(app: FastAPI) -> None:
    """Load the model and index (or the model alone) of ``app`` now, before it serves; the lifespan then uses them.

    Raises:
        Whatever loading raises (IndexFolderError, ModelError, ConfigurationError, ...).
    """
    await _load(app.state.service, reraise=True)


# --- lifespan -----------------------------------------------------------------------------


def _lifespan(state: ServiceState):
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if state.embedder is not None:  # opened by open_searcher
            yield
        elif state.settings.load_in_background:
            loading = asyncio.create_task(_load(state, reraise=False))
            yield
            loading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loading
        else:
            await _load(state, reraise=True)
            yield
        await state.close()  # readyz says 503 from here on

    return lifespan


async def _load(state: ServiceState, *, reraise: bool) -> None:
    settings, loader = state.settings, state.encoder_loader or load_encoder
    try:
        if settings.serves_search:
            state.searcher = await Searcher.open(settings, state.metrics, loader)
            state.embedder = state.searcher.embedder
        else:
            state.embedder = await Embedder.open(settings, state.metrics, loader)
            dims = state.embedder.served.dims
            logger.info("serving %s for embeddings only (no index), dims %s", settings.model, dims)
    except Exception as exc:
        state.load_error = f"loading failed: {state.redact(str(exc))}"
        logger.error("cannot serve %s: %s", settings.index or settings.model, exc)
        if reraise:
            raise


# --- errors -------------------------------------------------------------------------------


def _add_error_handlers(app: FastAPI, state: ServiceState) -> None:
    def answer(status: int, error_type: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
        state.metrics.failures.labels(type=error_type).inc()
        return JSONResponse(error_body(error_type, state.redact(message)), status_code=status, headers=headers)

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        kind = error_kind(exc)
        return answer(kind.status, kind.type, str(exc))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return answer(422, "invalid_request", describe_validation_errors(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        cause = exc.__cause__
        if isinstance(cause, ServiceError):  # raised while the body was read: too large, too slow
            kind = error_kind(cause)
            return answer(kind.status, kind.type, str(cause))
        if exc.status_code == 400 and cause is not None:  # FastAPI could not parse the body
            return answer(422, "invalid_request", str(unparsable_body(cause)))
        error_type = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        headers = exc.headers
        if exc.status_code == 405:  # Starlette names only the first route of the path
            headers = {**(headers or {}), "Allow": ", ".join(allowed_methods(request))}
        return answer(exc.status_code, error_type, str(exc.detail), headers)


HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def allowed_methods(request: Request) -> list[str]:
    """Every method that some route of this path takes (asked of the routes, however they are nested)."""
    routes = request.app.router.routes
    return [
        method
        for method in HTTP_METHODS
        if any(route.matches({**request.scope, "method": method})[0] is Match.FULL for route in routes)
    ]


def unparsable_body(cause: BaseException) -> InvalidRequest:
    """The 422 for a body FastAPI could not decode (FastAPI itself answers a bare 400)."""
    if isinstance(cause, UnicodeDecodeError):
        return InvalidRequest("the request body is not valid JSON: it is not UTF-8")
    if isinstance(cause, RecursionError):
        return InvalidRequest("the request body is not valid JSON: it is nested too deeply")
    return InvalidRequest("the request body is not valid JSON")
