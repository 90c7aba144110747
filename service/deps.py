"""FastAPI dependencies, as ``Annotated`` aliases the routes declare: the searcher, the state, the API key."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader

from service.engine import Searcher
from service.errors import NotReady, Unauthorized
from service.metrics import ServiceMetrics
from service.settings import ServiceSettings

API_KEY_HEADER = "X-API-Key"


@dataclass
class ServiceState:
    """What one app holds: its settings and metrics, and the searcher once the lifespan has built it."""

    settings: ServiceSettings
    metrics: ServiceMetrics
    searcher: Searcher | None = None
    load_error: str | None = None


def get_state(request: Request) -> ServiceState:
    return request.app.state.service


StateDep = Annotated[ServiceState, Depends(get_state)]


def get_searcher(state: StateDep) -> Searcher:
    """The loaded searcher; 503 while loading, after a failed load, or while shutting down."""
    if state.searcher is None:
        raise NotReady(state.load_error or "the index and model are still loading")
    return state.searcher


SearcherDep = Annotated[Searcher, Depends(get_searcher)]

_api_key_header = APIKeyHeader(
    name=API_KEY_HEADER, auto_error=False, description="required when the server runs with an API key"
)


def require_api_key(state: StateDep, key: Annotated[str | None, Security(_api_key_header)]) -> None:
    """Let the request through if no key is configured or the header carries it (compared in constant time)."""
    expected = state.settings.api_key
    if expected is None:
        return
    if key is None or not secrets.compare_digest(key.encode(), expected.get_secret_value().encode()):
        raise Unauthorized(f"missing or wrong {API_KEY_HEADER} header")


ApiKeyDep = Depends(require_api_key)
