from __future__ import annotations

import math

import numpy as np
import pytest

from core.metrics import metric_names, mrr_at_k, ndcg_at_k, neighbour_recall, recall_at_k, score_rankings


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


# trec_eval counts a judgement <= 0 as not relevant: no gain (never a negative one), not in the ideal
# ranking, not a hit for MRR, not in recall's denominator.
GRADED_WITH_NON_RELEVANT = {"neg": -1, "rel": 2, "zero": 0, "rel2": 1}
RANKED = ["neg", "rel", "zero", "rel2", "x"]


def test_ndcg_gives_no_gain_for_negative_or_zero_judgements():
    dcg = 0 + 2 / math.log2(3) + 0 + 1 / math.log2(5)
    idcg = 2 / math.log2(2) + 1 / math.log2(3)
    assert ndcg_at_k(RANKED, GRADED_WITH_NON_RELEVANT, 10) == pytest.approx(dcg / idcg)
    assert ndcg_at_k(RANKED, GRADED_WITH_NON_RELEVANT, 10) == pytest.approx(0.6433224, abs=1e-7)
    assert ndcg_at_k(["neg", "rel"], {"neg": -1, "rel": 1}, 1) == 0.0  # not -1.0
    assert ndcg_at_k(["neg", "zero"], {"neg": -1, "zero": 0}, 10) == 0.0  # nothing relevant


def test_mrr_and_recall_treat_negative_and_zero_as_not_relevant():
    assert mrr_at_k(RANKED, GRADED_WITH_NON_RELEVANT, 10) == 0.5
    assert recall_at_k(RANKED, GRADED_WITH_NON_RELEVANT, 1) == 0.0
    assert recall_at_k(RANKED, GRADED_WITH_NON_RELEVANT, 2) == 0.5
    assert recall_at_k(RANKED, GRADED_WITH_NON_RELEVANT, 10) == 1.0


def test_score_rankings_with_negative_judgements_matches_trec_eval():
    rankings = {"q1": RANKED, "q2": ["neg", "zero"]}
    qrels = {"q1": GRADED_WITH_NON_RELEVANT, "q2": {"neg": -1, "zero": 0}}  # q2 has nothing relevant: skipped
    scores = score_rankings(rankings, qrels)
    assert scores == pytest.approx(
        {"ndcg@10": 0.6433224, "mrr@10": 0.5, "recall@1": 0.0, "recall@10": 1.0, "recall@100": 1.0}, abs=1e-7
    )


def test_neighbour_recall_counts_shared_ids_and_ignores_padding():
    truth = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    assert neighbour_recall(truth, truth) == 1.0
    found = np.array([[4, 3, 9, -1], [-1, -1, -1, -1]])
    assert neighbour_recall(found, truth) == pytest.approx(0.25)
