"""Label-free calibration (index.calibration), the quality source of every plan, and live agreement (service.shadow).

Exact cases: the agreement of rankings and of plans known by construction (vectors that are zero past dim 4
rank the same at 4 as at 8), pseudo-queries drawn the same way twice, a source label for each way an index
gets its figures, and a sampled search whose full-dim comparison is slow answering at once.
"""

from __future__ import annotations

import json
import random
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import service.engine as engine_module
from core.data import Document
from index.backends import FaissIndex
from index.calibration import PseudoQueries, agreement, agreement_judgements, draw_pseudo_queries, sentences
from index.params import IndexPlan
from index.plans import AGREEMENT, JUDGED, calibrate_plans, evaluate_plans, with_agreement
from mrl.cli import main
from service.metrics import ServiceMetrics
from service.shadow import Sample, ShadowSampler
from tests.helpers.service import (
    add_evaluation,
    build_keyword_index,
    keyword_model,
    serve,
    write_data,
)

# --- agreement of rankings -----------------------------------------------------------------


def test_agreement_of_rankings_known_by_hand():
    reference = [f"d{i}" for i in range(10)]
    assert agreement(reference, reference) == (1.0, 1.0)
    swapped = ["d1", "d0", *reference[2:]]  # the first two swapped: all ten found, order costs a little
    rank_aware, overlap = agreement(swapped, reference)
    dcg = lambda gains: sum(g / np.log2(r + 2) for r, g in enumerate(gains))  # noqa: E731
    ideal = dcg(range(10, 0, -1))
    assert overlap == 1.0 and rank_aware == pytest.approx(dcg([9, 10, *range(8, 0, -1)]) / ideal)
    lost_first = [*reference[1:], "x"]  # the first hit lost costs more than the tenth
    lost_last = [*reference[:9], "x"]
    assert agreement(lost_first, reference)[1] == agreement(lost_last, reference)[1] == 0.9
    assert agreement(lost_first, reference)[0] < agreement(lost_last, reference)[0] < 1.0
    assert agreement(["a", "b"], ["a", "b"], k=10) == (1.0, 1.0)  # fewer than k: judged on what there is
    assert agreement([], []) == (1.0, 1.0)


# --- pseudo-queries --------------------------------------------------------------------------


def passages(count: int = 30) -> list[Document]:
    return [
        Document(
            f"p{i}",
            f"Short {i}. This sentence number {i} is long enough to ask. Another one about item {i} here.",
            f"Title of document {i % 10}",
            {},
            parent=f"d{i % 10}",
            start=0,
            end=10,
        )  # fmt: skip
        for i in range(count)
    ]


def test_pseudo_queries_are_drawn_the_same_way_twice_and_by_kind():
    assert sentences("Too short. This one has enough words in it! And?\nA fourth line with four words") == [
        "This one has enough words in it!",
        "A fourth line with four words",
    ]
    random_kind = draw_pseudo_queries(passages(), 12, "random", True, seed=3)
    assert random_kind == draw_pseudo_queries(passages(), 12, "random", True, seed=3)
    assert len(random_kind.ids) == 12 and random_kind.held_out
    assert all(text.startswith(("This sentence", "Another one")) for text in random_kind.texts)
    first = draw_pseudo_queries(passages(), 12, "first", False)
    assert all(text.startswith("This sentence") for text in first.texts)  # "Short 3." is too short to count
    titles = draw_pseudo_queries(passages(), 50, "title")
    assert sorted(titles.texts) == sorted({f"Title of document {i}" for i in range(10)})  # each title once
    assert titles.sources == [f"d{text.split()[-1]}" for text in titles.texts]  # the document each came from
    assert PseudoQueries.from_dict(json.loads(json.dumps(titles.to_dict()))) == titles
    assert "30 pseudo-queries" not in first.description and "12 pseudo-queries (first sentences" in first.description
    with pytest.raises(ValueError, match="use one of random, first, title"):
        draw_pseudo_queries(passages(), 5, "summary")


# --- plans scored without labels -------------------------------------------------------------


def lossless_at_4(rows: int = 40, seed: int = 0) -> tuple[dict, np.ndarray]:
    """Full vectors (dim 8) that are zero past dim 4: they rank at 4 exactly as at 8; and each dim's Flat index."""
    rng = np.random.default_rng(seed)
    vectors = np.zeros((rows, 8), dtype=np.float32)
    vectors[:, :4] = rng.normal(size=(rows, 4))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    indexes = {}
    for dim in (8, 4, 2):
        part = vectors[:, :dim] / np.linalg.norm(vectors[:, :dim], axis=1, keepdims=True)
        indexes[dim] = FaissIndex.build(np.ascontiguousarray(part), IndexPlan("Flat"))
    return indexes, vectors


def test_plans_agree_as_constructed_and_the_source_document_is_held_out():
    indexes, vectors = lossless_at_4()
    ids = lambda rows: [f"d{row}" for row in rows]  # noqa: E731
    rng = np.random.default_rng(1)
    queries = np.zeros((20, 8), dtype=np.float32)
    queries[:, :4] = rng.normal(size=(20, 4))
    pseudo = PseudoQueries([f"q{i}" for i in range(20)], ["x"] * 20, [f"d{i}" for i in range(20)], "random", True)
    qrels = agreement_judgements(pseudo, vectors, queries, ids)
    assert all(f"d{i}" not in qrels[f"q{i}"] and len(qrels[f"q{i}"]) == 10 for i in range(20))
    plans = {plan.key: plan for plan in calibrate_plans(indexes, vectors, ids, queries, pseudo, {8: 32, 4: 16, 2: 8})}
    assert {key: plan.source for key, plan in plans.items()} == dict.fromkeys(plans, AGREEMENT)
    for key in ("8", "4"):  # the same ranking, by construction
        assert (plans[key].agreement_at_10, plans[key].overlap_at_10, plans[key].ratio) == (1.0, 1.0, 1.0)
        assert plans[key].ndcg_at_10 is None and plans[key].recall_at_10 is None  # no judged NDCG to show
    assert plans["2"].agreement_at_10 < 0.95 and plans["2"].ratio == plans["2"].agreement_at_10
    assert plans["2>8x10"].agreement_at_10 == 1.0 if "2>8x10" in plans else True
    assert any(p.rerank_dim == 8 and p.agreement_at_10 >= 0.995 * 1.0 for p in plans.values())
    # The same plans judged on labels keep their NDCG as the source and carry the agreement beside it.
    judged_qrels = {f"q{i}": {f"d{(i + 1) % 40}": 1} for i in range(20)}
    from index.plans import JudgedQueries

    judged = JudgedQueries(pseudo.ids, pseudo.texts, judged_qrels, "made up")
    measured = evaluate_plans(indexes, vectors, ids, queries, judged, {8: 32, 4: 16, 2: 8})
    both = with_agreement(measured, indexes, vectors, ids, queries, pseudo)
    assert [p.key for p in both] == [p.key for p in measured] and all(p.source == JUDGED for p in both)
    assert {p.key: p.agreement_at_10 for p in both}["4"] == 1.0


# --- where every figure comes from -----------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_data(tmp_path_factory.mktemp("calibration-data"))


@pytest.mark.parametrize(
    ("calibration", "eval_data", "report", "kind", "source"),
    [
        ("random", False, False, "agreement", "agreement@10 with the full dim's exact ranking on 9 pseudo-queries"),
        ("random", True, False, "judged", "NDCG@10 on 8 judged queries of"),
        ("none", False, True, "training report", "the model's training report: NDCG@10 on its evaluation data, not"),
        ("none", False, False, "not measured", "not measured"),
    ],
)
def test_every_plan_names_the_source_of_its_quality(
    data, tmp_path, capsys, calibration, eval_data, report, kind, source
):
    root = tmp_path / "index"
    with keyword_model():
        args = ["index", "build", "--data", str(data), "--index", str(root), "--model", "keywords", "--dims", "8,4,2"]
        args += ["--calibration", calibration, "--device", "cpu", "--no-progress"]
        assert main([*args, *(["--eval-data", str(data)] if eval_data else [])]) == 0
    if report:
        add_evaluation(root, {8: 0.9, 4: 0.75, 2: 0.5})
    assert main(["index", "info", "--index", str(root)]) == 0
    info = capsys.readouterr().out
    if kind in ("agreement", "judged"):  # (a report added after the build: the server makes its plans)
        assert f"plans, quality from {source}" in info
    if report:
        assert "NDCG@10 per dim: the model's training report: NDCG@10 on its evaluation data" in info
    with serve(root) as client:
        plans = client.get("/plans").json()["plans"]
        dims = client.get("/dims").json()
        assert {plan["quality_kind"] for plan in plans} == {kind} and dims["quality_kind"] == kind
        assert all(plan["quality_source"].startswith(source) for plan in plans), plans[0]["quality_source"]
        assert dims["quality_source"] == plans[0]["quality_source"]
        if kind == "not measured":
            assert client.get("/search", params={"q": "fever", "min_quality": 0.5}).status_code == 422
            return
        chosen = client.get("/search", params={"q": "fever cough", "min_quality": 0.5}).json()["plan"]
        assert chosen["quality_kind"] == kind and chosen["quality_source"] == plans[0]["quality_source"]
        assert chosen["reason"].endswith("not on this index's documents") == (kind == "training report")
        if kind in ("agreement", "judged"):  # both builds measured each plan's agreement
            assert all(plan["agreement_at_10"] is not None for plan in plans)
            # (not 1.0 at dim 8: the keyword vectors tie, and FAISS orders ties its own way; lossless_at_4 has none)
            assert 0 < next(d for d in dims["dims"] if d["dim"] == 8)["agreement_at_10"] <= 1.0


def test_an_added_corpus_is_calibrated_again(data, tmp_path):
    root = tmp_path / "index"
    build_keyword_index(data, root, calibration="first")
    extra = tmp_path / "extra.jsonl"
    extra.write_text("\n".join(json.dumps({"_id": f"x{i}", "text": f"new leaflet about rash and pain {i}"})
                               for i in range(4)) + "\n")  # fmt: skip
    with keyword_model():
        assert main(["index", "add", "--index", str(root), "--data", str(extra), "--no-progress"]) == 0
    from index.layout import resolve_version
    from index.manifest import IndexManifest

    manifest = IndexManifest.read(resolve_version(root))
    drawn = PseudoQueries.from_dict(manifest.calibration_queries)
    assert drawn.kind == "first" and len(drawn.ids) == 9  # the same count, drawn from the grown corpus
    assert manifest.plans and all(plan["source"] == "agreement" for plan in manifest.plans)


def test_bad_calibration_options_are_one_line(data, tmp_path, capsys):
    args = ["index", "build", "--data", str(data), "--index", str(tmp_path / "i"), "--no-progress"]
    assert main([*args, "--calibration", "summaries"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "mrl: error: --calibration 'summaries' is not one of random, first, title, none"
    ]
    assert main([*args, "--calibration-queries", "0"]) == 2
    assert "--calibration-queries must be positive, got 0" in capsys.readouterr().err
    assert not (tmp_path / "i").exists()


# --- live agreement --------------------------------------------------------------------------


def sample(plan: str = "4", version: str = "v1") -> Sample:
    return Sample(plan, version, np.zeros((1, 8), dtype=np.float32), 10, None, None, [["a", "b", "c"]])


def wait_for(condition, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def compared(metrics: ServiceMetrics, outcome: str = "compared") -> float:
    return metrics.registry.get_sample_value("mrl_shadow_samples_total", {"outcome": outcome}) or 0.0


def test_the_sampler_compares_off_the_request_path_within_its_budget():
    metrics = ServiceMetrics()
    release = threading.Event()

    def slow_full(job: Sample):
        release.wait(10)  # a full-dim scan that takes as long as the test wants
        return job.version, [["a", "c", "x"]]

    sampler = ShadowSampler(1.0, 1.0, slow_full, metrics)
    sampler.start()
    try:
        started = time.perf_counter()
        assert sampler.offer(lambda: sample())
        assert time.perf_counter() - started < 0.05  # queued, not compared: the caller does not wait
        assert sampler.live("4") == (None, 0)
        release.set()
        wait_for(lambda: compared(metrics) == 1)
        expected, _ = agreement(["a", "b", "c"], ["a", "c", "x"], 10)
        assert sampler.live("4") == (round(expected, 4), 1)
        assert metrics.registry.get_sample_value("mrl_plan_agreement_count", {"plan": "4"}) == 1
    finally:
        sampler.close()

    never = ShadowSampler(0.0, 1.0, slow_full, metrics)
    assert not never.offer(lambda: pytest.fail("a sample is built only when drawn"))
    some = ShadowSampler(0.3, 1.0, slow_full, metrics, rng=random.Random(0))
    drawn = sum(some.offer(lambda: sample()) for _ in range(60))  # not started: the queue (64) only fills
    assert 8 <= drawn <= 30


def test_samples_beyond_the_queue_the_budget_or_a_reload_are_dropped_and_counted():
    metrics = ServiceMetrics()
    now = [0.0]
    spent = 0.5  # each comparison "takes" half a second of the fake clock

    def full(job: Sample):
        now[0] += spent
        return ("v2" if job.plan == "reloaded" else job.version), [["a", "b", "c"]]

    sampler = ShadowSampler(1.0, 0.1, full, metrics, clock=lambda: now[0])  # 0.1 s of work a second, 1 s saved
    for _ in range(64):
        assert sampler.offer(lambda: sample())
    assert not sampler.offer(lambda: sample())  # the 65th finds the queue full
    assert compared(metrics, "dropped_queue") == 1
    sampler.offer(lambda: sample("reloaded"))
    sampler.start()
    wait_for(lambda: compared(metrics) + compared(metrics, "dropped_budget") == 64)
    sampler.close()
    # A saved second pays for the first comparisons; then it refills at 0.1 s per second of the (frozen) clock.
    assert compared(metrics) == 3 and compared(metrics, "dropped_budget") == 61
    assert sampler.live("4") == (1.0, 3)


def test_a_server_samples_reduced_plans_and_a_slow_comparison_delays_no_response(data, tmp_path, monkeypatch):
    root = tmp_path / "index"
    build_keyword_index(data, root, calibration="random")
    release = threading.Event()
    real = engine_module.Searcher._search_full

    def slow(self, job):
        release.wait(10)
        return real(self, job)

    monkeypatch.setattr(engine_module.Searcher, "_search_full", slow)
    with serve(root, shadow_fraction=1.0) as client:
        started = time.perf_counter()
        answers = [client.get("/search", params={"q": "fever rash", "dim": dim}) for dim in (2, 2, 2, 8)]
        assert time.perf_counter() - started < 5  # answered while the first comparison still waits
        release.set()
        wait_for(lambda: 'mrl_shadow_samples_total{outcome="compared"} 3.0' in client.get("/metrics").text)
        plans = {plan["key"]: plan for plan in client.get("/plans").json()["plans"]}
        served, full = ([hit["id"] for hit in a.json()["results"][0]["hits"]] for a in (answers[0], answers[3]))
        expected = round(agreement(served, full, 10)[0], 4)  # the dim-8 search was not sampled: it is the full dim
        assert (plans["2"]["live_agreement"], plans["2"]["live_agreement_samples"]) == (expected, 3)
        assert plans["8"]["live_agreement"] is None and plans["2"]["agreement_at_10"] is not None
        text = client.get("/metrics").text
        assert f'mrl_plan_build_agreement{{plan="2"}} {plans["2"]["agreement_at_10"]}' in text
        assert 'mrl_plan_agreement_count{plan="2"} 3.0' in text
