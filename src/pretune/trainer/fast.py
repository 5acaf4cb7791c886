"""Faster dropout and training attention on CPUs: the same operations, cheaper random masks, fewer memory passes.

On a CPU, PyTorch's dropout draws its mask with ``bernoulli_``, which costs ~7 ns per element on
the 2-core development machine: 21% of a BERT-mini MLM step and 16% of a GPT-2-mini CLM step went
to it (``benchmarks/profile_step.py``, ``docs/performance.md``).  :func:`fast_dropout` draws the
mask with :func:`pretune.trainer.attention.keep_mask` instead: four 16-bit uniform integers per
64-bit draw of torch's seeded generator, 5x cheaper than ``torch.rand`` (which it replaced).  The
result is the same operation: each element is kept with probability ``1 - p`` (``p`` rounded to a
multiple of 1/65536) and scaled by ``1 / P(keep)``, with masks from torch's seeded generator (so
runs stay reproducible and resumable); only the random stream differs from
``torch.nn.functional.dropout``.

Two places use it:
- every ``nn.Dropout`` module of the model is swapped for :class:`FastDropout` (no weights, so
  saved models are unchanged);
- attention-probability dropout happens inside ``scaled_dot_product_attention``, which on a CPU
  falls back to its unfused math path whenever dropout is on.  Hugging Face models whose attention
  is ``sdpa`` are switched to the ``pretune`` attention function registered below: when training
  with attention dropout on a CPU it computes the same math (scores, softmax, dropout, values) with
  the cheap mask, over ``BLOCKED_FROM`` or more keys in cache-sized blocks that recompute the
  softmax in the backward pass (:mod:`pretune.trainer.attention`: 1.9x faster than the unblocked
  path at 512 tokens, 2.5x at 1,024); otherwise (evaluation, no dropout, GPUs, position biases) it calls
  Transformers' own SDPA function unchanged.  ``_attn_implementation`` is not saved in
  ``config.json``, so saved models load as ``sdpa`` everywhere else.

GPUs keep PyTorch's fused dropout: there it is already fast.
"""

from __future__ import annotations

import torch
from torch import nn

from pretune.trainer.attention import dropout_attention, keep_mask

BLOCKED_FROM = 256  # keys from which training attention runs in cache-sized blocks (docs/performance.md)


def fast_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``F.dropout(x, p, training)`` with a mask from ``torch.rand`` on CPUs."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return nn.functional.dropout(x, p, training)
    keep, factor = keep_mask(x.shape, p, x.device)
    return x * keep * factor


class FastDropout(nn.Dropout):
    """``nn.Dropout`` whose mask is drawn with :func:`fast_dropout`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fast_dropout(x, self.p, self.training)


def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
              is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """Transformers' SDPA attention, except attention dropout while training on a CPU (see the module doc)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    if (dropout == 0.0 or query.device.type != "cpu" or kwargs.get("position_bias") is not None
            or kwargs.get("softcap") is not None or kwargs.get("output_attentions")):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if groups > 1:  # grouped-query attention: every query head sees its key/value head
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    q_length, kv_length = query.shape[2], key.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = q_length > 1 and attention_mask is None and is_causal  # as sdpa_attention_forward decides
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if kv_length >= BLOCKED_FROM:
        mask = None if attention_mask is None else attention_mask[..., :kv_length]
        out = dropout_attention(query, key, value, mask, dropout=dropout, scale=scale, causal=is_causal)
        return out.transpose(1, 2).contiguous(), None
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale
    if attention_mask is not None:
        mask = attention_mask[..., :kv_length]
        # the lowest finite value, not -inf: a row with every key masked gives uniform weights, not NaN
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min) if mask.dtype == torch.bool else scores + mask
    elif is_causal:
        allowed = torch.ones(q_length, kv_length, dtype=torch.bool, device=query.device).tril(kv_length - q_length)
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores.float(), dim=-1).to(value.dtype)
    probs = fast_dropout(probs, dropout, True)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register("pretune", attention)
    AttentionMaskInterface.register("pretune", sdpa_mask)  # masks in SDPA's format (boolean, True = attend)


def speed_up(module: nn.Module, device: torch.device) -> nn.Module:
    """Swap in the cheap dropout mask for training on a CPU (in place; returns ``module``).

    A no-op on other devices and for models without dropout.  Weights, outputs in evaluation
    mode and saved files are unchanged.
    """
    if device.type != "cpu":
        return module
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout:
                fast = FastDropout(child.p, child.inplace)
                fast.train(child.training)
                setattr(parent, name, fast)
    for sub in module.modules():
        config = getattr(sub, "config", None)
        if getattr(config, "_attn_implementation", None) == "sdpa" and hasattr(sub, "set_attn_implementation"):
            _register()
            sub.set_attn_implementation("pretune")
    return module
