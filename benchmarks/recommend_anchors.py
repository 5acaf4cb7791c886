"""Non-neural anchors for next-item ranking and rating prediction, on pretune's own split.

Every anchor ranks in pretune's item vocabulary (:func:`pretune.data.interactions.item_tokenizer`:
the items of the training events, after the special tokens) and on pretune's queries
(:func:`pretune.data.interactions.ranking`), with the exclusion rule of
:func:`pretune.tasks.recommend.rank_queries`: every item of the history is excluded except the
target itself, specials are never ranked, and a target unseen in training is a miss.

- **Popularity**: score an item by its number of training events.
- **BPR-MF** (Rendle et al. 2009, "BPR: Bayesian Personalized Ranking from Implicit Feedback"):
  ``x_ui = p_u . q_i``; for each training event (u, i) one item j the user never trained on,
  minimise ``-log sigmoid(x_ui - x_uj) + l2 * (|p_u|^2 + |q_i|^2 + |q_j|^2)`` with Adam.
- **Rating means**: the global mean training rating, and each item's mean training rating
  (falling back to the global mean for an item without one).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from pretune.data.interactions import SPECIALS, Event
from pretune.tasks.recommend import rank_scores  # the one ranking rule every model and anchor is scored by


def popularity_scores(train_ids: list[list[int]], vocab_size: int) -> torch.Tensor:
    """``[V]``: each item's training-event count, ties broken by item id (lower first) so no two items tie."""
    counts = torch.zeros(vocab_size, dtype=torch.float64)
    for ids in train_ids:
        counts += torch.bincount(torch.tensor(ids, dtype=torch.long), minlength=vocab_size).double()
    return counts - torch.arange(vocab_size, dtype=torch.float64) / (2 * vocab_size)


@dataclass
class BPRSettings:
    dim: int = 64
    lr: float = 1e-3
    l2: float = 1e-5
    batch_size: int = 1024
    epochs: int = 50
    patience: int = 5  # epochs without a better validation NDCG@10
    seed: int = 0


class BPR(nn.Module):
    def __init__(self, users: int, items: int, dim: int):
        super().__init__()
        self.users, self.items = nn.Embedding(users, dim), nn.Embedding(items, dim)
        nn.init.normal_(self.users.weight, std=0.1)
        nn.init.normal_(self.items.weight, std=0.1)

    def forward(self, u: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        return (self.users(u) * self.items(i)).sum(-1)

    def scores(self, u: torch.Tensor) -> torch.Tensor:
        return self.users(u) @ self.items.weight.T


def sample_negatives(users: torch.Tensor, seen: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One item per row that ``users[row]`` has no training event with (uniform over the real items)."""
    low, high = len(SPECIALS), seen.shape[1]
    negatives = torch.randint(low, high, (len(users),), generator=generator)
    clash = seen[users, negatives]
    while clash.any():
        negatives[clash] = torch.randint(low, high, (int(clash.sum()),), generator=generator)
        clash = seen[users, negatives]
    return negatives


def train_bpr(train_ids: list[list[int]], vocab_size: int, settings: BPRSettings,
              validate: callable = None) -> tuple[BPR, list[float], int]:
    """BPR-MF over users ``0..len(train_ids)-1``; ``validate(model) -> NDCG@10`` after every epoch keeps
    the best epoch's weights (early stopping after ``patience`` epochs without a gain).
    Returns the model (best weights), the validation curve and the best epoch (1-based; 0 without ``validate``)."""
    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    model = BPR(len(train_ids), vocab_size, settings.dim)
    users = torch.tensor([u for u, ids in enumerate(train_ids) for _ in ids])
    items = torch.tensor([i for ids in train_ids for i in ids])
    seen = torch.zeros(len(train_ids), vocab_size, dtype=torch.bool)
    seen[users, items] = True
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    curve, best, best_epoch, best_state = [], -math.inf, 0, None
    for epoch in range(1, settings.epochs + 1):
        order = torch.randperm(len(users), generator=generator)
        for start in range(0, len(order), settings.batch_size):
            rows = order[start:start + settings.batch_size]
            u, i = users[rows], items[rows]
            j = sample_negatives(u, seen, generator)
            pu, qi, qj = model.users(u), model.items(i), model.items(j)
            loss = -nn.functional.logsigmoid((pu * qi).sum(-1) - (pu * qj).sum(-1)).mean()
            loss = loss + settings.l2 * (pu.pow(2).sum(-1) + qi.pow(2).sum(-1) + qj.pow(2).sum(-1)).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if validate is None:
            continue
        with torch.no_grad():
            curve.append(validate(model))
        if curve[-1] > best:
            best, best_epoch, best_state = curve[-1], epoch, {k: v.clone() for k, v in model.state_dict().items()}
        elif epoch - best_epoch >= settings.patience:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    return model, curve, best_epoch


def rating_means(train: list[Event]) -> tuple[float, dict[str, float]]:
    """The global mean target of ``train`` and each item's mean target."""
    total, per_item, counts = 0.0, Counter(), Counter()
    for event in train:
        value = float(event.target)
        total += value
        per_item[event.item] += value
        counts[event.item] += 1
    return total / len(train), {item: per_item[item] / counts[item] for item in counts}


def rating_errors(predicted: list[float], truth: list[float]) -> dict[str, float]:
    """RMSE and MAE."""
    errors = [p - t for p, t in zip(predicted, truth)]
    return {"rmse": math.sqrt(sum(e * e for e in errors) / len(errors)), "mae": sum(abs(e) for e in errors) / len(errors)}
