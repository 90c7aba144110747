"""``MrlClient`` and ``AsyncMrlClient``: one method per endpoint, the same arguments and results in both.

Requests are built by :class:`_Requests` (pure: path, method, body) and answers read by
:func:`_read`, so the two clients differ only in how they send.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from mrl_client.models import (
    CompactResponse,
    DimsResponse,
    HealthResponse,
    ModelCard,
    ModelsResponse,
    PlansResponse,
    ReloadResponse,
    SearchResponse,
    WriteResponse,
)

DEFAULT_TIMEOUT_S = 30.0


class MrlAPIError(Exception):
    """An error answer of the server: its HTTP status and the error body's ``type`` and ``message``."""

    def __init__(self, status: int, error_type: str, message: str) -> None:
        super().__init__(f"{status} {error_type}: {message}")
        self.status, self.type, self.message = status, error_type, message


@dataclass(frozen=True)
class _Call:
    method: str
    path: str
    body: dict[str, Any] | None = None


def _search_call(
    query: str | Sequence[str],
    dim: int | None,
    k: int,
    rerank_dim: int | None,
    min_quality: float | None,
    latency_budget_ms: float | None,
    group_by: str | None = None,
    filter: dict[str, Any] | None = None,  # noqa: A002 (the API's name for it)
) -> _Call:
    body: dict[str, Any] = {"query": query} if isinstance(query, str) else {"queries": list(query)}
    options = dict(dim=dim, k=k, rerank_dim=rerank_dim, min_quality=min_quality, latency_budget_ms=latency_budget_ms)
    options.update(group_by=group_by, filter=filter)
    body.update({key: value for key, value in options.items() if value is not None})
    return _Call("POST", "/search", body=body)


# What the embeddings endpoint takes: a text, texts, or token ids of the served model's tokenizer (one text's
# ids, or a list of them), as vLLM takes them.
EmbeddingInput = str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]]


def _upsert_call(documents: Sequence[Mapping[str, Any]]) -> _Call:
    return _Call("POST", "/documents", body={"documents": [dict(document) for document in documents]})


def _delete_call(ids: Sequence[str] | None, filter: Mapping[str, Any] | None) -> _Call:  # noqa: A002
    if (ids is None) == (filter is None):
        raise ValueError("give ids or filter, not both")
    return _Call("POST", "/documents/delete", body={"ids": list(ids)} if ids is not None else {"filter": dict(filter)})


def _delete_document_call(doc_id: str) -> _Call:
    return _Call("DELETE", f"/documents/{_path_part(doc_id)}")


# What a path may hold as it is (RFC 3986's unreserved characters, and "/"); the rest is percent-encoded. The
# same as urllib.parse.quote(name, safe="/"), written here so the package imports no more of the standard library.
_PATH_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~/")


def _path_part(name: str) -> str:
    """``name`` as the last part of a path; its slashes kept (a model's hub name, a file's path as document id)."""
    return "".join(c if c in _PATH_SAFE else "".join(f"%{byte:02X}" for byte in c.encode()) for c in name)


def _embed_input(texts: EmbeddingInput) -> str | list[Any]:
    if isinstance(texts, str):
        return texts
    return [item if isinstance(item, (str, int)) else list(item) for item in texts]


QUANTISED = ("int8", "ubinary")


def _embed_call(texts: EmbeddingInput, dimensions: int | None, input_type: str, encoding: str = "float") -> _Call:
    if encoding not in ("float", *QUANTISED):
        raise ValueError(f"encoding_format {encoding!r}: use float, int8 or ubinary")
    body: dict[str, Any] = {
        "input": _embed_input(texts),
        "encoding_format": "base64" if encoding == "float" else encoding,
    }
    body["input_type"] = input_type
    if dimensions is not None:
        body["dimensions"] = dimensions
    return _Call("POST", "/v1/embeddings", body=body)


def _vectors(answer: dict[str, Any]) -> list[list[float]] | list[list[int]]:
    """The embeddings of an answer in request order, from base64 little-endian float32 (or as sent: int8 codes,
    packed bits)."""
    vectors = []
    for item in sorted(answer["data"], key=lambda item: item["index"]):
        if isinstance(item["embedding"], list):
            vectors.append(item["embedding"])
            continue
        raw = base64.b64decode(item["embedding"])
        vectors.append(list(struct.unpack(f"<{len(raw) // 4}f", raw)))
    return vectors


def _read(response: httpx.Response) -> Any:
    """The JSON of a success; an error answer raises :class:`MrlAPIError` with its body."""
    if response.is_success:
        return response.json()
    try:
        error = response.json()["error"]
        raise MrlAPIError(response.status_code, error["type"], error["message"])
    except (ValueError, KeyError, TypeError):
        raise MrlAPIError(response.status_code, "http_error", response.text[:500]) from None


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


class MrlClient:
    """A blocking client. Use it as a context manager, or call :meth:`close`.

    Args:
        base_url: The server, e.g. ``http://127.0.0.1:8000``.
        api_key: The server's API key, if it has one (sent as ``Authorization: Bearer``).
        timeout: Seconds per request.
    """

    def __init__(self, base_url: str, *, api_key: str | None = None, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self._http = httpx.Client(base_url=base_url, headers=_headers(api_key), timeout=timeout)

    def _send(self, call: _Call) -> Any:
        return _read(self._http.request(call.method, call.path, json=call.body))

    def search(
        self,
        query: str | Sequence[str],
        *,
        dim: int | None = None,
        k: int = 10,
        rerank_dim: int | None = None,
        min_quality: float | None = None,
        latency_budget_ms: float | None = None,
        group_by: str | None = None,
        filter: dict[str, Any] | None = None,  # noqa: A002
    ) -> SearchResponse:
        """The top ``k`` passages for one query (a string) or several (a list), at ``dim`` or by a target.

        ``group_by="document"``: the best passage of each of ``k`` distinct documents. ``filter``: only passages
        whose document metadata match, e.g. ``{"topic": "Gout"}`` or ``{"year": {"$gte": 2020}}``.
        """
        call = _search_call(query, dim, k, rerank_dim, min_quality, latency_budget_ms, group_by, filter)
        return SearchResponse.model_validate(self._send(call))

    def embed(
        self,
        texts: EmbeddingInput,
        *,
        dimensions: int | None = None,
        input_type: str = "document",
        encoding_format: str = "float",
    ) -> list[list[float]] | list[list[int]]:
        """Unit-length embeddings at ``dimensions`` (default: the full dim), one per text.

        ``texts``: a text, a list of texts, or texts as token ids of the served model's tokenizer: one list of
        ids (one text) or a list of such lists. ``encoding_format``: ``float``, or ``int8`` (codes -128..127,
        each coordinate mapped from its range over the served corpus) or ``ubinary`` (sign bits packed eight
        to an integer 0..255).
        """
        return _vectors(self._send(_embed_call(texts, dimensions, input_type, encoding_format)))

    def upsert(self, documents: Sequence[Mapping[str, Any]]) -> WriteResponse:
        """Add or replace documents (``{"id", "text", "title"?, "metadata"?}``) on a writable server; durable and
        searchable there once this returns. Needs the write key when the server uses keys."""
        return WriteResponse.model_validate(self._send(_upsert_call(documents)))

    def delete(self, ids: Sequence[str] | None = None, *, filter: Mapping[str, Any] | None = None) -> WriteResponse:  # noqa: A002
        """Delete documents by id, or every document whose metadata match ``filter``."""
        return WriteResponse.model_validate(self._send(_delete_call(ids, filter)))

    def delete_document(self, doc_id: str) -> WriteResponse:
        """Delete one document and all its passages (``DELETE /documents/{doc_id}``); an unknown id comes back in
        ``not_found``."""
        return WriteResponse.model_validate(self._send(_delete_document_call(doc_id)))

    def compact(self) -> CompactResponse:
        """Fold the server's written documents into a new index version now."""
        return CompactResponse.model_validate(self._send(_Call("POST", "/admin/compact")))

    def dims(self) -> DimsResponse:
        return DimsResponse.model_validate(self._send(_Call("GET", "/dims")))

    def plans(self) -> PlansResponse:
        return PlansResponse.model_validate(self._send(_Call("GET", "/plans")))

    def models(self) -> ModelsResponse:
        return ModelsResponse.model_validate(self._send(_Call("GET", "/v1/models")))

    def model(self, model_id: str) -> ModelCard:
        """The served model's card if ``model_id`` names it (``GET /v1/models/{id}``); any other name raises a 404
        :class:`MrlAPIError`."""
        return ModelCard.model_validate(self._send(_Call("GET", f"/v1/models/{_path_part(model_id)}")))

    def reload(self) -> ReloadResponse:
        return ReloadResponse.model_validate(self._send(_Call("POST", "/admin/reload")))

    def health(self) -> HealthResponse:
        """Liveness (``/healthz``): answers while the process runs, loaded or not."""
        return HealthResponse.model_validate(self._send(_Call("GET", "/healthz")))

    def ready(self) -> bool:
        """Whether the server has its index and model loaded (``/readyz`` answers 200)."""
        return self._http.get("/readyz").status_code == 200

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> MrlClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncMrlClient:
    """The same as :class:`MrlClient`, for asyncio: every method is awaited."""

    def __init__(self, base_url: str, *, api_key: str | None = None, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self._http = httpx.AsyncClient(base_url=base_url, headers=_headers(api_key), timeout=timeout)

    async def _send(self, call: _Call) -> Any:
        return _read(await self._http.request(call.method, call.path, json=call.body))

    async def search(
        self,
        query: str | Sequence[str],
        *,
        dim: int | None = None,
        k: int = 10,
        rerank_dim: int | None = None,
        min_quality: float | None = None,
        latency_budget_ms: float | None = None,
        group_by: str | None = None,
        filter: dict[str, Any] | None = None,  # noqa: A002
    ) -> SearchResponse:
        call = _search_call(query, dim, k, rerank_dim, min_quality, latency_budget_ms, group_by, filter)
        return SearchResponse.model_validate(await self._send(call))

    async def embed(
        self,
        texts: EmbeddingInput,
        *,
        dimensions: int | None = None,
        input_type: str = "document",
        encoding_format: str = "float",
    ) -> list[list[float]] | list[list[int]]:
        return _vectors(await self._send(_embed_call(texts, dimensions, input_type, encoding_format)))

    async def upsert(self, documents: Sequence[Mapping[str, Any]]) -> WriteResponse:
        return WriteResponse.model_validate(await self._send(_upsert_call(documents)))

    async def delete(
        self,
        ids: Sequence[str] | None = None,
        *,
        filter: Mapping[str, Any] | None = None,  # noqa: A002
    ) -> WriteResponse:
        return WriteResponse.model_validate(await self._send(_delete_call(ids, filter)))

    async def delete_document(self, doc_id: str) -> WriteResponse:
        return WriteResponse.model_validate(await self._send(_delete_document_call(doc_id)))

    async def compact(self) -> CompactResponse:
        return CompactResponse.model_validate(await self._send(_Call("POST", "/admin/compact")))

    async def dims(self) -> DimsResponse:
        return DimsResponse.model_validate(await self._send(_Call("GET", "/dims")))

    async def plans(self) -> PlansResponse:
        return PlansResponse.model_validate(await self._send(_Call("GET", "/plans")))

    async def models(self) -> ModelsResponse:
        return ModelsResponse.model_validate(await self._send(_Call("GET", "/v1/models")))

    async def model(self, model_id: str) -> ModelCard:
        return ModelCard.model_validate(await self._send(_Call("GET", f"/v1/models/{_path_part(model_id)}")))

    async def reload(self) -> ReloadResponse:
        return ReloadResponse.model_validate(await self._send(_Call("POST", "/admin/reload")))

    async def health(self) -> HealthResponse:
        return HealthResponse.model_validate(await self._send(_Call("GET", "/healthz")))

    async def ready(self) -> bool:
        return (await self._http.get("/readyz")).status_code == 200

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncMrlClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
