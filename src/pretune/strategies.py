"""Fine-tuning strategies: which backbone parameters train, and how fast.

A strategy is the recipe's typed ``strategy:`` section (:class:`pretune.recipe.StrategyConfig`),
written in full or as a short string (``strategy: llrd:0.8``):

| strategy            | what trains                                                          |
|---------------------|----------------------------------------------------------------------|
| ``full``            | everything                                                           |
| ``linear-probe``    | only the new task layers; the backbone is frozen (and in eval mode); |
|                     | on cached features the linear head is fitted to convergence with its |
|                     | L2 strength chosen on validation (:func:`fit_probe`)                 |
| ``freeze-bottom:N`` | all but the embeddings and the bottom N layers                       |
| ``gradual-unfreeze``| ULMFiT (Howard & Ruder 2018): the head first, then more layers from  |
|                     | the top, paced so that every layer trains by the last epoch          |
| ``llrd:D``          | everything; layer-wise LR decay (Clark et al. 2020, ELECTRA): layer  |
|                     | l of L gets ``lr * D**(L - l)``, embeddings ``lr * D**(L + 1)``      |
| ``lora:r=8``        | low-rank adapters (Hu et al. 2021) through PEFT on the attention and |
|                     | MLP projections (at 20x ``trainer.lr``), plus the new task layers;   |
|                     | merged on export                                                     |
| ``setfit``          | SetFit (Tunstall et al. 2022; :mod:`pretune.tasks.setfit`): the       |
|                     | encoder on contrastive sentence pairs of the labelled examples; the  |
|                     | linear head is not trained by the loop but fitted (as the linear     |
|                     | probe) on the encoder's embeddings before every validation           |

"New task layers" are the parameters that were not in the loaded checkpoint (a classifier, a
pooler the checkpoint lacked...): they always train, at ``trainer.head_lr`` when given.  What
else trains runs at ``trainer.lr`` times ``strategy.lr_scale`` (default 20 for LoRA's adapters, 1
otherwise).  Layer
groups come from the backbone family (:meth:`pretune.backbones.Classifier.layer_groups`):
``[embeddings, layer 0, ..., layer L-1]`` bottom to top (images: ``[stem, stage 1, ..., stage S]``;
MLPs: ``[none, block 1, ..., block B]``).  Strategies work on every family through that one method.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from pretune.backbones.base import Classifier
from pretune.errors import RecipeError
from pretune.heads import Head
from pretune.recipe import STRATEGIES, StrategyConfig, parse_strategy, validate

NAMES = STRATEGIES


def parse(spec: str | StrategyConfig) -> StrategyConfig:
    """``'freeze-bottom:4'`` -> StrategyConfig(name='freeze-bottom', layers=4); one-line errors naming the key."""
    if isinstance(spec, StrategyConfig):
        return spec
    try:
        raw = parse_strategy(spec)
    except ValueError as exc:
        raise RecipeError(f"recipe key 'strategy': {exc}") from None
    return validate(StrategyConfig, raw, prefix="strategy.")


def prepare(strategy: StrategyConfig, model: Classifier) -> None:
    """Once, before training: LoRA adapters where the strategy asks for them."""
    if strategy.name == "lora":
        model.add_lora({"r": strategy.r, "alpha": strategy.alpha, "dropout": strategy.dropout})


def stages(strategy: StrategyConfig, model: Classifier, epochs: float | None) -> float:
    """Gradual unfreezing: epochs per stage (each stage unfreezes one more layer group from the top;
    epoch 0 trains the head only), paced so that every group trains by the last epoch when there are
    at least 2 epochs.  With ``E >= G + 1`` epochs for ``G`` groups: ``E // (G + 1)`` (ULMFiT's one
    group per epoch when ``E = G + 1``, and longer stages with more epochs); with fewer, ``(E - 1) / G``
    < 1, i.e. several groups per epoch.  Without a known number of epochs: 1 (one group per epoch)."""
    if strategy.name != "gradual-unfreeze" or not epochs:
        return 1.0
    groups = len(model.layer_groups())
    if epochs >= groups + 1:
        return float(int(epochs) // (groups + 1))
    return max(epochs - 1.0, 1.0) / groups


def apply(strategy: StrategyConfig, model: Classifier, epoch: int = 0, per_stage: float = 1.0) -> list[int]:
    """Set ``requires_grad`` for ``strategy`` at ``epoch``; returns the indices of the trainable layer groups.

    ``per_stage`` (gradual unfreezing, see :func:`stages`): epochs per stage; at epoch ``e > 0`` the top
    ``ceil(e / per_stage)`` groups train."""
    if strategy.name == "lora":
        return []  # PEFT has frozen the base weights already
    groups = model.layer_groups()
    if strategy.name in ("full", "llrd", "setfit"):
        trainable = list(range(len(groups)))
    elif strategy.name == "freeze-bottom":
        trainable = list(range(1 + strategy.layers, len(groups)))
    elif strategy.name == "gradual-unfreeze":
        stage = min(len(groups), math.ceil(epoch / per_stage - 1e-9)) if epoch > 0 else 0
        trainable = list(range(len(groups) - stage, len(groups)))
    else:  # linear-probe
        trainable = []
    backbone_ids = {id(p) for group in groups for module in group for p in module.parameters()}
    trainable_ids = {id(p) for i in trainable for module in groups[i] for p in module.parameters()}
    for name, param in model.named_parameters():
        if name in model.new_parameters:
            param.requires_grad_(strategy.name != "setfit")  # SetFit's head is fitted, not trained
        elif id(param) in backbone_ids:
            param.requires_grad_(id(param) in trainable_ids)
        else:  # loaded weights outside the layer stack (final norm, pooler): with the top layer
            param.requires_grad_(strategy.name in ("full", "llrd", "setfit") or bool(trainable))
    return trainable


def lr_scales(strategy: StrategyConfig, model: Classifier, head_scale: float = 1.0) -> dict[str, float]:
    """Per-parameter learning-rate multipliers: ``strategy.lr_scale`` (LoRA's adapters: 20 by default),
    LLRD by depth, and the new task layers' own scale."""
    scale = strategy.backbone_lr_scale
    scales = {name: scale for name, _ in model.named_parameters()}
    if strategy.name == "llrd":
        groups = model.layer_groups()
        depth = len(groups)  # embeddings sit at depth len-1 below the top layer, +1
        by_id = {id(param): scale * strategy.decay ** (depth - level)
                 for level, group in enumerate(groups) for module in group for param in module.parameters()}
        for name, param in model.named_parameters():
            if id(param) in by_id:
                scales[name] = by_id[id(param)]
    for name in model.new_parameters:
        scales[name] = head_scale if strategy.name != "setfit" else 0.0
    return scales


def describe(model: nn.Module) -> str:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"{trainable / 1e6:.2f}M of {total / 1e6:.2f}M parameters trainable"


# -- linear probe: fitted to convergence on cached features ----------------------------------------------
C_GRID = tuple(10.0 ** k for k in range(-4, 3))  # inverse L2 strengths tried: 1e-4 ... 1e2 (scikit-learn's C)
DEFAULT_C = 1.0  # scikit-learn's LogisticRegression default: kept unless cross-validation clearly prefers another C


@dataclass
class ProbeFit:
    weight: torch.Tensor  # [K, D]: takes raw (unstandardised) features
    bias: torch.Tensor  # [K]
    C: float  # the inverse L2 strength chosen
    scores: dict[float, float]  # cross-validated value of the head's monitored metric per C (empty: no cross-validation)
    folds: int  # cross-validation folds (0: too few examples, C = 1)
    iterations: int  # L-BFGS iterations of the final fit (0 for ridge)


def fit_probe(head: Head, x: torch.Tensor, y: torch.Tensor, *, weights: torch.Tensor | None = None, names: list[str] = (),
              threshold: float = 0.5, grid: tuple[float, ...] = C_GRID, folds: int = 5, max_rows: int = 10_000,
              max_iter: int = 1000, seed: int = 0) -> ProbeFit:
    """A linear head on frozen features ``x`` [N, D], trained to convergence, its L2 strength chosen by
    cross-validation on the training features (as scikit-learn's ``LogisticRegressionCV``).

    Features are standardised with the training mean and std, ``z = (x - m) / s``.  For a given ``C``
    the head ``V z + c`` minimises, in float64 with full-batch L-BFGS (strong Wolfe line search),

        L(V, c) = head.loss(V z + c, y) / n_units  +  ||V||^2 / (2 C n_units)

    i.e. scikit-learn's ``C * sum_i loss_i + ||V||^2 / 2`` divided by ``C * n_units`` (the bias is not
    penalised; class weights weight the loss as in training).  Regression heads are ridge regression in
    closed form with ``alpha = 1 / (2 C)``.

    ``C`` is chosen by ``folds``-fold cross-validation (stratified for single-label heads; on at most
    ``max_rows`` rows) on the head's monitored metric, pooled over the out-of-fold predictions.  The
    default ``C = 1`` is kept unless another ``C`` beats it by more than one standard error (the
    one-standard-error rule, Hastie et al., *Elements of Statistical Learning* 7.10, anchored at the
    default): on small data, where the choice is noisy, the probe is then scikit-learn's default fit.
    Finally ``W = V / s`` and ``b = c - W m``, so the returned head takes raw features."""
    x64 = x.double()
    y = y.double() if y.is_floating_point() else y  # multi-label / regression targets
    weights = weights.double() if weights is not None else None
    mean, std = x64.mean(0), x64.std(0, unbiased=False)
    std = torch.where(std > 1e-12, std, torch.ones_like(std))  # constant features, as StandardScaler
    z = (x64 - mean) / std
    fold = _folds(head, y, folds, max_rows, seed)
    scores: dict[float, float] = {}
    C = DEFAULT_C
    if fold is not None:
        k = int(fold.max()) + 1
        held = fold >= 0
        logits = {C_: torch.zeros(int(held.sum()), head.outputs(names), dtype=torch.float64) for C_ in grid}
        for i in range(k):
            params = None  # warm-started along the grid, from strong to weak regularisation
            for C_ in sorted(grid):
                params, _ = _fit(head, z[(fold != i) & held], y[(fold != i) & held], weights, C_, params, max_iter, names)
                logits[C_][fold[held] == i] = z[fold == i] @ params[0].T + params[1]
        metric, mode = head.monitor
        for C_ in grid:
            scores[C_] = float(head.score([logits[C_].float()], [y[held]], list(names), threshold)[metric])
        best = (max if mode == "max" else min)(grid, key=lambda c: (scores[c], -abs(math.log10(c))) if mode == "max"
                                               else (scores[c], abs(math.log10(c))))
        error = _standard_error(head, scores[best], logits[best], y[held])
        beaten = scores[best] - scores.get(DEFAULT_C, -math.inf) > error if mode == "max" else scores.get(DEFAULT_C, math.inf) - scores[best] > error
        C = best if beaten or DEFAULT_C not in grid else DEFAULT_C
    (V, c), iterations = _fit(head, z, y, weights, C, None, max_iter, names)
    weight = V / std
    return ProbeFit(weight.float(), (c - weight @ mean).float(), C, scores, 0 if fold is None else int(fold.max()) + 1, iterations)


def _folds(head: Head, y: torch.Tensor, folds: int, max_rows: int, seed: int) -> torch.Tensor | None:
    """The fold of each row (-1: left out of cross-validation), stratified by class for single-label
    heads; None when there are too few rows (or, single-label, a class with fewer than 2 rows)."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=generator)[:max_rows]
    k = min(folds, len(order) // 2)
    if head.name == "single":
        k = min(k, int(torch.bincount(y[order]).min()) if len(order) else 0)  # every class in every fold
        order = order[torch.argsort(y[order], stable=True)]  # dealt out class by class
    if k < 2:
        return None
    fold = torch.full((len(y),), -1, dtype=torch.long)
    fold[order] = torch.arange(len(order)) % k
    return fold


def _fit(head: Head, z: torch.Tensor, y: torch.Tensor, weights: torch.Tensor | None, C: float, start: tuple | None, max_iter: int,
         names: list[str]) -> tuple[tuple[torch.Tensor, torch.Tensor], int]:
    """``(V, c)`` minimising the probe objective (see :func:`fit_probe`) for one ``C``, and the L-BFGS iterations."""
    if head.name == "regression":  # ridge: w = (z'z + alpha I)^-1 z'(y - mean y), alpha = 1 / (2C), on centred z
        target = y.reshape(len(y), -1)
        centred = z - z.mean(0)
        gram = centred.T @ centred + torch.eye(z.shape[1], dtype=z.dtype) / (2.0 * C)
        w = torch.linalg.solve(gram, centred.T @ (target - target.mean(0))).T
        return (w, (target.mean(0) - w @ z.mean(0))), 0
    V = (start[0].clone() if start else torch.zeros(head.outputs(names), z.shape[1], dtype=torch.float64)).requires_grad_(True)
    c = (start[1].clone() if start else torch.zeros(head.outputs(names), dtype=torch.float64)).requires_grad_(True)
    units = float(head.units(y, weights))
    optimizer = torch.optim.LBFGS([V, c], lr=1.0, max_iter=max_iter, max_eval=int(max_iter * 1.25), tolerance_grad=1e-6,
                                  tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = head.loss(z @ V.T + c, y, weights) / units + (V * V).sum() / (2.0 * C * units)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return (V.detach(), c.detach()), int(optimizer.state[V].get("n_iter", 0))


def _standard_error(head: Head, value: float, logits: torch.Tensor, y: torch.Tensor) -> float:
    """Standard error of a cross-validated metric: ``sqrt(v (1 - v) / n)`` for accuracy and F1,
    the standard deviation of the squared errors over ``sqrt(n)`` for MSE."""
    if head.name == "regression":
        errors = (logits.squeeze(-1) - y) ** 2
        return float(errors.std() / math.sqrt(len(errors)))
    n = y.numel() if head.name == "multi" else len(y)
    return math.sqrt(max(value * (1.0 - value), 0.0) / max(n, 1))
