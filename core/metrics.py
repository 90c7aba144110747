"""Retrieval metrics: ranking metrics with graded relevance, exact search, recall against exact search.

Definitions follow trec_eval (and so BEIR): NDCG uses linear gains and a log2 discount,
a judgement of 0 or below counts as not relevant (no gain, never a negative one, in DCG and
ideal DCG alike; not a hit for MRR or recall), and a query's metrics are averaged with
equal weight.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

RECALL_AT = (1, 10, 100)
EXACT_QUERY_CHUNK = 256  # queries scored per matrix product in exact search
CUTOFF = 10


def gain(relevance: Mapping[str, int], doc: str) -> int:
    """A document's NDCG gain: its judgement if positive, else 0 (unjudged, 0 and negative alike)."""
    return max(relevance.get(doc, 0), 0)


def ndcg_at_k(ranked: Sequence[str], relevance: Mapping[str, int], k: int) -> float:
    """Normalised discounted cumulative gain of the top ``k`` documents."""
    dcg = sum(gain(relevance, doc) / math.log2(rank + 2) for rank, doc in enumerate(ranked[:k]))
    ideal = sorted((gain(relevance, doc) for doc in relevance), reverse=True)[:k]
    idcg = sum(score / math.log2(rank + 2) for rank, score in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def mrr_at_k(ranked: Sequence[str], relevance: Mapping[str, int], k: int) -> float:
    """Reciprocal rank of the first relevant document within the top ``k``; 0 if none."""
    for rank, doc in enumerate(ranked[:k], start=1):
        if gain(relevance, doc) > 0:
            return 1.0 / rank
    return 0.0


def recall_at_k(ranked: Sequence[str], relevance: Mapping[str, int], k: int) -> float:
    """Share of the relevant documents found in the top ``k``."""
    relevant = {doc for doc in relevance if gain(relevance, doc) > 0}
    if not relevant:
        return 0.0
    return len(relevant.intersection(ranked[:k])) / len(relevant)


def metric_names() -> list[str]:
    """Names of the metrics :func:`score_rankings` returns, in display order."""
    return [f"ndcg@{CUTOFF}", f"mrr@{CUTOFF}", *(f"recall@{k}" for k in RECALL_AT)]


def score_rankings(rankings: Mapping[str, Sequence[str]], qrels: Mapping[str, Mapping[str, int]]) -> dict[str, float]:
    """Mean NDCG@10, MRR@10 and Recall@1/10/100 over the queries of ``qrels``.

    Args:
        rankings: Query id to document ids, best first (at least 100 where available).
        qrels: Query id to document id to graded relevance.

    Returns:
        Metric name to mean value. Queries without any relevant document are skipped,
        as trec_eval does; a judged query missing from ``rankings`` scores 0.
    """
    judged = [qid for qid, docs in qrels.items() if any(score > 0 for score in docs.values())]
    totals = dict.fromkeys(metric_names(), 0.0)
    for qid in judged:
        ranked, relevance = rankings.get(qid, ()), qrels[qid]
        totals[f"ndcg@{CUTOFF}"] += ndcg_at_k(ranked, relevance, CUTOFF)
        totals[f"mrr@{CUTOFF}"] += mrr_at_k(ranked, relevance, CUTOFF)
        for k in RECALL_AT:
            totals[f"recall@{k}"] += recall_at_k(ranked, relevance, k)
    return {name: value / len(judged) if judged else 0.0 for name, value in totals.items()}


def exact_top_k(queries: np.ndarray, documents: np.ndarray, k: int) -> np.ndarray:
    """Row indices of the ``k`` highest inner products per query, best first (exact search).

    Equal scores keep corpus order, so results are reproducible to the last rank.
    """
    k = min(k, documents.shape[0])
    result = np.empty((queries.shape[0], k), dtype=np.int64)
    for start in range(0, queries.shape[0], EXACT_QUERY_CHUNK):
        scores = queries[start : start + EXACT_QUERY_CHUNK] @ documents.T
        result[start : start + EXACT_QUERY_CHUNK] = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return result


def neighbour_recall(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean share of each query's exact top k (rows of ``exact``) that ``found`` also returned.

    The recall of an approximate index against exact search; ``-1`` padding in ``found`` counts as a miss.
    """
    k = exact.shape[1]
    hits = [len(set(row[row >= 0].tolist()) & set(truth.tolist())) for row, truth in zip(found, exact, strict=True)]
    return float(np.mean(hits)) / k
