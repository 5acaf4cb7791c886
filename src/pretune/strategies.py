"""Fine-tuning strategies: which backbone parameters train, and how fast.

A strategy is the recipe's typed ``strategy:`` section (:class:`pretune.recipe.StrategyConfig`),
written in full or as a short string (``strategy: llrd:0.8``):

| strategy            | what trains                                                          |
|---------------------|----------------------------------------------------------------------|
| ``full``            | everything                                                           |
| ``linear-probe``    | only the new task layers; the backbone is frozen (and in eval mode)  |
| ``freeze-bottom:N`` | all but the embeddings and the bottom N layers                       |
| ``gradual-unfreeze``| ULMFiT (Howard & Ruder 2018): the head first, then one more layer    |
|                     | from the top at every epoch                                          |
| ``llrd:D``          | everything; layer-wise LR decay (Clark et al. 2020, ELECTRA): layer  |
|                     | l of L gets ``lr * D**(L - l)``, embeddings ``lr * D**(L + 1)``      |
| ``lora:r=8``        | low-rank adapters (Hu et al. 2021) through PEFT on the attention and |
|                     | MLP projections, plus the new task layers; merged on export          |

"New task layers" are the parameters that were not in the loaded checkpoint (a classifier, a
pooler the checkpoint lacked...): they always train, at ``trainer.head_lr`` when given.  Layer
groups come from the backbone family (:meth:`pretune.backbones.Classifier.layer_groups`):
``[embeddings, layer 0, ..., layer L-1]`` bottom to top (images: ``[stem, stage 1, ..., stage S]``;
MLPs: ``[none, block 1, ..., block B]``).  Strategies work on every family through that one method.
"""

from __future__ import annotations

from torch import nn

from pretune.backbones.base import Classifier
from pretune.errors import RecipeError
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


def stages(strategy: StrategyConfig, model: Classifier, epochs: float) -> int:
    """Gradual unfreezing: epochs per stage, so that every group is unfrozen by the last epoch
    (one group per epoch, as ULMFiT, when there are at least as many epochs as groups)."""
    groups = len(model.layer_groups())
    return max(1, int(epochs) // (groups + 1)) if strategy.name == "gradual-unfreeze" else 1


def apply(strategy: StrategyConfig, model: Classifier, epoch: int = 0, per_stage: int = 1) -> list[int]:
    """Set ``requires_grad`` for ``strategy`` at ``epoch``; returns the indices of the trainable layer groups."""
    if strategy.name == "lora":
        return []  # PEFT has frozen the base weights already
    groups = model.layer_groups()
    if strategy.name in ("full", "llrd"):
        trainable = list(range(len(groups)))
    elif strategy.name == "freeze-bottom":
        trainable = list(range(1 + strategy.layers, len(groups)))
    elif strategy.name == "gradual-unfreeze":
        stage = epoch // max(1, per_stage)
        trainable = list(range(len(groups) - stage, len(groups))) if stage > 0 else []
        trainable = [i for i in trainable if i >= 0]
    else:  # linear-probe
        trainable = []
    backbone_ids = {id(p) for group in groups for module in group for p in module.parameters()}
    trainable_ids = {id(p) for i in trainable for module in groups[i] for p in module.parameters()}
    for name, param in model.named_parameters():
        if name in model.new_parameters:
            param.requires_grad_(True)
        elif id(param) in backbone_ids:
            param.requires_grad_(id(param) in trainable_ids)
        else:  # loaded weights outside the layer stack (final norm, pooler): with the top layer
            param.requires_grad_(strategy.name in ("full", "llrd") or bool(trainable))
    return trainable


def lr_scales(strategy: StrategyConfig, model: Classifier, head_scale: float = 1.0) -> dict[str, float]:
    """Per-parameter learning-rate multipliers: LLRD by depth, and the new task layers' own scale."""
    scales = {name: 1.0 for name, _ in model.named_parameters()}
    if strategy.name == "llrd":
        groups = model.layer_groups()
        depth = len(groups)  # embeddings sit at depth len-1 below the top layer, +1
        by_id = {id(param): strategy.decay ** (depth - level)
                 for level, group in enumerate(groups) for module in group for param in module.parameters()}
        for name, param in model.named_parameters():
            if id(param) in by_id:
                scales[name] = by_id[id(param)]
    for name in model.new_parameters:
        scales[name] = head_scale
    return scales


def describe(model: nn.Module) -> str:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"{trainable / 1e6:.2f}M of {total / 1e6:.2f}M parameters trainable"
