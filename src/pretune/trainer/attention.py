"""Training attention with dropout on CPUs, in blocks that stay in cache.

PyTorch's fused attention kernels (flash, memory-efficient) refuse dropout on a CPU, so with
attention dropout on, ``scaled_dot_product_attention`` falls back to its math path: it writes the
scores, the fp32 softmax, a random mask and the dropped probabilities as full
``batch x heads x S x S`` tensors and keeps them for the backward pass.  At S = 512 each is 33 MB
per layer for BERT-mini's batch of 8: far beyond the cache, so every element-wise pass runs at
memory speed and a step spends 2-3x the time of the fused kernel (``docs/performance.md``).

:func:`dropout_attention` computes exactly the same function,

    out = (1 / (1 - p)) * (softmax(Q K^T * scale + mask) * keep) V,    keep_ij ~ Bernoulli(1 - p),

block by block over the queries (FlashAttention's recomputation, Dao et al. 2022, without its
online softmax: a block holds whole rows), so each block's scores, probabilities and mask are
written and read while they are still in the cache.  Only the keep mask (one byte per element)
and the output are kept for the backward pass, which recomputes each block's softmax and uses
FlashAttention's identity ``rowsum(dP * P) = rowsum(dOut * Out)``.

The mask comes from :func:`keep_mask`: 16-bit uniform integers from full-range 64-bit draws of
torch's seeded generator, four per draw.  That is 5x cheaper than ``torch.rand`` on the
development machine (19 ms vs 95 ms for 8.4M elements).  ``p`` is rounded to a multiple of
1/65536 (an error below 8e-6), and the kept values are scaled by the exact ``1 / (1 - p_rounded)``,
so the expectation is unchanged.
"""

from __future__ import annotations

import torch

BLOCK_ELEMENTS = 1 << 18  # scores per block (1 MB in fp32): about one core's L2 cache on the development machine
LEVELS = 1 << 16


def keep_mask(shape: tuple[int, ...], p: float, device: torch.device | str = "cpu") -> tuple[torch.Tensor, float]:
    """A boolean mask whose elements are True with probability ``1 - p`` (rounded to 1/65536), and the
    rescaling factor ``1 / P(keep)``.  Drawn from torch's default generator, so ``torch.manual_seed`` and
    checkpointed generator states reproduce it."""
    dropped = round(p * LEVELS)
    count = 1
    for size in shape:
        count *= size
    draws = torch.empty((count + 3) // 4, dtype=torch.int64, device=device).random_(-(1 << 63), None)
    uniform = draws.view(torch.int16)[:count].view(shape)  # each 16-bit slice of a 64-bit draw is uniform
    return uniform >= dropped - LEVELS // 2, LEVELS / (LEVELS - dropped)


def _accurate(dtype: torch.dtype) -> torch.dtype:
    """Where softmax and gradient sums run: fp32 for bf16/fp16/fp32 inputs, fp64 for fp64 (the tests' reference)."""
    return torch.promote_types(dtype, torch.float32)


def _blocks(batch_heads: int, queries: int, keys: int) -> list[tuple[slice, slice]]:
    """(heads, query rows) blocks of about ``BLOCK_ELEMENTS`` scores: whole heads while a head fits, else row slices."""
    heads = max(1, BLOCK_ELEMENTS // (queries * keys))
    rows = queries if queries * keys <= BLOCK_ELEMENTS else max(1, BLOCK_ELEMENTS // keys)
    return [(slice(h, min(h + heads, batch_heads)), slice(r, min(r + rows, queries)))
            for h in range(0, batch_heads, heads) for r in range(0, queries, rows)]


class _Mask:
    """The attention mask of a block of flattened (batch x heads) rows: boolean (True = attend), additive, or causal."""

    def __init__(self, mask: torch.Tensor | None, heads: int, causal: bool, queries: int, keys: int):
        self.heads, self.causal, self.offset = heads, causal and mask is None, keys - queries
        if mask is not None and mask.shape[1] == 1:
            mask = mask[:, 0]  # (batch, S_q or 1, S_k): one mask for all heads of a batch row
        elif mask is not None:
            mask, self.heads = mask.expand(-1, heads, -1, -1).flatten(0, 1), 1
        self.mask = mask

    def apply(self, scores: torch.Tensor, heads: slice, rows: slice) -> torch.Tensor:
        lowest = torch.finfo(scores.dtype).min  # not -inf: a row with every key masked gives uniform weights, not NaN
        if self.mask is not None:
            index = torch.arange(heads.start, heads.stop, device=scores.device) // self.heads
            block = self.mask[index] if self.mask.shape[1] == 1 else self.mask[index, rows]
            return scores.masked_fill_(~block, lowest) if block.dtype == torch.bool else scores.add_(block)
        if self.causal:
            query = torch.arange(rows.start, rows.stop, device=scores.device)[:, None] + self.offset
            return scores.masked_fill_(torch.arange(scores.shape[-1], device=scores.device) > query, lowest)
        return scores


class _DropoutAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask: _Mask, p: float, scale: float):
        q = q * scale
        keep = torch.empty(*q.shape[:2], k.shape[1], dtype=torch.bool, device=q.device)
        out = torch.empty(*q.shape[:2], v.shape[-1], dtype=v.dtype, device=q.device)
        factor = 1.0
        for heads, rows in _blocks(q.shape[0], q.shape[1], k.shape[1]):
            scores = mask.apply(torch.matmul(q[heads, rows], k[heads].transpose(-1, -2)).to(_accurate(q.dtype)), heads, rows)
            probs = torch.softmax(scores, dim=-1)
            keep[heads, rows], factor = keep_mask(probs.shape, p, q.device)
            out[heads, rows] = torch.matmul(probs.mul_(keep[heads, rows]).to(v.dtype), v[heads]).mul_(factor)
        ctx.save_for_backward(q, k, v, keep, out)
        ctx.mask, ctx.scale, ctx.factor = mask, scale, factor
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, keep, out = ctx.saved_tensors
        grad_q = torch.empty_like(q)
        grad_k = torch.zeros(k.shape, dtype=_accurate(k.dtype), device=k.device)
        grad_v = torch.zeros(v.shape, dtype=_accurate(v.dtype), device=v.device)
        row_dot = (grad_out.to(_accurate(q.dtype)) * out.to(_accurate(q.dtype))).sum(-1, keepdim=True)  # rowsum(dP * P) = rowsum(dOut * Out)
        for heads, rows in _blocks(q.shape[0], q.shape[1], k.shape[1]):
            scores = ctx.mask.apply(torch.matmul(q[heads, rows], k[heads].transpose(-1, -2)).to(_accurate(q.dtype)), heads, rows)
            probs = torch.softmax(scores, dim=-1)
            dout, kept = grad_out[heads, rows], keep[heads, rows]
            grad_v[heads] += torch.matmul((probs * kept).transpose(-1, -2).to(dout.dtype), dout).to(_accurate(q.dtype)).mul_(ctx.factor)
            grad_probs = torch.matmul(dout, v[heads].transpose(-1, -2)).to(_accurate(q.dtype)).mul_(kept).mul_(ctx.factor)
            grad_scores = grad_probs.sub_(row_dot[heads, rows]).mul_(probs).to(q.dtype)
            grad_q[heads, rows] = torch.matmul(grad_scores, k[heads]).mul_(ctx.scale)
            grad_k[heads] += torch.matmul(grad_scores.transpose(-1, -2), q[heads, rows]).to(grad_k.dtype)  # q is already scaled
        return grad_q, grad_k.to(k.dtype), grad_v.to(v.dtype), None, None, None


def dropout_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None = None,
                      *, dropout: float, scale: float | None = None, causal: bool = False) -> torch.Tensor:
    """``scaled_dot_product_attention(query, key, value, mask, dropout, is_causal=causal, scale=scale)`` in cache-sized
    blocks (see the module doc).  ``query``: (batch, heads, S_q, d); ``key``/``value``: (batch, heads, S_k, d);
    ``mask``: boolean (True = attend) or additive, shaped (batch, 1 or heads, 1 or S_q, S_k); ``causal`` only without a
    mask.  Returns (batch, heads, S_q, d_v)."""
    batch, heads, queries, _ = query.shape
    scale = scale if scale is not None else query.shape[-1] ** -0.5
    blocks = _Mask(mask, heads, causal, queries, key.shape[2])
    out = _DropoutAttention.apply(query.flatten(0, 1), key.flatten(0, 1), value.flatten(0, 1), blocks, float(dropout), float(scale))
    return out.view(batch, heads, queries, -1)
