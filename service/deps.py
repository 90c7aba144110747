"""FastAPI dependencies, as ``Annotated`` aliases the routes declare: the searcher, the state, the API key check."""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr

from service.embedder import Embedder
from service.engine import EncoderLoader, Searcher
from service.errors import Forbidden, NoIndex, NotReady, Unauthorized
from service.metrics import ServiceMetrics
from service.settings import ServiceSettings
from service.writes import DocumentWriter

API_KEY_HEADER = "X-API-Key"
UNAUTHORIZED_MESSAGE = "missing or wrong API key: send it as X-API-Key or as Authorization: Bearer <key>"


# No paths in it: the redaction of server paths in error messages would shorten them.
NO_INDEX = (
    "no index is served here: this server serves embeddings only (it was started with --model and no --index); "
    "to search, serve an index: mrl serve --index LOCATOR"
)


@dataclass
class ServiceState:
    """What one app holds: its settings and metrics, and once the lifespan has loaded them, the embedder (the
    model) and the searcher (the index; none when the app serves embeddings only)."""

    settings: ServiceSettings
    metrics: ServiceMetrics
    encoder_loader: EncoderLoader | None = None
    searcher: Searcher | None = None
    embedder: Embedder | None = None
    load_error: str | None = None

    @property
    def loading_message(self) -> str:
        what = "the index and model are" if self.settings.serves_search else "the model is"
        return self.load_error or f"{what} still loading"

    def redact(self, message: str) -> str:
        """``message`` as a client may see it: paths relative to the index root, other paths by their name."""
        root = self.settings.locator().path if self.settings.serves_search else None
        return redact_paths(message, root)

    async def check_ready(self) -> str | None:
        """The served index version (None: embeddings only) if requests can be answered.

        Raises:
            NotReady: Still loading, a failed load, shutting down, or a stopped encoder or index engine.
        """
        if self.embedder is None:
            raise NotReady(self.loading_message)
        if self.searcher is None:
            self.embedder.check_ready()
            return None
        await self.searcher.check_ready()
        return self.searcher.index_version

    async def close(self) -> None:
        """Stop serving: from here on requests get 503; the model and the index are released."""
        searcher, embedder, self.searcher, self.embedder = self.searcher, self.embedder, None, None
        if searcher is not None:
            await searcher.close()  # its embedder too
        elif embedder is not None:
            await embedder.close()


# An absolute path of two or more parts (not a URL's //host): clients see only its last part.
_ABSOLUTE_PATH = re.compile(r"(?<![\w:/.~])/(?:[^\s'\"/:,;()]+/)+([^\s'\"/:,;()]+)")


def redact_paths(message: str, root: Path | None) -> str:
    """Replace the index root's absolute path in ``message`` by nothing, any other absolute path by its name."""
    prefixes = {str(root.resolve()), str(root.absolute()), str(root)} if root is not None else set()
    for prefix in sorted(prefixes, key=len, reverse=True):
        if prefix not in ("", ".", "/"):
            message = message.replace(prefix + "/", "").replace(prefix, "the index root")
    return _ABSOLUTE_PATH.sub(r"\1", message)


# The dependencies are coroutines although they do no I/O: FastAPI runs a plain function in its thread
# pool, one thread round trip per dependency per request (17.6% of the event loop's busy time, by py-spy,
# in a one-request-at-a-time /search profile).


async def get_state(request: Request) -> ServiceState:
    return request.app.state.service


StateDep = Annotated[ServiceState, Depends(get_state)]


async def get_searcher(state: StateDep) -> Searcher:
    """The loaded searcher; 503 while loading, after a failed load, or while shutting down; 404 without an index."""
    if not state.settings.serves_search:
        raise NoIndex(NO_INDEX)
    if state.searcher is None:
        raise NotReady(state.loading_message)
    return state.searcher


SearcherDep = Annotated[Searcher, Depends(get_searcher)]

NOT_WRITABLE = "this server takes no writes: start it with --writable (MRL_WRITABLE=true) over a folder index"
READ_KEY_ONLY = "this key may search, not write: writes need the write key (MRL_WRITE_KEY)"


async def get_writer(request: Request, state: StateDep) -> DocumentWriter:
    """The write path; 403 when writes are off or the request carries the read key only, 401 without a key."""
    settings = state.settings
    if not settings.serves_search:
        raise NoIndex(NO_INDEX)
    if not settings.writable:
        raise Forbidden(NOT_WRITABLE)
    if settings.write_key is not None:
        headers = {name.lower(): value for name, value in request.headers.items()}
        if not key_is_valid(settings.write_key, headers):
            if settings.api_key is not None and key_is_valid(settings.api_key, headers):
                raise Forbidden(READ_KEY_ONLY)
            raise Unauthorized(UNAUTHORIZED_MESSAGE)
    if state.searcher is None or state.searcher.writer is None:
        raise NotReady(state.loading_message)
    return state.searcher.writer


WriterDep = Annotated[DocumentWriter, Depends(get_writer)]


async def get_embedder(state: StateDep) -> Embedder:
    """The loaded model (with an index or without); 503 while loading, after a failed load, or while shutting down."""
    if state.embedder is None:
        raise NotReady(state.loading_message)
    return state.embedder


EmbedderDep = Annotated[Embedder, Depends(get_embedder)]

_api_key_header = APIKeyHeader(name=API_KEY_HEADER, auto_error=False, description="the server's API key")
_bearer = HTTPBearer(auto_error=False, description="the server's API key, as OpenAI's clients send it")


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key a request carries: ``X-API-Key``, else an ``Authorization: Bearer`` token (lower-case names)."""
    key = headers.get(API_KEY_HEADER.lower())
    if key is not None:
        return key
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def key_is_valid(expected: SecretStr | None, headers: Mapping[str, str]) -> bool:
    """True if no key is configured or the request carries it (compared in constant time)."""
    if expected is None:
        return True
    key = presented_key(headers)
    return key is not None and secrets.compare_digest(key.encode(), expected.get_secret_value().encode())


def any_key_is_valid(settings: ServiceSettings, headers: Mapping[str, str]) -> bool:
    """True if the request carries the read key (``api_key``) or the write key, which may search too."""
    if key_is_valid(settings.api_key, headers):
        return True
    return settings.write_key is not None and key_is_valid(settings.write_key, headers)


async def require_api_key(
    request: Request,
    state: StateDep,
    _key: Annotated[str | None, Security(_api_key_header)],
    _bearer_token: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
) -> None:
    """The key check again, as a dependency, so that the OpenAPI schema declares both schemes.

    The edge middleware has already refused a request without the key, before its body was read;
    the app adds this dependency only when a key is configured.
    """
    headers = {name.lower(): value for name, value in request.headers.items()}
    if not any_key_is_valid(state.settings, headers):
        raise Unauthorized(UNAUTHORIZED_MESSAGE)


ApiKeyDep = Depends(require_api_key)
