"""Seeded synthetic vectors and exact search, for checking index backends against brute force."""

from __future__ import annotations

import numpy as np

from core.matryoshka import truncate_normalize


def clustered_vectors(n: int, d: int, nq: int, seed: int = 42) -> tuple[np.ndarray, np.ndarray]:
    """Seeded clustered documents and queries (as real embeddings are), unit length."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(20, d))
    docs = centers[rng.integers(0, 20, n)] + 0.5 * rng.normal(size=(n, d))
    queries = centers[rng.integers(0, 20, nq)] + 0.5 * rng.normal(size=(nq, d))
    return truncate_normalize(docs, d), truncate_normalize(queries, d)


def brute_force(docs, queries, k):
    scores = queries @ docs.T
    return np.argsort(-scores, axis=1, kind="stable")[:, :k], np.sort(scores, axis=1)[:, ::-1][:, :k]


def filtered_brute_force(docs, queries, k, allowed):
    """Exact top ``k`` among the rows ``allowed`` (a bool mask): ``(ids, scores)``, padded with -1 / -inf."""
    rows = np.flatnonzero(allowed)
    ids = np.full((len(queries), k), -1, dtype=np.int64)
    scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    if len(rows):
        similarity = queries @ docs[rows].T
        order = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
        ids[:, : order.shape[1]] = rows[order]
        scores[:, : order.shape[1]] = np.take_along_axis(similarity, order, axis=1)
    return ids, scores
