"""What every image / vector task shares: data, backbone, k-NN monitor, FLOPs, saving.

The pretraining objectives (``contrastive.py``, ``autoencoder.py``, ``gan.py``) and supervised
training (``supervised.py``) subclass :class:`ArrayTask`.  Their module holds the backbone as
``module.backbone``; the saved ``model/`` folder is a vision model folder (see
:mod:`pretune.backbones.vision`) that fine-tuning loads with ``model=RUN/model``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pretune.backbones import vision
from pretune.data.arrays import ArrayData, ArrayDataConfig, ArrayDataset, build_array_data, channel_stats
from pretune.errors import RecipeError
from pretune.evaluate.knn import knn_accuracy
from pretune.recipe import Section
from pretune.trainer.precision import autocast


class MonitorConfig(Section):
    """k-NN accuracy of the backbone's features on the labelled validation split, at every evaluation."""

    knn_k: int = Field(20, ge=1)
    knn_temperature: float = Field(0.1, gt=0)
    knn_bank: int = Field(5000, ge=1)  # labelled training examples in the memory bank (a fixed subset)


@dataclass
class ArrayRunData:
    """What the trainer reads (``train``, ``validation``) plus the whole data description."""

    train: ArrayDataset
    validation: ArrayDataset | None
    arrays: ArrayData


class ArrayTask:
    """Base of image / vector tasks.  Subclasses set ``Config``, ``losses`` and ``build``/``collate``."""

    DataConfig = ArrayDataConfig
    perplexity: tuple[str, ...] = ()
    monitor = ("knn_accuracy", "max")
    label_names = None  # pretraining ignores labels (only the k-NN monitor reads them)
    unit = "ex"  # throughput is counted in examples (images or vectors): the progress bar shows ex/s

    def __init__(self, cfg: Any, data_cfg: ArrayDataConfig, seed: int = 0):
        self.cfg, self.data_cfg, self.seed = cfg, data_cfg, seed
        self._flops_per_example: float | None = None

    # -- data and backbone --------------------------------------------------------------------
    def data(self, tokenizer_path: str | None = None) -> ArrayRunData:
        """Pretraining reads the whole training split, labelled or not; validation stays held out."""
        arrays = build_array_data(self.data_cfg, self.seed)
        return ArrayRunData(arrays.unlabelled_train, arrays.validation, arrays)

    def backbone(self, cfg: Any, data: ArrayRunData) -> vision.VisionBackbone:
        if not isinstance(cfg, vision.VisionConfig):
            raise RecipeError(f"recipe key 'backbone.name': {cfg.name!r} is a text backbone; "
                              f"{data.arrays.modality} data need cnn, mlp or a timm model")
        mean, std = channel_stats(data.train.x)
        return vision.build_backbone(cfg, data.arrays.shape, mean, std)

    def units(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {key: torch.tensor(float(len(batch["x"]))) for key in self.losses}

    def tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """Throughput is counted in examples (images or vectors)."""
        return len(batch["x"])

    def flops(self, module: nn.Module, batch: dict[str, torch.Tensor]) -> float:
        """Training FLOPs: 3x the forward FLOPs (backward costs about twice the forward), counted once."""
        if self._flops_per_example is None:
            self._flops_per_example = 3.0 * forward_flops(module, batch, getattr(self, "phases", None)) / len(batch["x"])
        return self._flops_per_example * len(batch["x"])

    # -- monitoring -----------------------------------------------------------------------------
    def probe(self, module: nn.Module, data: ArrayRunData, *, device: torch.device, precision: str, step: int,
              out_dir: Path | None) -> dict[str, float]:
        """k-NN accuracy of the backbone's features (validation queries, training-split memory bank)."""
        arrays, monitor = data.arrays, getattr(self.cfg, "monitor", MonitorConfig())
        bank, queries = arrays.unlabelled_train, arrays.validation
        if queries is None or queries.labels is None or bank.labels is None:
            return {}
        keep = torch.randperm(len(bank), generator=torch.Generator().manual_seed(self.seed))[: monitor.knn_bank].sort().values
        bank_features = encode(module.backbone, bank.x[keep], device, precision)
        query_features = encode(module.backbone, queries.x, device, precision)
        accuracy = knn_accuracy(bank_features, bank.labels[keep], query_features, queries.labels,
                                len(arrays.label_names), monitor.knn_k, monitor.knn_temperature)
        return {"knn_accuracy": accuracy}

    # -- saving ---------------------------------------------------------------------------------
    def save(self, module: nn.Module, path: Path, data: ArrayRunData) -> None:
        vision.save_model(path, module, module.backbone, {"task": self.cfg.name})
        meta = {"task": self.cfg.name, "modality": data.arrays.modality, "input_shape": list(data.arrays.shape)}
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


def forward_flops(module: nn.Module, batch: dict[str, torch.Tensor], phases: dict | None = None) -> float:
    """FLOPs of one forward pass of ``module`` on ``batch`` (every phase of a multi-phase task)."""
    device = next(module.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    was_training = module.training
    module.eval()  # no batch-norm statistics update from this extra pass
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        for phase in phases or [None]:
            module(batch, phase) if phase else module(batch)
    module.train(was_training)
    return float(counter.get_total_flops())
