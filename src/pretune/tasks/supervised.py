"""Classification of images and vectors: supervised pretraining, and fine-tuning with any strategy.

``task: classify`` with an ``images`` or ``vectors`` data section lands here (text lands in
``finetune.py``).  The model is the backbone plus one linear layer; it reuses the text task's
:class:`~pretune.tasks.finetune.FineTuneModel` (strategies, losses) and metrics.

- no ``backbone.path``: the backbone is built fresh and everything trains: *supervised
  pretraining* on a source task (``recipes/image-supervised.yaml``), or the from-scratch arm;
- ``backbone.path`` = a pretune vision folder: its backbone is loaded, a new head is added
  unless the folder already has one for the same labels; the strategy decides what trains.
  A linear probe encodes the data once and trains the head on cached features.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from pretune import strategies
from pretune.backbones import vision
from pretune.data.arrays import ArrayData, ArrayDataConfig, build_array_data
from pretune.data.augment import AugmentConfig, augment_images, augment_vectors
from pretune.errors import DataError, RecipeError
from pretune.evaluate import metrics as M
from pretune.recipe import Section
from pretune.tasks.finetune import FinetuneTask, FineTuneModel
from pretune.tasks.vision import ArrayTask, encode, forward_flops


class ArrayClassifyConfig(Section):
    name: Literal["classify"] = "classify"
    class_weights: Literal["balanced"] | list[float] | None = None  # balanced: n / (K * n_c)
    cache_features: bool = True  # linear probe: encode the data once, train the head on cached features
    head_dropout: float = Field(0.0, ge=0, lt=1)
    augment: AugmentConfig | None = None  # augment training examples (e.g. {crop_scale: [0.6, 1], flip: 0})


class Classifier(nn.Module):
    """Backbone features -> dropout -> linear head; augments its input while training, if asked."""

    def __init__(self, backbone: vision.VisionBackbone, outputs: int, dropout: float = 0.0, augment: AugmentConfig | None = None):
        super().__init__()
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(backbone.num_features, outputs)
        self.augment = augment

    @property
    def base_model(self) -> vision.VisionBackbone:  # what strategies freeze and layer groups come from
        return self.backbone

    def forward(self, x: torch.Tensor, seed: torch.Tensor | None = None) -> SimpleNamespace:
        if self.training and self.augment is not None and seed is not None:
            seeds = seed.tolist()
            x = augment_images(x, seeds, self.augment) if x.dim() == 4 else augment_vectors(x, seeds, self.augment)
        return SimpleNamespace(logits=self.head_logits(self.backbone(x)))

    def head_logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(features))


@dataclass
class Rows:
    """Named tensors indexed together: ``rows[[3, 1]] -> {"features": ..., "labels": ...}``."""

    columns: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def __getitem__(self, indices: Any) -> dict[str, torch.Tensor]:
        return {k: v[indices] for k, v in self.columns.items()}


@dataclass
class ClassifyData:
    train: Any
    validation: Any
    test: Any
    arrays: ArrayData


class ArrayClassify(FinetuneTask):
    Config = ArrayClassifyConfig
    DataConfig = ArrayDataConfig
    unit = "ex"

    def __init__(self, cfg: ArrayClassifyConfig, data_cfg: ArrayDataConfig, seed: int = 0, strategy: str = "full", head_lr_scale: float = 1.0):
        self.cfg, self.data_cfg, self.seed = cfg, data_cfg, seed
        self.strategy = strategies.parse(strategy)
        if self.strategy.name == "lora":
            raise RecipeError("recipe key 'strategy': lora applies to text backbones; for images and vectors use linear-probe, "
                              "freeze-bottom:N, gradual-unfreeze or llrd:D")
        self.head_lr_scale = head_lr_scale
        self.kind, self.losses, self.monitor = "single", ("ce",), M.primary_metric("classification")
        self._flops_per_example: float | None = None
        self.class_weights: torch.Tensor | None = None

    # -- data ---------------------------------------------------------------------------------
    def data(self, tokenizer_path: str | None = None, label_names: list[str] | None = None) -> ClassifyData:
        arrays = build_array_data(self.data_cfg, self.seed, label_names=label_names)
        if arrays.label_names is None:
            source = self.data_cfg.images or self.data_cfg.vectors
            raise DataError(f"{source}: classification needs labels (one sub-folder per class, or a '{self.data_cfg.label}' column)")
        saved = self._saved_labels(tokenizer_path) if tokenizer_path and not label_names else None
        if saved and saved != arrays.label_names and set(arrays.label_names) <= set(saved):  # keep the model's label order
            arrays = build_array_data(self.data_cfg, self.seed, label_names=saved)
        self.label_names = arrays.label_names
        return ClassifyData(arrays.train, arrays.validation, arrays.test, arrays)

    def collate(self, rows: dict[str, torch.Tensor], seeds: list[int]) -> dict[str, torch.Tensor]:
        batch = {"features": rows["features"]} if "features" in rows else {"x": rows["x"], "seed": torch.tensor(seeds)}
        return batch | {"labels": rows["labels"].long()}

    def tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return len(batch["labels"])

    def flops(self, module: FineTuneModel, batch: dict[str, torch.Tensor]) -> float:
        if "features" in batch:
            return 6.0 * sum(p.numel() for p in module.model.head.parameters()) * len(batch["labels"])
        if self._flops_per_example is None:
            self._flops_per_example = 3.0 * forward_flops(module, batch) / len(batch["labels"])
        return self._flops_per_example * len(batch["labels"])

    # -- model --------------------------------------------------------------------------------
    def build(self, backbone_cfg: Any, data: ClassifyData) -> FineTuneModel:
        backbone = ArrayTask.backbone(self, backbone_cfg, SimpleNamespace(train=data.arrays.unlabelled_train, arrays=data.arrays))
        model = Classifier(backbone, len(self.label_names), self.cfg.head_dropout, self.cfg.augment)
        new = {"head.weight", "head.bias"}
        if backbone_cfg.path and backbone_cfg.pretrained and self._saved_labels(backbone_cfg.path) == self.label_names:
            _, state = vision.read_folder(backbone_cfg.path)  # the folder already has a head for these labels
            if all(k in state and state[k].shape == model.state_dict()[k].shape for k in new):
                model.head.load_state_dict({k[len("head."):]: state[k] for k in new})
                new = set()
        if not backbone_cfg.path and self.strategy.name != "full":
            raise RecipeError(f"recipe key 'strategy': {self.strategy.name} needs a pretrained backbone (backbone.path / model=)")
        self.class_weights = self._class_weights(data)
        return FineTuneModel(model, self.kind, new, self.strategy, self.class_weights, self.head_lr_scale)

    def prepare(self, module: FineTuneModel, data: ClassifyData, device: torch.device, precision: str) -> ClassifyData:
        """Linear probe: the frozen backbone's features of train/validation, computed once."""
        if not (self.strategy.frozen_backbone and self.cfg.cache_features):
            return data
        module.to(device)

        def cached(split: Any) -> Rows | None:
            return None if split is None else Rows({"features": encode(module.model.backbone, split.x, device, precision), "labels": split.labels})

        return ClassifyData(cached(data.train), cached(data.validation), data.test, data.arrays)

    # -- saving ---------------------------------------------------------------------------------
    def save(self, module: FineTuneModel, path: Path, data: ClassifyData) -> None:
        vision.save_model(path, module.model, module.model.backbone, {"task": "classify", "outputs": len(self.label_names)})
        meta = {"task": "classify", "kind": self.kind, "label_names": self.label_names, "modality": data.arrays.modality,
                "input_shape": list(data.arrays.shape), "head_dropout": self.cfg.head_dropout}
        if data.arrays.modality == "vector":  # the label column a vector file is read with (predict / evaluate)
            meta["label"] = self.data_cfg.label
        (path / "pretune.json").write_text(json.dumps(meta, indent=2))

    def _saved_labels(self, path: str) -> list[str] | None:
        meta = Path(path) / "pretune.json"
        return json.loads(meta.read_text()).get("label_names") if meta.is_file() else None


FinetuneTask.for_arrays = ArrayClassify  # task: classify + images/vectors data -> this class (see run.build_task)
