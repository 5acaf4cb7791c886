"""The chunked linear + cross-entropy against the naive ``F.cross_entropy(F.linear(h, W, b).float())``."""

import pytest
import torch
import torch.nn.functional as F

from pretune.trainer.linear_ce import default_chunk_rows, linear_cross_entropy

N, H, V = 37, 16, 50


def inputs(dtype=torch.float64, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=dtype, requires_grad=True)
    weight = torch.randn(V, H, generator=g, dtype=dtype).mul_(0.5).requires_grad_()
    b = torch.randn(V, generator=g, dtype=dtype, requires_grad=True) if bias else None
    targets = torch.randint(V, (N,), generator=g)
    targets[::4] = -100  # ignored rows, in every chunk
    return hidden, weight, b, targets


def loss_and_grads(fn, hidden, weight, bias, targets):
    """The loss and the gradients of every leaf that requires them (None for the others)."""
    leaves = [t for t in (hidden, weight, bias) if t is not None]
    for t in leaves:
        t.grad = None
    loss = fn(hidden, weight, bias, targets)
    loss.backward()
    return loss.detach(), [t.grad for t in leaves]


def naive(hidden, weight, bias, targets):
    logits = F.linear(hidden, weight, bias)
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets, reduction="sum")


def chunked(chunk_rows):
    return lambda *args: linear_cross_entropy(*args, chunk_rows=chunk_rows)


def assert_same(a, b, **tol):
    torch.testing.assert_close(a[0], b[0], **tol)
    for x, y in zip(a[1], b[1]):
        if y is None:
            assert x is None
        else:
            torch.testing.assert_close(x, y, **tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize("chunk_rows", [1, 8, 36, 100])  # 8 and 36 do not divide 37; 100 is one chunk
def test_loss_and_gradients_equal_naive(dtype, tol, chunk_rows):
    args = inputs(dtype)
    assert_same(loss_and_grads(chunked(chunk_rows), *args), loss_and_grads(naive, *args), rtol=tol, atol=tol)


def test_without_bias():
    args = inputs(bias=False)
    assert_same(loss_and_grads(chunked(8), *args), loss_and_grads(naive, *args), rtol=1e-10, atol=1e-10)


def test_all_rows_ignored_gives_zero_loss_and_gradients():
    hidden, weight, bias, targets = inputs()
    loss, grads = loss_and_grads(chunked(8), hidden, weight, bias, torch.full_like(targets, -100))
    assert loss == 0 and all(not g.any() for g in grads)


def test_weight_tied_to_input_embedding_gets_both_gradients():
    ids = torch.randint(V, (N,), generator=torch.Generator().manual_seed(1))
    targets = torch.roll(ids, -1)
    results = []
    for fn in (naive, chunked(8)):
        torch.manual_seed(0)
        embedding = torch.nn.Embedding(V, H, dtype=torch.float64)
        hidden = torch.tanh(embedding(ids))  # the same Parameter earlier in the graph
        fn(hidden, embedding.weight, None, targets).backward()
        results.append(embedding.weight.grad)
    torch.testing.assert_close(results[0], results[1], rtol=1e-10, atol=1e-10)


def test_frozen_weight_and_hidden_without_grad():
    hidden, weight, bias, targets = inputs()
    weight.requires_grad_(False)
    assert_same(loss_and_grads(chunked(8), hidden, weight, bias, targets), loss_and_grads(naive, hidden, weight, bias, targets),
                rtol=1e-10, atol=1e-10)
    assert weight.grad is None
    weight.requires_grad_(True)
    hidden = hidden.detach()
    assert_same(loss_and_grads(chunked(8), hidden, weight, bias, targets), loss_and_grads(naive, hidden, weight, bias, targets),
                rtol=1e-10, atol=1e-10)


def test_cpu_bf16_autocast_matches_autocast_naive_and_keeps_input_dtypes():
    args = inputs(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = loss_and_grads(chunked(8), *args)
        reference = loss_and_grads(naive, *args)
    assert ours[0].dtype == torch.float32 and all(g.dtype == torch.float32 for g in ours[1])
    # same bf16 logits on both sides; gradients differ by bf16 rounding (~0.4%) of g and its products
    torch.testing.assert_close(ours[0], reference[0], rtol=1e-3, atol=1e-3)
    for x, y in zip(ours[1], reference[1]):
        torch.testing.assert_close(x, y, rtol=2e-2, atol=2e-2 * y.abs().max().item())


def test_no_grad_and_correct_count():
    hidden, weight, bias, targets = inputs()
    with torch.no_grad():
        loss, correct = linear_cross_entropy(hidden, weight, bias, targets, chunk_rows=8, with_correct=True)
        logits = F.linear(hidden, weight, bias)
    torch.testing.assert_close(loss, naive(hidden, weight, bias, targets).detach(), rtol=1e-10, atol=1e-10)
    assert correct == ((logits.argmax(-1) == targets) & (targets != -100)).sum()


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(2)
    shapes = ((5, 3), (7, 3), (7,))
    hidden, weight, bias = (torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True) for shape in shapes)
    targets = torch.tensor([1, -100, 6, 0, 3])
    assert torch.autograd.gradcheck(lambda h, w, b: linear_cross_entropy(h, w, b, targets, chunk_rows=2), (hidden, weight, bias))


def test_default_chunk_rows():
    assert default_chunk_rows(49152) == default_chunk_rows(128256) == 256  # at least 256 rows: the matmuls stay efficient
    assert default_chunk_rows(8000) * 8000 * 4 <= 32 * 2**20 < (default_chunk_rows(8000) + 1) * 8000 * 4


def grads_in_mode(module, batch, key, training):
    module.train(training)
    module.zero_grad()
    out = module(batch)
    out[key].backward()
    return out, {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def check_task_uses_chunked_loss_in_training(module, batch, key, monkeypatch, task_module):
    """Training (chunked) and evaluation (full logits) give the same loss and gradients; dropout is 0."""
    calls = []
    monkeypatch.setattr(task_module, "linear_cross_entropy", lambda *a, **k: calls.append(1) or linear_cross_entropy(*a, **k))
    train, train_grads = grads_in_mode(module, batch, key, True)
    evaluation, eval_grads = grads_in_mode(module, batch, key, False)
    assert len(calls) == 1  # training only
    torch.testing.assert_close(train[key], evaluation[key], rtol=1e-5, atol=1e-5)
    assert train_grads.keys() == eval_grads.keys()
    for name in train_grads:
        torch.testing.assert_close(train_grads[name], eval_grads[name], rtol=1e-4, atol=1e-5, msg=name)
    return train, evaluation


def test_causal_lm_training_loss_is_the_chunked_one_with_the_tied_head(monkeypatch):
    from transformers import GPT2Config, GPT2LMHeadModel

    from pretune.tasks import clm
    from pretune.tasks.clm import CausalLM

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=300, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    module = CausalLM(GPT2LMHeadModel(config))
    assert module.head.weight is module.model.get_input_embeddings().weight
    train, _ = check_task_uses_chunked_loss_in_training(module, {"input_ids": torch.randint(0, 300, (3, 20))}, "clm",
                                                        monkeypatch, clm)
    assert "clm_correct" not in train


def test_masked_lm_training_loss_is_the_chunked_one(monkeypatch):
    from transformers import BertConfig, BertForMaskedLM

    from pretune.tasks import mlm
    from pretune.tasks.mlm import MaskedLM

    torch.manual_seed(0)
    config = BertConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    ids = torch.randint(5, 300, (3, 20))
    labels = torch.where(torch.rand(ids.shape) < 0.3, ids, -100)
    train, evaluation = check_task_uses_chunked_loss_in_training(MaskedLM(BertForMaskedLM(config), nsp=False),
                                                                 {"input_ids": ids, "labels": labels}, "mlm", monkeypatch, mlm)
    assert train["mlm_correct"] == evaluation["mlm_correct"]
