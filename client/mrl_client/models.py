"""What the service answers, as typed models. Fields the server adds later are kept (``extra="allow"``)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Answer(BaseModel):
    model_config = ConfigDict(extra="allow")


class Hit(_Answer):
    """A passage: ``id`` is the passage's, ``doc_id`` its document's, ``text`` is ``document.text[start:end]``."""

    id: str
    score: float
    title: str = ""
    text: str = ""
    metadata: dict[str, Any] = Field(default_factory=dict)
    doc_id: str = ""  # empty from servers older than passages
    start: int = 0
    end: int = 0


class QueryHits(_Answer):
    query: str
    hits: list[Hit]


class Timings(_Answer):
    encode_ms: float
    search_ms: float
    rerank_ms: float
    total_ms: float


class PlanUsed(_Answer):
    key: str
    dim: int
    rerank_dim: int | None = None
    candidates: int | None = None
    expected_ndcg_at_10: float | None = None
    expected_ratio: float | None = None  # what min_quality was compared with; quality_kind says what it means
    quality_kind: str = "not measured"  # judged, agreement, training report, not measured
    quality_source: str = ""  # the same in words: which queries, which dataset
    reason: str = ""
    targets_missed: list[str] = Field(default_factory=list)


class SearchResponse(_Answer):
    dim: int
    rerank_dim: int | None = None
    k: int
    index_version: str
    results: list[QueryHits]
    timings_ms: Timings
    plan: PlanUsed | None = None

    @property
    def hits(self) -> list[Hit]:
        """The hits of the first (or only) query."""
        return self.results[0].hits


class Dim(_Answer):
    dim: int
    ndcg_at_10: float | None = None
    index_type: str
    bytes: int
    vectors: int
    recall_at_10: float | None = None
    search_ms: float | None = None
    measured_ndcg_at_10: float | None = None
    ndcg_source: str | None = None  # where ndcg_at_10 comes from (the model's training report)
    agreement_at_10: float | None = None


class DimsResponse(_Answer):
    model: str
    index_version: str
    encoder: str
    full_dim: int
    default_dim: int
    num_vectors: int
    built_at: str
    dims: list[Dim]
    quality_kind: str = "not measured"
    quality_source: str = "not measured"
    metadata_fields: dict[str, str] = Field(default_factory=dict)  # what a filter may name
    index: str | None = None  # where the served index is (a folder or a milvus:// locator); None from older servers


class Plan(_Answer):
    key: str
    dim: int
    rerank_dim: int | None = None
    candidates: int | None = None
    ndcg_at_10: float | None = None
    ratio: float | None = None  # what min_quality is compared with: NDCG@10 ratio (judged) or agreement@10
    quality_kind: str = "not measured"  # judged, agreement, training report, not measured
    quality_source: str
    agreement_at_10: float | None = None  # build time, against the full dim's exact ranking
    overlap_at_10: float | None = None
    live_agreement: float | None = None  # the same on sampled live searches (None before any sample)
    live_agreement_samples: int = 0
    p50_ms: float
    p95_ms: float


class PlansResponse(_Answer):
    index_version: str
    plans: list[Plan]


class ModelCard(_Answer):
    id: str
    created: int
    owned_by: str
    dimensions: list[int]
    default_dimensions: int
    index_version: str | None = None  # None: the server serves embeddings only (mrl serve --model, no index)


class ModelsResponse(_Answer):
    data: list[ModelCard]


class HealthResponse(_Answer):
    """``/healthz``: the process answers (``status`` is ``"ok"``), loaded or not."""

    status: str


class ReloadResponse(_Answer):
    previous_version: str
    version: str
    changed: bool


class WriteResponse(_Answer):
    """What a write did; it is durable (in the server's write-ahead log) and searchable there when returned."""

    seq: int | None = None
    documents: list[str] = Field(default_factory=list)
    passages: int = 0
    replaced: list[str] = Field(default_factory=list)
    not_found: list[str] = Field(default_factory=list)
    index_version: str = ""
    unmerged_passages: int = 0


class CompactResponse(_Answer):
    previous_version: str
    version: str
    unmerged_passages: int = 0
