"""The index-backend contract on Milvus: Milvus Lite and a real standalone Milvus 2.3.5 server.

The same cases as ``tests/test_index_backends.py`` (seeded clustered vectors against brute-force
NumPy search): an exact index matches to 1e-5, approximate ones keep recall@10 >= 0.95, ``add``
continues the row ids, ``k`` past the index size pads like FAISS, and a saved pointer opens the
same collection again. The real server is started by ``tests.milvus_server`` on loopback.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from core.metrics import neighbour_recall
from index.params import IndexPlan
from tests.milvus_server import milvus_lite_uri, milvus_server_uri  # noqa: F401 (fixtures)
from tests.test_index_backends import brute_force, clustered_vectors

pytestmark = pytest.mark.slow

N, D, NQ, K = 2000, 32, 50, 10
PLANS = {
    "flat": IndexPlan("Flat"),
    "ivf": IndexPlan("IVF16,Flat", {"nprobe": 16}),
    "hnsw": IndexPlan("HNSW16,Flat", {"efSearch": 128}),
}


@pytest.fixture(scope="module")
def synthetic():
    return clustered_vectors(N, D, NQ)


@pytest.fixture(params=["lite", "server"])
def backend(request):
    from index.milvus import MilvusBackend

    uri = request.getfixturevalue("milvus_lite_uri" if request.param == "lite" else "milvus_server_uri")
    backend = MilvusBackend(uri)
    yield backend
    for name in backend.collections():
        backend.drop(name)
    backend.close()


@pytest.mark.parametrize("plan_name", list(PLANS))
def test_results_match_brute_force(backend, plan_name, synthetic, tmp_path: Path):
    docs, queries = synthetic
    plan = PLANS[plan_name]
    index = backend.build(docs, plan)
    assert (index.ntotal, index.dim) == (N, D)
    scores, ids = index.search(queries, K)
    truth_ids, truth_scores = brute_force(docs, queries, K)
    if plan_name == "flat":
        np.testing.assert_allclose(scores, truth_scores, atol=1e-5)
        assert neighbour_recall(ids, truth_ids) == 1.0
    else:
        assert neighbour_recall(ids, truth_ids) >= 0.95
    index.save(tmp_path / "pointer.json")
    reopened = backend.open(tmp_path / "pointer.json", plan)
    np.testing.assert_array_equal(reopened.search(queries, K)[1], ids)
    assert reopened.describe()["backend"] == "milvus"


def test_add_extends_the_index_and_k_past_the_size_pads(backend, synthetic):
    docs, _ = synthetic
    index = backend.build(docs[:1500], PLANS["flat"])
    index.add(docs[1500:])
    assert index.ntotal == N
    _, ids = index.search(docs[1600:1610], 1)
    assert ids[:, 0].tolist() == list(range(1600, 1610))
    small = backend.build(docs[:3], PLANS["flat"])
    scores, rows = small.search(docs[:1], 10)
    assert sorted(rows[0][rows[0] >= 0].tolist()) == [0, 1, 2]
