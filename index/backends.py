"""Vector index backends behind one interface: FAISS on the CPU, FAISS on a GPU.

The backend is chosen at load time (:func:`backend_for`); both pass the same contract
test. Indexes are always written in FAISS's CPU format, so a folder built on a GPU
machine loads on a laptop and the other way round.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import numpy as np

from core.errors import ConfigError
from index.params import HNSW_EF_CONSTRUCTION, IndexPlan

logger = logging.getLogger(__name__)

Device = Literal["auto", "cpu", "gpu"]


def gpu_count() -> int:
    """GPUs FAISS can use: 0 with faiss-cpu or without CUDA."""
    import faiss

    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


class FaissIndex:
    """One dimension's FAISS inner-product index on the CPU."""

    device = "cpu"

    def __init__(self, index, plan: IndexPlan) -> None:  # index: faiss.Index
        self.plan = plan
        self._index = self._place(index)
        self._apply_search_params()

    # --- construction -------------------------------------------------------------
    @classmethod
    def build(cls, vectors: np.ndarray, plan: IndexPlan) -> FaissIndex:
        """Create, train if the type needs it, and fill an index with ``vectors``."""
        import faiss

        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        cpu_index = faiss.index_factory(vectors.shape[1], plan.factory, faiss.METRIC_INNER_PRODUCT)
        if "HNSW" in plan.factory:
            faiss.ParameterSpace().set_index_parameter(cpu_index, "efConstruction", HNSW_EF_CONSTRUCTION)
        built = cls(cpu_index, plan)
        if not built._index.is_trained:
            built._index.train(vectors)
        built.add(vectors)
        return built

    @classmethod
    def load(cls, path: Path, plan: IndexPlan) -> FaissIndex:
        import faiss

        return cls(faiss.read_index(str(path)), plan)

    def save(self, path: Path) -> None:
        import faiss

        faiss.write_index(self._to_cpu(), str(path))

    # --- use ----------------------------------------------------------------------
    @property
    def ntotal(self) -> int:
        return int(self._index.ntotal)

    @property
    def dim(self) -> int:
        return int(self._index.d)

    def add(self, vectors: np.ndarray) -> None:
        self._index.add(np.ascontiguousarray(vectors, dtype=np.float32))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` by inner product: ``(scores, row ids)``, each ``(n_queries, k)``; -1 pads missing hits."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        return self._index.search(queries, min(k, max(self.ntotal, 1)))

    # --- placement hooks ----------------------------------------------------------
    def _place(self, cpu_index):
        return cpu_index

    def _to_cpu(self):
        return self._index

    def _apply_search_params(self) -> None:
        import faiss

        space = (
            faiss.GpuParameterSpace()
            if self.device == "gpu" and hasattr(faiss, "GpuParameterSpace")
            else faiss.ParameterSpace()
        )
        for name, value in self.plan.search_params.items():
            space.set_index_parameter(self._index, name, value)


class FaissGpuIndex(FaissIndex):
    """The same index moved to GPU 0; types FAISS cannot run there (HNSW) stay on the CPU."""

    device = "gpu"

    def _place(self, cpu_index):
        import faiss

        self._resources = faiss.StandardGpuResources()
        try:
            return faiss.index_cpu_to_gpu(self._resources, 0, cpu_index)
        except RuntimeError as exc:  # e.g. HNSW has no GPU implementation
            logger.warning("%s stays on the CPU: %s", self.plan.factory, str(exc).splitlines()[0])
            self.device = "cpu"
            return cpu_index

    def _to_cpu(self):
        import faiss

        return faiss.index_gpu_to_cpu(self._index) if self.device == "gpu" else self._index


def backend_for(device: Device = "auto") -> type[FaissIndex]:
    """The index class for ``device``; ``auto`` means the GPU when FAISS sees one.

    Raises:
        ConfigError: If ``gpu`` is asked for and FAISS has no GPU.
    """
    if device == "gpu" and gpu_count() == 0:
        raise ConfigError("device 'gpu' requested but FAISS sees no GPU (install faiss-gpu and CUDA, or use cpu)")
    if device == "gpu" or (device == "auto" and gpu_count() > 0):
        return FaissGpuIndex
    return FaissIndex
