from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from core.data import load_beir
from training.evaluate import EvalResult, evaluate, exact_top_k
from training.report import comparison_table, markdown_report, write_eval_report

# At 2 dims the "rash" and "pain" queries become zero vectors: every document scores 0,
# ties keep corpus order, so d2 lands at rank 3 and d3 at rank 4.
NDCG_AT_2 = (1 + 1 + 1 / math.log2(4) + 1 / math.log2(5)) / 4
MRR_AT_2 = (1 + 1 + 1 / 3 + 1 / 4) / 4


def test_keyword_encoder_gives_exact_metrics_per_dimension(tiny_beir: Path, keyword_encoder):
    result = evaluate(keyword_encoder, load_beir(tiny_beir), "test", [4, 2])
    assert result.num_queries == 4 and result.num_documents == 4
    assert result.by_dim[4] == {"ndcg@10": 1.0, "mrr@10": 1.0, "recall@1": 1.0, "recall@10": 1.0, "recall@100": 1.0}
    assert result.metric(2) == pytest.approx(NDCG_AT_2)
    assert result.metric(2, "mrr@10") == pytest.approx(MRR_AT_2)
    assert result.metric(2, "recall@1") == 0.5
    assert result.metric(2, "recall@10") == 1.0


def test_evaluation_encodes_corpus_and_queries_once(tiny_beir: Path, keyword_encoder):
    calls = []

    class Counting(type(keyword_encoder)):
        def encode_documents(self, texts):
            calls.append(("documents", len(texts)))
            return super().encode_documents(texts)

        def encode_queries(self, texts):
            calls.append(("queries", len(texts)))
            return super().encode_queries(texts)

    evaluate(Counting(keyword_encoder.vocabulary), load_beir(tiny_beir), "test", [4, 3, 2, 1])
    assert sorted(calls) == [("documents", 4), ("queries", 4)]


def test_exact_top_k_matches_brute_force_and_breaks_ties_by_corpus_order():
    rng = np.random.default_rng(1)
    docs, queries = rng.normal(size=(300, 16)), rng.normal(size=(40, 16))
    top = exact_top_k(queries, docs, 10)
    np.testing.assert_array_equal(top, np.argsort(-(queries @ docs.T), axis=1)[:, :10])
    assert exact_top_k(np.zeros((1, 16)), docs, 5).tolist() == [[0, 1, 2, 3, 4]]
    assert exact_top_k(queries, docs[:3], 100).shape == (40, 3)


def test_reports_are_written_and_round_trip(tiny_beir: Path, keyword_encoder, tmp_path: Path):
    from tests.conftest import KeywordEncoder

    dataset = load_beir(tiny_beir)
    base = evaluate(KeywordEncoder(["fever", "cough", "rash", "pain"], "base"), dataset, "test", [4, 2])
    tuned = evaluate(KeywordEncoder(["rash", "pain", "fever", "cough"], "tuned"), dataset, "test", [4, 2])
    paths = write_eval_report([base, tuned], tmp_path / "out")
    assert [p.name for p in paths] == ["eval.json", "eval.md", "eval_ndcg.png"]
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    restored = [EvalResult.from_dict(r) for r in json.loads(paths[0].read_text())["results"]]
    assert restored[1].by_dim == tuned.by_dim
    table = comparison_table([base, tuned])
    assert table.splitlines()[0] == "| dim | base NDCG@10 | % of full | tuned NDCG@10 | % of full | Δ |"
    assert table.splitlines()[2] == "| 4 | 1.000 | 100.0% | 1.000 | 100.0% | +0.000 |"
    assert f"| 2 | {NDCG_AT_2:.3f} | {100 * NDCG_AT_2:.1f}% |" in table
    assert "4 queries, 4 documents" in markdown_report([base])
    assert not list((tmp_path / "out").glob(".*"))  # no temporary files left behind


def test_qrels_scores_of_zero_and_below_are_not_relevant(tmp_path: Path, keyword_encoder):
    """Read from a qrels file with -1 and 0 rows, then scored as trec_eval does (relevance <= 0: no gain)."""
    from tests.conftest import KEYWORDS, write_beir

    corpus = [{"_id": f"d{i}", "title": "", "text": f"advice about {word} at home"} for i, word in enumerate(KEYWORDS)]
    queries = [{"_id": f"q{i}", "text": f"what helps with {word}"} for i, word in enumerate(KEYWORDS)]
    # At 4 dims each query ranks its own keyword's document first, then the rest in corpus order.
    qrels = [
        ("q0", "d0", -1), ("q0", "d1", 1),  # ranked d0 d1 d2 d3: the -1 at rank 1 gains nothing
        ("q1", "d1", 0), ("q1", "d2", 1),  # ranked d1 d0 d2 d3: relevant at rank 3
        ("q2", "d2", 1),  # rank 1
        ("q3", "d3", 0), ("q3", "d0", -1),  # nothing relevant: skipped
    ]  # fmt: skip
    dataset = load_beir(write_beir(tmp_path / "graded", corpus, queries, {"test": qrels}))
    assert dataset.split("test")["q0"] == {"d0": -1, "d1": 1}
    result = evaluate(keyword_encoder, dataset, "test", [4])
    assert result.by_dim[4] == pytest.approx(
        {
            "ndcg@10": (1 / math.log2(3) + 1 / math.log2(4) + 1) / 3,
            "mrr@10": (1 / 2 + 1 / 3 + 1) / 3,
            "recall@1": 1 / 3,
            "recall@10": 1.0,
            "recall@100": 1.0,
        }
    )


def write_half_shared_beir(root: Path) -> Path:
    """The tiny corpus; training positives d0 and d1 only, so test questions q0 and q1 share, q2 and q3 are clean."""
    from tests.conftest import KEYWORDS, write_beir

    corpus = [{"_id": f"d{i}", "title": "", "text": f"advice about {word} at home"} for i, word in enumerate(KEYWORDS)]
    queries = [{"_id": f"q{i}", "text": f"what helps with {word}"} for i, word in enumerate(KEYWORDS)]
    queries += [{"_id": f"t{i}", "text": f"{word} remedies"} for i, word in enumerate(KEYWORDS)]
    qrels = {"test": [(f"q{i}", f"d{i}", 1) for i in range(4)], "train": [("t0", "d0", 1), ("t1", "d1", 1)]}
    return write_beir(root, corpus, queries, qrels)


def test_the_clean_and_shared_views_are_scored_from_the_same_rankings(tmp_path: Path, keyword_encoder):
    dataset = load_beir(write_half_shared_beir(tmp_path / "half"))
    result = evaluate(keyword_encoder, dataset, "test", [4, 2], dataset.split("train"))
    assert {view: v["num_queries"] for view, v in result.views.items()} == {"clean": 2, "shared": 2}
    # At 2 dims only fever and cough (q0, q1: shared) keep their coordinates; rash and pain rank 3rd and 4th.
    assert result.views["shared"]["by_dim"][2]["ndcg@10"] == 1.0
    assert result.views["clean"]["by_dim"][2]["ndcg@10"] == pytest.approx((1 / math.log2(4) + 1 / math.log2(5)) / 2)
    assert result.metric(2) == pytest.approx(NDCG_AT_2)  # the whole split is unchanged
    assert result.view("clean").metric(4) == 1.0 and result.view("clean").num_queries == 2
    assert EvalResult.from_dict(json.loads(json.dumps(result.to_dict()))).views == result.views
    assert not evaluate(keyword_encoder, dataset, "test", [4]).views  # no training split given: no views
    everything_shared = load_beir(write_half_shared_beir(tmp_path / "half"))
    assert not evaluate(keyword_encoder, everything_shared, "test", [4], dataset.split("test")).views


def test_the_report_leads_the_views_with_the_clean_one(tmp_path: Path, keyword_encoder):
    dataset = load_beir(write_half_shared_beir(tmp_path / "half"))
    result = evaluate(keyword_encoder, dataset, "test", [4, 2], dataset.split("train"))
    report = markdown_report([result])
    clean = report.index("## Clean view")
    assert clean < report.index("Shared view (2 questions)") and "2 of the 4 questions" in report
    assert f"| 2 | {(1 / math.log2(4) + 1 / math.log2(5)) / 2:.3f} |" in report[clean:]
    assert "## Clean view" not in markdown_report([evaluate(keyword_encoder, dataset, "test", [4, 2])])


@pytest.mark.slow
def test_mrl_eval_scores_the_views_when_the_folder_has_a_training_split(tmp_path: Path, capsys):
    from mrl.cli import main

    folder = write_half_shared_beir(tmp_path / "half")
    argv = ["eval", "--data", str(folder), "--dims", "384,64", "--no-progress", "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "clean view (2 questions whose relevant documents are no train positive):" in printed
    [saved] = json.loads((tmp_path / "out" / "eval.json").read_text())["results"]
    assert saved["views"]["clean"]["num_queries"] == 2 and set(saved["views"]["clean"]["by_dim"]) == {"384", "64"}
    assert main([*argv[:-1], str(tmp_path / "none"), "--training-split", "none"]) == 0
    assert "clean view" not in capsys.readouterr().out
