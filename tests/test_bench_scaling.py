"""``mrl bench scaling``: the synthetic data and the pure helpers exactly, and one small smoke run.

The smoke run goes through the benchmark's own argument parser on a few thousand vectors:
structure and sanity of the outputs (recall in [0, 1], flat exact, positive times), never timings.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks import scaling
from benchmarks.scaling import (
    CellResult,
    ScalingConfig,
    build_index,
    check_config,
    factory_for,
    flat_speedups,
    search_params,
    synthetic_corpus,
    synthetic_queries,
)
from core.matryoshka import DimensionError, truncate_normalize
from index.backends import faiss_threads, set_faiss_threads
from index.params import HNSW_EF_CONSTRUCTION


def bench(*argv: str) -> int:
    """Run ``mrl bench scaling ...`` through the benchmark's parser, registered as benchmarks/cli.py will."""
    from benchmarks.scaling import add_scaling_parser

    parser = argparse.ArgumentParser(prog="mrl")
    commands = parser.add_subparsers(dest="command", required=True)
    add_scaling_parser(commands.add_parser("bench").add_subparsers(dest="action", required=True))
    args = parser.parse_args(["bench", *argv])
    return args.handler(args)


# --- synthetic data and helpers -------------------------------------------------------------


def test_synthetic_corpus_is_seeded_unit_length_and_front_loaded():
    corpus = synthetic_corpus(3000, 64, np.random.default_rng(7))
    again = synthetic_corpus(3000, 64, np.random.default_rng(7))
    assert corpus.dtype == np.float32 and corpus.shape == (3000, 64)
    np.testing.assert_array_equal(corpus, again)
    np.testing.assert_allclose(np.linalg.norm(corpus, axis=1), 1.0, atol=1e-5)
    spread = corpus.var(axis=0)
    assert spread[:8].mean() > 4 * spread[-8:].mean()  # leading coordinates carry the signal


def test_queries_are_perturbed_corpus_vectors_from_the_first_rows():
    corpus = synthetic_corpus(3000, 64, np.random.default_rng(0))
    queries = synthetic_queries(corpus, 50, 1000, np.random.default_rng(1))
    np.testing.assert_allclose(np.linalg.norm(queries, axis=1), 1.0, atol=1e-5)
    best = (queries @ corpus.T).max(axis=1)
    assert np.median(best) > 0.8 and best.min() > 0.5  # each query stays close to its source row...
    assert best.max() < 0.9999  # ...without being a copy of it


def faiss_built(kind: str, corpus: np.ndarray, dim: int, params: dict[str, int], rng: np.random.Generator):
    """The index as the benchmark built it with FAISS directly, before the backend contract."""
    import faiss

    size = len(corpus)
    factory = factory_for(kind, size)
    index = faiss.IndexFlatIP(dim) if kind == "flat" else faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    if kind == "ivf":
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.niter = scaling.IVF_KMEANS_ITERATIONS
        sample = np.sort(rng.choice(size, min(size, scaling.IVF_TRAIN_PER_LIST * ivf.nlist), replace=False))
        index.train(truncate_normalize(corpus[sample], dim))
    if kind == "hnsw":
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    for start in range(0, size, scaling.CHUNK_ROWS):
        index.add(truncate_normalize(corpus[start : start + scaling.CHUNK_ROWS], dim))
    for name, value in params.items():
        faiss.ParameterSpace().set_index_parameter(index, name, value)
    return index


@pytest.fixture
def one_faiss_thread():
    """One FAISS thread: a multi-threaded HNSW insertion order depends on scheduling."""
    threads = faiss_threads()
    set_faiss_threads(1)
    yield
    set_faiss_threads(threads)


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_indexes_built_through_the_backend_are_the_faiss_indexes_built_directly(kind, monkeypatch, one_faiss_thread):
    # On a small corpus: a training sample smaller than it, several chunks, and k-means rounds
    # other than FAISS's IVF default (10), so that each of them shows in the results.
    monkeypatch.setattr(scaling, "IVF_TRAIN_PER_LIST", 40)
    monkeypatch.setattr(scaling, "CHUNK_ROWS", 1000)
    monkeypatch.setattr(scaling, "IVF_KMEANS_ITERATIONS", 5)
    corpus = synthetic_corpus(3000, 32, np.random.default_rng(0))
    queries = truncate_normalize(synthetic_queries(corpus, 40, 3000, np.random.default_rng(1)), 16)
    params = search_params(kind, factory_for(kind, 3000), 3000, nprobe=2)
    index, _, train_s = build_index(kind, corpus, 16, params, np.random.default_rng(5))
    assert index.backend == "faiss-cpu" and index.ntotal == 3000 and (train_s is not None) == (kind == "ivf")
    expected = faiss_built(kind, corpus, 16, params, np.random.default_rng(5)).search(queries, 10)
    for found, wanted in zip(index.search(queries, 10), expected, strict=True):
        np.testing.assert_array_equal(found, wanted)


def _flat(size: int, dim: int, batched: float, single: float) -> CellResult:
    return CellResult(size, dim, "flat", "Flat", {}, 0.1, None, size * dim * 4, batched, single, single, 1.0)


def test_flat_speedup_compares_dim_64_with_the_full_dim():
    results = [_flat(1000, 384, 4.0, 8.0), _flat(1000, 64, 1.0, 2.0), _flat(1000, 32, 0.5, 1.0)]
    results.append(_flat(5000, 64, 1.0, 1.0))  # no full-dim row at this size: no ratio
    (speedup,) = flat_speedups(results, 384)
    assert speedup == {"size": 1000, "dim": 64, "full_dim": 384, "batched": 4.0, "single_p50": 4.0, "bytes": 6.0}
    # When 64 is the full dim, the smallest dim is compared instead.
    (small,) = flat_speedups([_flat(10, 64, 2.0, 2.0), _flat(10, 32, 1.0, 1.0)], 64)
    assert small["dim"] == 32 and small["batched"] == 2.0


def test_check_config_resolves_the_default_dims():
    assert check_config(ScalingConfig()) == (384, [384, 256, 128, 64, 32])
    assert check_config(ScalingConfig(full_dim=64, dims=[32, 64])) == (64, [64, 32])


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        ({"dims": [512]}, DimensionError, r"dims \[512\] are not between 1 and the full dimension 384"),
        ({"sizes": [1000, 0]}, ValueError, "--sizes must list positive numbers"),
        ({"sizes": []}, ValueError, "--sizes must list positive numbers"),
        ({"queries": 0}, ValueError, "--queries must be positive"),
        ({"full_dim": 0}, ValueError, "--full-dim must be positive"),
        ({"threads": 0}, ValueError, "--threads must be positive"),
        ({"kinds": ["flat", "pq"]}, ValueError, r"unknown index kinds \['pq'\]"),
        ({"kinds": ["ivf"]}, ValueError, "--kinds must include flat"),
        ({"sizes": [5], "k": 10}, ValueError, "--k 10 is more than the smallest size 5"),
    ],
)
def test_bad_settings_are_refused_in_one_line(overrides, error, message):
    with pytest.raises(error, match=message) as caught:
        check_config(ScalingConfig(**overrides))
    assert "\n" not in str(caught.value)


def test_bad_command_line_input_is_refused_before_any_work(tmp_path: Path):
    with pytest.raises(DimensionError, match="not between 1 and the full dimension 64"):
        bench("scaling", "--sizes", "100", "--full-dim", "64", "--dims", "128", "--out", str(tmp_path))
    with pytest.raises(ValueError, match="--sizes must list positive numbers"):
        bench("scaling", "--sizes", "-5", "--out", str(tmp_path))
    assert not list(tmp_path.iterdir())


# --- smoke run --------------------------------------------------------------------------------


@pytest.mark.benchmark
def test_scaling_smoke_run(tmp_path: Path, capsys):
    argv = ["--sizes", "2000,1000", "--dims", "64,32", "--full-dim", "64", "--kinds", "flat,ivf,hnsw"]
    argv += ["--queries", "20", "--single-queries", "5", "--nprobe", "2", "--hnsw-max-size", "1000", "--threads", "1"]
    assert bench("scaling", *argv, "--out", str(tmp_path)) == 0
    report = json.loads((tmp_path / "scaling.json").read_text())
    cells = [(row["size"], row["dim"], row["kind"]) for row in report["results"]]
    assert cells == [
        (1000, 64, "flat"),
        (1000, 64, "ivf"),
        (1000, 64, "hnsw"),
        (1000, 32, "flat"),
        (1000, 32, "ivf"),
        (1000, 32, "hnsw"),
        (2000, 64, "flat"),
        (2000, 64, "ivf"),
        (2000, 32, "flat"),
        (2000, 32, "ivf"),
    ]
    assert report["skipped"] == [
        {"size": 2000, "kind": "hnsw", "reason": "size above --hnsw-max-size 1000: HNSW build time grows too long"}
    ]
    for row in report["results"]:
        assert 0.0 <= row["recall_at_k"] <= 1.0 and row["build_s"] >= 0
        assert row["batched_ms_per_query"] > 0 and row["single_p50_ms"] > 0 and row["single_mean_ms"] > 0
        assert row["vector_bytes"] == row["size"] * row["dim"] * 4
        if row["kind"] == "flat":
            assert row["recall_at_k"] == 1.0 and row["factory"] == "Flat" and row["scan_bound_ms"] > 0
            assert row["batched_to_bound"] > 0 and row["single_to_bound"] > 0
        else:
            assert row["scan_bound_ms"] is None and row["search_params"]
    ivf = next(row for row in report["results"] if row["kind"] == "ivf")
    assert ivf["search_params"] == {"nprobe": 2} and ivf["train_s"] is not None
    assert [(s["size"], s["dim"], s["full_dim"]) for s in report["flat_speedup"]] == [(1000, 32, 64), (2000, 32, 64)]
    assert all(s["batched"] > 0 and s["single_p50"] > 0 and s["bytes"] == 2.0 for s in report["flat_speedup"])
    assert report["memory_bandwidth"]["read_gb_s"] > 0 and report["memory_bandwidth"]["copy_gb_s"] > 0
    assert report["faiss_threads"] == 1 and report["settings"]["threads"] == 1
    assert report["settings"]["full_dim"] == 64 and report["settings"]["dims"] == [64, 32]
    assert report["peak_rss_mib"] > 0 and report["machine"]["cpu_count"] >= 1
    png = (tmp_path / "scaling.png").read_bytes()
    assert png.startswith(b"\x89PNG") and not list(tmp_path.glob(".*"))  # no temporary files left
    printed = capsys.readouterr().out
    assert printed.splitlines()[0] == "# Search time vs corpus size and dimension"
    assert (tmp_path / "scaling.md").read_text() in printed and "wrote " in printed
    assert "| 2,000 | 64 | flat |" in printed and "- hnsw at 2,000:" in printed


@pytest.mark.benchmark
def test_scaling_is_reproducible_for_a_seed(tmp_path: Path):
    from benchmarks.scaling import run_scaling

    config = dict(sizes=[1500], dims=[32], full_dim=32, kinds=["flat", "ivf"], queries=10, single_queries=2, nprobe=1)
    first = run_scaling(ScalingConfig(**config, threads=1, bandwidth_bytes=2**20))
    second = run_scaling(ScalingConfig(**config, threads=1, bandwidth_bytes=2**20))
    assert [row["recall_at_k"] for row in first["results"]] == [row["recall_at_k"] for row in second["results"]]
    assert first["results"][1]["factory"] == "IVF32,Flat"
