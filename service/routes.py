"""The HTTP endpoints: each parses a request model, calls the searcher, returns a response model."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response

from core.data import Document
from service.deps import EmbedderDep, SearcherDep, StateDep, WriterDep
from service.errors import InvalidRequest, NotFound, WriteFailed
from service.metrics import CONTENT_TYPE
from service.schemas import (
    BUDGET_DESCRIPTION,
    DIM_DESCRIPTION,
    FILTER_DESCRIPTION,
    GROUP_BY_DESCRIPTION,
    K_DESCRIPTION,
    MIN_QUALITY_DESCRIPTION,
    RERANK_DESCRIPTION,
    CompactResponse,
    DeleteRequest,
    DimsResponse,
    DocumentIn,
    EmbeddingRequest,
    EmbeddingResponse,
    ErrorResponse,
    GroupBy,
    HealthResponse,
    ModelCard,
    ModelsResponse,
    PlanModel,
    PlansResponse,
    ReadyResponse,
    ReloadResponse,
    SearchRequest,
    SearchResponse,
    UpsertRequest,
    WriteResponse,
)
from service.settings import ServiceSettings

ERRORS = {
    400: {"model": ErrorResponse, "description": "malformed HTTP, or a request line or headers over the limit"},
    401: {"model": ErrorResponse, "description": "missing or wrong API key (X-API-Key or Authorization: Bearer)"},
    408: {"model": ErrorResponse, "description": "the request body did not arrive in time"},
    413: {"model": ErrorResponse, "description": "the request body is over the server's limit"},
    422: {"model": ErrorResponse, "description": "invalid request (unknown dim, k out of range, bad query ...)"},
    429: {"model": ErrorResponse, "description": "too many requests in flight; retry later"},
    500: {"model": ErrorResponse, "description": "internal error (the detail is in the server log only)"},
    503: {"model": ErrorResponse, "description": "not ready: the index is loading, or the encoder stopped"},
}

search_router = APIRouter(tags=["search"], responses=ERRORS)  # the app adds the key check
# What a server without an index (embeddings only) answers 404 no_index, and leaves out of its OpenAPI schema.
WRITE_PATHS = frozenset({"/documents", "/documents/{doc_id}", "/documents/delete", "/admin/compact"})
INDEX_PATHS = frozenset({"/search", "/dims", "/info", "/plans", "/admin/reload"}) | WRITE_PATHS
admin_router = APIRouter(tags=["admin"], responses=ERRORS)
ops_router = APIRouter(tags=["operations"])
documents_router = APIRouter(tags=["documents"], responses=ERRORS)


def label_dim(request: Request, dim: int | None) -> None:
    """Tell the request-metrics middleware which dim this request used (a bounded label)."""
    request.state.metric_dim = str(dim) if dim is not None else None


EXAMPLE_FILTER = '{"topic": "Gout"}'


def filter_from_query(text: str | None) -> dict[str, Any] | None:
    """``GET /search``'s ``filter``: a JSON object as text.

    Raises:
        InvalidRequest: If it is not a JSON object (422).
    """
    if text is None:
        return None
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"filter must be a JSON object, e.g. {EXAMPLE_FILTER}; not JSON: {exc.msg}") from None
    if not isinstance(parsed, dict):
        raise InvalidRequest(f"filter must be a JSON object, e.g. {EXAMPLE_FILTER}")
    return parsed


@search_router.get("/search", response_model=SearchResponse, summary="Search with one query")
async def search_get(
    request: Request,
    searcher: SearcherDep,
    q: Annotated[str, Query(description="the query text", examples=["how to lower blood sugar"])],
    dim: Annotated[int | None, Query(description=DIM_DESCRIPTION, examples=[256])] = None,
    k: Annotated[int, Query(description=K_DESCRIPTION, examples=[10])] = 10,
    rerank_dim: Annotated[int | None, Query(description=RERANK_DESCRIPTION, examples=[384])] = None,
    min_quality: Annotated[
        float | None, Query(gt=0, le=1, description=MIN_QUALITY_DESCRIPTION, examples=[0.98])
    ] = None,
    latency_budget_ms: Annotated[float | None, Query(gt=0, description=BUDGET_DESCRIPTION, examples=[20])] = None,
    group_by: Annotated[GroupBy | None, Query(description=GROUP_BY_DESCRIPTION, examples=["document"])] = None,
    filter: Annotated[  # noqa: A002 (the API's name for it)
        str | None, Query(description=f"as JSON text: {FILTER_DESCRIPTION}", examples=['{"topic": "Gout"}'])
    ] = None,
) -> SearchResponse:
    """The top `k` passages for `q`, by cosine similarity at dimension `dim` (or the plan a target chose)."""
    result = await searcher.search(
        [q],
        dim,
        k,
        rerank_dim,
        min_quality=min_quality,
        latency_budget_ms=latency_budget_ms,
        group_by=group_by,
        filter=filter_from_query(filter),
    )
    label_dim(request, result.dim)
    return SearchResponse.of(result, [q])


@search_router.post("/search", response_model=SearchResponse, summary="Search with one or several queries")
async def search_post(request: Request, searcher: SearcherDep, body: SearchRequest) -> SearchResponse:
    """`query` or a batch of `queries`, encoded together and searched at `dim`."""
    texts = body.texts()
    result = await searcher.search(
        texts,
        body.dim,
        body.k,
        body.rerank_dim,
        min_quality=body.min_quality,
        latency_budget_ms=body.latency_budget_ms,
        group_by=body.group_by,
        filter=body.filter,
    )
    label_dim(request, result.dim)
    return SearchResponse.of(result, texts)


@search_router.post("/v1/embeddings", response_model=EmbeddingResponse, summary="Embeddings (OpenAI-compatible)")
async def embeddings(request: Request, embedder: EmbedderDep, body: EmbeddingRequest) -> EmbeddingResponse:
    """Unit-length embeddings at a Matryoshka dimension (`dimensions`, default full), like OpenAI's API; texts,
    or (as vLLM takes them) token ids of the served model's tokenizer."""
    token_ids = body.token_ids()
    if token_ids is not None:
        result = await embedder.embed_tokens(token_ids, body.dimensions, body.input_type)
    else:
        result = await embedder.embed(body.texts(), body.dimensions, body.input_type)
    label_dim(request, result.dim)
    ranges = None
    if body.encoding_format == "int8":
        ranges = await asyncio.to_thread(embedder.int8_ranges, result.dim)
    return EmbeddingResponse.of(result, body.encoding_format, ranges)


@search_router.get("/v1/models", response_model=ModelsResponse, summary="Models (OpenAI-compatible)")
async def list_models(embedder: EmbedderDep) -> ModelsResponse:
    """The one served model, with the Matryoshka dims it answers at, as OpenAI's clients list models."""
    return ModelsResponse(data=[ModelCard.of(embedder.served)])


@search_router.get(
    "/v1/models/{model_id:path}",
    response_model=ModelCard,
    responses={404: {"model": ErrorResponse, "description": "no model of that name is served here"}},
    summary="One model (OpenAI-compatible)",
)
async def get_model(model_id: str, embedder: EmbedderDep) -> ModelCard:
    """The served model, if `model_id` names it (404 otherwise)."""
    card = ModelCard.of(embedder.served)
    if model_id != card.id:
        raise NotFound(f"model {model_id!r} is not served here; this server serves {card.id!r}")
    return card


@search_router.get("/dims", response_model=DimsResponse, summary="Dimensions served, their cost and quality")
@search_router.get("/info", response_model=DimsResponse, include_in_schema=False)
async def dims(searcher: SearcherDep) -> DimsResponse:
    """Every dim with its measured NDCG@10 (from the manifest), index type, size and vector count."""
    return DimsResponse.of(searcher.info())


@search_router.get("/plans", response_model=PlansResponse, summary="Plans: measured quality and live latency")
async def plans(searcher: SearcherDep) -> PlansResponse:
    """Every plan (dim, or two-stage dim → rerank_dim with its candidates) the targets choose from."""
    return PlansResponse(
        index_version=searcher.index_version,
        plans=[PlanModel.model_validate(plan, from_attributes=True) for plan in searcher.plans()],
    )


@admin_router.post(
    "/admin/reload",
    response_model=ReloadResponse,
    responses={409: {"model": ErrorResponse, "description": "the new version was refused; the old one serves on"}},
    summary="Serve the newest index version",
)
async def reload(searcher: SearcherDep) -> ReloadResponse:
    """Open the index root's `current` version and swap it in; searches in flight finish on the old one."""
    return ReloadResponse.of(await searcher.reload())


@ops_router.get("/healthz", response_model=HealthResponse, summary="Liveness")
async def healthz() -> HealthResponse:
    """200 while the process answers, loaded or not."""
    return HealthResponse()


@ops_router.get("/readyz", response_model=ReadyResponse, responses={503: {"model": ErrorResponse}}, summary="Readiness")
async def readyz(state: StateDep) -> ReadyResponse:
    """200 once the index and model (or, for embeddings only, the model) are loaded; 503 before, after a failed
    load, and while shutting down."""
    return ReadyResponse(index_version=await state.check_ready())


@ops_router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(state: StateDep) -> Response:
    """All `mrl_*` metrics of this process in the Prometheus text format."""
    return Response(state.metrics.exposition(), media_type=CONTENT_TYPE)


# --- documents: a writable server ------------------------------------------------------------

DELETE_IDS_PER_DOCUMENT = 16  # a delete by ids carries no text: it may name 16 times max_write_documents ids
WRITE_ERRORS = {
    403: {"model": ErrorResponse, "description": "writes are off, or the key may search but not write"},
    507: {"model": ErrorResponse, "description": "the write could not be logged (a full disk); nothing was applied"},
}


def check_documents(documents: list[DocumentIn], settings: ServiceSettings) -> list[Document]:
    """The request's documents as the index reads them; 422 beyond the server's limits or for a repeated id."""
    if len(documents) > settings.max_write_documents:
        raise InvalidRequest(f"{len(documents)} documents in one write; at most {settings.max_write_documents}")
    seen: set[str] = set()
    for number, document in enumerate(documents):
        if len(document.text) > settings.max_document_chars:
            raise InvalidRequest(
                f"documents[{number}] ({document.id!r}): {len(document.text)} characters of text; "
                f"at most {settings.max_document_chars}"
            )
        if not document.text.strip():
            raise InvalidRequest(f"documents[{number}] ({document.id!r}): the text is blank")
        if document.id in seen:
            raise InvalidRequest(f"documents[{number}]: the id {document.id!r} is given twice in this write")
        seen.add(document.id)
    return [Document(d.id, d.text, d.title, dict(d.metadata)) for d in documents]


@documents_router.post(
    "/documents", response_model=WriteResponse, responses=WRITE_ERRORS, summary="Add or replace documents"
)
async def upsert_documents(state: StateDep, writer: WriterDep, body: UpsertRequest) -> WriteResponse:
    """Chunk, encode and write `documents`; a known id replaces that document and all its passages. Answered once
    the write is in the write-ahead log on disk, and searchable on this server from then on."""
    documents = check_documents(body.documents, state.settings)
    return WriteResponse.of(await writer.upsert(documents))


@documents_router.delete(
    "/documents/{doc_id:path}", response_model=WriteResponse, responses=WRITE_ERRORS, summary="Delete a document"
)
async def delete_document(writer: WriterDep, doc_id: str) -> WriteResponse:
    """Delete one document and all its passages (an unknown id is reported in `not_found`)."""
    return WriteResponse.of(await writer.delete([doc_id]))


@documents_router.post(
    "/documents/delete", response_model=WriteResponse, responses=WRITE_ERRORS, summary="Delete documents"
)
async def delete_documents(state: StateDep, writer: WriterDep, body: DeleteRequest) -> WriteResponse:
    """Delete documents by `ids`, or every document whose metadata match `filter`."""
    if body.ids is not None:
        most = state.settings.max_write_documents * DELETE_IDS_PER_DOCUMENT
        if len(body.ids) > most:
            raise InvalidRequest(f"{len(body.ids)} ids in one delete; at most {most}")
        return WriteResponse.of(await writer.delete(list(dict.fromkeys(body.ids))))
    return WriteResponse.of(await writer.delete_where(body.filter or {}))


@documents_router.post(
    "/admin/compact", response_model=CompactResponse, responses=WRITE_ERRORS, summary="Compact the written documents"
)
async def compact(writer: WriterDep) -> CompactResponse:
    """Fold the write-ahead log into a new index version now (the server also does it on its own, past
    `compact_max_unmerged` passages or `compact_max_age_s`); writes and searches go on meanwhile."""
    before = writer.live.manifest.version
    version = await writer.compact(writer.on_compacted)
    if version is None:
        raise WriteFailed("the compaction failed (the server log says why); every write is still in the log")
    unmerged, _ = writer.live.unmerged()
    return CompactResponse(previous_version=before, version=version, unmerged_passages=unmerged)
