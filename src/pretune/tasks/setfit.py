"""SetFit (Tunstall et al. 2022, "Efficient Few-Shot Learning Without Prompts"): few-label
fine-tuning of a sentence encoder in two steps.

1. **Contrastive pairs.**  Every labelled example anchors pairs with a partner drawn from the
   labelled set: a *positive* partner of its own class (target cosine similarity 1) and a
   *negative* partner of another class (target 0).  The encoder is fine-tuned so that the cosine
   similarity of each pair's sentence embeddings approaches its target, with a squared error
   (sentence-transformers' ``CosineSimilarityLoss``, SetFit's default loss).
2. **The head.**  A logistic-regression head is fitted on the fine-tuned encoder's embeddings of
   the labelled examples (SetFit's default head is scikit-learn's ``LogisticRegression``; here it is
   the same convex fit, :func:`pretune.strategies.fit_probe`, into a torch linear layer).

Pair count (``strategy: setfit:pairs=20,max_pairs=20000``): over the whole run each example anchors
``pairs`` positive and ``pairs`` negative pairs (SetFit's ``num_iterations=20``, the paper's
setting), spread over ``trainer.epochs``: each epoch, every example is the anchor of
``ceil(pairs / epochs)`` rows, and each row gives one positive and one negative pair.  So a run
sees about ``2 * pairs * N`` pairs for ``N`` labelled examples, at most ``max_pairs`` (for large
label sets, where SetFit's advantage over ordinary fine-tuning is gone anyway).  The anchor is
encoded once for its two pairs: a micro-batch of ``B`` rows encodes ``3B`` texts for ``2B`` pairs.

Partners are drawn from each row's own seed (a pure function of seed, epoch and position, as every
random choice of the loop), so a resumed run draws the same pairs.  As in SetFit, partners are
drawn with replacement; a positive partner is another example of the class when the class has one
(SetFit may also pair an example with itself), the example itself otherwise.
"""

from __future__ import annotations

import math
import random
from typing import Any

import torch
import torch.nn.functional as F

PAIR_LOSS = "pair"  # the loss key of the contrastive step


class PairAnchors:
    """The training rows of a SetFit run: the labelled rows, each repeated ``repeats`` times per epoch.

    ``rows[[i, j]]`` gives the labelled rows ``i % N`` and ``j % N`` plus their index (``anchor``),
    from which :func:`draw_partners` draws each anchor's positive and negative partner."""

    def __init__(self, rows: Any, labels: list[int], repeats: int):
        self.rows, self.labels, self.repeats = rows, list(labels), repeats
        by_class: dict[int, list[int]] = {}
        for i, label in enumerate(self.labels):
            by_class.setdefault(label, []).append(i)
        if len(by_class) < 2:
            raise ValueError("SetFit needs labelled examples of at least two classes (its negative pairs join two classes)")
        self.by_class = by_class

    def __len__(self) -> int:
        return len(self.labels) * self.repeats

    def __getitem__(self, indices: Any) -> dict[str, Any]:
        anchors = [int(i) % len(self.labels) for i in indices]
        return {**self.rows[anchors], "anchor": anchors}

    def partners(self, anchors: list[int], seeds: list[int]) -> tuple[list[int], list[int]]:
        """Each anchor's positive (same class, another example when there is one) and negative partner."""
        positives, negatives = [], []
        for anchor, seed in zip(anchors, seeds):
            rng = random.Random(seed)
            label = self.labels[anchor]
            same = self.by_class[label]
            others = [i for i in same if i != anchor] or same
            positives.append(others[rng.randrange(len(others))])
            other_classes = [c for c in self.by_class if c != label]
            members = self.by_class[other_classes[rng.randrange(len(other_classes))]]
            negatives.append(members[rng.randrange(len(members))])
        return positives, negatives


def repeats_per_epoch(examples: int, pairs: int, max_pairs: int, epochs: float) -> int:
    """How many times each example anchors a row per epoch: ``ceil(pairs / epochs)``, lowered so that the
    whole run stays within ``max_pairs`` pairs (two per row), and at least 1."""
    epochs = max(epochs, 1.0)
    repeats = math.ceil(pairs / epochs)
    cap = math.floor(max_pairs / (2.0 * examples * epochs))
    return max(1, min(repeats, cap))


def pair_rows(source: Any, anchors: list[int], positives: list[int], negatives: list[int]) -> dict[str, list]:
    """The rows to encode for one micro-batch: anchors, then positive partners, then negative partners."""
    parts = [source[anchors], source[positives], source[negatives]]
    return {key: [*parts[0][key], *parts[1][key], *parts[2][key]] for key in parts[0]}


def pair_targets(rows: int) -> torch.Tensor:
    """Target cosine similarities of the ``2 * rows`` pairs: ``rows`` positives (1), then ``rows`` negatives (0)."""
    return torch.cat([torch.ones(rows), torch.zeros(rows)])


def pair_loss(embeddings: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed squared error between each pair's cosine similarity and its target.

    ``embeddings`` [3B, H] are anchors, positive partners, negative partners; pair ``i < B`` is
    (anchor i, positive i), pair ``B + i`` is (anchor i, negative i)."""
    rows = len(embeddings) // 3
    anchors = embeddings[:rows].float().repeat(2, 1)
    partners = embeddings[rows:].float()
    cosine = F.cosine_similarity(anchors, partners, dim=-1)
    return ((cosine - targets.to(cosine)) ** 2).sum()
