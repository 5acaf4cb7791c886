"""Head kinds: what a fine-tuning head predicts, and everything that follows from it.

A head kind is a small object that owns, for one kind of target, the whole chain the rest of
pretune used to spell out with ``if kind == ...``: how a label cell is parsed and stratified, the
label tensor, the loss and its unit count, decoding logits into predictions, and the metrics.  The
same objects serve text, images and vectors (and any modality to come): the backbone family only
decides how the head is attached.

| kind         | outputs   | loss (summed, then / units)                 | monitor      |
|--------------|-----------|---------------------------------------------|--------------|
| ``single``   | K classes | softmax cross-entropy (optionally weighted) | accuracy     |
| ``multi``    | K labels  | sigmoid binary cross-entropy, per label     | micro-F1     |
| ``regression``| 1 value  | squared error                               | MSE          |
| ``tags``     | K tags    | cross-entropy per labelled token            | entity F1    |

Sentence pairs are an input format (``data.text_pair``), not a head kind: they use ``single``.
With class weights ``w``: ``sum_i w_{y_i} CE_i / sum_i w_{y_i}`` (PyTorch's weighted mean).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Sequence

import datasets
import numpy as np
import torch
import torch.nn.functional as F

from pretune.errors import DataError
from pretune.evaluate import metrics as M

IGNORE = -100  # label of token positions that carry no tag (special tokens, later word pieces)
REGRESSION_BINS = 5  # quantile bins that stand in for classes when splitting / budgeting targets


def label_key(value: Any) -> str | None:
    """One label as the string used in the label map; None when missing."""
    if isinstance(value, float):  # 1.0 and 1 are the same class; NaN is no label
        value = None if math.isnan(value) else int(value) if value.is_integer() else value
    return None if value is None else str(value).strip() or None


def words(value: Any) -> list[str] | None:
    """A tagging cell (a list, or a string of space-separated words) as a list of words."""
    if isinstance(value, (list, tuple)):
        return [str(word) for word in value]
    return None if value is None else str(value).split()


class Head:
    name: ClassVar[str]
    loss_key: ClassVar[str]
    metric_family: ClassVar[str]
    per_token: ClassVar[bool] = False  # reads every token's state (tagging), not one pooled vector
    has_classes: ClassVar[bool] = True
    class_weights: ClassVar[bool] = False  # takes task.class_weights
    hf_problem_type: ClassVar[str | None] = None

    @property
    def monitor(self) -> tuple[str, str]:
        return M.primary_metric(self.metric_family)

    def outputs(self, label_names: Sequence[str]) -> int:
        return len(label_names)

    # -- data ------------------------------------------------------------------------------------
    def parse(self, value: Any, where: str, n_words: int, text_column: str) -> Any:
        """One raw label cell -> the label in key form (a class name, names, a float...)."""
        if isinstance(value, (list, dict)):
            raise DataError(f"{where} holds several labels; lists need a multi-label task")
        if (key := label_key(value)) is None:
            raise DataError(f"missing label in {where}")
        return key

    def keys(self, label: Any) -> list[str]:
        """The label-map keys one parsed label uses."""
        return [label]

    def encode(self, label: Any, label2id: dict[str, int]) -> Any:
        return label2id[label]

    def strata(self, labels: list) -> list:
        """The class each encoded row counts under when splitting or budgeting."""
        return list(labels)

    def tensor(self, labels: Any) -> torch.Tensor:
        return torch.as_tensor(labels, dtype=torch.long)

    def feature(self, names: list[str]) -> Any:
        """The ``datasets`` feature of an encoded ``labels`` column."""
        return datasets.ClassLabel(names=names)

    # -- training ----------------------------------------------------------------------------------
    def loss(self, logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        return F.cross_entropy(logits, labels, weight=weights, reduction="sum")

    def units(self, labels: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        return weights[labels].sum() if weights is not None else torch.tensor(float(len(labels)))

    # -- predictions and metrics -------------------------------------------------------------------
    def predictions(self, logits: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
        return logits.argmax(-1)

    def score(self, logits: list[torch.Tensor], labels: list[torch.Tensor], names: list[str], threshold: float = 0.5) -> dict:
        """All metrics from the logits and labels of a whole evaluation set."""
        y_pred = torch.cat([self.predictions(x, threshold) for x in logits]).numpy()
        truth = torch.cat(labels).numpy()
        probabilities = torch.cat(logits).float().softmax(-1).numpy()
        return {**M.classification_metrics(truth, y_pred, names), **M.probability_metrics(truth, probabilities)}

    def decode(self, logits: torch.Tensor, names: list[str], threshold: float = 0.5) -> list[dict[str, Any]]:
        """One output dict per row of ``logits`` (what ``predict`` returns)."""
        probs = logits.float().softmax(-1)
        return [{"label": names[int(p.argmax())], "probabilities": dict(zip(names, p.tolist()))} for p in probs]

    def score_decoded(self, truth: list, results: list[dict[str, Any]], names: list[str]) -> dict:
        """Metrics of decoded predictions against encoded labels (``pretune evaluate``)."""
        probabilities = [[r["probabilities"][name] for name in names] for r in results]
        return {**M.classification_metrics(truth, [names.index(r["label"]) for r in results], names),
                **M.probability_metrics(truth, probabilities)}


class SingleLabel(Head):
    name = "single"
    class_weights = True
    loss_key = "ce"
    metric_family = "classification"
    hf_problem_type = "single_label_classification"


class MultiLabel(Head):
    name = "multi"
    loss_key = "bce"
    metric_family = "multilabel"
    hf_problem_type = "multi_label_classification"

    def parse(self, value: Any, where: str, n_words: int, text_column: str) -> Any:
        if value is None:
            raise DataError(f"missing label in {where} (write [] or an empty string for no label)")
        parts = value.split(";") if isinstance(value, str) else value if isinstance(value, list) else [value]
        return [key for key in map(label_key, parts) if key is not None]

    def keys(self, label: Any) -> list[str]:
        return list(label)

    def encode(self, label: Any, label2id: dict[str, int]) -> Any:
        present = {label2id[key] for key in label}
        return [float(i in present) for i in range(len(label2id))]

    def strata(self, labels: list) -> list:
        return [next((i for i, v in enumerate(row) if v), -1) for row in labels]  # lowest label set, -1 for none

    def tensor(self, labels: Any) -> torch.Tensor:
        return torch.as_tensor(labels, dtype=torch.float32)

    def feature(self, names: list[str]) -> Any:
        return datasets.List(datasets.Value("float32"))

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits, labels.float(), reduction="sum")

    def units(self, labels: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        return torch.tensor(float(labels.numel()))

    def predictions(self, logits: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
        return (logits.sigmoid() > threshold).long()

    def score(self, logits: list[torch.Tensor], labels: list[torch.Tensor], names: list[str], threshold: float = 0.5) -> dict:
        y_pred = torch.cat([self.predictions(x, threshold) for x in logits]).numpy()
        return M.multilabel_metrics(torch.cat(labels).numpy().astype(int), y_pred, names)

    def decode(self, logits: torch.Tensor, names: list[str], threshold: float = 0.5) -> list[dict[str, Any]]:
        probs = logits.float().sigmoid()
        return [{"labels": [n for n, x in zip(names, p.tolist()) if x > threshold], "probabilities": dict(zip(names, p.tolist()))}
                for p in probs]

    def score_decoded(self, truth: list, results: list[dict[str, Any]], names: list[str]) -> dict:
        return M.multilabel_metrics([[int(x) for x in t] for t in truth], [[int(n in r["labels"]) for n in names] for r in results], names)


def finite_number(value: Any, what: str) -> float:
    """``float(value)``, or one line saying that ``what`` (which names the value and where it is) is not a finite number."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DataError(f"{what} is not a number") from None
    if not math.isfinite(number):
        raise DataError(f"{what} is NaN or infinite")
    return number


class Regression(Head):
    name = "regression"
    loss_key = "mse"
    metric_family = "regression"
    has_classes = False
    hf_problem_type = "regression"

    def outputs(self, label_names: Sequence[str]) -> int:
        return 1

    def parse(self, value: Any, where: str, n_words: int, text_column: str) -> Any:
        if value is None or (isinstance(value, str) and not value.strip()):
            raise DataError(f"missing regression target in {where}")
        return finite_number(value, f"regression target {value!r} in {where}")

    def keys(self, label: Any) -> list[str]:
        return []

    def encode(self, label: Any, label2id: dict[str, int]) -> Any:
        return label

    def strata(self, labels: list) -> list:
        if not labels:
            return []
        edges = np.quantile(np.asarray(labels, dtype=float), np.linspace(0, 1, REGRESSION_BINS + 1)[1:-1])
        return np.searchsorted(edges, labels, side="right").tolist()

    def tensor(self, labels: Any) -> torch.Tensor:
        return torch.as_tensor(labels, dtype=torch.float32)

    def feature(self, names: list[str]) -> Any:
        return datasets.Value("float32")

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        return F.mse_loss(logits.view_as(labels), labels.float(), reduction="sum")

    def units(self, labels: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        return torch.tensor(float(labels.numel()))

    def predictions(self, logits: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
        return logits.squeeze(-1)

    def score(self, logits: list[torch.Tensor], labels: list[torch.Tensor], names: list[str], threshold: float = 0.5) -> dict:
        return M.regression_metrics(torch.cat(labels).numpy(), torch.cat([self.predictions(x) for x in logits]).numpy())

    def decode(self, logits: torch.Tensor, names: list[str], threshold: float = 0.5) -> list[dict[str, Any]]:
        return [{"value": float(v[0]) if v.numel() == 1 else v.tolist()} for v in logits.float()]

    def score_decoded(self, truth: list, results: list[dict[str, Any]], names: list[str]) -> dict:
        return M.regression_metrics(truth, [r["value"] for r in results])


class Tags(Head):
    """Token tagging (NER with BIO tags): one label per word, trained on each word's first piece."""

    name = "tags"
    loss_key = "ce"
    metric_family = "entity"
    per_token = True

    def parse(self, value: Any, where: str, n_words: int, text_column: str) -> Any:
        tags = words(value)
        if tags is None or None in (keys := [label_key(tag) for tag in tags]):
            raise DataError(f"missing tag in {where}")
        if len(keys) != n_words:
            raise DataError(f"{where} has {len(keys)} tags but column {text_column!r} has {n_words} words")
        return keys

    def keys(self, label: Any) -> list[str]:
        return list(label)

    def encode(self, label: Any, label2id: dict[str, int]) -> Any:
        return [label2id[key] for key in label]

    def strata(self, labels: list) -> list:
        return [0] * len(labels)

    def feature(self, names: list[str]) -> Any:
        return datasets.List(datasets.ClassLabel(names=names))

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum")

    def units(self, labels: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        return (labels != IGNORE).sum()

    def score(self, logits: list[torch.Tensor], labels: list[torch.Tensor], names: list[str], threshold: float = 0.5) -> dict:
        true, pred = [], []
        for batch_logits, batch_labels in zip(logits, labels):
            for row_pred, row_true in zip(self.predictions(batch_logits), batch_labels):
                keep = row_true != IGNORE
                true.append([names[i] for i in row_true[keep].tolist()])
                pred.append([names[i] for i in row_pred[keep].tolist()])
        return M.entity_metrics(true, pred)

    def decode_words(self, logits: torch.Tensor, word_ids: list[int | None], n_words: int, names: list[str]) -> list[str]:
        """Each word's tag: the prediction at its first piece."""
        tags, previous = ["O"] * n_words, None
        for position, word in enumerate(word_ids):
            if word is not None and word != previous:
                tags[word] = names[int(logits[position].argmax())]
            previous = word
        return tags

    def score_decoded(self, truth: list, results: list[dict[str, Any]], names: list[str]) -> dict:
        return M.entity_metrics([[names[i] for i in t] for t in truth], [r["tags"] for r in results])


HEADS: dict[str, Head] = {head.name: head for head in (SingleLabel(), MultiLabel(), Regression(), Tags())}


def get(name: str | Head) -> Head:
    """The head kind saved as ``name`` in ``pretune.json`` (``single``, ``multi``, ``regression``, ``tags``)."""
    if isinstance(name, Head):
        return name
    if name not in HEADS:
        raise ValueError(f"head kind must be one of {', '.join(HEADS)}, got {name!r}")
    return HEADS[name]
