"""Searching an index at a Matryoshka dimension, single-stage or two-stage: composed once, here.

Two-stage search (the adaptive retrieval of the Matryoshka paper) shortlists candidates with
the small, fast index at ``dim``, then re-scores them exactly with the stored full vectors
truncated to ``rerank_dim``. The service and every benchmark call :func:`staged_search`, so
what a benchmark measures is the code path the service runs.
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import numpy as np

from core.matryoshka import truncate_normalize
from index.backends import VectorIndex


@dataclass
class StagedHits:
    """Best-first ``(n, k)`` scores and row ids per query (-inf / -1 pad), and the seconds of each stage."""

    scores: np.ndarray
    rows: np.ndarray
    search_seconds: float
    rerank_seconds: float


def staged_search(
    index: VectorIndex,
    full_vectors: np.ndarray,
    queries: np.ndarray,
    dim: int,
    k: int,
    rerank_dim: int | None = None,
    candidates: int = 10,
    search_lock: AbstractContextManager | None = None,
) -> StagedHits:
    """Top ``k`` per query at ``dim``; with ``rerank_dim``, shortlist ``k * candidates`` there and re-score.

    Args:
        index: The index of dimension ``dim``.
        full_vectors: Every document's full-dimension vector (memory-mapped; only shortlisted rows are read).
        queries: ``(n, full_dim)`` query vectors, unnormalised; each stage truncates and normalises them.
        dim: The dimension searched (the shortlist's, in two-stage search).
        k: Hits kept per query.
        rerank_dim: Re-scoring dimension (larger than ``dim``), or None for single-stage search.
        candidates: The shortlist holds ``k * candidates`` rows.
        search_lock: Held around the index search, for indexes that are not thread-safe.
    """
    started = time.perf_counter()
    fetch = k * candidates if rerank_dim else k
    with search_lock or nullcontext():
        scores, rows = index.search(truncate_normalize(queries, dim), fetch)
    searched = time.perf_counter()
    if rerank_dim:
        scores, rows = rerank(full_vectors, queries, rows, rerank_dim, k)
    finished = time.perf_counter()
    return StagedHits(scores, rows, searched - started, finished - searched if rerank_dim else 0.0)


def rerank(
    full_vectors: np.ndarray, queries: np.ndarray, rows: np.ndarray, dim: int, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact re-scoring of shortlisted rows at ``dim``: the best ``k`` per query, as ``(scores, rows)``.

    Args:
        full_vectors: All documents' full-dimension vectors (memory-mapped; only shortlisted rows are read).
        queries: ``(n, full_dim)`` query vectors.
        rows: ``(n, m)`` shortlisted row ids per query; -1 marks padding.
        dim: Dimension to re-score at.
        k: Hits to keep per query.

    Returns:
        ``(n, k')`` scores and rows, best first, ``k' = min(k, m)``; padded with -inf / -1 where a
        query had fewer candidates.
    """
    width = min(k, rows.shape[1])
    scores = np.full((len(rows), width), -np.inf, dtype=np.float32)
    best = np.full((len(rows), width), -1, dtype=np.int64)
    reduced_queries = truncate_normalize(queries, dim)
    # Every shortlisted row is read once, for all queries together: one pass over a memory map, or
    # one fetch from an engine that keeps the vectors (Milvus), however many queries there are.
    wanted = np.unique(rows[rows >= 0])
    if not len(wanted):
        return scores, best
    block = truncate_normalize(np.asarray(full_vectors[wanted]), dim)
    for number, candidates in enumerate(rows):
        candidates = np.sort(candidates[candidates >= 0])
        if not len(candidates):
            continue
        similarity = block[np.searchsorted(wanted, candidates)] @ reduced_queries[number]
        order = np.argsort(-similarity, kind="stable")[:width]
        scores[number, : len(order)] = similarity[order]
        best[number, : len(order)] = candidates[order]
    return scores, best
