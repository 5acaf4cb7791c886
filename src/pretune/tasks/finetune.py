"""Fine-tuning: a new task layer on a backbone, for every modality.

``task: classify | regress | tag`` picks a head kind (:mod:`pretune.heads`: loss, units, decoding,
metrics); the backbone family (:mod:`pretune.backbones`) attaches the head the way its ecosystem
expects (Hugging Face head classes for text, a linear layer for images and vectors); the strategy
(:mod:`pretune.strategies`) decides what else trains.  The parameters the starting checkpoint did
not have are the *new task layers*: they always train.  Without a model to start from (no
``backbone.path`` or ``weights``) everything trains from random weights: supervised pretraining on
a source task, or the from-scratch arm of a study.

A frozen backbone in eval mode runs nothing stochastic before the head, so with ``linear-probe``
the data are encoded once (``prepare``) and only the head trains on the cached features.  With
``task.probe: lbfgs`` (the default) and a head that is one linear layer, that training is a
convex fit run to convergence, its L2 strength cross-validated on the training features as
scikit-learn's ``LogisticRegressionCV`` does (:func:`pretune.strategies.fit_probe`): it happens at the start of epoch 0 (``on_epoch``, after the
step-0 validation of the untrained head, so curves keep their "before" point), and the loop's
steps that follow run the head at learning rate 0, so they validate and save the fitted head
without changing it.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn
from tqdm.auto import tqdm

from pretune import heads, strategies
from pretune.backbones.base import Backbone, Classifier
from pretune.data.augment import AugmentConfig
from pretune.data.readers import TOKENIZED, RunData
from pretune.errors import RecipeError
from pretune.heads import Head
from pretune.recipe import Section, StrategyConfig
from pretune.registry import TASKS
from pretune.tasks import setfit
from pretune.tasks.base import Task
from pretune.trainer.flops import forward_flops
from pretune.trainer.precision import autocast

HEAD_OF_TASK = {"classify": "single", "regress": "regression", "tag": "tags"}


SIZE_SAMPLE = 512  # rows whose characters per token convert data.max_length into a character cap (lengths())


class FinetuneConfig(Section):
    name: Literal["classify", "regress", "tag"] = "classify"
    multi_label: bool = False  # classify: several labels per example (sigmoid + BCE)
    threshold: float = Field(0.5, gt=0, lt=1)  # multi-label decision threshold
    class_weights: Literal["balanced"] | list[float] | None = None  # balanced: n / (K * n_c)
    label_all_subwords: bool = False  # tag: label every piece of a word, not only the first
    cache_features: bool = True  # linear probe: encode the data once, train the head on cached features
    probe: Literal["lbfgs", "sgd"] = "lbfgs"  # linear probe: fit the head to convergence (L2 chosen on validation), or train it by the loop
    pooling: Literal["auto", "cls", "mean", "max", "last"] = "auto"  # text: what the head reads; auto: the folder's sentence-transformers pooling, else the architecture's head
    head_dropout: float = Field(0.0, ge=0, lt=1)  # images / vectors: dropout before the linear head
    augment: AugmentConfig | None = None  # images / vectors: augment training examples (e.g. {crop_scale: [0.6, 1], flip: 0})


class TensorRows:
    """Named tensors indexed together: ``rows[[3, 1]] -> {"features": ..., "labels": ...}``."""

    def __init__(self, columns: dict[str, torch.Tensor]):
        self.columns = columns

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def __getitem__(self, indices: Any) -> dict[str, torch.Tensor]:
        return {k: v[indices] for k, v in self.columns.items()}


class FineTuneModel(nn.Module):
    """A classifier (backbone + task layer) and its head kind; ``forward`` returns the summed loss and the logits."""

    def __init__(self, model: Classifier, head: Head, class_weights: torch.Tensor | None, frozen_backbone: bool):
        super().__init__()
        self.model, self.head, self.frozen_backbone = model, head, frozen_backbone
        self.register_buffer("class_weights", class_weights, persistent=False)

    def train(self, mode: bool = True) -> "FineTuneModel":
        super().train(mode)
        if mode and self.frozen_backbone:
            self.model.backbone.eval()  # a frozen backbone runs deterministically (no dropout, fixed batch-norm statistics)
        return self

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if "pair_targets" in batch:  # SetFit's contrastive step: sentence embeddings of anchors and partners
            return {setfit.PAIR_LOSS: setfit.pair_loss(self.model.encode(batch), batch["pair_targets"])}
        logits = self.model.head_logits(batch["features"]) if "features" in batch else self.model(batch)
        logits = logits.float()
        return {self.head.loss_key: self.head.loss(logits, batch["labels"], self.class_weights), "logits": logits.detach()}


class Finetune(Task):
    Config = FinetuneConfig
    data_kind = "labelled"
    modalities = ("text", "array", "interactions")
    wants_logits = True

    def __init__(self, cfg: FinetuneConfig, seed: int = 0, strategy: StrategyConfig = StrategyConfig(), head_lr_scale: float = 1.0,
                 epochs: float | None = None):
        super().__init__(cfg, seed)
        self.strategy, self.head_lr_scale, self.epochs = strategy, head_lr_scale, epochs  # epochs: paces gradual unfreezing
        self.head = heads.get("multi" if cfg.name == "classify" and cfg.multi_label else HEAD_OF_TASK[cfg.name])
        if cfg.class_weights is not None and not self.head.class_weights:  # would be silently ignored otherwise
            raise RecipeError(f"recipe key 'task.class_weights': applies to single-label classification only, not to {self.head.name!r} tasks")
        self.setfit = strategy.name == "setfit"
        self.losses = (setfit.PAIR_LOSS,) if self.setfit else (self.head.loss_key,)
        self.stretch = not self.setfit  # SetFit's schedule is its pair count (strategy.pairs), not trainer.min_steps
        self.monitor = self.head.monitor
        self.class_weights: torch.Tensor | None = None
        self.trainable_groups: list[int] | None = None
        self.flops_per_example: float | None = None  # images / vectors: counted once, on the first batch
        self.probe_data: TensorRows | None = None  # cached training features to fit the probe on
        self.pair_source: Any = None  # SetFit: the labelled training rows the pairs are drawn from
        self.anchors: setfit.PairAnchors | None = None  # ... and the rows it trains on
        self.fitted = False

    # -- model --------------------------------------------------------------------------------------
    def build(self, backbone: Backbone, data: RunData) -> FineTuneModel:
        self.backbone, self.data = backbone, data
        tokenized = backbone.modality in TOKENIZED  # text, and item histories (sentences whose words are items)
        self.unit = "tok" if tokenized else "ex"
        if tokenized and (self.cfg.augment is not None or self.cfg.head_dropout):
            raise RecipeError("recipe key 'task.augment' / 'task.head_dropout': apply to images and vectors; "
                              "text heads use the model's own dropout (backbone.config)")
        if self.cfg.pooling != "auto" and (not tokenized or self.head.per_token):
            raise RecipeError("recipe key 'task.pooling': applies to text classification and regression; "
                              "tagging reads every token, and images and vectors use their network's own pooling")
        if self.strategy.name != "full" and not backbone.pretrained:
            raise RecipeError(f"recipe key 'strategy': {self.strategy.name} needs a pretrained backbone "
                              "(model=PATH, backbone.path or backbone.weights)")
        if self.head.per_token and self.cfg.label_all_subwords:  # later pieces of a B-X word are I-X (see align_tags)
            names = data.label_names
            data.label_names = names + [f"I-{n[2:]}" for n in names if n.startswith("B-") and f"I-{n[2:]}" not in names]
            data.all_subwords = True
        self.label_names = data.label_names
        if self.setfit and (not tokenized or self.head.name != "single"):
            raise RecipeError("recipe key 'strategy': setfit fine-tunes a text encoder for single-label classification "
                              f"(task: classify); this run is {backbone.modality} {self.head.name}")
        text = ({"pooling": self.cfg.pooling, "linear": self.fits_probe or self.setfit, "sentence": self.setfit}
                if tokenized else {})
        model = backbone.classifier(self.head, self.label_names, data, dropout=self.cfg.head_dropout, augment=self.cfg.augment, **text)
        strategies.prepare(self.strategy, model)
        self.class_weights = self._class_weights(data)
        return FineTuneModel(model, self.head, self.class_weights, self.strategy.frozen_backbone)

    @property
    def fits_probe(self) -> bool:
        """A linear probe fitted to convergence (``task.probe: lbfgs``), not trained by the loop."""
        return self.strategy.frozen_backbone and self.cfg.probe == "lbfgs"

    def on_epoch(self, module: FineTuneModel, epoch: int) -> str | None:
        """Gradual unfreezing changes what trains at every epoch (paced by ``trainer.epochs``); the other
        strategies set it once.  A linear probe on cached features is fitted here, at the start of epoch 0."""
        per_stage = strategies.stages(self.strategy, module.model, self.epochs)
        trainable = strategies.apply(self.strategy, module.model, epoch, per_stage)
        notes = []
        if trainable != self.trainable_groups:
            self.trainable_groups = trainable
            groups = len(module.model.layer_groups()) if self.strategy.name != "lora" else 0
            what = "all layer groups" if len(trainable) == groups else (f"layer groups {trainable[0]}-{trainable[-1]} of 0-{groups - 1}" if trainable else "no layer group")
            notes.append(f"{self.strategy} trains the new task layers and {what} ({strategies.describe(module)})")
        if self.probe_data is not None and not self.fitted and epoch == 0:  # a resumed run past epoch 0 loaded the fitted head
            notes.append(self._fit_probe(module.model, self.probe_data))
        return "; ".join(notes) or None

    def refit(self, module: FineTuneModel, device: torch.device, precision: str) -> str | None:
        """SetFit: fit the linear head on the encoder's embeddings of the labelled training rows as they
        are now (before every validation, and before saving a model no validation picked)."""
        if not self.setfit:
            return None
        return self._fit_probe(module.model, self._encode(module.model, self.pair_source, device, precision))

    def _fit_probe(self, model: Classifier, train: TensorRows) -> str:
        """Fit the linear head on the cached training features (:func:`pretune.strategies.fit_probe`) and write it into the model."""
        fit = strategies.fit_probe(self.head, train.columns["features"], train.columns["labels"], weights=self.class_weights,
                                   names=self.label_names, threshold=self.cfg.threshold, seed=self.seed)
        layer = model.linear_head()
        with torch.no_grad():
            layer.weight.copy_(fit.weight.to(layer.weight))
            layer.bias.copy_(fit.bias.to(layer.bias))
        self.fitted = True
        metric = self.head.monitor[0]
        chosen = (f"C={fit.C:g} chosen by {fit.folds}-fold cross-validation on them ({metric} per C: "
                  f"{', '.join(f'{c:g}: {v:.4g}' for c, v in fit.scores.items())}; C=1 unless beaten by one standard error)"
                  if fit.scores else "C=1 (too few examples to cross-validate)")
        how = "ridge regression" if self.head.name == "regression" else f"L-BFGS ({fit.iterations} iterations)"
        if self.setfit:
            return f"head fitted by {how} on the encoder's embeddings of {len(train)} labelled examples, {chosen}"
        return f"linear probe fitted by {how} on {len(train)} cached examples, {chosen}; the loop's steps leave it unchanged (lr 0)"

    def lr_scales(self, module: FineTuneModel) -> dict[str, float]:
        scales = strategies.lr_scales(self.strategy, module.model, self.head_lr_scale)
        if self.probe_data is not None:  # the head is fitted to convergence at the start of training: the loop leaves it
            scales = dict.fromkeys(scales, 0.0)
        return {f"model.{n}": s for n, s in scales.items()}

    def _class_weights(self, data: RunData) -> torch.Tensor | None:
        if self.cfg.class_weights is None:
            return None
        if self.cfg.class_weights == "balanced":
            labels = torch.as_tensor(list(data.train[:]["labels"]))
            counts = torch.bincount(labels, minlength=len(self.label_names)).float()
            return len(labels) / (len(counts) * counts.clamp(min=1))
        if len(self.cfg.class_weights) != len(self.label_names):
            raise RecipeError(f"recipe key 'task.class_weights': {len(self.cfg.class_weights)} weights for {len(self.label_names)} labels")
        return torch.tensor(self.cfg.class_weights, dtype=torch.float32)

    # -- batches ------------------------------------------------------------------------------------
    def collate(self, rows: dict[str, Any], seeds: list[int]) -> dict[str, torch.Tensor]:
        if "anchor" in rows:  # SetFit: each anchor with a positive and a negative partner drawn from its seed
            positives, negatives = self.anchors.partners(rows["anchor"], seeds)
            texts = setfit.pair_rows(self.pair_source, rows["anchor"], positives, negatives)
            batch = self.backbone.collate(texts, seeds * 3, self.head, self.data)
            return {k: v for k, v in batch.items() if k != "labels"} | {"pair_targets": setfit.pair_targets(len(seeds))}
        if "features" in rows:  # cached by prepare()
            return {"features": torch.as_tensor(rows["features"]), "tokens": torch.as_tensor(rows["tokens"]),
                    "labels": torch.as_tensor(rows["labels"])}
        batch = self.backbone.collate(rows, seeds, self.head, self.data)
        if "labels" not in batch:  # per-token heads get labels aligned to the inputs by the family
            batch["labels"] = self.head.tensor(rows["labels"])
        return batch

    def lengths(self, train: Any) -> list[int] | None:
        """Characters per example (text and pair), capped at what ``data.max_length`` tokens hold: a size for
        length-grouped batches that needs no pass of the tokenizer over the whole set.

        The cap matters: texts cut at ``max_length`` all cost the same, and sorting them by their
        uncut length would only make batches correlate with whatever correlates with length (often the class)."""
        data = getattr(self, "data", None)
        columns = getattr(train, "column_names", None) or []
        if data is None or data.tokenizer is None or data.text not in columns or "features" in columns:
            return None  # images, vectors, cached features, SetFit's anchors: nothing is padded per batch
        if getattr(self, "cacheable", False):
            return None  # the same order as the cached-feature run, so task.cache_features does not change the result
        texts = train[data.text]
        sizes = [_characters(text) for text in texts]
        if data.text_pair:
            sizes = [size + _characters(pair) for size, pair in zip(sizes, train[data.text_pair])]
        cap = _characters_per_token(data.tokenizer, texts[:SIZE_SAMPLE]) * data.max_length
        return [min(size, math.ceil(cap)) for size in sizes]

    def units(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if "pair_targets" in batch:
            return {setfit.PAIR_LOSS: torch.tensor(len(batch["pair_targets"]))}
        return {self.head.loss_key: self.head.units(batch["labels"], self.class_weights)}

    def tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """Real (unpadded) text tokens, or examples; for cached features, what they were encoded from."""
        if "tokens" in batch:
            return int(batch["tokens"].sum())
        return int(batch["attention_mask"].sum()) if "attention_mask" in batch else len(next(iter(batch.values())))

    def flops(self, module: FineTuneModel, batch: dict[str, torch.Tensor]) -> float:
        new = sum(p.numel() for n, p in module.model.named_parameters() if n in module.model.new_parameters)
        if "features" in batch:
            return 6.0 * new * len(batch["labels"])
        if "attention_mask" in batch:  # text: 6 FLOPs per trained parameter and token, 2 per frozen one
            trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
            frozen = sum(p.numel() for p in module.parameters() if not p.requires_grad)
            return (6.0 * trainable + 2.0 * frozen) * self.tokens(batch)
        if self.flops_per_example is None:  # images / vectors: 3x the counted forward FLOPs
            self.flops_per_example = 3.0 * forward_flops(module, batch) / len(batch["labels"])
        return self.flops_per_example * len(batch["labels"])

    # -- cached features ----------------------------------------------------------------------------
    def prepare(self, module: FineTuneModel, data: RunData, device: torch.device, precision: str) -> RunData:
        """Linear probe: encode train/validation once with the frozen backbone; the head trains (or is
        fitted, ``task.probe: lbfgs``) on the features.  ``task.cache_features=false`` keeps the loop's
        steps on the raw data (the fit still reads the features)."""
        self.data = data
        if self.setfit:  # train on anchors, each drawing its partners; the labelled rows stay for the head's fit
            self.pair_source = data.train
            labels = [int(y) for y in self.head.tensor(data.train[:]["labels"])]
            repeats = setfit.repeats_per_epoch(len(labels), self.strategy.pairs, self.strategy.max_pairs, self.epochs or 1.0)
            try:
                self.anchors = setfit.PairAnchors(data.train, labels, repeats)
            except ValueError as exc:
                raise RecipeError(f"recipe key 'strategy': {exc}") from None
            return RunData(**{**vars(data), "train": self.anchors})
        # a frozen backbone with cacheable features keeps the cached run's batch order even with task.cache_features=false
        self.cacheable = self.strategy.frozen_backbone and module.model.supports_cache(self.head)
        if not self.cacheable:
            return data
        fit = self.fits_probe and module.model.linear_head() is not None
        if self.fits_probe and not fit:
            print(f"pretune: note: task.probe=lbfgs needs a head that is one linear layer; {type(module.model).__name__} "
                  "trains its head with the loop (task.probe=sgd)", file=sys.stderr, flush=True)
        if not (fit or self.cfg.cache_features):
            return data
        module.to(device)
        train = self._encode(module.model, data.train, device, precision)
        if fit:
            self.probe_data = train
        if not self.cfg.cache_features:
            return data
        validation = None if data.validation is None else self._encode(module.model, data.validation, device, precision)
        return RunData(**{**vars(data), "train": train, "validation": validation})

    @torch.no_grad()
    def _encode(self, model: Classifier, split: Any, device: torch.device, precision: str, batch_size: int = 256) -> TensorRows:
        was_training = model.training
        model.eval()
        features, tokens, labels = [], [], []
        for start in tqdm(range(0, len(split), batch_size), desc="encoding once (frozen backbone)", leave=False, mininterval=5):
            rows = split[start:start + batch_size]
            n = len(rows["labels"])
            batch = self.backbone.collate(rows, [0] * n, self.head, self.data)
            inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
            with autocast(precision, device):
                features.append(model.encode(inputs).float().cpu())
            tokens.append(batch["attention_mask"].sum(-1) if "attention_mask" in batch else torch.ones(n, dtype=torch.long))
            labels.append(self.head.tensor(rows["labels"]))
        model.train(was_training)
        return TensorRows({"features": torch.cat(features), "tokens": torch.cat(tokens), "labels": torch.cat(labels)})

    # -- evaluation and saving ----------------------------------------------------------------------
    def score(self, logits: list[torch.Tensor], labels: list[torch.Tensor]) -> dict[str, Any]:
        return self.head.score(logits, labels, self.label_names, self.cfg.threshold)

    def save(self, module: FineTuneModel, path: Path, data: RunData) -> None:
        self.backbone.save(module.model, path, data)
        family = path / "pretune.json"  # keys the family wrote itself (a text classifier's pooling)
        meta = {**(json.loads(family.read_text()) if family.is_file() else {}),
                "task": self.cfg.name, "kind": self.head.name, "family": self.backbone.name, "label_names": self.label_names,
                "threshold": self.cfg.threshold, "head_dropout": self.cfg.head_dropout, **data.meta}
        (path / "pretune.json").write_text(json.dumps(meta, indent=2))


for _name in ("classify", "regress", "tag"):
    TASKS.register(_name)(Finetune)


def _characters(text: Any) -> int:
    """The length of a text, or of a tagging row's words (with a space between each)."""
    return sum(len(word) + 1 for word in text) if isinstance(text, list) else len(text or "")


def _characters_per_token(tokenizer: Any, texts: list) -> float:
    """Characters per token of the first rows (``SIZE_SAMPLE``): converts ``max_length`` tokens into characters."""
    words = bool(texts) and isinstance(texts[0], list)
    pieces = sum(len(ids) for ids in tokenizer(texts, is_split_into_words=words, add_special_tokens=False)["input_ids"])
    return sum(_characters(text) for text in texts) / max(1, pieces)
