"""Full-ranking metrics against hand-computed values."""

import math

import pytest
import torch

from pretune.evaluate.ranking import ranking_metrics, target_ranks


def test_ranks_count_the_items_scored_strictly_higher():
    scores = torch.tensor([[0.1, 0.9, 0.5, float("-inf")], [3.0, 2.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    assert target_ranks(scores, torch.tensor([2, 3, 0])).tolist() == [1, 3, 0]


def test_an_unscorable_or_excluded_target_is_a_miss_even_in_a_catalogue_smaller_than_k():
    scores = torch.tensor([[0.1, float("-inf"), 0.3]])
    assert target_ranks(scores, torch.tensor([1])).tolist() == [float("inf")]
    ranks = target_ranks(scores, torch.tensor([-1]))
    assert ranks.tolist() == [float("inf")]
    assert ranking_metrics(ranks, ks=(10,)) == {"hr@10": 0.0, "ndcg@10": 0.0, "mrr": 0.0}


def test_hr_ndcg_mrr_by_hand():
    metrics = ranking_metrics([0, 2, 9, 30], ks=(1, 10))
    assert metrics["hr@1"] == pytest.approx(1 / 4)
    assert metrics["hr@10"] == pytest.approx(3 / 4)
    assert metrics["ndcg@10"] == pytest.approx((1 + 1 / math.log2(4) + 1 / math.log2(11)) / 4)
    assert metrics["ndcg@1"] == pytest.approx(1 / 4)
    assert metrics["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 10 + 1 / 31) / 4)
