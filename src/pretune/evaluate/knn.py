"""Weighted k-nearest-neighbour accuracy: how good a representation is, without training a head.

The monitor of self-supervised pretraining used by InstDisc (Wu et al. 2018), MoCo and lightly:
features are L2-normalised, each query takes its ``k`` most cosine-similar memory-bank examples,
and class ``c`` scores ``sum over those neighbours of class c of exp(similarity / temperature)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def knn_predict(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, num_classes: int,
                k: int = 20, temperature: float = 0.1) -> torch.Tensor:
    """Predicted class of every query ``[Q, D]`` from the memory bank ``[N, D]`` and its labels ``[N]``."""
    bank, queries = F.normalize(bank.float(), dim=1), F.normalize(queries.float(), dim=1)
    similarity = queries @ bank.T  # [Q, N]
    top, index = similarity.topk(min(k, len(bank)), dim=1)
    votes = torch.zeros(len(queries), num_classes, dtype=top.dtype, device=top.device)
    votes.scatter_add_(1, bank_labels[index], (top / temperature).exp())
    return votes.argmax(dim=1)


def knn_accuracy(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, query_labels: torch.Tensor,
                 num_classes: int, k: int = 20, temperature: float = 0.1) -> float:
    predicted = knn_predict(bank, bank_labels, queries, num_classes, k, temperature)
    return float((predicted == query_labels).float().mean())
