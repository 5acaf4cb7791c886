"""Uncertainty of a study's scores: 95% intervals from a bootstrap over seeds and test examples.

A cell's score varies with its seed (which labelled rows it drew, its initialisation, its batch
order) and with the finite test set every cell is scored on.  Both are resampled (a two-way
bootstrap: Davison & Hinkley 1997, section 3.8): a replicate draws one set of test-example indices
(with replacement) and one draw of seed ranks (with replacement), both shared by every arm; the
arm's replicate score is the metric on those examples averaged over the drawn seeds.  The interval
is the 2.5th and 97.5th percentile of 2,000 replicates.  Because arms share the draws, the
interval of a *difference* between two arms is paired by example and by seed (a study gives every
arm the same labelled rows for a budget and seed): an example both get wrong does not widen it.

This needs each cell's per-example predictions (``test_predictions.json``, written for single-label
classifiers when a study scores ``data.test``) and a metric computable from them (accuracy,
macro-F1).  Otherwise (regression, tagging, scores on validation splits) only the seeds are
resampled: with few seeds a percentile bootstrap is too narrow, so the interval is Student's t over
seeds instead, and none at all from one seed.

A difference is called *inside the noise* when its interval contains 0.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import numpy as np

REPLICATES = 2000
LEVEL = 0.95
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def metric_of(truth: np.ndarray, predicted: np.ndarray, metric: str, classes: int) -> np.ndarray:
    """``metric`` of predictions ``[..., N]`` against ``truth`` ``[..., N]`` (class ids), over the last axis."""
    if metric == "accuracy":
        return (truth == predicted).mean(-1)
    if metric == "f1_macro":  # over every class of the label map, as pretune's metrics do
        f1 = []
        for k in range(classes):
            tp = ((truth == k) & (predicted == k)).sum(-1)
            denominator = (truth == k).sum(-1) + (predicted == k).sum(-1)  # 2tp + fp + fn
            f1.append(np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 0.0))
        return np.mean(f1, axis=0)
    raise ValueError(f"no per-example formula for {metric!r}")


def predictions(cell: dict[str, Any]) -> dict[str, list[int]] | None:
    """The cell's per-example test predictions, if it kept them."""
    path = Path(cell.get("run_dir", "")) / "test_predictions.json"
    if cell.get("scored_on") != "test" or not path.is_file():
        return None
    return json.loads(path.read_text())


class Bootstrap:
    """Replicates of each arm's mean score, all drawn with the same test-example indices."""

    def __init__(self, cells: list[dict[str, Any]], metric: str, seed: int = 0, replicates: int = REPLICATES):
        self.metric, self.n = metric, replicates
        self.rng = np.random.default_rng(seed)
        kept = [predictions(c) for c in cells]
        truths = {tuple(k["truth"]) for k in kept if k is not None}
        self.per_example = metric in ("accuracy", "f1_macro") and bool(cells) and all(k is not None for k in kept) and len(truths) == 1
        self.kept = {id(c): k for c, k in zip(cells, kept)}
        self.draws: dict[int, np.ndarray] = {}
        if self.per_example:
            self.truth = np.array(next(iter(truths)))
            self.classes = int(max(max(k["truth"] + k["predicted"]) for k in kept)) + 1
            self.examples = self.rng.integers(0, len(self.truth), size=(replicates, len(self.truth)))

    def replicates(self, cells: list[dict[str, Any]]) -> np.ndarray | None:
        """``[replicates]`` mean scores of one arm's cells (its seeds at one budget); None without per-example data."""
        if not self.per_example:
            return None
        cells = sorted(cells, key=lambda c: c.get("seed", 0))
        truth = self.truth[self.examples]
        per_seed = np.stack([metric_of(truth, np.array(self.kept[id(c)]["predicted"])[self.examples], self.metric, self.classes)
                             for c in cells])  # [seeds, replicates]
        return per_seed.T[np.arange(self.n)[:, None], self._seeds(len(cells))].mean(1)

    def _seeds(self, count: int) -> np.ndarray:
        """Which seeds (by rank) each replicate draws; the same draws for every arm with as many seeds, so
        arms are paired by seed too (a study gives every arm the same labelled rows for a budget and seed)."""
        if count not in self.draws:
            self.draws[count] = self.rng.integers(0, count, size=(self.n, count))
        return self.draws[count]

    def majority(self) -> float | None:
        """The score of always answering the test set's most frequent class (None without per-example data):
        the floor a classifier must clear before any comparison between arms means something."""
        if not self.per_example:
            return None
        constant = np.full_like(self.truth, np.bincount(self.truth).argmax())
        return float(metric_of(self.truth, constant, self.metric, self.classes))

    def interval(self, cells: list[dict[str, Any]]) -> tuple[float, float] | None:
        values = self.replicates(cells)
        if values is None:
            return t_interval([c["score"] for c in cells])
        return percentile(values)

    def difference(self, a: list[dict[str, Any]], b: list[dict[str, Any]]) -> dict[str, Any]:
        """Mean score of ``a`` minus that of ``b``, its 95% interval, and whether the interval holds 0."""
        mean = statistics.fmean(c["score"] for c in a) - statistics.fmean(c["score"] for c in b)
        ra, rb = self.replicates(a), self.replicates(b)
        if ra is not None:
            low, high = percentile(ra - rb)
        else:  # Welch's t over seeds (None with one seed on either side)
            bounds = welch([c["score"] for c in a], [c["score"] for c in b])
            if bounds is None:
                return {"difference": mean, "low": None, "high": None, "inside_noise": None}
            low, high = bounds
        return {"difference": mean, "low": low, "high": high, "inside_noise": low <= 0 <= high}


def percentile(values: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def t_interval(scores: list[float]) -> tuple[float, float] | None:
    """Student's t 95% interval of the mean of ``scores`` (None for one score)."""
    if len(scores) < 2:
        return None
    mean, half = statistics.fmean(scores), _t(len(scores) - 1) * statistics.stdev(scores) / math.sqrt(len(scores))
    return mean - half, mean + half


def welch(a: list[float], b: list[float]) -> tuple[float, float] | None:
    if len(a) < 2 or len(b) < 2:
        return None
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    se = math.sqrt(va + vb)
    dof = (va + vb) ** 2 / ((va ** 2 / (len(a) - 1)) + (vb ** 2 / (len(b) - 1))) if se > 0 else len(a) + len(b) - 2
    mean = statistics.fmean(a) - statistics.fmean(b)
    return mean - _t(max(1, int(dof))) * se, mean + _t(max(1, int(dof))) * se


def _t(dof: int) -> float:
    return T975.get(dof, 1.96 + 2.4 / dof)  # beyond 10 degrees of freedom, a close approximation of the quantile
