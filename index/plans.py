"""Plans: the ways an index can answer a query, each with its quality measured on judged queries.

A plan is single-stage search at one dim, or two-stage search: shortlist ``k × candidates`` rows at
``dim``, re-score them at ``rerank_dim``. ``mrl index build --eval-data`` scores every plan on the
index itself, through :func:`index.search.staged_search` (the function the service runs), and keeps
the results in the manifest with the judged queries, so that a service whose query encoder is not
the build's (ONNX, int8) can score the same plans again with its own query vectors.

For a two-stage plan the candidate count is the smallest of :data:`CANDIDATE_LADDER` that reaches
:data:`TWO_STAGE_TARGET` of the re-scoring dim's own NDCG@10 (the full dim's, when it re-scores at
the full dim: re-scoring at 256 cannot beat 256), or the best found up to its last rung.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from core.metrics import score_rankings
from index.backends import VectorIndex
from index.search import staged_search

K = 10  # plans are scored and timed at k=10 (NDCG@10, Recall@10)
CANDIDATE_LADDER = (1, 2, 3, 5, 10, 20, 50)  # shortlist = k × candidates
TWO_STAGE_TARGET = 0.995  # of the full dim's NDCG@10
TIMED_QUERIES = 100  # queries timed one at a time per plan
MEASURED = "measured"  # on judged queries, through the service's search code
TRAINING_REPORT = "training report"  # the model's training-time evaluation (single-stage only)


@dataclass(frozen=True)
class Plan:
    """One way to answer a query and what it was measured at."""

    dim: int
    rerank_dim: int | None = None
    candidates: int | None = None  # two-stage: the shortlist holds k × candidates rows
    ndcg_at_10: float | None = None
    recall_at_10: float | None = None
    ratio: float | None = None  # NDCG@10 ÷ the full dim's single-stage NDCG@10
    search_ms: float | None = None  # one query at k=10, search and re-scoring, measured at build time
    bytes_per_vector: float = 0.0  # memory per document: the dim's index, plus the re-scoring vectors
    source: str = MEASURED

    @property
    def key(self) -> str:
        """A short, stable name: ``64``, or ``64>384x10`` for two-stage (also the metrics label)."""
        return str(self.dim) if self.rerank_dim is None else f"{self.dim}>{self.rerank_dim}x{self.candidates}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Plan:
        return cls(**raw)


@dataclass
class JudgedQueries:
    """The queries plans are scored on: ids, texts and graded relevance (by document id)."""

    ids: list[str]
    texts: list[str]
    qrels: dict[str, dict[str, int]]
    source: str = ""  # the dataset folder and split, for the record

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> JudgedQueries:
        return cls(list(raw["ids"]), list(raw["texts"]), {q: dict(d) for q, d in raw["qrels"].items()}, raw["source"])


def evaluate_plans(
    indexes: Mapping[int, VectorIndex],
    full_vectors: np.ndarray,
    doc_ids: Callable[[list[int]], list[str]],
    queries: np.ndarray,
    judged: JudgedQueries,
    bytes_by_dim: Mapping[int, float],
    grouped: bool = False,
) -> list[Plan]:
    """Every single-stage and two-stage plan of ``indexes``, scored with ``queries`` (full-dim, one row per judged id).

    With ``grouped`` (an index of passages, some cut from one document), a ranking is of documents: each
    document's best passage, as ``group_by=document`` searches answer, so judgements of documents apply.

    Args:
        indexes: The index of each dim.
        full_vectors: Every document's full-dimension vector, by row.
        doc_ids: The document ids of rows (asked once for each row any plan returns, not for the whole corpus).
        queries: The judged queries' full-dimension vectors, in ``judged.ids`` order.
        judged: Query ids and graded relevance.
        bytes_by_dim: Index bytes per document vector of each dim.
        grouped: Rank documents by their best passage.
    """
    dims = sorted(indexes, reverse=True)
    full = dims[0]
    known: dict[int, str] = {}

    def score(dim: int, rerank_dim: int | None = None, candidates: int = 1) -> dict[str, float]:
        group = doc_ids if grouped else None
        found = staged_search(indexes[dim], full_vectors, queries, dim, K, rerank_dim, candidates, group=group)
        new = sorted({int(row) for row in found.rows.ravel() if row >= 0} - known.keys())
        known.update(zip(new, doc_ids(new), strict=True))
        rankings = {
            qid: [known[int(row)] for row in rows if row >= 0] for qid, rows in zip(judged.ids, found.rows, strict=True)
        }
        return score_rankings(rankings, judged.qrels)

    def timed(dim: int, rerank_dim: int | None = None, candidates: int = 1) -> float:
        sample = queries[:TIMED_QUERIES]
        group = (lambda rows: [known.get(row) or doc_ids([row])[0] for row in rows]) if grouped else None
        seconds = []
        for number in range(len(sample)):
            started = time.perf_counter()
            query = sample[number : number + 1]
            staged_search(indexes[dim], full_vectors, query, dim, K, rerank_dim, candidates, group=group)
            seconds.append(time.perf_counter() - started)
        return round(1000 * float(np.median(seconds)), 4) if seconds else 0.0

    single = {dim: score(dim) for dim in dims}
    reference = single[full]["ndcg@10"]
    plans = [_plan(dim, None, None, single[dim], reference, timed(dim), bytes_by_dim[dim]) for dim in dims]
    for dim in dims:
        for rerank_dim in (d for d in dims if d > dim):
            ceiling = single[rerank_dim]["ndcg@10"]
            candidates, metrics = _smallest_candidates(lambda c: score(dim, rerank_dim, c), ceiling)  # noqa: B023
            memory = bytes_by_dim[dim] + 4 * rerank_dim  # the re-scoring reads rerank_dim float32 coordinates
            plans.append(
                _plan(dim, rerank_dim, candidates, metrics, reference, timed(dim, rerank_dim, candidates), memory)
            )
    return plans


def _smallest_candidates(score, reference: float) -> tuple[int, dict[str, float]]:
    best: tuple[int, dict[str, float]] | None = None
    for candidates in CANDIDATE_LADDER:
        metrics = score(candidates)
        if best is None or metrics["ndcg@10"] > best[1]["ndcg@10"]:
            best = (candidates, metrics)
        if metrics["ndcg@10"] >= TWO_STAGE_TARGET * reference:
            return candidates, metrics
    assert best is not None
    return best


def _plan(
    dim: int,
    rerank_dim: int | None,
    candidates: int | None,
    metrics: Mapping[str, float],
    reference: float,
    search_ms: float,
    memory: float,
) -> Plan:
    ndcg = round(metrics["ndcg@10"], 4)
    return Plan(
        dim=dim,
        rerank_dim=rerank_dim,
        candidates=candidates,
        ndcg_at_10=ndcg,
        recall_at_10=round(metrics["recall@10"], 4),
        ratio=round(metrics["ndcg@10"] / reference, 4) if reference else None,
        search_ms=search_ms,
        bytes_per_vector=round(memory, 2),
        source=MEASURED,
    )


def plans_from_report(
    evaluation: Mapping[str, Any] | None, dims: Sequence[int], search_ms: Mapping[int, float | None],
    bytes_by_dim: Mapping[int, float],
) -> list[Plan]:  # fmt: skip
    """Single-stage plans from a training report's NDCG@10 per dim (none where the report lacks the full dim)."""
    by_dim = (evaluation or {}).get("by_dim") or {}
    ndcg = {int(dim): m.get("ndcg@10") for dim, m in by_dim.items() if isinstance(m, Mapping)}
    full = max(dims)
    if ndcg.get(full) is None:
        return []
    return [
        Plan(
            dim=dim,
            ndcg_at_10=round(float(ndcg[dim]), 4),
            recall_at_10=None,
            ratio=round(float(ndcg[dim]) / float(ndcg[full]), 4) if ndcg[full] else None,
            search_ms=search_ms.get(dim),
            bytes_per_vector=bytes_by_dim[dim],
            source=TRAINING_REPORT,
        )
        for dim in sorted(dims, reverse=True)
        if ndcg.get(dim) is not None
    ]
