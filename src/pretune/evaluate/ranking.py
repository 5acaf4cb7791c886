"""Next-item ranking metrics over the full item set (no sampled negatives).

Sampled-negative evaluation (ranking the target among 100 random items) inflates and reorders
results (Krichene & Rendle 2020, "On Sampled Metrics for Item Recommendation"); these metrics rank
the target against **every** item the model can recommend.

For one query whose target has 0-based rank ``r`` (the number of items scored strictly higher):

    HR@K   = 1 if r < K else 0
    NDCG@K = 1 / log2(r + 2) if r < K else 0     (one relevant item: the ideal DCG is 1)
    MRR    = 1 / (r + 1)

A target the model cannot score (an item unseen in training) is a miss: its rank is infinite.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

KS = (5, 10, 20)


def target_ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """0-based rank of each row's target among its scores (``[N, V]``, ``-inf`` for excluded items):
    the count of items scored strictly higher, so ties are resolved in the target's favour only as
    far as equal scores go (a model that scores everything equally ranks every target first: pass
    distinct scores).  A target of -1 (unscorable) or scored ``-inf`` gets rank ``inf``: a miss at every K."""
    valid = targets >= 0
    safe = targets.clamp(min=0)
    own = scores.gather(1, safe[:, None])
    ranks = (scores > own).sum(1).double()
    return torch.where(valid & torch.isfinite(own[:, 0]), ranks, torch.full_like(ranks, float("inf")))


def ranking_metrics(ranks: Sequence[int] | torch.Tensor, ks: Sequence[int] = KS) -> dict[str, float]:
    """``hr@K``, ``ndcg@K`` for each K and ``mrr``, averaged over the queries."""
    ranks = torch.as_tensor(ranks, dtype=torch.float64)
    if ranks.numel() == 0:
        return {}
    out: dict[str, float] = {}
    for k in ks:
        hit = ranks < k
        out[f"hr@{k}"] = float(hit.double().mean())
        out[f"ndcg@{k}"] = float(torch.where(hit, 1.0 / torch.log2(ranks + 2), torch.zeros_like(ranks)).mean())
    out["mrr"] = float((1.0 / (ranks + 1)).mean())
    return out

