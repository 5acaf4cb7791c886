"""The cheap CPU dropout is dropout: keep rate, scaling, gradients, attention equal to SDPA's math."""

import pytest
import torch
import transformers
from torch import nn

from pretune.trainer import fast
from pretune.trainer.attention import keep_mask
from pretune.trainer.fast import FastDropout, attention, fast_dropout, speed_up


def test_fast_dropout_keeps_1_minus_p_and_scales():
    torch.manual_seed(0)
    x = torch.ones(200_000, requires_grad=True)
    y = fast_dropout(x, 0.1)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.9) < 0.005  # 6 standard deviations: sqrt(.09 / 2e5) = 0.00067
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / 0.9))
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() / 0.9)  # gradient only through kept elements, scaled
    assert fast_dropout(x, 0.1, training=False) is x and fast_dropout(x, 0.0) is x
    torch.manual_seed(1)
    a = fast_dropout(x, 0.3)
    torch.manual_seed(1)
    assert torch.equal(a, fast_dropout(x, 0.3))  # seeded: reproducible, so resumable


def attention_module(causal: bool) -> nn.Module:
    module = nn.Module()
    module.is_causal = causal
    return module


@pytest.mark.parametrize("blocked", [False, True], ids=["short", "blocked"])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_is_sdpa_math_with_the_mask_it_drew(causal, blocked, monkeypatch):
    if blocked:  # long sequences take trainer/attention.py's blocked path; one block here, so the same mask stream
        monkeypatch.setattr(fast, "BLOCKED_FROM", 1)
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4) for _ in range(3))
    # no dropout: Transformers' own SDPA function, unchanged
    out, _ = attention(attention_module(causal), q, k, v, None, dropout=0.0)
    expected = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal).transpose(1, 2)
    torch.testing.assert_close(out, expected)
    # dropout: softmax(q k^T / sqrt(d)) with the same kept entries, scaled, times v
    torch.manual_seed(5)
    out, _ = attention(attention_module(causal), q, k, v, None, dropout=0.5)
    torch.manual_seed(5)
    kept, factor = keep_mask((2, 3, 5, 5), 0.5)
    keep = kept.float() * factor
    scores = q @ k.transpose(-1, -2) / 2
    if causal:
        scores = scores.masked_fill(~torch.ones(5, 5, dtype=torch.bool).tril(), float("-inf"))
    torch.testing.assert_close(out, ((scores.softmax(-1) * keep) @ v).transpose(1, 2))
    # a boolean padding mask (True = attend), as Transformers builds for SDPA
    mask = torch.tensor([True, True, True, False, False]).expand(2, 1, 5, 5)
    out, _ = attention(attention_module(False), q, k, v, mask, dropout=0.0)
    torch.testing.assert_close(out, nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2))
    torch.manual_seed(5)
    out, _ = attention(attention_module(False), q, k, v, mask, dropout=0.5)
    assert torch.isfinite(out).all()
    torch.manual_seed(5)
    masked = (q @ k.transpose(-1, -2) / 2).masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(out, ((masked.softmax(-1) * keep) @ v).transpose(1, 2))


def test_speed_up_changes_training_noise_only():
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32)
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(config).eval()
    ids = torch.randint(0, 50, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, 5:] = 0  # padding goes through the mask path
    before = model(input_ids=ids, attention_mask=mask).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    speed_up(model, torch.device("cpu"))
    assert not any(type(m) is nn.Dropout for m in model.modules())
    assert sum(isinstance(m, FastDropout) for m in model.modules()) == 2 * 3 + 1  # embeddings + 3 per layer
    assert model.config._attn_implementation == "pretune"
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, before)  # eval: identical
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    model.train()
    torch.manual_seed(0)
    a = model(input_ids=ids, attention_mask=mask).logits
    torch.manual_seed(0)
    assert torch.equal(a, model(input_ids=ids, attention_mask=mask).logits) and not torch.allclose(a, before)
    a.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.bert.encoder.parameters())


def test_speed_up_leaves_other_devices_alone():
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1))
    speed_up(model, torch.device("meta"))
    assert type(model[1]) is nn.Dropout
