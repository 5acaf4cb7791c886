"""Fine-tuning strategies: which backbone parameters train, and how fast.

A strategy is written as a short string in the recipe (``strategy: llrd:0.8``):

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
pooler the checkpoint lacked...): they always train, at ``head_lr`` when given.  Layer groups come
from the backbone: ``[embeddings, layer 0, ..., layer L-1]`` bottom to top (images: ``[stem,
stage 1, ..., stage S]``; MLPs: ``[none, block 1, ..., block B]``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from pretune.errors import RecipeError

NAMES = ("full", "linear-probe", "freeze-bottom", "gradual-unfreeze", "llrd", "lora")


@dataclass(frozen=True)
class Strategy:
    name: str = "full"
    layers: int = 0  # freeze-bottom:N
    decay: float = 1.0  # llrd:D
    lora: dict[str, Any] = field(default_factory=dict)  # lora:r=8,alpha=16,dropout=0.05

    @property
    def frozen_backbone(self) -> bool:
        return self.name == "linear-probe"


def parse(spec: str) -> Strategy:
    """``'freeze-bottom:4'`` -> Strategy(name='freeze-bottom', layers=4); clear one-line errors."""
    name, _, arg = str(spec).strip().partition(":")
    where = f"recipe key 'strategy': {spec!r}"
    if name not in NAMES:
        raise RecipeError(f"{where} is not a strategy; choose one of full, linear-probe, freeze-bottom:N, gradual-unfreeze, llrd:D, lora:r=R")
    try:
        if name == "freeze-bottom":
            layers = int(arg)
            if layers < 0:
                raise ValueError
            return Strategy(name, layers=layers)
        if name == "llrd":
            decay = float(arg) if arg else 0.8
            if not 0 < decay <= 1:
                raise ValueError
            return Strategy(name, decay=decay)
        if name == "lora":
            options = {"r": 8, "alpha": 16, "dropout": 0.05}
            for item in filter(None, arg.split(",")):
                key, _, value = item.partition("=")
                if key not in options:
                    raise ValueError
                options[key] = type(options[key])(float(value)) if key != "dropout" else float(value)
            if options["r"] < 1:
                raise ValueError
            return Strategy(name, lora=options)
    except ValueError:
        raise RecipeError(f"{where} has a bad argument (e.g. freeze-bottom:4, llrd:0.8, lora:r=8,alpha=16,dropout=0.05)") from None
    if arg:
        raise RecipeError(f"{where}: {name} takes no argument")
    return Strategy(name)


def layer_groups(model: nn.Module) -> list[list[nn.Module]]:
    """Bottom-to-top groups of a Hugging Face backbone: embeddings, then each transformer layer."""
    base = getattr(model, "base_model", model)
    if hasattr(base, "layer_groups"):  # image / vector backbones: stem, then stages (see backbones/vision.py)
        return base.layer_groups()
    embeddings = [m for name in ("embeddings", "embed_tokens", "wte", "wpe", "word_embedding") if (m := getattr(base, name, None)) is not None]
    for path in ("encoder.layer", "layers", "h", "transformer.layer", "layer"):
        node: Any = base
        for part in path.split("."):
            node = getattr(node, part, None)
        if isinstance(node, nn.ModuleList):
            return [embeddings, *[[layer] for layer in node]]
    raise RecipeError(f"{type(base).__name__}: cannot find its transformer layers for layer-wise strategies")


def apply(strategy: Strategy, model: nn.Module, new_params: set[str], epoch: int = 0) -> None:
    """Set ``requires_grad`` for ``strategy`` at ``epoch`` (only gradual unfreezing changes over epochs)."""
    if strategy.name == "lora":
        return  # PEFT has frozen the base weights already
    trainable_groups: list[list[nn.Module]] = []
    groups = layer_groups(model)
    if strategy.name in ("full", "llrd"):
        trainable_groups = groups
    elif strategy.name == "freeze-bottom":
        trainable_groups = groups[1 + strategy.layers:]
    elif strategy.name == "gradual-unfreeze":
        trainable_groups = groups[len(groups) - epoch:] if epoch > 0 else []
    backbone_ids = {id(p) for group in groups for module in group for p in module.parameters()}
    trainable_ids = {id(p) for group in trainable_groups for module in group for p in module.parameters()}
    for name, param in model.named_parameters():
        if name in new_params:
            param.requires_grad_(True)
        elif id(param) in backbone_ids:
            param.requires_grad_(id(param) in trainable_ids)
        else:  # loaded weights outside the layer stack (final norm, pooler): with the top layer
            param.requires_grad_(strategy.name in ("full", "llrd") or bool(trainable_groups))


def lr_scales(strategy: Strategy, model: nn.Module, new_params: set[str], head_lr_scale: float) -> dict[str, float]:
    """Per-parameter learning-rate multipliers: LLRD by depth, and the head's own scale."""
    scales = {name: 1.0 for name, _ in model.named_parameters()}
    if strategy.name == "llrd":
        groups = layer_groups(model)
        depth = len(groups)  # embeddings sit at depth len-1 below the top layer, +1
        by_id = {}
        for level, group in enumerate(groups):
            for module in group:
                for param in module.parameters():
                    by_id[id(param)] = strategy.decay ** (depth - level)
        for name, param in model.named_parameters():
            if id(param) in by_id:
                scales[name] = by_id[id(param)]
    for name in new_params:
        scales[name] = head_lr_scale
    return scales


def wrap_lora(strategy: Strategy, model: nn.Module, head_modules: list[str]) -> nn.Module:
    """Add LoRA adapters with PEFT; the new task layers train fully (``modules_to_save``)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=strategy.lora["r"], lora_alpha=strategy.lora["alpha"], lora_dropout=strategy.lora["dropout"],
        target_modules="all-linear", modules_to_save=head_modules,
    )
    return get_peft_model(model, config)


def describe(model: nn.Module) -> str:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"{trainable / 1e6:.2f}M of {total / 1e6:.2f}M parameters trainable"
