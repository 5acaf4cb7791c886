"""Next-item scores of a language model over items: what validation ranks and ``predict --top-k`` returns.

- an **encoder** (BERT4Rec) reads ``[CLS] history [MASK] [SEP]`` and scores every item at ``[MASK]``
  (Sun et al. 2019, section 3.6: the mask appended after the history);
- a **decoder** (SASRec) reads ``history`` and scores the item after its last position;
- a **tower** (the user tower of a two-tower model) reads ``[CLS] history [SEP]`` and its head scores
  every item against the ``[CLS]`` state (``tasks/two_tower.py``).

Only the hidden state of that one position goes through the output layer, so a large catalogue
costs ``N x V`` scores, not ``N x T x V``.  Special tokens and ``[UNK]`` are never recommended, and
by default neither is an item already in the history (the usual protocol for MovieLens).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pretune.data.interactions import CLS, MASK, PAD, SEP, SPECIALS
from pretune.evaluate.ranking import ranking_metrics, target_ranks

RANKING_K = 10  # the K of the monitored ndcg@K


def query_batch(histories: list[list[int]], family: str, max_length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask, position)`` for next-item queries: each history keeps its last
    ``max_length - 1`` (encoder) or ``max_length`` (decoder, tower) items; ``position`` is where to read."""
    keep = max_length - 1 if family == "encoder" else max_length
    layout = {"encoder": lambda h: [CLS, *h, MASK, SEP], "decoder": lambda h: list(h), "tower": lambda h: [CLS, *h, SEP]}[family]
    rows = [layout(h[-keep:]) for h in histories]
    width = max(map(len, rows))
    ids = torch.tensor([r + [PAD] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    read = {"encoder": lambda r: len(r) - 2, "decoder": lambda r: len(r) - 1, "tower": lambda r: 0}[family]
    position = torch.tensor([read(r) for r in rows])
    return ids, mask, position


@torch.no_grad()
def next_item_scores(base: nn.Module, head: Any, histories: list[list[int]], *, family: str, max_length: int,
                     exclude_seen: bool = True, batch_size: int = 256, device: torch.device | None = None) -> torch.Tensor:
    """``[N, V]`` float32 scores on the CPU, ``-inf`` for specials, ``[UNK]`` and (``exclude_seen``) the history's items.
    ``base``: the transformer; ``head``: hidden states -> vocabulary logits."""
    device = device or next(base.parameters()).device
    out = []
    for start in range(0, len(histories), batch_size):
        part = histories[start:start + batch_size]
        ids, mask, position = query_batch(part, family, max_length)
        hidden = base(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
        scores = head(hidden[torch.arange(len(part), device=device), position.to(device)]).float().cpu()
        scores[:, :len(SPECIALS)] = float("-inf")
        if exclude_seen:
            for row, history in enumerate(part):
                scores[row, torch.tensor(history, dtype=torch.long)] = float("-inf")
        out.append(scores)
    return torch.cat(out) if out else torch.zeros(0, 0)


def rank_queries(base: nn.Module, head: Any, histories: list[list[int]], targets: list[int], *, family: str,
                 max_length: int, device: torch.device | None = None) -> dict[str, float]:
    """HR@K, NDCG@K and MRR of next-item queries over all items; a target outside the vocabulary
    (``[UNK]``, an item unseen in training) is a miss.  The target is not excluded as seen even when
    the user consumed it before (a re-watch counts as a hit when ranked)."""
    if not histories:
        return {}
    was_training = base.training
    base.eval()
    try:
        scores = next_item_scores(base, head, histories, family=family, max_length=max_length, exclude_seen=False, device=device)
    finally:
        base.train(was_training)
    return rank_scores(scores, histories, targets)


def rank_scores(scores: torch.Tensor, histories: list[list[int]], targets: list[int]) -> dict[str, float]:
    """HR@K, NDCG@K and MRR of ``[N, V]`` next-item scores under the evaluation rule: specials are never
    ranked, the history's items are excluded except the target itself, a target outside the vocabulary
    (``[UNK]``) is a miss.  Every model and baseline is ranked by this one function."""
    scores = scores.float().clone()
    target = torch.tensor(targets)
    own = scores.gather(1, target[:, None]).clone()
    for row, history in enumerate(histories):  # exclude the seen items, but never the target itself
        scores[row, torch.tensor(history, dtype=torch.long)] = float("-inf")
    scores.scatter_(1, target[:, None], own)
    scores[:, :len(SPECIALS)] = float("-inf")
    ranks = target_ranks(scores, torch.where(target < len(SPECIALS), -1, target))
    return ranking_metrics(ranks)
