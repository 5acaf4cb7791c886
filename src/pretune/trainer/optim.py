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
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, param in named:
        scale = (lr_scales or {}).get(name, 1.0)
        groups.setdefault((scale, param.ndim >= 2), []).append(param)
    return [{"params": params, "weight_decay": weight_decay if decayed else 0.0, "lr": lr * scale}
            for (scale, decayed), params in sorted(groups.items(), key=lambda item: (-item[0][0], not item[0][1]))]


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
