"""Request and response models of the HTTP API (pydantic); the OpenAPI docs are generated from them."""

from __future__ import annotations

import base64
from datetime import datetime, timezone
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from core.quantization import QUANTISED, quantize
from service.results import EmbeddingResult, IndexInfo, ReloadOutcome, SearchResult, ServedModel

DIM_DESCRIPTION = "Matryoshka dimension to search at; one of those listed by GET /dims (default: the largest)"
RERANK_DESCRIPTION = (
    "two-stage search: shortlist k x rerank_candidates (10) documents at `dim` (default then: the smallest), "
    "then re-score them exactly at this larger dimension"
)
K_DESCRIPTION = "number of hits per query (1 to the server's max_k, 100 by default)"
MIN_QUALITY_DESCRIPTION = (
    "instead of dim: the least quality wanted, 0 to 1; the service answers with the fastest plan measured to reach "
    "it. What a plan's figure means depends on the index's quality_kind (GET /plans): judged, NDCG@10 on judged "
    "queries as a fraction of the full dim's (0.98 = 98%); agreement (an index built without judged queries), "
    "agreement@10 with the full dim's exact ranking on pseudo-queries drawn from the corpus (0.98: nearly the "
    "same top 10 in the same order); training report, the model's NDCG@10 ratio measured on another dataset"
)
QUALITY_KIND_DESCRIPTION = (
    "where the quality figures come from: judged (NDCG@10 on judged queries, on this index), agreement (label-free: "
    "agreement@10 with the full dim on pseudo-queries from this corpus), training report (the model's NDCG@10 on "
    "its own evaluation data, not this index), not measured"
)
GROUP_BY_DESCRIPTION = (
    "`document`: the best passage of each of k distinct documents (a long document is indexed as several "
    "passages; without it, several hits may be passages of one document)"
)
GroupBy = Literal["document"]
FILTER_DESCRIPTION = (
    'only passages whose document metadata match, selected before the scan: {"topic": "Gout"} (equals), '
    '{"year": {"$gte": 2020}}, operators $eq $ne $in $nin $gt $gte $lt $lte (ranges on numbers), '
    '{"$and": [...]} / {"$or": [...]} (several keys: all of them); a field a document lacks matches only '
    "$ne and $nin; the fields are those of GET /dims (metadata_fields)"
)
_SCALAR = {"anyOf": [{"type": "string"}, {"type": "number"}, {"type": "boolean"}]}
_OPERATORS = {
    "type": "object",
    "properties": {
        **{op: _SCALAR for op in ("$eq", "$ne")},
        **{op: {"type": "number"} for op in ("$gt", "$gte", "$lt", "$lte")},
        **{op: {"type": "array", "items": _SCALAR, "minItems": 1, "maxItems": 1000} for op in ("$in", "$nin")},
    },
    "additionalProperties": False,
}
FILTER_SCHEMA = {
    "type": "object",
    "description": FILTER_DESCRIPTION,
    "properties": {op: {"type": "array", "items": {"type": "object"}, "minItems": 1} for op in ("$and", "$or")},
    "additionalProperties": {"anyOf": [_SCALAR, _OPERATORS]},
    "examples": [{"topic": "Gout"}, {"$or": [{"topic": {"$in": ["Gout", "Asthma"]}}, {"year": {"$gte": 2020}}]}],
}
BUDGET_DESCRIPTION = (
    "instead of dim: the whole request's time budget in ms; the service answers with the best-measured plan whose "
    "live p95 fits it, or with the fastest plan (and says so) when none does"
)


# --- errors -------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    type: str = Field(description="machine-readable error type", examples=["unknown_dimension"])
    message: str = Field(
        description="what went wrong and what is allowed",
        examples=["dim 100 is not served; allowed: 384, 256, 128, 64, 32"],
    )


class ErrorResponse(BaseModel):
    """The one error body of every endpoint."""

    error: ErrorDetail


# --- search -------------------------------------------------------------------------------


class SearchRequest(BaseModel):
    """One query (``query``) or several answered in one batch (``queries``)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"query": "how to lower blood sugar", "dim": 256, "k": 5}],
            "oneOf": [{"required": ["query"]}, {"required": ["queries"]}],
        },
    )

    query: str | None = Field(None, description="the query text (give this or `queries`)")
    queries: list[str] | None = Field(None, description="several query texts answered in one batch")
    dim: int | None = Field(None, description=DIM_DESCRIPTION, examples=[256])
    k: int = Field(10, description=K_DESCRIPTION, examples=[10])
    rerank_dim: int | None = Field(None, description=RERANK_DESCRIPTION, examples=[384])
    min_quality: float | None = Field(None, gt=0, le=1, description=MIN_QUALITY_DESCRIPTION, examples=[0.98])
    latency_budget_ms: float | None = Field(None, gt=0, description=BUDGET_DESCRIPTION, examples=[20])
    group_by: GroupBy | None = Field(None, description=GROUP_BY_DESCRIPTION, examples=["document"])
    filter: dict[str, Any] | None = Field(None, description=FILTER_DESCRIPTION, json_schema_extra=FILTER_SCHEMA)

    @model_validator(mode="after")
    def _one_of_query_or_queries(self) -> SearchRequest:
        given = {"query", "queries"} & self.model_fields_set
        if len(given) != 1 or (self.query is None and self.queries is None):
            raise ValueError("give exactly one of 'query' (a string) or 'queries' (a list of strings)")
        return self

    def texts(self) -> list[str]:
        return [self.query] if self.query is not None else list(self.queries or [])


class HitModel(BaseModel):
    id: str = Field(description="the passage's id: its document's id, or DOCUMENT#N for passage N of a split document")
    score: float = Field(description="cosine similarity at the dimension that ranked it (rerank_dim if given)")
    title: str = Field(description="the document's title")
    text: str = Field(description="the passage, cut to the server's snippet length")
    metadata: dict[str, Any] = Field(default_factory=dict, description="the document's metadata")
    doc_id: str = Field(description="the id of the document the passage comes from")
    start: int = Field(description="where the passage starts in its document's text (a character offset)")
    end: int = Field(description="where it ends (exclusive): the passage is the document's text[start:end]")


class QueryHits(BaseModel):
    query: str
    hits: list[HitModel]


class TimingsModel(BaseModel):
    encode_ms: float = Field(description="query encoding, including the wait for a micro-batch")
    search_ms: float = Field(description="index search (the shortlist, in two-stage search)")
    rerank_ms: float = Field(description="exact re-scoring (0 without rerank_dim)")
    total_ms: float


class PlanUsedModel(BaseModel):
    key: str = Field(description="the plan's name: 64, or 64>384x10 (shortlist 10 x k at 64, re-scored at 384)")
    dim: int
    rerank_dim: int | None
    candidates: int | None = Field(description="two-stage: the shortlist holds k times this many documents")
    expected_ndcg_at_10: float | None = Field(description="measured for this plan (null if not measured)")
    expected_ratio: float | None = Field(
        description="the figure min_quality is compared with: NDCG@10 as a fraction of the full dim's, or agreement@10 "
        "(quality_kind says which)"
    )
    quality_kind: str = Field(description=QUALITY_KIND_DESCRIPTION)
    quality_source: str = Field(description="the same in words: which queries, which dataset")
    reason: str = Field(description="why this plan answered")
    targets_missed: list[str] = Field(description="targets no plan could meet: quality, latency")
    p50_ms: float | None = Field(None, description="the plan's expected whole-request p50")
    p95_ms: float | None = Field(None, description="and p95")
    latency_samples: int = Field(0, description="recent requests of this plan behind those figures")
    latency_source: str | None = Field(
        None, description="live (recent requests), or estimate (build-time search + live encoding)"
    )


class SearchResponse(BaseModel):
    dim: int = Field(description="the dimension searched")
    rerank_dim: int | None = Field(description="the re-scoring dimension, if two-stage")
    k: int
    index_version: str
    results: list[QueryHits] = Field(description="one entry per query, in request order")
    timings_ms: TimingsModel
    plan: PlanUsedModel | None = Field(None, description="the plan that answered, its expected quality, and why")

    @classmethod
    def of(cls, result: SearchResult, queries: list[str]) -> SearchResponse:
        return cls(
            dim=result.dim,
            rerank_dim=result.rerank_dim,
            k=result.k,
            index_version=result.index_version,
            results=[
                QueryHits(query=query, hits=[HitModel.model_validate(hit, from_attributes=True) for hit in hits])
                for query, hits in zip(queries, result.hits, strict=True)
            ],
            timings_ms=TimingsModel.model_validate(result.timings, from_attributes=True),
            plan=PlanUsedModel.model_validate(result.plan, from_attributes=True) if result.plan else None,
        )


# --- embeddings (OpenAI-compatible) ---------------------------------------------------------

INPUT_SHAPES = (
    "give a text, a list of texts, a list of token ids (integers of the served model's vocabulary) "
    "or a list of lists of token ids"
)


class EmbeddingRequest(BaseModel):
    """OpenAI's embeddings request; ``dimensions`` must be one of the Matryoshka dims."""

    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={"examples": [{"input": ["fever in children", "knee pain"], "dimensions": 128}]},
    )

    input: str | list[str] | list[int] | list[list[int]] = Field(
        description="a text, a list of texts, or (as vLLM takes them) one text or several as token ids of the served "
        "model's own tokenizer: a list of ids, or a list of lists of ids; each id array holds at most as many ids "
        "as a text may hold characters"
    )
    model: str | None = Field(None, description="accepted for compatibility; the served model answers")
    dimensions: int | None = Field(
        None, description="Matryoshka dimension (see GET /dims); truncated, then re-normalised", examples=[256]
    )
    encoding_format: Literal["float", "base64", "int8", "ubinary"] = Field(
        "float",
        description="`base64`: little-endian float32 bytes, as OpenAI's clients request by default; `int8`: each "
        "coordinate of the vector at `dimensions` mapped from its range over the served index's corpus onto -128 to "
        "127 (needs an index); `ubinary`: one sign bit per coordinate, packed eight to a byte (ceil(`dimensions` / 8) "
        "integers 0 to 255, unused bits of the last 0; compare with the Hamming distance)",
    )
    input_type: Literal["query", "document"] = Field(
        "document", description="extension: encode with the model's query or document prompt"
    )
    user: str | None = Field(None, description="accepted for compatibility; ignored")

    @field_validator("input", mode="before")
    @classmethod
    def _texts_or_token_ids(cls, value: Any) -> Any:
        if isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise ValueError(INPUT_SHAPES)
        if not value:
            raise ValueError(f"an empty list; {INPUT_SHAPES}")
        kinds = [_input_kind(item) for item in value]
        if None in kinds:
            number = kinds.index(None)
            raise ValueError(f"input[{number}] is {value[number]!r}; {INPUT_SHAPES}")
        if len(set(kinds)) > 1:
            raise ValueError(f"a list that mixes {' and '.join(sorted(set(kinds)))}; {INPUT_SHAPES}")
        if kinds[0] == "token ids":
            return [int(item) for item in value]
        if kinds[0] == "lists":
            for number, ids in enumerate(value):
                wrong = [item for item in ids if not _is_token_id(item)]
                if wrong:
                    raise ValueError(f"input[{number}] holds {wrong[0]!r}, not a token id (an integer); {INPUT_SHAPES}")
            return [[int(item) for item in ids] for ids in value]
        return value

    def texts(self) -> list[str]:
        """The texts of a request that sent texts (empty for one that sent token ids)."""
        if isinstance(self.input, str):
            return [self.input]
        return [item for item in self.input if isinstance(item, str)]

    def token_ids(self) -> list[int] | list[list[int]] | None:
        """The token ids of a request that sent them: one array (``[ids]``) or several; None for texts."""
        if isinstance(self.input, str) or not self.input or isinstance(self.input[0], str):
            return None
        return self.input  # type: ignore[return-value]


def _is_token_id(value: Any) -> bool:
    """An integer; as JSON Schema's ``integer`` (and pydantic) say, 2.0 is one too."""
    if isinstance(value, float):
        return value.is_integer()
    return isinstance(value, int) and not isinstance(value, bool)


def _input_kind(item: Any) -> str | None:
    """What one item of a list ``input`` is: ``texts``, ``token ids`` or ``lists`` (of token ids); None: none."""
    if isinstance(item, str):
        return "texts"
    if _is_token_id(item):
        return "token ids"
    return "lists" if isinstance(item, list) else None


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | list[int] | str = Field(
        description="unit-length vector, its base64 float32 bytes, or its int8 / packed-bit quantisation"
    )


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: Usage

    @classmethod
    def of(cls, result: EmbeddingResult, encoding: str, ranges: np.ndarray | None = None) -> EmbeddingResponse:
        vectors = result.vectors
        if encoding in QUANTISED:
            vectors = quantize(vectors, encoding, ranges)
        data = [EmbeddingData(index=i, embedding=_encode_vector(row, encoding)) for i, row in enumerate(vectors)]
        return cls(data=data, model=result.model, usage=Usage(prompt_tokens=result.tokens, total_tokens=result.tokens))


def _encode_vector(row: np.ndarray, encoding: str) -> list[float] | list[int] | str:
    if encoding in QUANTISED:
        return row.astype(int).tolist()
    if encoding == "base64":
        return base64.b64encode(np.asarray(row, dtype="<f4").tobytes()).decode("ascii")
    return row.astype(float).tolist()


# --- info, health, admin ------------------------------------------------------------------


class DimModel(BaseModel):
    dim: int
    ndcg_at_10: float | None = Field(
        description="NDCG@10 of the model at this dim from its training report, on its own evaluation data "
        "(ndcg_source; null if none)"
    )
    index_type: str = Field(description="FAISS factory string", examples=["Flat"])
    bytes: int = Field(description="size of this dim's index file")
    vectors: int
    recall_at_10: float | None = Field(description="recall@10 against exact search (null for an exact index)")
    search_ms: float | None = Field(description="one query, k=10, measured at build time")
    measured_ndcg_at_10: float | None = Field(
        None, description="NDCG@10 of this dim's plan on the index's judged queries, with the served query encoder"
    )
    ndcg_source: str | None = Field(None, description="where ndcg_at_10 comes from: the model's training report")
    agreement_at_10: float | None = Field(
        None, description="this dim's agreement@10 with the full dim on pseudo-queries from the corpus"
    )


class DimsResponse(BaseModel):
    model: str
    index: str = Field(
        description="the index's locator, as `mrl index info` shows it: a folder, milvus://HOST:PORT/NAME or "
        "milvus-lite://PATH/FILE.db/NAME (a password in an old-style Milvus URI shows as ***)"
    )
    index_version: str
    encoder: str = Field(description="torch or onnx")
    full_dim: int
    default_dim: int
    num_vectors: int
    built_at: str
    dims: list[DimModel]
    encoder_quality_loss: float | None = Field(
        None, description="largest NDCG@10 loss of the served query encoder against the build's, at any dim"
    )
    encoder_warning: str | None = Field(None, description="set when that loss is over 0.5%")
    quality_kind: str = Field("not measured", description=QUALITY_KIND_DESCRIPTION)
    quality_source: str = Field("not measured", description="the plans' quality source in words")
    metadata_fields: dict[str, str] = Field(
        default_factory=dict,
        description="the document metadata a filter may name, with its type (string, number, bool; list, object "
        "and mixed fields cannot be filtered)",
    )
    passages: dict[str, Any] | None = Field(
        None, description="how documents became passages: size, overlap, documents, passages, split, over_window"
    )
    writes: dict[str, Any] | None = Field(
        None,
        description="a writable server's live corpus: documents, passages, unmerged_passages, tombstones, "
        "wal_bytes, last_seq (null when the server takes no writes)",
    )

    @classmethod
    def of(cls, info: IndexInfo) -> DimsResponse:
        return cls.model_validate(info, from_attributes=True)


class PlanModel(BaseModel):
    key: str
    dim: int
    rerank_dim: int | None
    candidates: int | None
    ndcg_at_10: float | None
    recall_at_10: float | None
    ratio: float | None = Field(
        description="the figure min_quality is compared with: NDCG@10 as a fraction of the full dim's (judged, "
        "training report), or agreement@10 (agreement)"
    )
    quality_kind: str = Field(description=QUALITY_KIND_DESCRIPTION)
    quality_source: str = Field(description="the same in words: which queries, which dataset")
    agreement_at_10: float | None = Field(
        description="build time: rank-aware agreement of the plan's top 10 with the full dim's exact top 10 on "
        "pseudo-queries drawn from the corpus (1: same hits, same order)"
    )
    overlap_at_10: float | None = Field(description="build time: share of the full dim's exact top 10 in the plan's")
    live_agreement: float | None = Field(
        description="the same agreement on sampled live searches (shadow_fraction), against a full-dim search of the "
        "same query; mean of the recent samples, null before any"
    )
    live_agreement_samples: int = Field(description="recent live samples behind live_agreement")
    bytes_per_vector: float
    build_search_ms: float | None = Field(description="one query's search (and re-scoring) at build time")
    p50_ms: float = Field(description="whole-request p50: live, or estimated (latency_source)")
    p95_ms: float
    latency_samples: int
    latency_source: str


class PlansResponse(BaseModel):
    index_version: str
    plans: list[PlanModel]


class ModelCard(BaseModel):
    """One model, as OpenAI's ``GET /v1/models`` lists it, plus the Matryoshka dims it serves."""

    id: str = Field(description="the served model's name (what `model` in an embeddings request may say)")
    object: Literal["model"] = "model"
    created: int = Field(
        description="when the served index was built, or (embeddings only) when the model was loaded (Unix seconds)"
    )
    owned_by: str = "mrl-retrieval"
    dimensions: list[int] = Field(description="the Matryoshka dims `dimensions` may ask for, largest first")
    default_dimensions: int = Field(description="the dim of an embeddings request that names none")
    index_version: str | None = Field(
        description="the served index version; null: this server serves embeddings only (no index, no search)"
    )

    @classmethod
    def of(cls, served: ServedModel) -> ModelCard:
        created = datetime.fromisoformat(served.created) if served.created else datetime.now(timezone.utc)
        return cls(
            id=served.model,
            created=int(created.timestamp()),
            dimensions=sorted(served.dims, reverse=True),
            default_dimensions=served.default_dim,
            index_version=served.index_version,
        )


class ModelsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"


class ReadyResponse(BaseModel):
    status: Literal["ready"] = "ready"
    index_version: str | None = Field(description="the served index version; null: embeddings only (no index)")


class ReloadResponse(BaseModel):
    previous_version: str
    version: str
    changed: bool = Field(description="false when `current` still pointed at the served version")

    @classmethod
    def of(cls, outcome: ReloadOutcome) -> ReloadResponse:
        return cls.model_validate(outcome, from_attributes=True)


# --- documents (a writable server) ------------------------------------------------------------


class DocumentIn(BaseModel):
    """One document to write: chunked and encoded as ``mrl index build`` would."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=512, description="the document's id; a known id is replaced")
    text: str = Field(min_length=1, description="the document's text (the server's max_document_chars at most)")
    title: str = Field("", max_length=2000, description="encoded in front of every passage, returned with hits")
    metadata: dict[str, Any] = Field(default_factory=dict, description="returned with hits; filters can name it")


class UpsertRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "documents": [
                        {
                            "id": "leaflet-17",
                            "title": "Gout",
                            "text": "Gout causes sudden pain…",
                            "metadata": {"topic": "Gout"},
                        }
                    ]
                }
            ]  # fmt: skip
        },
    )

    documents: list[DocumentIn] = Field(
        min_length=1, description="the documents to add or replace (the server's max_write_documents at most)"
    )


class DeleteRequest(BaseModel):
    """The documents to delete: by id, or every document a filter matches."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"ids": ["leaflet-17"]}]})

    ids: list[str] | None = Field(None, min_length=1, description="document ids (unknown ones are reported)")
    filter: dict[str, Any] | None = Field(None, description=FILTER_DESCRIPTION, json_schema_extra=FILTER_SCHEMA)

    @model_validator(mode="after")
    def _one_of_ids_or_filter(self) -> DeleteRequest:
        if (self.ids is None) == (self.filter is None):
            raise ValueError("give exactly one of 'ids' (a list of document ids) or 'filter' (a metadata filter)")
        return self


class WriteResponse(BaseModel):
    """What a write did; it is in the write-ahead log and searchable on this server when this is answered."""

    seq: int | None = Field(description="the write's place in the log (null: nothing changed)")
    documents: list[str] = Field(description="the documents written or deleted")
    passages: int = Field(description="passages written (upsert) or removed (delete)")
    replaced: list[str] = Field(description="documents an upsert replaced")
    not_found: list[str] = Field(description="ids a delete did not find")
    index_version: str = Field(description="the version the writes are on top of")
    unmerged_passages: int = Field(description="written passages not yet compacted into a version")

    @classmethod
    def of(cls, written: Any) -> WriteResponse:
        result = written.result
        return cls(
            seq=result.seq,
            documents=list(result.documents),
            passages=result.passages,
            replaced=list(result.replaced),
            not_found=list(result.not_found),
            index_version=written.version,
            unmerged_passages=written.unmerged_passages,
        )


class CompactResponse(BaseModel):
    previous_version: str
    version: str = Field(description="the version that now holds every write (the same when there was nothing to fold)")
    unmerged_passages: int = Field(description="passages written while it ran, not yet in a version")
