"""Learning curves: how a score grows with the labels, and how many labels pretraining was worth.

Each arm's mean score against its label budget ``x`` (a fraction of the labels, or labels per class)
is fitted with a saturating power law,

    score(x) = a - b * x^(-c)        (b > 0, c > 0; for metrics where lower is better: a + b * x^(-c))

the form of Hestness et al. 2017 and Rosenfeld et al. 2020 for generalisation error against data
size, with an asymptote ``a`` because accuracy saturates.  Three parameters need at least three
budgets.  ``c`` is searched on a grid and ``a, b`` solved by least squares for each ``c`` (the
problem is linear given ``c``), so the fit has no starting point to get wrong.

The labels an arm needs to reach a target ``T`` are the inverse, ``x = (b / (a - T))^(1/c)`` (None
when ``a`` does not reach ``T``).  With the default target, scratch's score at the largest budget
``X``, pretraining was **worth k× the labels** for an arm that needs ``x`` to match it: ``k = X / x``.
Budgets are relative, so ``k`` needs no absolute label count.  Its interval repeats the fit on every
bootstrap replicate of the study (:mod:`pretune.studies.stats`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

EXPONENTS = np.linspace(0.05, 3.0, 119)


@dataclass
class Curve:
    a: float
    b: float
    c: float
    sign: float  # +1: higher is better; -1: lower is better (the fit is of sign * score)

    def __call__(self, x: np.ndarray | float) -> np.ndarray:
        return self.sign * (self.a - self.b * np.power(x, -self.c))

    def needed(self, target: float) -> float | None:
        """The budget at which the curve reaches ``target`` (None if it never does)."""
        gap = self.a - self.sign * target
        return float((self.b / gap) ** (1 / self.c)) if gap > 0 else None


def fit(x: list[float] | np.ndarray, y: np.ndarray, mode: str = "max") -> list[Curve | None]:
    """Fit ``y`` (``[budgets]``, or ``[replicates, budgets]``) at budgets ``x``; one curve per row (None when
    fewer than three budgets, or no increasing power law fits)."""
    x = np.asarray(x, dtype=float)
    y = np.atleast_2d(np.asarray(y, dtype=float))
    sign = 1.0 if mode == "max" else -1.0
    if len(np.unique(x)) < 3:
        return [None] * len(y)
    z = sign * y  # [R, B]
    best_sse = np.full(len(z), np.inf)
    best = np.full((len(z), 3), np.nan)
    for c in EXPONENTS:
        design = np.stack([np.ones_like(x), -np.power(x, -c)], axis=1)  # z = a - b x^-c
        coef, *_ = np.linalg.lstsq(design, z.T, rcond=None)  # [2, R]
        sse = ((design @ coef - z.T) ** 2).sum(0)
        better = (coef[1] > 0) & (sse < best_sse)
        best_sse = np.where(better, sse, best_sse)
        best[better] = np.stack([coef[0][better], coef[1][better], np.full(better.sum(), c)], axis=1)
    return [Curve(float(a), float(b), float(c), sign) if np.isfinite(a) else None for a, b, c in best]


def worth(budgets: list[float], arm: np.ndarray, scratch_top: np.ndarray, mode: str = "max") -> np.ndarray:
    """``k`` per replicate: the largest budget divided by the budget at which the arm's fitted curve reaches
    scratch's score at the largest budget (``arm``: ``[replicates, budgets]``, ``scratch_top``: ``[replicates]``);
    0 where the arm's curve never gets there, NaN where no curve fits."""
    top = max(budgets)
    out = np.full(len(arm), np.nan)
    for i, curve in enumerate(fit(budgets, arm, mode)):
        if curve is not None:
            needed = curve.needed(float(scratch_top[i]))
            out[i] = top / needed if needed else 0.0
    return out
