from __future__ import annotations

import pytest

from index.params import (
    FLAT_MAX_VECTORS,
    IndexPlan,
    choose_index,
    flat_bytes,
    hnsw_bytes,
    ivf_lists,
    pq_subvectors,
)

GIB = 1 << 30


def test_small_corpus_gets_exact_flat():
    assert choose_index(5_183, 384, GIB) == IndexPlan("Flat")
    assert choose_index(FLAT_MAX_VECTORS, 64, GIB).exact


def test_large_corpus_gets_hnsw_when_it_fits():
    plan = choose_index(1_000_000, 384, 4 * GIB)
    assert plan == IndexPlan("HNSW32,Flat", {"efSearch": 128})
    assert not plan.exact


def test_small_corpus_that_does_not_fit_flat_goes_approximate():
    assert choose_index(50_000, 384, flat_bytes(50_000, 384) - 1).factory.startswith("IVF")


def test_memory_bound_gets_ivf_pq_within_budget():
    budget = 100 * (1 << 20)
    plan = choose_index(1_000_000, 384, budget)
    assert plan.factory == "IVF4096,PQ64"
    assert plan.search_params == {"nprobe": 32}
    lists, m = 4096, 64
    assert lists * 384 * 4 + 1_000_000 * (m + 8) <= budget


def test_sizes():
    assert flat_bytes(10, 384) == 15_360
    assert hnsw_bytes(10, 384) > flat_bytes(10, 384)


@pytest.mark.parametrize(("n", "lists"), [(1_000_000, 4096), (100_000, 1024), (1000, 16), (10, 1)])
def test_ivf_lists_power_of_two_with_enough_training_points(n, lists):
    assert ivf_lists(n) == lists
    assert n >= 39 * lists or lists == 1


def test_pq_subvectors_divide_dimension():
    assert pq_subvectors(384, 1000) == 192
    assert pq_subvectors(384, 50) == 48
    assert pq_subvectors(64, 0.5) == 1


def test_rejects_non_positive():
    with pytest.raises(ValueError, match="must be positive"):
        choose_index(0, 384, GIB)
