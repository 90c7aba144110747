from __future__ import annotations

import math

import pytest

from training.metrics import metric_names, mrr_at_k, ndcg_at_k, recall_at_k, score_rankings


def test_ndcg_single_relevant_at_rank_three():
    assert ndcg_at_k(["a", "b", "c"], {"c": 1}, 10) == pytest.approx(1 / math.log2(4))


def test_ndcg_graded_uses_linear_gains_and_ideal_order():
    ranked = ["low", "high", "x"]
    relevance = {"high": 2, "low": 1}
    dcg = 1 / math.log2(2) + 2 / math.log2(3)
    idcg = 2 / math.log2(2) + 1 / math.log2(3)
    assert ndcg_at_k(ranked, relevance, 10) == pytest.approx(dcg / idcg)


def test_cutoffs_ignore_ranks_past_k():
    ranked = [str(i) for i in range(20)]
    assert ndcg_at_k(ranked, {"15": 1}, 10) == 0.0
    assert mrr_at_k(ranked, {"15": 1}, 10) == 0.0
    assert mrr_at_k(ranked, {"3": 1, "7": 1}, 10) == pytest.approx(1 / 4)
    assert recall_at_k(ranked, {"3": 1, "15": 1}, 10) == 0.5
    assert recall_at_k(ranked, {"3": 1, "15": 1, "zero": 0}, 100) == 1.0


def test_score_rankings_skips_unjudged_and_zero_only_queries():
    rankings = {"q1": ["d1", "d2"], "q2": ["d2", "d1"]}
    qrels = {"q1": {"d1": 1}, "q2": {"d1": 1}, "q3": {"d9": 0}}
    scores = score_rankings(rankings, qrels)
    assert list(scores) == metric_names()
    assert scores["recall@1"] == 0.5
    assert scores["mrr@10"] == pytest.approx((1 + 0.5) / 2)
    assert scores["ndcg@10"] == pytest.approx((1 + 1 / math.log2(3)) / 2)


def test_query_missing_from_rankings_scores_zero():
    assert score_rankings({}, {"q1": {"d1": 1}})["ndcg@10"] == 0.0
