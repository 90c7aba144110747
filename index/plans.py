"""Plans: the ways an index can answer a query, each with its quality and where that figure comes from.

A plan is single-stage search at one dim, or two-stage search: shortlist ``k × candidates`` rows at
``dim``, re-score them at ``rerank_dim``. ``mrl index build --eval-data`` scores every plan on the
index itself, through :func:`index.search.staged_search` (the function the service runs), and keeps
the results in the manifest with the judged queries, so that a service whose query encoder is not
the build's (ONNX, int8) can score the same plans again with its own query vectors.

For a two-stage plan the candidate count is the smallest of :data:`CANDIDATE_LADDER` that reaches
:data:`TWO_STAGE_TARGET` of the re-scoring dim's own NDCG@10 (the full dim's, when it re-scores at
the full dim: re-scoring at 256 cannot beat 256), or the best found up to its last rung.

Every plan names its quality's source (:data:`SOURCES`): judged queries on this index, label-free
agreement with the full dim on pseudo-queries drawn from this corpus (:mod:`index.calibration`), or
the model's training report, measured on another dataset. A build with judged queries also records
each plan's agreement, so that the two can be compared and live agreement has a build-time figure.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from core.metrics import score_rankings
from index.backends import VectorIndex
from index.calibration import PseudoQueries, agreement_judgements
from index.search import staged_search

logger = logging.getLogger(__name__)

K = 10  # plans are scored and timed at k=10 (NDCG@10, Recall@10)
CANDIDATE_LADDER = (1, 2, 3, 5, 10, 20, 50)  # shortlist = k × candidates
TWO_STAGE_TARGET = 0.995  # of the full dim's NDCG@10
TIMED_QUERIES = 100  # queries timed one at a time per plan
EXCLUDE_SLACK = 5  # rows searched past k where a query's own document is left out of its ranking
JUDGED = "judged"  # NDCG@10 on judged queries of this index, through the service's search code
AGREEMENT = "agreement"  # agreement@10 with the full dim's exact ranking, pseudo-queries from this corpus
TRAINING_REPORT = "training report"  # the model's training-time NDCG@10, on its own dataset (single-stage only)
NOT_MEASURED = "not measured"
SOURCES = (JUDGED, AGREEMENT, TRAINING_REPORT, NOT_MEASURED)
_OLD_SOURCES = {"measured": JUDGED}  # as manifests written before agreement named it


@dataclass(frozen=True)
class Plan:
    """One way to answer a query and what it was measured at."""

    dim: int
    rerank_dim: int | None = None
    candidates: int | None = None  # two-stage: the shortlist holds k × candidates rows
    ndcg_at_10: float | None = None
    recall_at_10: float | None = None
    ratio: float | None = None  # what min_quality compares: NDCG@10 ÷ the full dim's, or agreement@10
    search_ms: float | None = None  # one query at k=10, search and re-scoring, measured at build time
    bytes_per_vector: float = 0.0  # memory per document: the dim's index, plus the re-scoring vectors
    source: str = JUDGED
    agreement_at_10: float | None = None  # rank-aware agreement with the full dim's exact top 10
    overlap_at_10: float | None = None  # share of the full dim's exact top 10 in the plan's

    @property
    def key(self) -> str:
        """A short, stable name: ``64``, or ``64>384x10`` for two-stage (also the metrics label)."""
        return str(self.dim) if self.rerank_dim is None else f"{self.dim}>{self.rerank_dim}x{self.candidates}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Plan:
        raw = dict(raw)
        raw["source"] = _OLD_SOURCES.get(raw.get("source", JUDGED), raw.get("source", JUDGED))
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
    exclude: Mapping[str, str] | None = None,
) -> list[Plan]:
    """Every single-stage and two-stage plan of ``indexes``, scored with ``queries`` (full-dim, one row per judged id).

    With ``grouped`` (an index of passages, some cut from one document), a ranking is of documents: each
    document's best passage, as ``group_by=document`` searches answer, so judgements of documents apply.
    ``exclude`` names a document to leave out of a query's ranking (a pseudo-query's own document).

    Args:
        indexes: The index of each dim.
        full_vectors: Every document's full-dimension vector, by row.
        doc_ids: The document ids of rows (asked once for each row any plan returns, not for the whole corpus).
        queries: The judged queries' full-dimension vectors, in ``judged.ids`` order.
        judged: Query ids and graded relevance.
        bytes_by_dim: Index bytes per document vector of each dim.
        grouped: Rank documents by their best passage.
        exclude: Per query id, a document its ranking leaves out.
    """
    dims = sorted(indexes, reverse=True)
    full = dims[0]
    score, known = _scorer(indexes, full_vectors, doc_ids, queries, judged, grouped, exclude)

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


def _scorer(
    indexes: Mapping[int, VectorIndex],
    full_vectors: np.ndarray,
    doc_ids: Callable[[list[int]], list[str]],
    queries: np.ndarray,
    judged: JudgedQueries,
    grouped: bool,
    exclude: Mapping[str, str] | None,
) -> tuple[Callable[..., dict[str, float]], dict[int, str]]:
    """``score(dim, rerank_dim=None, candidates=1)``: a plan's metrics over the judged queries; and the document
    ids of the rows scored so far (row -> id), which the timing reuses."""
    known: dict[int, str] = {}
    k = K + (1 if grouped else EXCLUDE_SLACK) if exclude else K

    def score(dim: int, rerank_dim: int | None = None, candidates: int = 1) -> dict[str, float]:
        group = doc_ids if grouped else None
        found = staged_search(indexes[dim], full_vectors, queries, dim, k, rerank_dim, candidates, group=group)
        new = sorted({int(row) for row in found.rows.ravel() if row >= 0} - known.keys())
        known.update(zip(new, doc_ids(new), strict=True))
        rankings = {}
        for qid, rows in zip(judged.ids, found.rows, strict=True):
            left_out = (exclude or {}).get(qid)
            rankings[qid] = [known[int(row)] for row in rows if row >= 0 and known[int(row)] != left_out][:K]
        return score_rankings(rankings, judged.qrels)

    return score, known


def _agreement_targets(
    pseudo: PseudoQueries, full_vectors: np.ndarray, queries: np.ndarray, doc_ids: Callable[[list[int]], list[str]]
) -> tuple[JudgedQueries, dict[str, str] | None]:
    """The pseudo-queries judged by the full dim's exact ranking, and each one's own document to leave out."""
    judged = JudgedQueries(pseudo.ids, pseudo.texts, agreement_judgements(pseudo, full_vectors, queries, doc_ids))
    return judged, dict(zip(pseudo.ids, pseudo.sources, strict=True)) if pseudo.held_out else None


def calibrate_plans(
    indexes: Mapping[int, VectorIndex],
    full_vectors: np.ndarray,
    doc_ids: Callable[[list[int]], list[str]],
    queries: np.ndarray,
    pseudo: PseudoQueries,
    bytes_by_dim: Mapping[int, float],
    grouped: bool = False,
) -> list[Plan]:
    """Every plan of ``indexes`` scored without labels: agreement with the full dim on ``pseudo`` queries.

    ``queries`` are the pseudo-queries' full-dim vectors. A plan's ``ratio`` (what ``min_quality``
    compares) is its agreement@10 with the exact full-dim ranking, not a fraction of the full dim's plan.
    """
    judged, exclude = _agreement_targets(pseudo, full_vectors, queries, doc_ids)
    plans = evaluate_plans(indexes, full_vectors, doc_ids, queries, judged, bytes_by_dim, grouped, exclude)
    return [
        replace(
            plan,
            source=AGREEMENT,
            agreement_at_10=plan.ndcg_at_10,
            overlap_at_10=plan.recall_at_10,
            ratio=plan.ndcg_at_10,
            ndcg_at_10=None,
            recall_at_10=None,
        )  # fmt: skip
        for plan in plans
    ]


def with_agreement(
    plans: Sequence[Plan],
    indexes: Mapping[int, VectorIndex],
    full_vectors: np.ndarray,
    doc_ids: Callable[[list[int]], list[str]],
    queries: np.ndarray,
    pseudo: PseudoQueries,
    grouped: bool = False,
) -> list[Plan]:
    """``plans`` (measured otherwise) with each one's agreement with the full dim on ``pseudo`` queries added."""
    judged, exclude = _agreement_targets(pseudo, full_vectors, queries, doc_ids)
    score, _ = _scorer(indexes, full_vectors, doc_ids, queries, judged, grouped, exclude)
    scored = []
    for plan in plans:
        metrics = score(plan.dim, plan.rerank_dim, plan.candidates or 1)
        scored.append(
            replace(plan, agreement_at_10=round(metrics["ndcg@10"], 4), overlap_at_10=round(metrics["recall@10"], 4))
        )
    return scored


def score_plans(
    built: Mapping[int, VectorIndex],
    vectors: np.ndarray,
    ids: Callable[[list[int]], list[str]],
    encode: Callable[[list[str]], np.ndarray],
    judged: JudgedQueries | None,
    pseudo: PseudoQueries | None,
    per_vector: Mapping[int, float],
    grouped: bool,
) -> list[Plan]:
    """Every plan's quality: NDCG@10 on ``judged`` queries, else agreement with the full dim on ``pseudo``
    queries (:mod:`index.calibration`); with both, judged plans that also carry their agreement. None of
    either (or no pseudo-query could be drawn): no plans. ``ids`` gives the document id of rows, ``encode`` the
    full-dim vectors of query texts."""
    plans: list[Plan] = []
    if judged is not None:
        logger.info("scoring every plan on %d judged queries of %s", len(judged.ids), judged.source)
        queries = encode(judged.texts)
        plans = evaluate_plans(built, vectors, ids, queries, judged, per_vector, grouped)
    if pseudo is None or not pseudo.ids:
        return plans
    logger.info("measuring every plan's agreement with the full dim on %s", pseudo.description)
    queries = encode(pseudo.texts)
    if plans:
        return with_agreement(plans, built, vectors, ids, queries, pseudo, grouped)
    return calibrate_plans(built, vectors, ids, queries, pseudo, per_vector, grouped)


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
        source=JUDGED,
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


def quality_source(manifest: Any, plans: Sequence[Plan] | None = None) -> tuple[str, str]:
    """Where the quality figures of ``manifest``'s plans (or of ``plans``) come from: ``(kind, in words)``.

    ``kind`` is one of :data:`SOURCES`; the words name the queries, or the dataset of a training report.
    """
    plans = [Plan.from_dict(raw) for raw in manifest.plans] if plans is None else list(plans)
    kind = plans[0].source if plans else NOT_MEASURED
    if kind == JUDGED and manifest.judged_queries:
        judged = manifest.judged_queries
        return kind, f"NDCG@10 on {len(judged['ids'])} judged queries of {judged['source']}, searched on this index"
    if kind == AGREEMENT and manifest.calibration_queries:
        pseudo = PseudoQueries.from_dict(manifest.calibration_queries)
        return kind, f"agreement@10 with the full dim's exact ranking on {pseudo.description} (no labels)"
    if kind == TRAINING_REPORT:
        return kind, f"{report_source(manifest.evaluation)}, not on this index's documents"
    return kind, "not measured" if kind == NOT_MEASURED else kind


def report_source(evaluation: Mapping[str, Any] | None) -> str:
    """A model training report's NDCG@10, in words: on which dataset and split it was measured."""
    evaluation = evaluation or {}
    dataset, split = evaluation.get("dataset"), evaluation.get("split")
    where = f" on {dataset}" + (f" ({split} split)" if split else "") if dataset else " on its evaluation data"
    return f"the model's training report: NDCG@10{where}"
