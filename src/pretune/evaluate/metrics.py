"""Evaluation metrics for fine-tuning: pure functions on numpy arrays and Python lists.

Every function returns plain Python numbers, lists and dicts (``json.dumps`` takes them as they are),
so one dict goes to ``metrics.jsonl``, to early stopping and to ``summary_table``.

Conventions, as scikit-learn with ``zero_division=0``:
    precision_c = tp_c / (tp_c + fp_c)     recall_c = tp_c / (tp_c + fn_c)
    f1_c = 2 tp_c / (2 tp_c + fp_c + fn_c)  (= 2 P R / (P + R))
and any 0 / 0 is 0.0. Averages over classes:
    macro    = mean over classes of the per-class score (classes without support count, as 0 recall)
    micro    = the score of the summed counts: sum tp / (sum tp + sum fp), ...
    weighted = sum_c support_c * score_c / sum_c support_c
The tests check each function against scikit-learn (and seqeval for entities).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

# What early stopping and "best checkpoint" monitor for each kind of task: (metric name, "max" | "min").
# Single-label classification uses accuracy: on the balanced benchmarks we fine-tune on it is what papers
# report, and it moves smoothly; macro-F1 is still in the dict for imbalanced data. Multilabel uses micro-F1,
# because subset accuracy is too coarse to monitor and macro-F1 is noisy on rare labels. Regression uses
# MSE (the loss most heads train on; lower is better). Entities use seqeval's micro-F1, the CoNLL number.
PRIMARY_METRICS = {
    "classification": ("accuracy", "max"),
    "multilabel": ("f1_micro", "max"),
    "regression": ("mse", "min"),
    "entity": ("f1", "max"),
}
MAX_MATRIX_CLASSES = 30  # summary_table leaves out larger confusion matrices: they would not fit a terminal
NAME_WIDTH = 16  # longer label names are cut in summary_table


def primary_metric(kind: str) -> tuple[str, str]:
    """(metric name, "max" or "min") that early stopping monitors for a task kind (see ``PRIMARY_METRICS``)."""
    if kind not in PRIMARY_METRICS:
        raise ValueError(f"unknown task kind {kind!r}: expected one of {sorted(PRIMARY_METRICS)}")
    return PRIMARY_METRICS[kind]


def _divide(num: Any, den: Any) -> np.ndarray:
    """num / den elementwise, with 0.0 wherever den == 0."""
    num, den = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den != 0)


def _scores(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall and F1 from counts (per class if the counts are arrays)."""
    return _divide(tp, tp + fp), _divide(tp, tp + fn), _divide(2 * tp, 2 * tp + fp + fn)


def _averaged(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, averages: Sequence[str]) -> dict[str, float]:
    """{"precision_<avg>", "recall_<avg>", "f1_<avg>"} for each of "macro", "micro", "weighted"."""
    per_class = _scores(tp, fp, fn)
    support = tp + fn
    out = {}
    for average in averages:
        if average == "micro":
            values = _scores(tp.sum(), fp.sum(), fn.sum())
        elif average == "macro":
            values = [scores.mean() for scores in per_class]
        else:  # weighted by support
            values = [_divide((scores * support).sum(), support.sum()) for scores in per_class]
        for name, value in zip(("precision", "recall", "f1"), values):
            out[f"{name}_{average}"] = float(value)
    return out


def _per_class(names: Sequence[Any], tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> dict[str, dict]:
    precision, recall, f1 = _scores(tp, fp, fn)
    return {
        str(name): {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
        for name, p, r, f, s in zip(names, precision, recall, f1, tp + fn)
    }


def _check_labels(labels: Sequence[Any]) -> list[str]:
    names = [str(label) for label in labels]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"labels must be non-empty and unique, got {labels!r}")
    return names


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str]) -> dict:
    """Single-label classification; ``y_true`` and ``y_pred`` are class indices into ``labels``.

    accuracy = mean(y_true == y_pred); precision / recall / F1 macro, micro and weighted as in the module
    docstring (micro equals accuracy here), ``per_class`` and ``confusion_matrix`` (rows = true class,
    columns = predicted class, both in the order of ``labels``). A class of ``labels`` that never occurs
    still has its row and counts in the macro average, as ``sklearn.metrics`` with ``labels=`` does.
    """
    names = _check_labels(labels)
    k = len(names)
    true, pred = (np.asarray(y, dtype=int).reshape(-1) for y in (y_true, y_pred))
    if len(true) != len(pred) or len(true) == 0:
        raise ValueError(f"need as many predictions as targets, and at least one: {len(true)} vs {len(pred)}")
    if min(true.min(), pred.min()) < 0 or max(true.max(), pred.max()) >= k:
        raise ValueError(f"class indices must lie in [0, {k}) for {k} labels")
    matrix = np.zeros((k, k), dtype=int)
    np.add.at(matrix, (true, pred), 1)
    tp = np.diag(matrix)
    fp, fn = matrix.sum(axis=0) - tp, matrix.sum(axis=1) - tp
    return {
        "accuracy": float(tp.sum() / len(true)),
        **_averaged(tp, fp, fn, ("macro", "micro", "weighted")),
        "per_class": _per_class(names, tp, fp, fn),
        "confusion_matrix": matrix.tolist(),
    }


def probability_metrics(y_true: Sequence[int], probabilities: Any) -> dict:
    """``log_loss`` = mean -log p(true class) (probabilities clipped to [1e-15, 1], as scikit-learn), and for two
    classes ``auc``: the ROC AUC of class 1's probability, the chance that a random positive is scored above a
    random negative (ties count one half; Mann-Whitney U / (n_pos n_neg)).  No AUC when a class is absent."""
    true = np.asarray(y_true, dtype=int).reshape(-1)
    probs = np.asarray(probabilities, dtype=float).reshape(len(true), -1)
    out = {"log_loss": float(-np.log(np.clip(probs[np.arange(len(true)), true], 1e-15, 1.0)).mean())}
    if probs.shape[1] == 2 and 0 < true.sum() < len(true):
        score = probs[:, 1]
        order = np.argsort(score, kind="mergesort")
        ranks = np.empty(len(score))
        sorted_scores = score[order]
        starts = np.r_[0, np.flatnonzero(np.diff(sorted_scores)) + 1]
        ends = np.r_[starts[1:], len(score)]
        for start, end in zip(starts, ends):  # tied scores share their mean rank
            ranks[order[start:end]] = (start + end + 1) / 2
        positives = true == 1
        n_pos, n_neg = positives.sum(), (~positives).sum()
        out["auc"] = float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    return out


def multilabel_metrics(y_true: Any, y_pred: Any, labels: Sequence[str]) -> dict:
    """Multilabel classification on 0/1 indicator arrays of shape [N, K] (column k is ``labels[k]``).

    subset_accuracy = mean over samples of [every label right]; hamming_loss = mean over the N*K cells of
    [y_true != y_pred]; precision / recall / F1 micro (counts summed over labels) and macro (mean over
    labels), and ``per_class`` with support = number of samples carrying the label.
    """
    names = _check_labels(labels)
    true, pred = (np.asarray(y) for y in (y_true, y_pred))
    if true.ndim != 2 or true.shape != pred.shape or true.shape[1] != len(names) or len(true) == 0:
        raise ValueError(f"need two [N, {len(names)}] arrays with N > 0, got {true.shape} and {pred.shape}")
    if not (np.isin(true, (0, 1)).all() and np.isin(pred, (0, 1)).all()):
        raise ValueError("multilabel targets and predictions must be 0/1 indicators")
    true, pred = true.astype(bool), pred.astype(bool)
    tp, fp, fn = (true & pred).sum(axis=0), (~true & pred).sum(axis=0), (true & ~pred).sum(axis=0)
    return {
        "subset_accuracy": float((true == pred).all(axis=1).mean()),
        "hamming_loss": float((true != pred).mean()),
        **_averaged(tp, fp, fn, ("micro", "macro")),
        "per_class": _per_class(names, tp, fp, fn),
    }


def regression_metrics(y_true: Any, y_pred: Any) -> dict:
    """mse = mean (y - ŷ)², rmse = sqrt(mse), mae = mean |y - ŷ|, r2 = 1 - SS_res / SS_tot.

    SS_res = sum (y - ŷ)², SS_tot = sum (y - mean y)². When SS_tot == 0 (constant targets) r2 is 1.0 for a
    perfect prediction and 0.0 otherwise, as scikit-learn. Targets of shape [N, D] give each metric per
    column, then the mean over columns (scikit-learn's ``multioutput="uniform_average"``).
    """
    true, pred = (np.asarray(y, dtype=float) for y in (y_true, y_pred))
    if true.shape != pred.shape or true.size == 0 or true.ndim > 2:
        raise ValueError(f"need non-empty targets and predictions of one shape [N] or [N, D]: {true.shape} vs {pred.shape}")
    true, pred = true.reshape(len(true), -1), pred.reshape(len(pred), -1)
    mse = ((true - pred) ** 2).mean(axis=0)
    ss_res = ((true - pred) ** 2).sum(axis=0)
    ss_tot = ((true - true.mean(axis=0)) ** 2).sum(axis=0)
    r2 = np.where(ss_tot > 0, 1 - _divide(ss_res, ss_tot), np.where(ss_res == 0, 1.0, 0.0))
    return {
        "mse": float(mse.mean()),
        "rmse": float(np.sqrt(mse).mean()),
        "mae": float(np.abs(true - pred).mean()),
        "r2": float(r2.mean()),
    }


def _chunk_ends(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    """Whether the chunk open at the previous token ends before this one (conlleval.pl's endOfChunk)."""
    return (
        prev_tag in ("E", "S")
        or (prev_tag in ("B", "I") and tag in ("B", "S", "O"))
        or (prev_tag not in ("O", ".") and prev_type != type_)
    )


def _chunk_starts(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    """Whether a chunk starts at this token (conlleval.pl's startOfChunk)."""
    return (
        tag in ("B", "S")
        or (prev_tag in ("E", "S", "O") and tag in ("E", "I"))
        or (tag not in ("O", ".") and prev_type != type_)
    )


def entities(sentences: Sequence[Sequence[str]]) -> set[tuple[str, int, int]]:
    """Entity chunks (type, first token, last token) of tagged sentences, as seqeval's default mode.

    A tag is "<prefix>-<type>" with prefix B, I, E, S (BIO / IOB1 / BIOES) or "O". Chunking is CoNLL's
    lenient one: an I- after O or after another type starts an entity, so "I-PER I-PER" is one PER.
    Sentences are joined with an "O" between them, so positions are global and no entity crosses two.
    """
    tags = [tag for sentence in sentences for tag in [*sentence, "O"]]
    prev_tag, prev_type, begin, chunks = "O", "", 0, set()
    for i, tagged in enumerate(tags + ["O"]):
        tag, type_ = tagged[0], tagged[1:].split("-", maxsplit=1)[-1] or "_"
        if _chunk_ends(prev_tag, tag, prev_type, type_):
            chunks.add((prev_type, begin, i - 1))
        if _chunk_starts(prev_tag, tag, prev_type, type_):
            begin = i
        prev_tag, prev_type = tag, type_
    return chunks


def entity_metrics(true_tags: Sequence[Sequence[str]], pred_tags: Sequence[Sequence[str]]) -> dict:
    """Entity-level precision / recall / F1 (micro over entities) and token accuracy, as seqeval.

    An entity counts as right only if its type, start and end all match (see ``entities``).
    precision = |true ∩ pred| / |pred|, recall = |true ∩ pred| / |true|, f1 = 2 P R / (P + R);
    ``per_type`` gives the same per entity type (support = number of true entities of that type);
    accuracy = share of tokens whose tag is right, "O" tokens included.
    """
    lengths = [len(sentence) for sentence in true_tags]
    if lengths != [len(sentence) for sentence in pred_tags] or sum(lengths) == 0:
        raise ValueError("need at least one token, and predicted sentences as long as the true ones")
    true, pred = entities(true_tags), entities(pred_tags)
    types = sorted({type_ for type_, _, _ in true | pred})

    def counts(kept: set) -> np.ndarray:
        return np.array([sum(1 for entity in kept if entity[0] == type_) for type_ in types], dtype=int)

    tp, fp, fn = counts(true & pred), counts(pred - true), counts(true - pred)
    precision, recall, f1 = _scores(tp.sum(), fp.sum(), fn.sum())
    correct = sum(t == p for ts, ps in zip(true_tags, pred_tags) for t, p in zip(ts, ps))
    return {
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "accuracy": correct / sum(lengths),
        "per_type": _per_class(types, tp, fp, fn),
    }


def _clip(name: str, width: int = NAME_WIDTH) -> str:
    return name if len(name) <= width else name[: width - 1] + "~"


def _number(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def summary_table(metrics: dict, title: str | None = None) -> str:
    """Plain-text report of any of the four metric dicts: headline numbers, per-class (or per-type)
    rows, then the confusion matrix with (cut) label names when there is one."""
    lines = [title, "=" * len(title)] if title else []
    headline = {key: value for key, value in metrics.items() if isinstance(value, (int, float))}
    width = max(map(len, headline), default=0)
    lines += [f"{key:<{width}}  {_number(value)}" for key, value in headline.items()]

    rows = metrics.get("per_class", metrics.get("per_type"))
    if rows:
        name_width = max(len("label"), *(len(_clip(name)) for name in rows))
        lines += ["", f"{'label':<{name_width}}  precision  recall     f1         support"]
        for name, row in rows.items():
            scores = "  ".join(f"{row[key]:<9.4f}" for key in ("precision", "recall", "f1"))
            lines.append(f"{_clip(name):<{name_width}}  {scores}  {row['support']}")

    matrix = metrics.get("confusion_matrix")
    if matrix is not None:
        names = [_clip(name, 10) for name in metrics["per_class"]]
        lines += ["", "confusion matrix (rows = true, columns = predicted)"]
        if len(names) > MAX_MATRIX_CLASSES:
            lines.append(f"(left out: {len(names)} classes > {MAX_MATRIX_CLASSES})")
        else:
            cells = [max(len(name), *(len(str(row[j])) for row in matrix)) for j, name in enumerate(names)]
            name_width = max(map(len, names))
            lines.append(" " * name_width + "".join(f"  {name:>{w}}" for name, w in zip(names, cells)))
            for name, row in zip(names, matrix):
                lines.append(f"{name:<{name_width}}" + "".join(f"  {count:>{w}}" for count, w in zip(row, cells)))
    return "\n".join(lines)
