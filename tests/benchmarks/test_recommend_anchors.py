"""The MovieLens benchmark's anchors (``benchmarks/recommend_anchors.py``) on tiny hand-made logs:
the exclusion rule of ``rank_queries``, popularity's order, BPR learning a planted preference, and the
rating means."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from recommend_anchors import (BPRSettings, popularity_scores, rank_scores, rating_errors, rating_means,  # noqa: E402
                               train_bpr)

from pretune.data.interactions import SPECIALS, UNK, Event  # noqa: E402

FIRST = len(SPECIALS)  # the first real item's id


def test_rank_scores_excludes_the_history_but_not_the_target():
    scores = torch.tensor([[9.0] * FIRST + [5.0, 4.0, 3.0, 2.0]])  # specials scored highest: never ranked
    items = [FIRST + i for i in range(4)]
    # history holds items 0 and 2; the target is item 2 (a re-watch): item 0 is excluded, item 1 beats it
    metrics = rank_scores(scores, [[items[0], items[2]]], [items[2]])
    assert metrics["mrr"] == pytest.approx(1 / 2)
    assert metrics["ndcg@10"] == pytest.approx(1 / math.log2(3))
    assert rank_scores(scores, [[items[0]]], [UNK])["hr@5"] == 0.0  # an unseen target is a miss at every K


def test_popularity_ranks_the_most_frequent_unseen_item_first():
    a, b, c, d = (FIRST + i for i in range(4))
    train = [[a, a, b], [a, b, c], [a, d]]  # counts: a 4, b 2, c 1, d 1
    scores = popularity_scores(train, FIRST + 4)
    assert scores[a] > scores[b] > scores[c] > scores[d]  # the c / d tie broken by id
    assert rank_scores(scores.expand(2, -1), [[c], [a]], [b, b])["mrr"] == pytest.approx((1 / 2 + 1) / 2)
    # the user who saw a: b (the next most frequent) is first


def test_bpr_learns_a_planted_preference():
    """Two groups of users, each consuming only its own half of the items: BPR must score a user's
    unseen in-group items above every out-group item."""
    items, per_group, users = 20, 10, 40
    generator = torch.Generator().manual_seed(0)
    train, held = [], []
    for user in range(users):
        group = range(FIRST, FIRST + per_group) if user % 2 == 0 else range(FIRST + per_group, FIRST + items)
        order = [list(group)[i] for i in torch.randperm(per_group, generator=generator).tolist()]
        train.append(order[:6])
        held.append(order[6])
    model, curve, best = train_bpr(train, FIRST + items, BPRSettings(dim=8, lr=0.05, l2=1e-4, batch_size=64, epochs=60, seed=0))
    assert curve == [] and best == 0  # no validation: the last epoch's weights
    with torch.no_grad():
        scores = model.scores(torch.arange(users))
    same = torch.tensor([[(u % 2 == 0) == (i < FIRST + per_group) for i in range(FIRST, FIRST + items)] for u in range(users)])
    real = scores[:, FIRST:]
    assert (real[same].mean() - real[~same].mean()) > 1.0  # in-group items score higher
    # 4 unseen in-group items of 14 unseen: the held one is in the top 5 of (nearly) every user; chance is ~5/14
    assert rank_scores(scores, train, held)["hr@5"] >= 0.8


def test_bpr_keeps_the_best_validation_epoch():
    train = [[FIRST, FIRST + 1], [FIRST + 1, FIRST + 2]]
    marks = iter([0.1, 0.3, 0.2, 0.2, 0.2, 0.2])
    _, curve, best = train_bpr(train, FIRST + 3, BPRSettings(dim=4, epochs=6, patience=3), validate=lambda model: next(marks))
    assert best == 2 and curve == [0.1, 0.3, 0.2, 0.2, 0.2]  # stopped 3 epochs after the best


def test_rating_means_and_errors():
    train = [Event("x", 0, 5.0), Event("x", 1, 3.0), Event("y", 2, 1.0)]
    overall, per_item = rating_means(train)
    assert overall == pytest.approx(3.0) and per_item == {"x": 4.0, "y": 1.0}
    errors = rating_errors([4.0, 1.0, 3.0], [5.0, 1.0, 1.0])
    assert errors["mae"] == pytest.approx(1.0) and errors["rmse"] == pytest.approx(math.sqrt(5 / 3))
