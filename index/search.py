"""Searching an index at a Matryoshka dimension, single-stage or two-stage: composed once, here.

Two-stage search (the adaptive retrieval of the Matryoshka paper) shortlists candidates with
the small, fast index at ``dim``, then re-scores them exactly with the stored full vectors
truncated to ``rerank_dim``. The service and every benchmark call :func:`staged_search`, so
what a benchmark measures is the code path the service runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import numpy as np

from core.matryoshka import truncate_normalize
from index.backends import VectorIndex
from index.filters import SearchFilter

GROUP_FETCH = 4  # passages fetched per document wanted, at first, when hits are grouped by document


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
    group: Callable[[list[int]], list[str]] | None = None,
    where: SearchFilter | None = None,
) -> StagedHits:
    """Top ``k`` per query at ``dim``; with ``rerank_dim``, shortlist ``k * candidates`` there and re-score.

    With ``group`` (the document id of each of a list of rows), the hits are the best passage of each of
    ``k`` distinct documents: passages are fetched ``GROUP_FETCH`` times over, and again four times as
    many while a query has fewer than ``k`` documents and more passages are left, then the best passage
    of each document is kept, in score order. In two-stage search the shortlist grows with the fetch.

    Args:
        index: The index of dimension ``dim``.
        full_vectors: Every document's full-dimension vector (memory-mapped; only shortlisted rows are read).
        queries: ``(n, full_dim)`` query vectors, unnormalised; each stage truncates and normalises them.
        dim: The dimension searched (the shortlist's, in two-stage search).
        k: Hits kept per query.
        rerank_dim: Re-scoring dimension (larger than ``dim``), or None for single-stage search.
        candidates: The shortlist holds ``k * candidates`` rows.
        search_lock: Held around the index search, for indexes that are not thread-safe.
        where: Search only the rows this filter allows (in the first stage: re-scoring sees only those).
    """
    if group is None:
        return _staged(index, full_vectors, queries, dim, k, rerank_dim, candidates, search_lock, where)
    fetch, known = k * GROUP_FETCH, {}
    search_seconds = rerank_seconds = 0.0
    while True:
        fetch = min(fetch, index.ntotal)
        found = _staged(index, full_vectors, queries, dim, fetch, rerank_dim, candidates, search_lock, where)
        search_seconds += found.search_seconds
        rerank_seconds += found.rerank_seconds
        new = sorted({int(row) for row in found.rows.ravel() if row >= 0} - known.keys())
        known.update(zip(new, group(new), strict=True))
        scores, rows, short = _best_per_group(found, known, k)
        if not short or fetch >= index.ntotal:
            return StagedHits(scores, rows, search_seconds, rerank_seconds)
        fetch *= 4


def _staged(
    index: VectorIndex,
    full_vectors: np.ndarray,
    queries: np.ndarray,
    dim: int,
    k: int,
    rerank_dim: int | None,
    candidates: int,
    search_lock: AbstractContextManager | None,
    where: SearchFilter | None = None,
) -> StagedHits:
    started = time.perf_counter()
    fetch = k * candidates if rerank_dim else k
    with search_lock or nullcontext():
        reduced = truncate_normalize(queries, dim)
        scores, rows = index.search(reduced, fetch) if where is None else index.search(reduced, fetch, where=where)
    searched = time.perf_counter()
    if rerank_dim:
        scores, rows = rerank(full_vectors, queries, rows, rerank_dim, k)
    finished = time.perf_counter()
    return StagedHits(scores, rows, searched - started, finished - searched if rerank_dim else 0.0)


def _best_per_group(found: StagedHits, group_of: dict[int, str], k: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """The first (best) row of each group per query, ``k`` groups at most; and whether a query got fewer
    than ``k`` although every row fetched for it was a hit (so that fetching more could find more)."""
    scores = np.full((len(found.rows), k), -np.inf, dtype=np.float32)
    rows = np.full((len(found.rows), k), -1, dtype=np.int64)
    short = False
    for number, (row_scores, row_ids) in enumerate(zip(found.scores, found.rows, strict=True)):
        seen: set[str] = set()
        for score, row in zip(row_scores, row_ids, strict=True):
            if row < 0 or len(seen) == k:
                break
            name = group_of[int(row)]
            if name not in seen:
                scores[number, len(seen)], rows[number, len(seen)] = score, row
                seen.add(name)
        short = short or (len(seen) < k and bool(row_ids[-1] >= 0))
    return scores, rows, short


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
