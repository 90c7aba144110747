"""The contract every registered index backend passes: results match brute-force NumPy search.

Cases come from ``index.backends.registered_backends()``, so a backend registered later is
tested here without a change; one this machine cannot run (faiss-gpu without a GPU) is skipped.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from core.matryoshka import truncate_normalize
from core.metrics import neighbour_recall
from index.backends import FaissIndex, backend_for, get_backend, gpu_count, registered_backends
from index.params import IndexPlan
from tests.helpers.vectors import brute_force, clustered_vectors

N, D, NQ, K = 4000, 64, 100, 10

needs_gpu = pytest.mark.skipif(gpu_count() == 0, reason="FAISS sees no GPU")

PLANS = {
    "flat": IndexPlan("Flat"),
    "hnsw": IndexPlan("HNSW32,Flat", {"efSearch": 128}),
    "ivf": IndexPlan("IVF32,Flat", {"nprobe": 16}),
}
# Index types each backend supports (HNSW has no FAISS GPU implementation: it stays on the CPU there).
SUPPORTED = {"faiss-gpu": ("flat", "ivf")}


def backend_cases() -> list:
    cases = []
    for name in registered_backends():
        marks = [pytest.mark.gpu, needs_gpu] if "gpu" in name else []
        for plan_name in SUPPORTED.get(name, tuple(PLANS)):
            cases.append(pytest.param(name, plan_name, id=f"{name}-{plan_name}", marks=marks))
    return cases


CASES = backend_cases()


@pytest.fixture(scope="module")
def synthetic():
    return clustered_vectors(N, D, NQ)


@pytest.mark.parametrize(("backend", "plan_name"), CASES)
def test_results_match_brute_force(backend, plan_name, synthetic, tmp_path: Path):
    backend = get_backend(backend)
    docs, queries = synthetic
    plan = PLANS[plan_name]
    index = backend.build(docs, plan)
    assert (index.ntotal, index.dim) == (N, D)
    scores, ids = index.search(queries, K)
    truth_ids, truth_scores = brute_force(docs, queries, K)
    if plan.exact:
        np.testing.assert_allclose(scores, truth_scores, atol=1e-5)
        assert neighbour_recall(ids, truth_ids) == 1.0
    else:
        assert neighbour_recall(ids, truth_ids) >= 0.95

    # Written in CPU format, read back by the same backend: same answers.
    index.save(tmp_path / "i.faiss")
    reloaded = backend.open(tmp_path / "i.faiss", plan)
    np.testing.assert_array_equal(reloaded.search(queries, K)[1], ids)
    description = reloaded.describe()
    assert description["backend"] == backend.name and description["factory"] == plan.factory
    assert description["search_params"] == plan.search_params
    reloaded.close()


@pytest.mark.parametrize(("backend", "plan_name"), CASES)
def test_add_extends_the_index(backend, plan_name, synthetic):
    docs, queries = synthetic
    index = get_backend(backend).build(docs[:3000], PLANS[plan_name])
    index.add(docs[3000:])
    assert index.ntotal == N
    _, ids = index.search(docs[3500:3510], 1)
    assert ids[:, 0].tolist() == list(range(3500, 3510))


def test_k_larger_than_index_and_single_query():
    docs = truncate_normalize(np.eye(3, dtype=np.float32), 3)
    index = FaissIndex.build(docs, IndexPlan("Flat"))
    scores, ids = index.search(docs[1], 10)
    assert ids[0, 0] == 1 and sorted(ids[0].tolist()) == [0, 1, 2]
    assert scores.shape == (1, 3)


def test_backend_choice():
    assert backend_for("cpu").name == "faiss-cpu"
    if gpu_count() == 0:
        assert backend_for("auto").name == "faiss-cpu"
        with pytest.raises(ValueError, match="FAISS sees no GPU"):
            backend_for("gpu")
    else:
        assert backend_for("auto").name == "faiss-gpu"


def test_backends_are_found_by_name_and_unknown_names_listed():
    assert {"faiss-cpu", "faiss-gpu"} <= set(registered_backends())
    with pytest.raises(ValueError, match="unknown index backend 'nope'; registered: faiss-cpu, faiss-gpu"):
        get_backend("nope")


def test_a_new_backend_is_one_registered_name(monkeypatch):
    """A second engine needs only the two protocols and one registered name (here: FAISS under another name)."""
    import index.backends as backends
    from index.backends import FaissBackend, register_backend

    monkeypatch.setattr(backends, "_BACKENDS", dict(backends._BACKENDS))
    other = register_backend(FaissBackend("other-engine", FaissIndex, needs_gpu=False))
    assert get_backend("other-engine") is other and "other-engine" in registered_backends()


@pytest.mark.parametrize(
    ("plan", "index_type", "build", "search"),
    [
        (IndexPlan("Flat"), "FLAT", {}, {}),
        (IndexPlan("IVF64,Flat", {"nprobe": 8}), "IVF_FLAT", {"nlist": 64}, {"nprobe": 8}),
        (IndexPlan("IVF64,PQ8", {"nprobe": 8}), "IVF_PQ", {"nlist": 64, "m": 8, "nbits": 8}, {"nprobe": 8}),
        (IndexPlan("HNSW32,Flat", {"efSearch": 64}), "HNSW", {"M": 32}, {"ef": 64}),
    ],
)
def test_faiss_plans_map_onto_milvus_index_types(plan, index_type, build, search):
    from index.milvus import milvus_layout

    layout = milvus_layout(plan)
    assert layout.index_type == index_type and build.items() <= layout.build_params.items()
    assert layout.search_params == search


def test_a_plan_without_a_milvus_equivalent_is_refused_by_name():
    from index.milvus import milvus_layout

    with pytest.raises(ValueError, match="'OPQ16,IVF64,PQ16' has no Milvus equivalent"):
        milvus_layout(IndexPlan("OPQ16,IVF64,PQ16"))


@pytest.mark.parametrize("plan_name", ["flat", "hnsw", "ivf"])
def test_a_loaded_cpu_index_is_memory_mapped_and_read_only(synthetic, tmp_path: Path, plan_name: str):
    """Workers of one server share a loaded index through the page cache, not a copy each."""
    vectors, queries = synthetic[0], synthetic[1]
    built = FaissIndex.build(vectors, PLANS[plan_name])
    path = tmp_path / f"{plan_name}.faiss"
    built.save(path)

    loaded = FaissIndex.load(path, PLANS[plan_name])

    assert str(path) in Path("/proc/self/maps").read_text()
    np.testing.assert_array_equal(loaded.search(queries, K)[1], built.search(queries, K)[1])
    with pytest.raises(TypeError, match="read-only"):
        loaded.add(vectors[:1])
    loaded.close()
