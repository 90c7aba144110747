"""Per-dimension retrieval evaluation: encode once at full dimension, score every dimension.

The corpus and the queries are encoded a single time; each Matryoshka dimension is then
derived with :func:`truncate_normalize` and searched exactly, so the figures differ
between dimensions only because of the dimension.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from core.data import Qrels, RetrievalDataset, shared_positives
from core.matryoshka import truncate_normalize
from core.metrics import RECALL_AT, exact_top_k, score_rankings
from core.models import Encoder

logger = logging.getLogger(__name__)

TOP_K = max(RECALL_AT)


@dataclass
class SplitEmbeddings:
    """Full-dimension embeddings of a whole corpus and of the queries of one split."""

    doc_ids: list[str]
    doc_vectors: np.ndarray
    query_ids: list[str]
    query_vectors: np.ndarray
    encode_seconds: float


@dataclass
class EvalResult:
    """Metrics per dimension for one model on one dataset split."""

    model: str
    dataset: str
    split: str
    num_queries: int
    num_documents: int
    encode_seconds: float
    by_dim: dict[int, dict[str, float]] = field(default_factory=dict)
    # "clean" and "shared": the same metrics over the questions none of whose relevant documents is a
    # training positive, and over the rest (only when a training split was given and some question shares)
    views: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def full_dim(self) -> int:
        return max(self.by_dim)

    def metric(self, dim: int, name: str = "ndcg@10") -> float:
        return self.by_dim[dim][name]

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "dataset": self.dataset,
            "split": self.split,
            "num_queries": self.num_queries,
            "num_documents": self.num_documents,
            "encode_seconds": round(self.encode_seconds, 2),
            "by_dim": {str(dim): values for dim, values in sorted(self.by_dim.items(), reverse=True)},
            "views": {
                view: {
                    "num_queries": v["num_queries"],
                    "by_dim": {str(d): m for d, m in sorted(v["by_dim"].items(), reverse=True)},
                }
                for view, v in self.views.items()
            },
        }

    @classmethod
    def from_dict(cls, raw: dict) -> EvalResult:
        by_dim = {int(dim): values for dim, values in raw["by_dim"].items()}
        views = {
            view: {"num_queries": v["num_queries"], "by_dim": {int(d): m for d, m in v["by_dim"].items()}}
            for view, v in raw.get("views", {}).items()
        }
        return cls(**{**raw, "by_dim": by_dim, "views": views})

    def view(self, name: str) -> EvalResult:
        """This result restricted to one view ("clean" or "shared"), as a result of its own."""
        view = self.views[name]
        return EvalResult(self.model, self.dataset, f"{self.split} ({name})", view["num_queries"],
                          self.num_documents, self.encode_seconds, view["by_dim"])  # fmt: skip


def encode_split(encoder: Encoder, dataset: RetrievalDataset, split: str) -> SplitEmbeddings:
    """Encode the whole corpus and the judged queries of ``split``, once, at full dimension."""
    qrels = dataset.split(split)
    query_ids = list(qrels)
    doc_ids = list(dataset.corpus)
    started = time.perf_counter()
    logger.info("encoding %d documents and %d queries with %s", len(doc_ids), len(query_ids), encoder.name)
    doc_vectors = encoder.encode_documents([dataset.corpus[d].passage for d in doc_ids])
    query_vectors = encoder.encode_queries([dataset.queries[q] for q in query_ids])
    return SplitEmbeddings(doc_ids, doc_vectors, query_ids, query_vectors, time.perf_counter() - started)


def score_dims(embeddings: SplitEmbeddings, qrels: Qrels, dims: list[int]) -> dict[int, dict[str, float]]:
    """Metrics at each dimension, from one set of full-dimension embeddings."""
    return score_views(embeddings, qrels, dims, {})[0]


def split_views(training: Qrels, qrels: Qrels) -> dict[str, Qrels]:
    """The clean and shared views of ``qrels`` against a training split (none when either would be empty)."""
    shared = shared_positives(training, qrels)
    if not shared or not set(qrels) - shared:  # one view would be the whole split
        return {}
    return {
        "clean": {q: docs for q, docs in qrels.items() if q not in shared},
        "shared": {q: docs for q, docs in qrels.items() if q in shared},
    }


def score_views(
    embeddings: SplitEmbeddings, qrels: Qrels, dims: list[int], views: dict[str, Qrels]
) -> tuple[dict[int, dict[str, float]], dict[str, dict[int, dict[str, float]]]]:
    """Metrics at each dimension over ``qrels`` and over each view's subset, from the same rankings."""
    by_dim: dict[int, dict[str, float]] = {}
    by_view: dict[str, dict[int, dict[str, float]]] = {view: {} for view in views}
    for dim in sorted(dims, reverse=True):
        docs = truncate_normalize(embeddings.doc_vectors, dim)
        queries = truncate_normalize(embeddings.query_vectors, dim)
        top = exact_top_k(queries, docs, TOP_K)
        rankings = {
            qid: [embeddings.doc_ids[i] for i in row] for qid, row in zip(embeddings.query_ids, top, strict=True)
        }
        by_dim[dim] = score_rankings(rankings, qrels)
        for view, subset in views.items():
            by_view[view][dim] = score_rankings(rankings, subset)
    return by_dim, by_view


def evaluate(
    encoder: Encoder, dataset: RetrievalDataset, split: str, dims: list[int], training: Qrels | None = None
) -> EvalResult:
    """NDCG@10, MRR@10 and Recall@1/10/100 of ``encoder`` on ``split`` at every dimension in ``dims``.

    ``training``: the training split's judgements; when given, the result also has the clean and shared
    views (:func:`split_views`), so a tuned model's gain on documents it saw as positives is told apart.
    """
    embeddings = encode_split(encoder, dataset, split)
    qrels = dataset.split(split)
    views = split_views(training, qrels) if training else {}
    by_dim, by_view = score_views(embeddings, qrels, dims, views)
    return EvalResult(
        model=encoder.name,
        dataset=dataset.name,
        split=split,
        num_queries=len(embeddings.query_ids),
        num_documents=len(embeddings.doc_ids),
        encode_seconds=embeddings.encode_seconds,
        by_dim=by_dim,
        views={view: {"num_queries": len(views[view]), "by_dim": scores} for view, scores in by_view.items()},
    )
