"""Choosing a FAISS index type from (vector count, dimension, memory budget).

A pure function so the choice is visible, testable and overridable (``--index-type``):
exact ``Flat`` while a brute-force scan is fast enough and fits; HNSW beyond that while
its graph fits; IVF with product quantisation when memory is what limits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

FLOAT_BYTES = 4
# Flat scans every vector: ~100k × 384 floats is ~150 MB per query batch pass, a few ms on one core.
FLAT_MAX_VECTORS = 100_000
HNSW_M = 32
HNSW_EF_SEARCH = 128
HNSW_EF_CONSTRUCTION = 80
IVF_NPROBE = 32
PQ_BYTES_PER_SUBVECTOR = 1


@dataclass(frozen=True)
class IndexPlan:
    """A FAISS factory string plus the search-time parameters it needs (and, optionally, how to train it)."""

    factory: str
    search_params: dict[str, int] = field(default_factory=dict)
    kmeans_iterations: int | None = None  # IVF k-means rounds; None: FAISS's default for IVF (10)

    @property
    def exact(self) -> bool:
        return self.factory == "Flat"


def search_params_for(factory: str) -> dict[str, int]:
    """Search-time parameters for a FAISS factory string (empty for exact types)."""
    if "HNSW" in factory:
        return {"efSearch": HNSW_EF_SEARCH}
    if factory.startswith("IVF"):
        return {"nprobe": IVF_NPROBE}
    return {}


def flat_bytes(n_vectors: int, dim: int) -> int:
    return n_vectors * dim * FLOAT_BYTES


def hnsw_bytes(n_vectors: int, dim: int, m: int = HNSW_M) -> int:
    # Vectors plus about 2·M neighbour ids (int32) per vector on the base layer, and upper layers (~1/M).
    return flat_bytes(n_vectors, dim) + int(n_vectors * 2 * m * 4 * (1 + 1 / m))


def ivf_lists(n_vectors: int) -> int:
    """Number of IVF cells: about 4·sqrt(n), a power of two, with ≥ 39 training points per cell."""
    target = 4 * math.sqrt(n_vectors)
    lists = 1 << max(0, round(math.log2(max(target, 1))))
    while lists > 1 and n_vectors < 39 * lists:
        lists //= 2
    return lists


def pq_subvectors(dim: int, max_bytes_per_vector: float) -> int:
    """Largest divisor of ``dim`` (≤ dim/2, so each sub-vector has ≥ 2 coordinates) within the byte budget."""
    candidates = [
        m for m in range(1, dim // 2 + 1) if dim % m == 0 and m * PQ_BYTES_PER_SUBVECTOR <= max_bytes_per_vector
    ]
    return max(candidates, default=1)


def choose_index(n_vectors: int, dim: int, memory_budget_bytes: int) -> IndexPlan:
    """Pick the index type for one dimension.

    Args:
        n_vectors: Vectors to index.
        dim: Their dimension.
        memory_budget_bytes: What this dimension's index may take in memory.

    Returns:
        ``Flat`` (exact) up to ``FLAT_MAX_VECTORS`` if it fits; else ``HNSW32,Flat`` if it
        fits; else ``IVF{n},PQ{m}`` sized to the budget.

    Raises:
        ValueError: For non-positive arguments.
    """
    if n_vectors <= 0 or dim <= 0 or memory_budget_bytes <= 0:
        raise ValueError("vector count, dimension and memory budget must be positive")
    if n_vectors <= FLAT_MAX_VECTORS and flat_bytes(n_vectors, dim) <= memory_budget_bytes:
        return IndexPlan("Flat")
    if hnsw_bytes(n_vectors, dim) <= memory_budget_bytes:
        factory = f"HNSW{HNSW_M},Flat"
        return IndexPlan(factory, search_params_for(factory))
    lists = ivf_lists(n_vectors)
    centroid_bytes = lists * dim * FLOAT_BYTES
    per_vector = (memory_budget_bytes - centroid_bytes) / n_vectors - 8  # 8 bytes: the stored id
    m = pq_subvectors(dim, per_vector)
    return IndexPlan(f"IVF{lists},PQ{m}", {"nprobe": min(IVF_NPROBE, lists)})
