"""Fused, chunked "linear + cross-entropy": the summed token loss without the full [N, V] logits.

For hidden states ``h`` (N x H), an output layer ``W`` (V x H), ``b`` (V) and targets ``y``:

    z_i = W h_i + b,    L = sum_{i: y_i != ignore} ( logsumexp_v z_iv - z_{i,y_i} )

and, with ``g_i = softmax(z_i) - onehot(y_i)`` (zero on ignored rows),

    dL/dh = g W,    dL/dW = g^T h,    dL/db = sum_i g_i.

``F.cross_entropy(F.linear(h, W, b).float(), y, reduction="sum")`` holds N x V values several times:
the fp32 log-softmax is kept for backward, which adds its gradient and the logits' (~11 bytes per
logit at the peak: +1.17 GB for N = 2048 tokens, V = 49152 in fp32 on CPU).  Here the forward walks
over row chunks of ``h``, computes a chunk's logits, its loss and, in the same pass, ``g`` for that
chunk, which gives the chunk's rows of ``dL/dh`` and is accumulated into ``dL/dW`` and ``dL/db``;
the chunk's logits are then dropped.  What stays for backward is N x H + V x H (+ V), never N x V
(+0.27 GB in the same case); backward only scales the stored gradients by the incoming ``dL_outer/dL``.  This is Liger Kernel's
``FusedLinearCrossEntropy`` (Hsu et al. 2024) in plain PyTorch; Wijmans et al. 2024, "Cut Your
Losses in Large-Vocabulary Language Models", go further (no chunk in memory at all, in Triton).

Precision: the chunk's matmuls run in the compute dtype (the autocast dtype when autocast is on,
else the inputs' dtype), the log-sum-exp, the softmax and ``dL/db`` in fp32, ``dL/dW`` is
accumulated in fp32; gradients are returned in each input's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK_BYTES = 32 * 2**20  # fp32 logits of one chunk; see default_chunk_rows
MIN_ROWS = 256


def default_chunk_rows(vocab: int) -> int:
    """Rows per chunk: ``max(256, 32 MiB / (4 V))``, not the fewest rows memory alone would pick.

    Memory alone would favour tiny chunks, but every chunk reads ``W`` twice and reads and writes the
    fp32 ``dL/dW`` (V x H) once, while its matmuls do ``6 c V H`` flops: about ``c / 2`` flops per byte,
    so small chunks are bound by memory bandwidth.  Measured on a 2-core CPU (fp32, H = 256-576,
    V = 8k-49k): 64 rows ran 1.4-1.9x slower than 512, 256 rows within 10% of the best size.  256
    rows of a 49k vocabulary are 50 MB of fp32 logits, against 400 MB for 2048 tokens unchunked.
    """
    return max(MIN_ROWS, CHUNK_BYTES // (4 * vocab))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_rows, ignore_index, dtype, with_grad, with_correct):
        grad_h = with_grad and ctx.needs_input_grad[0]
        grad_w = with_grad and ctx.needs_input_grad[1]
        grad_b = with_grad and bias is not None and ctx.needs_input_grad[2]
        acc = torch.promote_types(dtype, torch.float32)  # log-sum-exp, softmax, dL/dW and dL/db: fp32 (fp64 in fp64)
        w = weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        # dL/dh = g @ w: CPU bf16/fp16 matmuls of two row-major operands fall back to a slow kernel (16x slower
        # than g @ w_t.T on an AVX2 CPU), so w_t = w^T is kept contiguous there, a V x H copy in the low precision
        w_t = w.T.contiguous() if grad_h and w.device.type == "cpu" and w.element_size() == 2 else None
        d_hidden = torch.empty_like(hidden) if grad_h else None
        d_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if grad_w else None
        d_bias = torch.zeros(bias.shape, dtype=acc, device=bias.device) if grad_b else None
        loss = torch.zeros((), dtype=acc, device=hidden.device)
        correct = torch.zeros((), dtype=torch.long, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], chunk_rows):
                rows = slice(start, start + chunk_rows)
                h, y = hidden[rows].to(dtype), targets[rows]
                logits = F.linear(h, w, b).to(acc)  # the only [chunk, V] fp32 tensor
                valid = y != ignore_index
                y_safe = y.masked_fill(~valid, 0).unsqueeze(1)
                lse = torch.logsumexp(logits, dim=1)
                loss += ((lse - logits.gather(1, y_safe).squeeze(1)) * valid).sum()
                if with_correct:
                    correct += ((logits.argmax(1) == y) & valid).sum()
                if not (grad_h or grad_w or grad_b):
                    continue
                # g = softmax - onehot, in place; lse = +inf on ignored rows makes their softmax exactly 0
                g = logits.sub_(lse.masked_fill(~valid, float("inf")).unsqueeze(1)).exp_()
                g.scatter_add_(1, y_safe, -valid.to(g.dtype).unsqueeze(1))
                if grad_b:
                    d_bias += g.sum(0)
                g = g.to(dtype)
                if grad_h:
                    d_hidden[rows] = g @ w if w_t is None else F.linear(g, w_t)
                if grad_w and dtype == acc:
                    d_weight.addmm_(g.T, h)  # in place: no V x H temporary per chunk
                elif grad_w:
                    d_weight.add_(g.T @ h)  # bf16 product, fp32 sum (CPU has no bf16 -> fp32 addmm)
        ctx.mark_non_differentiable(correct)
        ctx.save_for_backward(d_hidden, d_weight, d_bias)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return loss, correct

    @staticmethod
    def backward(ctx, grad_loss, grad_correct):
        grads = [None if d is None else (d * grad_loss).to(dt) for d, dt in zip(ctx.saved_tensors, ctx.dtypes)]
        return *grads, None, None, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor, *,
                         chunk_rows: int | None = None, ignore_index: int = -100, with_correct: bool = False):
    """``F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, reduction="sum", ignore_index=...)``
    computed chunk by chunk (see the module docstring); ``hidden`` is N x H, ``targets`` N.

    ``chunk_rows`` defaults to :func:`default_chunk_rows`.  With ``with_correct`` it returns
    ``(loss, correct)``, ``correct`` the number of non-ignored rows whose argmax is the target.
    Under autocast the matmuls run in the autocast dtype; a frozen ``weight`` or ``bias`` or a
    ``hidden`` without grad skips that gradient, and under ``torch.no_grad`` no gradient is computed.
    """
    device = hidden.device.type
    autocast = torch.is_autocast_enabled(device)
    dtype = torch.get_autocast_dtype(device) if autocast else torch.promote_types(hidden.dtype, weight.dtype)
    rows = max(1, chunk_rows or default_chunk_rows(weight.shape[0]))
    loss, correct = _LinearCrossEntropy.apply(hidden, weight, bias, targets, rows, ignore_index, dtype,
                                              torch.is_grad_enabled(), with_correct)
    return (loss, correct) if with_correct else loss
