"""What the searcher returns: hits with their timings, embeddings, the served dims, reload outcomes.

Plain data; the HTTP layer turns them into response models (``service.schemas``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Hit:
    """One search result: a passage, its cosine similarity to the query, and its place in its document."""

    id: str
    score: float
    title: str
    text: str
    metadata: dict[str, Any]
    doc_id: str = ""
    start: int = 0
    end: int = 0


@dataclass
class Timings:
    """Milliseconds per stage of one request (a batch's queries share them)."""

    encode_ms: float = 0.0
    search_ms: float = 0.0
    rerank_ms: float = 0.0
    total_ms: float = 0.0


@dataclass
class PlanUsed:
    """The plan a search ran, what it was measured at, and why it was chosen."""

    key: str
    dim: int
    rerank_dim: int | None
    candidates: int | None
    expected_ndcg_at_10: float | None
    expected_ratio: float | None
    quality_kind: str
    quality_source: str
    reason: str
    targets_missed: list[str] = field(default_factory=list)
    p50_ms: float | None = None
    p95_ms: float | None = None
    latency_samples: int = 0
    latency_source: str | None = None


@dataclass
class PlanInfo:
    """One plan of the served index: measured quality, memory, build-time and live latency."""

    key: str
    dim: int
    rerank_dim: int | None
    candidates: int | None
    ndcg_at_10: float | None
    recall_at_10: float | None
    ratio: float | None
    quality_kind: str
    quality_source: str
    agreement_at_10: float | None
    overlap_at_10: float | None
    live_agreement: float | None
    live_agreement_samples: int
    bytes_per_vector: float
    build_search_ms: float | None
    p50_ms: float
    p95_ms: float
    latency_samples: int
    latency_source: str


@dataclass
class SearchResult:
    """Hits per query, in query order, and how they were found."""

    dim: int
    rerank_dim: int | None
    k: int
    index_version: str
    hits: list[list[Hit]]
    timings: Timings
    plan: PlanUsed | None = None


@dataclass
class EmbeddingResult:
    """Unit-length embeddings, one row per input, at ``dim`` coordinates."""

    vectors: np.ndarray
    dim: int
    model: str
    tokens: int


@dataclass(frozen=True)
class ServedModel:
    """What ``/v1/embeddings`` and ``/v1/models`` answer with: the model, its dims, and the index they come from."""

    model: str
    dims: list[int]  # the index's dims; without an index, the model's Matryoshka dims
    default_dim: int  # of an embeddings request that names no `dimensions`
    created: str  # ISO 8601: when the served index was built, or (no index) when the model was loaded
    index_version: str | None = None  # None: embeddings only, no index


@dataclass
class DimInfo:
    """What one served dimension costs and buys."""

    dim: int
    index_type: str
    bytes: int
    vectors: int
    ndcg_at_10: float | None
    recall_at_10: float | None
    search_ms: float | None
    measured_ndcg_at_10: float | None = None  # the single-stage plan's on judged queries, for the served encoder
    ndcg_source: str | None = None  # where ndcg_at_10 comes from (the model's training report)
    agreement_at_10: float | None = None  # the single-stage plan's agreement with the full dim


@dataclass
class IndexInfo:
    """The served index, as the ``/dims`` endpoint shows it."""

    model: str
    index_version: str
    encoder: str
    full_dim: int
    default_dim: int
    num_vectors: int
    built_at: str
    index: str  # the locator, as mrl index info shows it (a password in an old-style Milvus URI as ***)
    dims: list[DimInfo] = field(default_factory=list)
    encoder_quality_loss: float | None = None  # largest NDCG@10 loss of the served encoder against the build's
    encoder_warning: str | None = None
    quality_kind: str = "not measured"  # index.plans.SOURCES
    quality_source: str = "not measured"  # in words
    metadata_fields: dict[str, str] = field(default_factory=dict)  # filterable metadata: name -> type
    passages: dict[str, Any] | None = None  # index.chunking.ChunkReport of the version (None: not recorded)
    writes: dict[str, Any] | None = None  # a writable server's index.live.LiveCounts


@dataclass
class ReloadOutcome:
    previous_version: str
    version: str
    changed: bool
