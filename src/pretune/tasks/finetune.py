"""Fine-tuning tasks: new task layers on a pretrained backbone.

| task                         | head (Hugging Face class)             | loss (summed, then / units)      |
|------------------------------|---------------------------------------|----------------------------------|
| ``classify``                 | ``AutoModelForSequenceClassification`` | softmax cross-entropy            |
| ``classify`` + ``multi_label``| same, ``multi_label_classification``  | sigmoid binary cross-entropy     |
| ``classify`` + ``text_pair``  | same, inputs ``[CLS] a [SEP] b [SEP]`` | softmax cross-entropy            |
| ``regress``                  | same, ``num_labels=1``                | mean squared error               |
| ``tag`` (NER, BIO tags)      | ``AutoModelForTokenClassification``   | cross-entropy on each word's first piece |

Using the Hugging Face head classes means the exported folder is one that
``AutoModelForSequenceClassification.from_pretrained`` loads and gives the same predictions.  The
parameters missing from the loaded checkpoint (the classifier, a pooler the checkpoint lacked) are
the *new task layers*: they always train; the strategy (:mod:`pretune.strategies`) decides the rest.
With class weights ``w``, the loss is ``sum_i w_{y_i} CE_i / sum_i w_{y_i}`` (PyTorch's weighted mean).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import datasets
import torch
import torch.nn.functional as F
import transformers
from pydantic import Field
from torch import nn

from pretune import strategies
from pretune.backbones.transformers import TransformerConfig, load_config
from pretune.data.labelled import LabelledData, LabelledDataConfig, build_labelled
from pretune.errors import CheckpointError, RecipeError
from pretune.evaluate import metrics as M
from pretune.recipe import Section
from pretune.registry import TASKS
from pretune.tasks.features import cache_features, head_logits

IGNORE = -100
KIND_METRICS = {"single": "classification", "multi": "multilabel", "regression": "regression", "tags": "entity"}


class FinetuneConfig(Section):
    name: Literal["classify", "regress", "tag"] = "classify"
    multi_label: bool = False  # classify: several labels per example (sigmoid + BCE)
    threshold: float = Field(0.5, gt=0, lt=1)  # multi-label decision threshold
    class_weights: Literal["balanced"] | list[float] | None = None  # balanced: n / (K * n_c)
    label_all_subwords: bool = False  # tag: label every piece of a word, not only the first
    cache_features: bool = True  # linear probe: encode the data once, train the head on cached features


@dataclass
class FinetuneData:
    train: datasets.Dataset
    validation: datasets.Dataset | None
    test: datasets.Dataset | None
    tokenizer: Any
    labels: LabelledData


class FineTuneModel(nn.Module):
    """A Hugging Face model with a task head; ``forward`` returns the summed loss and the logits."""

    def __init__(self, model: nn.Module, kind: str, new_params: set[str], strategy: strategies.Strategy,
                 class_weights: torch.Tensor | None, head_lr_scale: float):
        super().__init__()
        self.model, self.kind, self.strategy = model, kind, strategy
        self.new_params = {f"model.{n}" for n in new_params}
        self.register_buffer("class_weights", class_weights, persistent=False)
        self.loss_key = {"single": "ce", "multi": "bce", "regression": "mse", "tags": "ce"}[kind]
        self.on_epoch(0)
        scales = strategies.lr_scales(strategy, model, new_params, head_lr_scale)
        self.lr_scales = {f"model.{n}": s for n, s in scales.items()}

    def on_epoch(self, epoch: int) -> None:
        """Gradual unfreezing changes what trains at every epoch; the other strategies are fixed."""
        strategies.apply(self.strategy, self.model, {n[len("model."):] for n in self.new_params}, epoch)
        self.frozen = [m for m in self.model.modules() if list(m.parameters(recurse=False))
                       and not any(p.requires_grad for p in m.parameters(recurse=False))]

    def train(self, mode: bool = True) -> "FineTuneModel":
        super().train(mode)
        if mode and self.strategy.frozen_backbone:
            self.model.base_model.eval()  # a frozen backbone runs deterministically (no dropout)
        return self

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if "features" in batch:  # linear probe on cached backbone features
            logits = head_logits(self.model, batch["features"])
        else:
            inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids", "x", "seed") if k in batch}
            logits = self.model(**inputs).logits
        logits = logits.float()
        labels = batch["labels"]
        if self.kind == "single":
            loss = F.cross_entropy(logits, labels, weight=self.class_weights, reduction="sum")
        elif self.kind == "multi":
            loss = F.binary_cross_entropy_with_logits(logits, labels.float(), reduction="sum")
        elif self.kind == "regression":
            loss = F.mse_loss(logits.view_as(labels), labels.float(), reduction="sum")
        else:
            loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum")
        return {self.loss_key: loss, "logits": logits.detach()}


class FinetuneTask:
    Config = FinetuneConfig
    DataConfig = LabelledDataConfig
    uses_strategy = True
    perplexity: tuple[str, ...] = ()

    def __init__(self, cfg: FinetuneConfig, data_cfg: LabelledDataConfig, seed: int = 0, strategy: str = "full",
                 head_lr_scale: float = 1.0):
        self.cfg, self.data_cfg, self.seed = cfg, data_cfg, seed
        self.strategy = strategies.parse(strategy)
        self.head_lr_scale = head_lr_scale
        self.kind = {"classify": "multi" if cfg.multi_label else "single", "regress": "regression", "tag": "tags"}[cfg.name]
        if cfg.class_weights is not None and self.kind != "single":  # would be silently ignored otherwise
            raise RecipeError(f"recipe key 'task.class_weights': applies to single-label classification only, not to {self.kind!r} tasks")
        self.losses = ({"single": "ce", "multi": "bce", "regression": "mse", "tags": "ce"}[self.kind],)
        self.monitor = M.primary_metric(KIND_METRICS[self.kind])

    # -- data ---------------------------------------------------------------------------------
    def data(self, tokenizer_path: str | None = None, label_names: list[str] | None = None) -> FinetuneData:
        if not tokenizer_path:
            raise RecipeError("recipe key 'backbone.path': fine-tuning needs a model folder to start from (a pretune run's model/ or a Hugging Face folder)")
        labelled = build_labelled(self.data_cfg, self.kind, self.seed, label_names=label_names or self._saved_labels(tokenizer_path))
        tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_path)
        if tokenizer.pad_token is None:  # decoders: pad with end-of-text
            tokenizer.pad_token = tokenizer.eos_token
        names = labelled.label_names
        if self.kind == "tags" and self.cfg.label_all_subwords:  # later pieces of a B-X word are I-X (see align_tags)
            names = names + [f"I-{n[2:]}" for n in names if n.startswith("B-") and f"I-{n[2:]}" not in names]
        self.tokenizer, self.label_names = tokenizer, names
        return FinetuneData(labelled.train, labelled.validation, labelled.test, tokenizer, labelled)

    def _saved_labels(self, path: str) -> list[str] | None:
        meta = Path(path) / "pretune.json"
        if meta.is_file() and json.loads(meta.read_text()).get("kind") == self.kind:
            return json.loads(meta.read_text()).get("label_names")
        return None

    def collate(self, rows: dict[str, list], seeds: list[int]) -> dict[str, torch.Tensor]:
        if "features" in rows:
            batch = {"features": torch.tensor(rows["features"]), "tokens": torch.tensor(rows["tokens"])}
        else:
            batch = self.encode(rows[self.data_cfg.text], rows.get(self.data_cfg.text_pair) if self.data_cfg.text_pair else None)
        labels = rows["labels"]
        if self.kind == "tags":
            batch["labels"] = self.align_tags(batch.pop("word_ids"), labels)
        elif self.kind == "single":
            batch["labels"] = torch.tensor(labels, dtype=torch.long)
        else:
            batch["labels"] = torch.tensor(labels, dtype=torch.float32)
        return batch

    def encode(self, texts: list, pairs: list | None = None) -> dict[str, torch.Tensor]:
        split = self.kind == "tags"
        encoded = self.tokenizer(texts, pairs, truncation=True, max_length=self.data_cfg.max_length, padding=True,
                                 is_split_into_words=split, return_tensors="pt")
        batch = {k: encoded[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoded}
        if split:
            batch["word_ids"] = [encoded.word_ids(i) for i in range(len(texts))]
        return batch

    def align_tags(self, word_ids: list[list[int | None]], tags: list[list[int]]) -> torch.Tensor:
        """Word labels -> piece labels: the first piece of each word carries the word's tag, the rest -100.

        With ``label_all_subwords`` the other pieces carry the tag too, ``B-X`` turned into ``I-X`` (when
        ``I-X`` is a known tag) so that a word split into pieces still counts as one entity."""
        names = getattr(self, "label_names", None) or []
        inside = {i: names.index("I-" + name[2:]) for i, name in enumerate(names) if name.startswith("B-") and "I-" + name[2:] in names}
        out = torch.full((len(word_ids), len(word_ids[0])), IGNORE, dtype=torch.long)
        for row, (ids, word_tags) in enumerate(zip(word_ids, tags)):
            previous = None
            for position, word in enumerate(ids):
                if word is not None and word != previous:
                    out[row, position] = word_tags[word]
                elif word is not None and self.cfg.label_all_subwords:
                    out[row, position] = inside.get(word_tags[word], word_tags[word])
                previous = word
        return out

    def units(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        labels = batch["labels"]
        if self.kind == "single":
            count = self.class_weights[labels].sum() if self.class_weights is not None else torch.tensor(float(len(labels)))
        elif self.kind == "tags":
            count = (labels != IGNORE).sum()
        else:
            count = torch.tensor(float(labels.numel()))
        return {self.losses[0]: count}

    def tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """Real (unpadded) text tokens in the batch; for cached features, the tokens they were encoded from."""
        return int(batch["tokens" if "tokens" in batch else "attention_mask"].sum())

    def flops(self, module: FineTuneModel, batch: dict[str, torch.Tensor]) -> float:
        if "features" in batch:
            return 6.0 * sum(p.numel() for n, p in module.named_parameters() if n in module.new_params) * len(batch["labels"])
        trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
        frozen = sum(p.numel() for p in module.parameters() if not p.requires_grad)
        return (6.0 * trainable + 2.0 * frozen) * self.tokens(batch)

    # -- model --------------------------------------------------------------------------------
    def build(self, backbone: TransformerConfig, data: FinetuneData) -> FineTuneModel:
        path = backbone.path
        config = load_config(path)
        names = self.label_names
        kwargs: dict[str, Any] = {"num_labels": 1 if self.kind == "regression" else len(names)}
        if names:
            kwargs.update(id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
        kwargs["problem_type"] = {"single": "single_label_classification", "multi": "multi_label_classification",
                                  "regression": "regression", "tags": None}[self.kind]
        if kwargs["problem_type"] is None:
            del kwargs["problem_type"]
        if config.pad_token_id is None:
            kwargs["pad_token_id"] = data.tokenizer.pad_token_id
        auto = transformers.AutoModelForTokenClassification if self.kind == "tags" else transformers.AutoModelForSequenceClassification
        try:
            if backbone.pretrained:
                model, info = auto.from_pretrained(path, output_loading_info=True, ignore_mismatched_sizes=True,  # a head of another size is new
                                                   attn_implementation=backbone.attention, **kwargs, **backbone.config)
                new = set(info["missing_keys"]) | {k for k, *_ in info.get("mismatched_keys", [])}
            else:  # the same architecture, randomly initialised: the "from scratch" arm
                model = auto.from_config(transformers.AutoConfig.from_pretrained(path, **kwargs, **backbone.config), attn_implementation=backbone.attention)
                new = {n for n, _ in model.named_parameters()}
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: cannot load as {auto.__name__}: {exc}") from None
        new &= {n for n, _ in model.named_parameters()}
        if self.strategy.name == "lora":
            heads = sorted({n.rsplit(".", 1)[0] for n in new})
            model = strategies.wrap_lora(self.strategy, model, heads)
            new = {n for n, p in model.named_parameters() if p.requires_grad}
        self.class_weights = self._class_weights(data)
        return FineTuneModel(model, self.kind, new, self.strategy, self.class_weights, self.head_lr_scale)

    def _class_weights(self, data: FinetuneData) -> torch.Tensor | None:
        if self.kind != "single" or self.cfg.class_weights is None:
            return None
        if self.cfg.class_weights == "balanced":
            counts = torch.bincount(torch.tensor(list(data.train["labels"])), minlength=len(self.label_names)).float()
            return len(data.train) / (len(counts) * counts.clamp(min=1))
        if len(self.cfg.class_weights) != len(self.label_names):
            raise RecipeError(f"recipe key 'task.class_weights': {len(self.cfg.class_weights)} weights for {len(self.label_names)} labels")
        return torch.tensor(self.cfg.class_weights, dtype=torch.float32)

    def prepare(self, module: FineTuneModel, data: FinetuneData, device: torch.device, precision: str) -> FinetuneData:
        """Linear probe: encode train/validation once with the frozen backbone (see ``features.py``)."""
        if not (self.strategy.frozen_backbone and self.cfg.cache_features and self.kind != "tags"):
            return data
        return replace(data, **cache_features(module.model, self, {"train": data.train, "validation": data.validation}, device, precision))

    # -- evaluation and saving ----------------------------------------------------------------
    def predictions(self, logits: torch.Tensor) -> torch.Tensor:
        if self.kind == "single":
            return logits.argmax(-1)
        if self.kind == "multi":
            return (logits.sigmoid() > self.cfg.threshold).long()
        if self.kind == "regression":
            return logits.squeeze(-1)
        return logits.argmax(-1)

    def score(self, logits: list[torch.Tensor], labels: list[torch.Tensor]) -> dict[str, Any]:
        """All metrics of the task from the logits and labels of a whole evaluation set."""
        if self.kind == "tags":
            true, pred = [], []
            for batch_logits, batch_labels in zip(logits, labels):
                for row_pred, row_true in zip(self.predictions(batch_logits), batch_labels):
                    keep = row_true != IGNORE
                    true.append([self.label_names[i] for i in row_true[keep].tolist()])
                    pred.append([self.label_names[i] for i in row_pred[keep].tolist()])
            return M.entity_metrics(true, pred)
        y_pred = torch.cat([self.predictions(x) for x in logits]).numpy()
        y_true = torch.cat(labels).numpy()
        if self.kind == "single":
            return M.classification_metrics(y_true, y_pred, self.label_names)
        if self.kind == "multi":
            return M.multilabel_metrics(y_true.astype(int), y_pred, self.label_names)
        return M.regression_metrics(y_true, y_pred)

    def save(self, module: FineTuneModel, path: Path, data: FinetuneData) -> None:
        model = module.model
        if self.strategy.name == "lora":  # export a plain model: adapters merged into the weights
            import copy

            model = copy.deepcopy(model).merge_and_unload()
        transformers.utils.logging.disable_progress_bar()
        model.save_pretrained(path)
        data.tokenizer.save_pretrained(path)
        meta = {"task": self.cfg.name, "kind": self.kind, "label_names": self.label_names, "text": self.data_cfg.text,
                "label": self.data_cfg.label,
                "text_pair": self.data_cfg.text_pair, "max_length": self.data_cfg.max_length, "threshold": self.cfg.threshold}
        (path / "pretune.json").write_text(json.dumps(meta, indent=2))


for _name in ("classify", "regress", "tag"):
    TASKS.register(_name)(FinetuneTask)
