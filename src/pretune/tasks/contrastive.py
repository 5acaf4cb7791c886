"""Contrastive pretraining: SimCLR (Chen et al. 2020) on images, vectors and audio spectrograms.

Each example gives two augmented *views*; backbone and projection head map them to embeddings
``z``; the loss pulls the two views of an example together and pushes every other embedding of
the batch away:

    NT-Xent:  l_i = -log  exp(s(z_i, z_j(i)) / t) / sum_{k != i} exp(s(z_i, z_k) / t)

over all ``2N`` anchors, ``s`` the cosine similarity and ``t`` the temperature.  ``info_nce`` is
the one-directional variant whose negatives are only the other view's embeddings (CPC / MoCo /
SimCSE).  Under DDP every rank's embeddings are gathered *with their gradients*
(``torch.distributed.nn.all_gather``) so the negatives are the whole global batch, exactly as
on one large device; see ``tests/tasks/test_contrastive.py``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from pretune.data.augment import AugmentConfig, augment_examples
from pretune.backbones.arrays import ArrayFamily
from pretune.data.readers import RunData
from pretune.recipe import Section
from pretune.registry import TASKS
from pretune.tasks.vision import ArrayTask, MonitorConfig
from pretune.trainer.data import mix


def _gather(z: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All ranks' rows of ``z`` (gradients flow back to each rank's own rows) and this rank's offset."""
    if not (z.requires_grad and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return z, 0
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(z)), dist.get_rank() * len(z)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NT-Xent loss over the ``2n`` local anchors, and how many rank their positive first."""
    z1, z2 = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
    n = len(z1)
    keys1, offset = _gather(z1)
    keys2, _ = _gather(z2)
    total = len(keys1)
    logits = torch.cat([z1, z2]) @ torch.cat([keys1, keys2]).T / temperature  # [2n, 2N]
    own = torch.arange(n, device=z1.device) + offset
    self_index = torch.cat([own, own + total])
    positive = torch.cat([own + total, own])
    logits = logits.masked_fill(F.one_hot(self_index, 2 * total).bool(), float("-inf"))
    loss = F.cross_entropy(logits, positive, reduction="sum")
    return loss, (logits.argmax(1) == positive).sum()


def info_nce(queries: torch.Tensor, keys: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed InfoNCE loss of each query against its own key, the other keys being negatives."""
    queries, keys = F.normalize(queries.float(), dim=1), F.normalize(keys.float(), dim=1)
    all_keys, offset = _gather(keys)
    logits = queries @ all_keys.T / temperature
    positive = torch.arange(len(queries), device=queries.device) + offset
    return F.cross_entropy(logits, positive, reduction="sum"), (logits.argmax(1) == positive).sum()


class ContrastiveConfig(Section):
    name: Literal["simclr"] = "simclr"
    loss: Literal["nt_xent", "info_nce"] = "nt_xent"
    temperature: float = Field(0.5, gt=0)  # SimCLR: 0.5 for CIFAR-size images, 0.1 with very large batches
    projection_dim: int = Field(128, ge=1)
    projection_hidden: int | None = Field(None, ge=1)  # default: the backbone's feature size
    projection_norm: bool = True  # batch norm in the projection head (SimCLR v2); per-rank statistics under DDP
    view_size: int | None = Field(None, ge=4)  # side of the augmented views (default: the image size)
    augment: AugmentConfig = AugmentConfig()
    monitor: MonitorConfig = MonitorConfig()


class ProjectionHead(nn.Sequential):
    """SimCLR's projection g(h): Linear -> BatchNorm -> ReLU -> Linear (the v2 head, as in lightly)."""

    def __init__(self, features: int, hidden: int, out: int, norm: bool = True):
        super().__init__(nn.Linear(features, hidden, bias=not norm), nn.BatchNorm1d(hidden) if norm else nn.Identity(),
                         nn.ReLU(inplace=True), nn.Linear(hidden, out))


class SimCLRModel(nn.Module):
    def __init__(self, backbone: nn.Module, cfg: ContrastiveConfig):
        super().__init__()
        self.backbone = backbone
        self.projector = ProjectionHead(backbone.num_features, cfg.projection_hidden or backbone.num_features, cfg.projection_dim,
                                        cfg.projection_norm)
        self.loss, self.temperature = cfg.loss, cfg.temperature

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        views = batch["x"]  # [n, 2, ...]: both views of each example
        n = len(views)
        z = self.projector(self.backbone(views.transpose(0, 1).flatten(0, 1)))  # first views, then second views
        loss, correct = (nt_xent if self.loss == "nt_xent" else info_nce)(z[:n], z[n:], self.temperature)
        return {"contrastive": loss, "contrastive_correct": correct}


@TASKS.register("simclr")
class SimCLR(ArrayTask):
    Config = ContrastiveConfig
    losses = ("contrastive",)
    audio: dict | None = None  # the data's AudioSpec (spectrogram views)

    def build(self, backbone: ArrayFamily, data: RunData) -> SimCLRModel:
        self.audio = data.arrays.audio  # spectrogram views need the length of a frame
        return SimCLRModel(backbone.build(data), self.cfg)

    def collate(self, rows: dict[str, torch.Tensor], seeds: list[int]) -> dict[str, torch.Tensor]:
        """Two views per example, each drawn from the example's own seed."""
        views = [augment_examples(rows["x"], [mix(s, v) for s in seeds], self.cfg.augment, self.cfg.view_size, self.audio)
                 for v in (1, 2)]
        return {"x": torch.stack(views, dim=1)}

    def units(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        anchors = torch.tensor(float(len(batch["x"]) * (2 if self.cfg.loss == "nt_xent" else 1)))
        return {"contrastive": anchors, "contrastive_correct": anchors}
