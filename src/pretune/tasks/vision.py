"""What the image / vector pretraining objectives share: the backbone, the k-NN monitor, FLOPs, saving.

SimCLR (``contrastive.py``), autoencoders (``autoencoder.py``) and the GAN (``gan.py``) subclass
:class:`ArrayTask`.  Their module holds the backbone as ``module.backbone``; the saved ``model/``
folder is a pretune image/vector model folder (see :mod:`pretune.backbones.arrays`) that
fine-tuning loads with ``model=RUN/model``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from torch import nn

from pretune.backbones.arrays import save_model
from pretune.data.readers import RunData
from pretune.evaluate.knn import knn_accuracy
from pretune.recipe import Section
from pretune.tasks.base import Task
from pretune.trainer.flops import forward_flops
from pretune.trainer.precision import autocast


class MonitorConfig(Section):
    """k-NN accuracy of the backbone's features on the labelled validation split, at every evaluation."""

    knn_k: int = Field(20, ge=1)
    knn_temperature: float = Field(0.1, gt=0)
    knn_bank: int = Field(5000, ge=1)  # labelled training examples in the memory bank (a fixed subset)


class ArrayTask(Task):
    """Base of image / vector pretraining tasks.  Subclasses set ``Config``, ``losses``, ``build`` and ``collate``."""

    modalities = ("array",)
    monitor = ("knn_accuracy", "max")
    unit = "ex"  # throughput is counted in examples (images or vectors): the progress bar shows ex/s

    def __init__(self, cfg: Any, seed: int = 0):
        super().__init__(cfg, seed)
        self.flops_per_example: float | None = None

    def prepare(self, module: nn.Module, data: RunData, device: torch.device, precision: str) -> RunData:
        """Without labelled validation examples there is no k-NN accuracy: the validation loss picks the best model."""
        arrays = data.arrays
        if arrays is None or arrays.validation is None or arrays.validation.labels is None:
            self.monitor = ("loss", "min") if data.validation is not None else None
        return data

    def units(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {key: torch.tensor(float(len(batch["x"]))) for key in self.losses}

    def tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """Throughput is counted in examples (images or vectors)."""
        return len(batch["x"])

    def flops(self, module: nn.Module, batch: dict[str, torch.Tensor]) -> float:
        """Training FLOPs: 3x the forward FLOPs (backward costs about twice the forward), counted once."""
        if self.flops_per_example is None:
            self.flops_per_example = 3.0 * forward_flops(module, batch, self.phases) / len(batch["x"])
        return self.flops_per_example * len(batch["x"])

    def probe(self, module: nn.Module, data: RunData, *, device: torch.device, precision: str, step: int,
              out_dir: Path | None) -> dict[str, float]:
        """k-NN accuracy of the backbone's features (validation queries, training-split memory bank)."""
        arrays, monitor = data.arrays, self.cfg.monitor
        bank, queries = arrays.unlabelled_train, arrays.validation
        if queries is None or queries.labels is None or bank.labels is None:
            return {}
        keep = torch.randperm(len(bank), generator=torch.Generator().manual_seed(self.seed))[: monitor.knn_bank].sort().values
        bank_features = encode(module.backbone, bank.x[keep], device, precision)
        query_features = encode(module.backbone, queries.x, device, precision)
        accuracy = knn_accuracy(bank_features, bank.labels[keep], query_features, queries.labels,
                                len(arrays.label_names), monitor.knn_k, monitor.knn_temperature)
        return {"knn_accuracy": accuracy}

    def save(self, module: nn.Module, path: Path, data: RunData) -> None:
        save_model(path, module, module.backbone, {"task": self.cfg.name})
        meta = {"task": self.cfg.name, **data.meta}
        (path / "pretune.json").write_text(json.dumps(meta, indent=2))


@torch.no_grad()
def encode(backbone: nn.Module, x: torch.Tensor, device: torch.device, precision: str, batch_size: int = 512) -> torch.Tensor:
    """Features of every row of ``x`` with the backbone in eval mode (then back to its previous mode)."""
    was_training = backbone.training
    backbone.eval()
    out = []
    for start in range(0, len(x), batch_size):
        with autocast(precision, device):
            out.append(backbone(x[start:start + batch_size].to(device)).float().cpu())
    backbone.train(was_training)
    return torch.cat(out) if out else torch.empty(0)
