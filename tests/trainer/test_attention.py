"""The blocked dropout attention equals SDPA's math: without dropout against SDPA itself, with dropout against the
formula on the very masks it drew; forward and gradients, causal, padded and additive masks, blocks of every shape."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pretune.trainer import attention
from pretune.trainer.attention import dropout_attention, keep_mask


@pytest.fixture(params=[1 << 18, 40, 7], ids=["whole-heads", "row-blocks", "tiny-blocks"])
def block(request, monkeypatch):
    monkeypatch.setattr(attention, "BLOCK_ELEMENTS", request.param)
    return request.param


def inputs(batch=2, heads=3, queries=9, keys=9, dim=4, dtype=torch.float64):
    torch.manual_seed(0)
    return [torch.randn(batch, heads, n, dim, dtype=dtype, requires_grad=True) for n in (queries, keys, keys)]


def padding_mask(batch=2, keys=9):
    mask = torch.ones(batch, 1, 1, keys, dtype=torch.bool)
    mask[1, ..., 6:] = False  # the second row is 6 tokens long
    return mask


def grads(out, tensors):
    torch.manual_seed(1)
    return torch.autograd.grad(out, tensors, torch.randn_like(out))


@pytest.mark.parametrize("case", ["plain", "causal", "padded", "additive", "per-head", "rectangular"])
def test_without_dropout_equals_sdpa(case, block):
    q, k, v = inputs(keys=12 if case == "rectangular" else 9)
    mask, causal = None, case in ("causal", "rectangular")
    if case == "padded":
        mask = padding_mask()
    elif case == "additive":
        mask = torch.randn(2, 1, 9, 9, dtype=torch.float64)
    elif case == "per-head":
        mask = torch.rand(2, 3, 9, 9) > 0.3
    ours = dropout_attention(q, k, v, mask, dropout=0.0, causal=causal)
    if case == "rectangular":  # causal with a longer key cache: query i sees keys up to i + 3 (as Transformers' sdpa decides)
        mask, causal = torch.ones(9, 12, dtype=torch.bool).tril(3), False
    reference = F.scaled_dot_product_attention(q, k, v, mask, is_causal=causal)
    torch.testing.assert_close(ours, reference)
    for mine, theirs in zip(grads(ours, (q, k, v)), grads(reference, (q, k, v))):
        torch.testing.assert_close(mine, theirs)


@pytest.mark.parametrize("causal", [False, True])
def test_with_dropout_equals_the_formula_on_its_masks(causal, block, monkeypatch):
    drawn = []

    def recording(shape, p, device="cpu"):
        keep, factor = keep_mask(shape, p, device)
        drawn.append(keep)
        return keep, factor

    monkeypatch.setattr(attention, "keep_mask", recording)
    q, k, v = inputs()
    mask = None if causal else padding_mask()
    ours = dropout_attention(q, k, v, mask, dropout=0.3, causal=causal)
    keep = torch.empty(6, 9, 9, dtype=torch.bool)
    for (heads, rows), part in zip(attention._blocks(6, 9, 9), drawn, strict=True):
        keep[heads, rows] = part
    keep = keep.view(2, 3, 9, 9)
    assert 0.1 < 1 - keep.float().mean() < 0.5  # some, not all, dropped

    scores = q @ k.transpose(-1, -2) / 2.0  # dim 4: scale 1/2
    lowest = torch.finfo(scores.dtype).min
    if causal:
        scores = scores.masked_fill(~torch.ones(9, 9, dtype=torch.bool).tril(), lowest)
    else:
        scores = scores.masked_fill(~mask, lowest)
    factor = 65536 / (65536 - round(0.3 * 65536))
    reference = (torch.softmax(scores, -1) * keep * factor) @ v
    torch.testing.assert_close(ours, reference)
    for mine, theirs in zip(grads(ours, (q, k, v)), grads(reference, (q, k, v))):
        torch.testing.assert_close(mine, theirs)


def test_keep_mask_rate_scale_and_seed():
    torch.manual_seed(3)
    keep, factor = keep_mask((1000, 1000), 0.1)
    assert keep.dtype == torch.bool and keep.shape == (1000, 1000)
    assert abs(keep.float().mean().item() - 0.9) < 0.002  # 1e6 draws: the rate's standard error is 3e-4
    assert factor == pytest.approx(1 / 0.9, rel=1e-4)
    torch.manual_seed(3)
    assert torch.equal(keep_mask((1000, 1000), 0.1)[0], keep)  # the seeded generator reproduces it
    assert keep_mask((5,), 0.0)[0].all() and keep_mask((3, 7), 0.0)[1] == 1.0  # odd sizes, nothing dropped


def test_bf16_autocast_matches_fp32():
    q, k, v = inputs(batch=2, heads=2, queries=16, keys=16, dim=8, dtype=torch.float32)
    reference = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = dropout_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), dropout=0.0, causal=True)
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), reference, atol=3e-2, rtol=3e-2)
    assert all(g.dtype == torch.float32 for g in torch.autograd.grad(ours.float().sum(), (q, k, v)))
