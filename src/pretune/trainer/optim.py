"""Optimizers and learning-rate schedules.

Schedules are plain Python (``math``, not numpy) so that the scheduler state saved in a
checkpoint holds only Python numbers and loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from pretune.recipe import TrainerConfig


def param_groups(named: Iterable[tuple[str, nn.Parameter]], weight_decay: float, lr: float,
                 lr_scales: dict[str, float] | None = None) -> list[dict]:
    """Weight decay on matrices only (not on biases and norm weights); optional per-parameter LR scales.

    Frozen parameters are included (with no gradient the optimizer skips them), so a strategy that
    unfreezes layers later (gradual unfreezing) needs no new optimizer.
    """
    return [{"params": [param for _, param in members], "weight_decay": weight_decay if decayed else 0.0, "lr": lr * scale}
            for scale, decayed, members in _grouped(named, lr_scales)]


def lr_log_keys(named: list[tuple[str, nn.Parameter]], lr_scales: dict[str, float] | None = None) -> list[str]:
    """The metrics key of each group of :func:`param_groups` (same arguments, same order): ``lr`` for
    groups at the base learning rate, else ``lr_`` + the module path their parameters share
    (``lr_classifier``, ``lr_bert.encoder.layer.3``), without the prefix every parameter shares."""
    grouped = _grouped(named, lr_scales)
    shared = len(_common_path([name for name, _ in named]))
    names_by_scale: dict[float, list[str]] = {}
    for scale, _, members in grouped:
        names_by_scale.setdefault(scale, []).extend(name for name, _ in members)
    key_of: dict[float, str] = {}
    for i, (scale, names) in enumerate(names_by_scale.items()):
        if scale == 1.0:
            key_of[scale] = "lr"
            continue
        key = "lr_" + (".".join(_common_path(names)[shared:]) or f"group{i}")
        key_of[scale] = key if key not in key_of.values() else f"{key}_{i}"
    return [key_of[scale] for scale, _, _ in grouped]


def _grouped(named: Iterable[tuple[str, nn.Parameter]], lr_scales: dict[str, float] | None
             ) -> list[tuple[float, bool, list[tuple[str, nn.Parameter]]]]:
    """(lr scale, weight-decayed, named parameters) groups: highest scale first, decayed first."""
    groups: dict[tuple[float, bool], list[tuple[str, nn.Parameter]]] = {}
    for name, param in named:
        scale = (lr_scales or {}).get(name, 1.0)
        groups.setdefault((scale, param.ndim >= 2), []).append((name, param))
    return [(scale, decayed, members)
            for (scale, decayed), members in sorted(groups.items(), key=lambda item: (-item[0][0], not item[0][1]))]


def _common_path(names: list[str]) -> list[str]:
    """The module path (dotted parts, the parameter's own name excluded) that all ``names`` share."""
    shared: list[str] = []
    for parts in zip(*(name.split(".")[:-1] for name in names)):
        if len(set(parts)) > 1:
            break
        shared.append(parts[0])
    return shared


def build_optimizer(groups: list[dict], cfg: TrainerConfig, device: torch.device) -> torch.optim.Optimizer:
    fast = {"fused": True} if device.type in ("cuda", "cpu") else {"foreach": True}
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, **fast)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=cfg.betas, **fast)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, foreach=True)


def lr_factor(step: int, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        decay = 1.0 - progress
    else:  # cosine
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * decay


def build_schedule(optimizer: torch.optim.Optimizer, cfg: TrainerConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = int(cfg.warmup * total_steps) if cfg.warmup < 1 else int(cfg.warmup)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup, cfg.schedule, cfg.min_lr_ratio)
    )
