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
