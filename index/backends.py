"""The index-backend contract, and its first implementations: FAISS on the CPU, FAISS on a GPU.

:class:`VectorIndex` is what the index builder, the service and the benchmarks need of one
dimension's inner-product index; :class:`IndexBackend` builds and opens them. Backends are
registered by name (:func:`register_backend`, :func:`get_backend`) and chosen at load time
(:func:`backend_for` maps a device to one). Every registered backend passes the one contract
test, ``tests/test_index_backends.py``. A new engine implements these two protocols and
registers one name.

FAISS indexes are always written in FAISS's CPU format, so a folder built on a GPU machine
loads on a laptop and the other way round.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from core.errors import ConfigError, MrlError
from index.filters import SearchFilter
from index.params import HNSW_EF_CONSTRUCTION, IndexPlan

logger = logging.getLogger(__name__)

Device = Literal["auto", "cpu", "gpu"]
MISSING_SCORE = np.finfo(np.float32).min  # what FAISS puts in the places of missing hits (inner product), row id -1


class EngineUnavailable(MrlError):
    """The engine that holds an index (a Milvus server) cannot be reached, or did not answer in time.

    Not an :class:`IndexFolderError`: the index may be perfectly good, and the same request may
    work a moment later. At start-up it is one line and exit code 2; while serving, and on a
    reload, the service answers 503 and reports not ready until the engine answers again.
    """


class VectorIndex(Protocol):
    """One dimension's inner-product index, as the builder, the service and the benchmarks use it."""

    backend: str  # the registered name of the backend that made it
    thread_safe: bool  # whether several threads may search it at once

    @property
    def ntotal(self) -> int: ...

    @property
    def dim(self) -> int: ...

    def add(self, vectors: np.ndarray) -> None:
        """Append rows; their ids continue from ``ntotal``."""

    def search(self, queries: np.ndarray, k: int, where: SearchFilter | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` by inner product for each query row: ``(scores, row ids)``, best first; -1 pads.

        With ``where``, only the rows it allows are searched (before the scan, not dropped after it).
        """

    def save(self, path: Path) -> None:
        """Write the index to one file that :meth:`IndexBackend.open` reads back."""

    def describe(self) -> dict[str, Any]:
        """What the manifest and ``/dims`` say of it: backend, index type, search parameters, device."""

    def close(self) -> None:
        """Release what it holds (device memory); it is not searched afterwards."""


class IndexBackend(Protocol):
    """Builds and opens :class:`VectorIndex` objects of one engine."""

    name: str

    def available(self) -> bool:
        """Whether this machine can run it (a GPU backend without a GPU cannot)."""

    def build(self, vectors: np.ndarray, plan: IndexPlan, train_vectors: np.ndarray | None = None) -> VectorIndex:
        """A new index of ``vectors`` (unit length) laid out as ``plan`` says, trained if it needs it.

        A type that needs training is trained on ``train_vectors`` when given (a sample), else on
        ``vectors``; with a sample, ``vectors`` may be empty and be added later with
        :meth:`VectorIndex.add`, a chunk at a time.
        """

    def open(self, path: Path, plan: IndexPlan) -> VectorIndex:
        """The index :meth:`VectorIndex.save` wrote at ``path``, with ``plan``'s search parameters."""


def describe_plan(backend: str, plan: IndexPlan, device: str) -> dict[str, Any]:
    """The keys every :meth:`VectorIndex.describe` has; a backend adds its own after them."""
    return {"backend": backend, "factory": plan.factory, "search_params": dict(plan.search_params), "device": device}


def gpu_count() -> int:
    """GPUs FAISS can use: 0 with faiss-cpu or without CUDA."""
    import faiss

    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def faiss_threads() -> int:
    """Threads FAISS's CPU indexes search with (OpenMP; process-wide)."""
    import faiss

    return faiss.omp_get_max_threads()


def set_faiss_threads(count: int) -> None:
    """Make FAISS's CPU indexes search with ``count`` threads, process-wide."""
    import faiss

    faiss.omp_set_num_threads(count)


class FaissIndex:
    """One dimension's FAISS inner-product index on the CPU (a :class:`VectorIndex`)."""

    backend = "faiss-cpu"
    device = "cpu"
    _mapped = False  # loaded memory-mapped from a file

    def __init__(self, index, plan: IndexPlan) -> None:  # index: faiss.Index
        self.plan = plan
        self._index = self._place(index)
        self._apply_search_params()

    # --- construction -------------------------------------------------------------
    @classmethod
    def build(cls, vectors: np.ndarray, plan: IndexPlan, train_vectors: np.ndarray | None = None) -> FaissIndex:
        """Create, train if the type needs it (on ``train_vectors`` when given), and fill an index with ``vectors``."""
        import faiss

        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        cpu_index = faiss.index_factory(vectors.shape[1], plan.factory, faiss.METRIC_INNER_PRODUCT)
        if "HNSW" in plan.factory:
            faiss.ParameterSpace().set_index_parameter(cpu_index, "efConstruction", HNSW_EF_CONSTRUCTION)
        if plan.kmeans_iterations is not None:
            faiss.extract_index_ivf(cpu_index).cp.niter = plan.kmeans_iterations
        built = cls(cpu_index, plan)
        if not built._index.is_trained:
            training = vectors if train_vectors is None else train_vectors
            built._index.train(np.ascontiguousarray(training, dtype=np.float32))
        built.add(vectors)
        return built

    @classmethod
    def load(cls, path: Path, plan: IndexPlan) -> FaissIndex:
        """Open a saved index, memory-mapped read-only: its vectors (or codes) stay in the page cache, shared
        by every process that opens the same file (``mrl serve --workers``) instead of copied into each.

        FAISS maps the codes of flat, SQ and PQ indexes, the storage of HNSW and the lists of IVF indexes;
        an HNSW graph and IVF centroids are read into memory. A mapped index takes no more vectors.
        """
        import faiss

        loaded = cls(faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC), plan)
        loaded._mapped = loaded.device == "cpu"  # a GPU copy is its own
        return loaded

    def save(self, path: Path) -> None:
        """Write the index file through Python's I/O, so a full disk or a read-only folder is an ``OSError``
        with its errno (FAISS's own writer reports them as ``RuntimeError`` text)."""
        import faiss

        data = faiss.serialize_index(self._to_cpu())
        with open(path, "wb") as handle:
            handle.write(memoryview(data))

    def describe(self) -> dict[str, Any]:
        return describe_plan(self.backend, self.plan, self.device)

    def close(self) -> None:
        self._index = None
        self._resources = None
        self._cpu_copy = None

    # --- use ----------------------------------------------------------------------
    @property
    def thread_safe(self) -> bool:
        """FAISS CPU indexes take concurrent searches; GPU resources are not thread-safe."""
        return self.device == "cpu"

    @property
    def ntotal(self) -> int:
        return int(self._index.ntotal)

    @property
    def dim(self) -> int:
        return int(self._index.d)

    def add(self, vectors: np.ndarray) -> None:
        if self._mapped:  # FAISS would abort the whole process on a mapped vector's resize
            raise TypeError("a memory-mapped index is read-only: build a new one to add vectors")
        self._index.add(np.ascontiguousarray(vectors, dtype=np.float32))

    def search(self, queries: np.ndarray, k: int, where: SearchFilter | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` by inner product: ``(scores, row ids)``, each ``(n_queries, k)``; -1 pads missing hits.

        With ``where``, FAISS skips every row it does not allow while it scans (an ``IDSelector``, with the
        index's own nprobe or efSearch); no allowed row at all answers without searching. An approximate
        index finds allowed rows only among those it visits: under a very selective filter, IVF and HNSW
        can return fewer than ``k`` hits although more rows are allowed.
        """
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        k = min(k, max(self.ntotal, 1))
        if where is None:
            return self._index.search(queries, k)
        rows = where.allowed(self.ntotal)
        if not len(rows):
            return np.full((len(queries), k), MISSING_SCORE, dtype=np.float32), np.full((len(queries), k), -1)
        return self._filtered_search(queries, k, rows)

    def _filtered_search(self, queries: np.ndarray, k: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return selected_search(self._index, queries, k, rows)

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


def selected_search(index, queries: np.ndarray, k: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``index.search`` (a CPU ``faiss.Index``) over the sorted ``rows`` only: a bitmap ``IDSelector``, passed
    in the search parameters of the index's type with its own nprobe (IVF) or efSearch (HNSW)."""
    import faiss

    ntotal = int(index.ntotal)
    allowed = np.zeros(ntotal, dtype=bool)
    allowed[rows] = True
    bitmap = np.packbits(allowed, bitorder="little")  # FAISS reads bit (i % 8) of byte i // 8
    selector = faiss.IDSelectorBitmap(ntotal, faiss.swig_ptr(bitmap))
    ivf = faiss.try_extract_index_ivf(index)
    inner = faiss.downcast_index(index.index if isinstance(index, faiss.IndexPreTransform) else index)
    if ivf is not None:
        params = faiss.SearchParametersIVF(sel=selector, nprobe=ivf.nprobe, max_codes=ivf.max_codes)
    elif isinstance(inner, faiss.IndexHNSW):
        params = faiss.SearchParametersHNSW(sel=selector, efSearch=inner.hnsw.efSearch)
    else:
        params = faiss.SearchParameters(sel=selector)
    scores, found = index.search(queries, k, params=params)
    del bitmap  # the selector reads it until here
    return scores, found


class FaissGpuIndex(FaissIndex):
    """The same index moved to GPU 0; types FAISS cannot run there (HNSW) stay on the CPU.

    FAISS's GPU indexes take no ``IDSelector``: a filtered search runs on a CPU copy of the index (made at
    the first filtered search, with the same search parameters, and again after an ``add``), so it gives
    exactly the CPU backend's answer; unfiltered searches stay on the GPU.
    """

    backend = "faiss-gpu"
    device = "gpu"
    _cpu_copy = None

    def add(self, vectors: np.ndarray) -> None:
        super().add(vectors)
        self._cpu_copy = None

    def _filtered_search(self, queries: np.ndarray, k: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.device != "gpu":
            return super()._filtered_search(queries, k, rows)
        if self._cpu_copy is None:
            import faiss

            copy = self._to_cpu()
            for name, value in self.plan.search_params.items():
                faiss.ParameterSpace().set_index_parameter(copy, name, value)
            self._cpu_copy = copy
        return selected_search(self._cpu_copy, queries, k, rows)

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


class FaissBackend:
    """An :class:`IndexBackend` over one of the FAISS index classes above."""

    def __init__(self, name: str, index_class: type[FaissIndex], needs_gpu: bool) -> None:
        self.name = name
        self.index_class = index_class
        self.needs_gpu = needs_gpu

    def available(self) -> bool:
        return not self.needs_gpu or gpu_count() > 0

    def build(self, vectors: np.ndarray, plan: IndexPlan, train_vectors: np.ndarray | None = None) -> FaissIndex:
        return self.index_class.build(vectors, plan, train_vectors)

    def open(self, path: Path, plan: IndexPlan) -> FaissIndex:
        return self.index_class.load(path, plan)


_BACKENDS: dict[str, IndexBackend] = {
    "faiss-cpu": FaissBackend("faiss-cpu", FaissIndex, needs_gpu=False),
    "faiss-gpu": FaissBackend("faiss-gpu", FaissGpuIndex, needs_gpu=True),
}


def register_backend(backend: IndexBackend) -> IndexBackend:
    """Make ``backend`` known by its name (replacing one of that name); returns it."""
    _BACKENDS[backend.name] = backend
    return backend


def registered_backends() -> list[str]:
    return sorted(_BACKENDS)


def get_backend(name: str) -> IndexBackend:
    """The backend registered as ``name``.

    Raises:
        ConfigError: For an unknown name (the message lists the registered ones) or one this machine lacks.
    """
    if name not in _BACKENDS:
        raise ConfigError(f"unknown index backend {name!r}; registered: {', '.join(registered_backends())}")
    backend = _BACKENDS[name]
    if not backend.available():
        raise ConfigError(f"index backend {name!r} cannot run here (for faiss-gpu: install faiss-gpu and CUDA)")
    return backend


def backend_for(device: Device = "auto") -> IndexBackend:
    """The FAISS backend for ``device``; ``auto`` means the GPU when FAISS sees one.

    Raises:
        ConfigError: If ``gpu`` is asked for and FAISS has no GPU.
    """
    if device == "gpu" and gpu_count() == 0:
        raise ConfigError("device 'gpu' requested but FAISS sees no GPU (install faiss-gpu and CUDA, or use cpu)")
    if device == "gpu" or (device == "auto" and gpu_count() > 0):
        return get_backend("faiss-gpu")
    return get_backend("faiss-cpu")
