"""``mrl bench quality``: exact checks of its search options and report logic, and a smoke run on the sample.

The search options are checked against brute force on seeded vectors; the smoke run tunes the
tiny random model (``tiny_model``, dims 64 and 32) for two steps on ``data/sample_medical``,
measures it, then measures again from the embedding cache.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks.quality import (
    QualityBenchConfig,
    check_config,
    dataset_folders,
    inner_product_index,
    latency_reports,
    pareto_front,
    pareto_points,
    recommended_dim,
    run_quality,
    search_binary,
    search_binary_rescore,
    search_float,
    search_int8,
    search_two_stage,
    sign_bits,
)
from core.data import DataError, load_beir
from core.matryoshka import truncate_normalize
from index.search import rerank
from tests.conftest import SAMPLE
from tests.helpers.models import TINY_DIMS


@pytest.fixture(scope="module")
def vectors() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    docs = rng.standard_normal((300, 64)).astype(np.float32)
    queries = docs[:20] + 0.3 * rng.standard_normal((20, 64)).astype(np.float32)
    return docs, queries


def brute_force(docs: np.ndarray, query: np.ndarray, dim: int, k: int) -> np.ndarray:
    scores = truncate_normalize(docs, dim) @ truncate_normalize(query, dim)[0]
    return np.argsort(-scores, kind="stable")[:k]


def test_float_search_is_exact_at_each_dim(vectors):
    docs, queries = vectors
    for dim in (64, 16):
        search = search_float(docs, dim)
        for query in queries:
            assert np.array_equal(search(query[None])[0][:10], brute_force(docs, query[None], dim, 10))


def test_two_stage_reorders_the_shortlist_by_full_dim_scores(vectors):
    docs, queries = vectors
    search = search_two_stage(docs, 16, 30)
    for query in queries:
        found = search(query[None])[0]
        shortlist = set(brute_force(docs, query[None], 16, 30))
        assert set(found) == shortlist
        full = truncate_normalize(docs[found], 64) @ truncate_normalize(query[None], 64)[0]
        assert np.all(np.diff(full) <= 1e-6)


def test_two_stage_is_the_exact_shortlist_re_scored_at_full_dim(vectors):
    docs, queries = vectors
    search = search_two_stage(docs, 16, 30)
    for query in queries:
        exact = brute_force(docs, query[None], 16, 30)[None]
        np.testing.assert_array_equal(search(query[None]), rerank(docs, query[None], exact, 64, 30)[1])


@pytest.mark.parametrize("factory", ["Flat", "SQ8"])
def test_float_and_int8_indexes_are_the_faiss_indexes_they_replace(vectors, factory):
    import faiss

    docs, queries = vectors
    reduced = truncate_normalize(docs, 32)
    if factory == "Flat":
        direct = faiss.IndexFlatIP(32)
    else:
        direct = faiss.IndexScalarQuantizer(32, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
        direct.train(reduced)
    direct.add(reduced)
    index = inner_product_index(docs, 32, factory)
    assert index.describe()["backend"] == "faiss-cpu" and index.describe()["factory"] == factory
    for found, wanted in zip(
        index.search(truncate_normalize(queries, 32), 50),
        direct.search(truncate_normalize(queries, 32), 50),
        strict=True,
    ):
        np.testing.assert_array_equal(found, wanted)


def test_int8_ranks_almost_like_float(vectors):
    docs, queries = vectors
    search = search_int8(docs, 64)
    top1 = [search(q[None])[0][0] == brute_force(docs, q[None], 64, 1)[0] for q in queries]
    assert np.mean(top1) >= 0.95


def test_binary_search_orders_by_hamming_distance(vectors):
    docs, queries = vectors
    search = search_binary(docs, 64)
    query = queries[:1]
    found = search(query)[0]
    bits_docs, bits_query = np.unpackbits(sign_bits(docs), axis=1), np.unpackbits(sign_bits(query), axis=1)
    distances = (bits_docs[found] != bits_query).sum(axis=1)
    assert np.all(np.diff(distances) >= 0)
    assert distances[0] == (bits_docs != bits_query).sum(axis=1).min()


def test_binary_rescore_orders_by_float_query_against_signs(vectors):
    docs, queries = vectors
    found = search_binary_rescore(docs, 64)(queries[:1])[0]
    signs = np.where(docs[found] > 0, 1.0, -1.0)
    scores = signs @ truncate_normalize(queries[:1], 64)[0]
    assert np.all(np.diff(scores) <= 1e-5)
    assert set(found) == set(search_binary(docs, 64)(queries[:1])[0])


def test_binary_needs_whole_bytes(vectors):
    with pytest.raises(ValueError, match="divisible by 8"):
        search_binary(vectors[0], 12)


def test_sign_bits_pack_one_bit_per_coordinate():
    packed = sign_bits(np.array([[1.0, -1.0, 0.5, 0.0, -2.0, 3.0, 1.0, -1.0, 1.0] + [0.0] * 7]))
    assert packed.shape == (1, 2)
    assert packed[0, 0] == 0b10100110 and packed[0, 1] == 0b10000000


def test_pareto_front_keeps_points_no_other_beats():
    points = [(1.0, 0.5, "a"), (2.0, 0.4, "b"), (2.0, 0.7, "c"), (3.0, 0.6, "d"), (4.0, 0.9, "e")]
    assert [label for _, _, label in pareto_front(points)] == ["a", "c", "e"]


def _dataset(ndcg_by_dim: dict[int, float]) -> dict:
    rows = [{"model": "tuned", "method": "float32", "dim": d, "ndcg@10": v, "search_ms_p50": 0.1}
            for d, v in ndcg_by_dim.items()]  # fmt: skip
    return {"name": "x", "rows": rows}


def test_recommended_dim_is_the_smallest_keeping_98_percent():
    assert recommended_dim(_dataset({384: 0.80, 128: 0.79, 64: 0.70})) == 128
    assert recommended_dim(_dataset({384: 0.80, 64: 0.785})) == 64


def test_end_to_end_pareto_points_join_latency_cells_by_dim():
    dataset = _dataset({384: 0.8, 64: 0.7})
    dataset["rows"].append({"model": "tuned", "method": "two-stage", "dim": 64, "shortlist": 100, "ndcg@10": 0.79})
    latency = {"cells": [
        {"encoder": "onnx", "dim": 384, "rerank_dim": None, "shortlist": None, "concurrency": 1, "p50_ms": 20.0},
        {"encoder": "onnx", "dim": 64, "rerank_dim": 384, "shortlist": 100, "concurrency": 1, "p50_ms": 19.0},
        {"encoder": "onnx", "dim": 64, "rerank_dim": None, "shortlist": None, "concurrency": 16, "p50_ms": 90.0},
    ]}  # fmt: skip
    assert sorted(pareto_points(dataset, latency)) == [(19.0, 0.79, "onnx 64→384"), (20.0, 0.8, "onnx 384")]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"shortlists": [5]}, "at least 10"),
        ({"timing_queries": 0}, "--timing-queries must be positive"),
        ({"max_train_pairs": 0}, "--max-train-pairs must be positive"),
        ({"tuned": ["scifact"]}, "NAME=PATH"),
        ({"tuned": ["scifact=/no/such/model"]}, "does not exist"),
        ({"latency": ["scifact=/no/such.json"]}, "does not exist"),
    ],
)
def test_bad_settings_are_refused_in_one_line(overrides, message):
    with pytest.raises(ValueError, match=message):
        check_config(QualityBenchConfig(**overrides))


def test_a_latency_file_must_be_a_latency_report(tmp_path):
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"benchmark": "quality"}))
    with pytest.raises(ValueError, match="not a report of `mrl bench latency`"):
        latency_reports(QualityBenchConfig(latency=[f"scifact={path}"]))


def test_missing_datasets_are_named(tmp_path):
    with pytest.raises(DataError, match="pass --data"):
        dataset_folders(QualityBenchConfig(datasets_root=tmp_path))
    with pytest.raises(DataError, match="no corpus.jsonl"):
        dataset_folders(QualityBenchConfig(data=[tmp_path]))


@pytest.mark.benchmark
def test_smoke_run_trains_measures_and_reuses_the_cache(tmp_path, tiny_model):
    full, small = TINY_DIMS
    config = QualityBenchConfig(
        data=[SAMPLE],
        models_dir=tmp_path / "models",
        base_model=str(tiny_model),
        dims=[full, small],
        shortlists=[30],
        max_queries=20,
        timing_queries=5,
        epochs=1,
        batch_size=8,
        max_train_pairs=16,
        query_encoders=["onnx"],
        onnx_cache=tmp_path / "onnx",
        progress=False,
        out=tmp_path / "out",
    )
    report = run_quality(config)
    (dataset,) = report["datasets"]
    assert dataset["training"] is not None and (tmp_path / "models" / SAMPLE.name / "mrl.json").is_file()
    assert set(dataset["models"]) == {"base", "tuned"}
    methods = {(row["model"], row["method"], row["dim"]) for row in dataset["rows"]}
    assert ("base", "float32", small) in methods and ("base", "int8", small) not in methods
    for method in ("float32", "int8", "binary", "binary+rescore"):
        assert ("tuned", method, full) in methods and ("tuned", method, small) in methods
    assert ("tuned", "two-stage", small) in methods and ("tuned", "two-stage", full) not in methods
    assert ("tuned", "queries by onnx", small) in methods and ("base", "queries by onnx", small) not in methods
    exact = {(row["method"], row["dim"]): row for row in dataset["rows"] if row["model"] == "tuned"}
    for dim in (full, small):  # ONNX in float32 makes torch's query vectors, so the same rankings
        onnx = exact[("queries by onnx", dim)]
        assert onnx["cosine_to_torch"] > 0.9999
        assert onnx["ndcg@10"] == pytest.approx(exact[("float32", dim)]["ndcg@10"], abs=1e-3)
    flag = "Query encoder onnx: largest NDCG@10 loss against torch's queries"
    assert flag in (tmp_path / "out" / "quality.md").read_text()
    for row in dataset["rows"]:
        assert 0 <= row["ndcg@10"] <= 1 and 0 <= row["recall@100"] <= 1 and row["search_ms_p50"] > 0
    assert not any(model["from_cache"] for model in dataset["models"].values())
    for name in ("quality.json", "quality.md", "quality_vs_dim.png", "quality_vs_latency.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    assert json.loads((tmp_path / "out" / "quality.json").read_text())["datasets"][0]["name"] == SAMPLE.name

    again = run_quality(config)
    assert all(model["from_cache"] for model in again["datasets"][0]["models"].values())
    assert again["datasets"][0]["training"] is None  # the tuned model is found in models_dir
    assert again["datasets"][0]["rows"] == [
        {**row, "search_ms_p50": again_row["search_ms_p50"]}
        for row, again_row in zip(dataset["rows"], again["datasets"][0]["rows"], strict=True)
    ]


def test_the_clean_test_view_is_scored_apart_from_the_same_rankings(tmp_path, tiny_model):
    """A model tuned on the train split can memorise the passages it saw as positives: the test questions
    that need them (the shared view) are scored apart from the clean rest, for base and tuned alike."""
    from tests.helpers.sample import half_shared_sample

    data, shared = half_shared_sample(tmp_path / "sample_medical")
    full, small = TINY_DIMS
    config = QualityBenchConfig(data=[data], base_model=str(tiny_model), dims=[full, small], train=False,
                                timing_queries=5, query_encoders=[], progress=False, out=tmp_path / "out")  # fmt: skip
    (dataset,) = run_quality(config)["datasets"]
    tests = len(load_beir(data, ["test"]).split("test"))
    assert dataset["views"] == {"clean": tests - len(shared), "shared": len(shared)}
    for row in dataset["rows"]:
        if row["method"] != "float32":
            assert "views" not in row
            continue
        views = row["views"]  # the two views partition the split: NDCG@10 is a mean over questions
        pooled = views["clean"]["ndcg@10"] * (tests - len(shared)) + views["shared"]["ndcg@10"] * len(shared)
        assert pooled / tests == pytest.approx(row["ndcg@10"], abs=1e-3)
    markdown = (tmp_path / "out" / "quality.md").read_text()
    assert "NDCG@10 on the clean view of each test split" in markdown
    assert f"| sample_medical (clean, {tests - len(shared)} q) base → tuned (% of full) |" in markdown
