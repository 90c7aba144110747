"""What the searcher returns: hits with their timings, embeddings, the served dims, reload outcomes.

Plain data; the HTTP layer turns them into response models (``service.schemas``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Hit:
    """One search result: the document and its cosine similarity to the query."""

    id: str
    score: float
    title: str
    text: str
    metadata: dict[str, Any]


@dataclass
class Timings:
    """Milliseconds per stage of one request (a batch's queries share them)."""

    encode_ms: float = 0.0
    search_ms: float = 0.0
    rerank_ms: float = 0.0
    total_ms: float = 0.0


@dataclass
class SearchResult:
    """Hits per query, in query order, and how they were found."""

    dim: int
    rerank_dim: int | None
    k: int
    index_version: str
    hits: list[list[Hit]]
    timings: Timings


@dataclass
class EmbeddingResult:
    """Unit-length embeddings, one row per input, at ``dim`` coordinates."""

    vectors: np.ndarray
    dim: int
    model: str
    tokens: int


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
    dims: list[DimInfo] = field(default_factory=list)


@dataclass
class ReloadOutcome:
    previous_version: str
    version: str
    changed: bool
