"""SimCSE (Gao et al. 2021, unsupervised): contrastive pretraining of a text encoder, with
dropout as the only augmentation.

Every text block goes through the encoder twice in one batch; the two copies see different
dropout masks, so they are two "views" of the same text.  The InfoNCE loss (temperature 0.05 in
the paper) makes each first view pick its own second view among all second views of the batch:
``-log exp(s(h_i, h'_i)/t) / sum_j exp(s(h_i, h'_j)/t)``.  The representation is the ``[CLS]``
state (``pooling: cls``, the paper's choice for a pretrained BERT) or the mean over tokens
(``pooling: mean``, the default: what sentence-transformers models use, and the one that learns from a
randomly initialised encoder, whose ``[CLS]`` states start out nearly identical for every text so the
loss sits at ``log(batch)`` for a long time).  Dropout must be on: a backbone with ``hidden_dropout_prob: 0`` would give identical
views and a trivial task, so it is refused.

Validation runs without dropout, where the two views coincide: it reports the InfoNCE of each
embedding against the batch and the *uniformity* of the embeddings (Wang & Isola 2020), not the
(always perfect) view-matching accuracy of training.

The examples are the packed text blocks of ``data`` (``block_size`` tokens, like MLM), and the
saved ``model/`` is the encoder as a Hugging Face folder (``AutoModel`` loads it; fine-tuning adds
a head as for any encoder).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from torch import nn
from transformers import AutoModel

from pretune.backbones.transformers import HF
from pretune.data.readers import RunData
from pretune.errors import RecipeError
from pretune.recipe import Section
from pretune.registry import TASKS
from pretune.tasks.base import Task
from pretune.tasks.common import DownstreamConfig, downstream_probe, save_hf, stack_rows
from pretune.tasks.contrastive import info_nce
from pretune.trainer.flops import transformer_training_flops


class SimCSEConfig(Section):
    name: Literal["simcse"] = "simcse"
    monitor: DownstreamConfig | None = None  # k-NN accuracy of the features on a small labelled set, at every evaluation
    temperature: float = Field(0.05, gt=0)
    pooling: Literal["cls", "mean"] = "mean"


def pool(hidden: torch.Tensor, mask: torch.Tensor | None, how: str) -> torch.Tensor:
    if how == "cls":
        return hidden[:, 0]
    if mask is None:
        return hidden.mean(1)
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


def uniformity(z: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    """Wang & Isola 2020: ``log E_{i != j} exp(-t ||z_i - z_j||^2)`` of the normalised embeddings of a
    batch; lower is more uniform (0 when every text maps to one point, the collapse SimCSE prevents)."""
    z = torch.nn.functional.normalize(z.float(), dim=1)
    distances = torch.cdist(z, z).pow(2)
    off = ~torch.eye(len(z), dtype=torch.bool, device=z.device)
    return torch.logsumexp(-t * distances[off], 0) - torch.log(torch.tensor(float(off.sum())))


class SimCSEModel(nn.Module):
    def __init__(self, model: nn.Module, cfg: SimCSEConfig):
        super().__init__()
        self.model, self.temperature, self.pooling = model, cfg.temperature, cfg.pooling

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        if not self.training:  # no dropout: both views would be the same vector and the accuracy always 1
            z = pool(self.model(input_ids=ids, attention_mask=mask).last_hidden_state, mask, self.pooling)
            loss, _ = info_nce(z, z, self.temperature)
            return {"contrastive": loss, "uniformity": uniformity(z) * len(z)}
        twice = {"input_ids": ids.repeat(2, 1)}  # one forward pass: each copy draws its own dropout mask
        if mask is not None:
            twice["attention_mask"] = mask.repeat(2, 1)
        hidden = self.model(**twice).last_hidden_state
        z = pool(hidden, twice.get("attention_mask"), self.pooling)
        loss, correct = info_nce(z[: len(ids)], z[len(ids):], self.temperature)
        return {"contrastive": loss, "contrastive_correct": correct}


@TASKS.register("simcse")
class SimCSE(Task):
    Config = SimCSEConfig
    family = "encoder"
    losses = ("contrastive",)

    def build(self, backbone: HF, data: RunData) -> SimCSEModel:
        model = backbone.model(AutoModel, data)
        self.start = backbone.start
        if getattr(model.config, "hidden_dropout_prob", 0.1) == 0:
            raise RecipeError("recipe key 'backbone.config.hidden_dropout_prob': SimCSE uses dropout as its augmentation; it must be > 0")
        return SimCSEModel(model, self.cfg)

    def collate(self, rows: dict[str, list], seeds: list[int]) -> dict[str, torch.Tensor]:
        return stack_rows(rows)

    def units(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        n = torch.tensor(float(len(batch["input_ids"])))
        return {"contrastive": n, "contrastive_correct": n, "uniformity": n}

    def tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["input_ids"].numel())

    def flops(self, module: SimCSEModel, batch: dict[str, torch.Tensor]) -> float:
        ids = batch["input_ids"]
        return transformer_training_flops(module.model.config, 2 * ids.numel(), ids.shape[1], 0)

    def probe(self, module: SimCSEModel, data: RunData, *, device: torch.device, precision: str, step: int,
              out_dir: Path | None) -> dict[str, float]:
        return downstream_probe(self, module, data, device)

    def save(self, module: SimCSEModel, path: Path, data: RunData) -> None:
        save_hf(module.model, data.tokenizer, path, {"task": "simcse", "family": self.family, "pooling": self.cfg.pooling}, self.start)
