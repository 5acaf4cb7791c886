"""Model FLOPs and the hardware peak they are compared with (model-FLOPs utilisation, MFU).

Training FLOPs of a transformer per token follow Kaplan et al. 2020 / PaLM (Chowdhery et al.
2022, appendix B): ``6 N`` for the weight matmuls of the forward and backward passes, plus
``12 L H T`` for attention scores and values, where N counts non-embedding parameters.  The
output projection (``H x V``) costs ``6 H V`` per *predicted* token, so MLM counts it only at
masked positions.  The peak is measured, not looked up: the best rate of a large GEMM in the
training precision on this machine, in this process.
"""

from __future__ import annotations

import time

import torch


def transformer_training_flops(config, tokens: int, seq_len: int, predicted: int, body: bool = True) -> float:
    """Forward + backward model FLOPs of a transformer step; ``body=False``: the body runs forward only (a new head
    warming up alone), the head's backward still reaches its input."""
    hidden = config.hidden_size
    layers = config.num_hidden_layers
    inner = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    gated = getattr(config, "model_type", "") in ("llama", "mistral", "qwen2")
    per_layer = 4 * hidden * hidden + (3 if gated else 2) * hidden * inner
    attention = 12 * layers * hidden * seq_len  # per token, forward + backward
    if not body:
        return 2.0 * layers * per_layer * tokens + attention / 3 * tokens + 4.0 * hidden * config.vocab_size * predicted
    return 6.0 * layers * per_layer * tokens + attention * tokens + 6.0 * hidden * config.vocab_size * predicted


def measure_peak(dtype: torch.dtype, device: torch.device, size: int | None = None, seconds: float = 0.5) -> float:
    """Best observed FLOP/s of a ``size x size`` matmul in ``dtype`` on ``device`` (default size: 2048 on a CPU,
    8192 on a GPU, where a 2048 matmul takes tens of microseconds and launch overhead would hide the peak)."""
    size = size or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    best = 0.0
    a @ b  # warm-up
    end = time.perf_counter() + seconds
    while best == 0.0 or time.perf_counter() < end:  # at least one timed matmul, however slow the machine
        best = max(best, 2 * size**3 / (_cuda_seconds(a, b) if device.type == "cuda" else _seconds(a, b)))
    return best


def _seconds(a: torch.Tensor, b: torch.Tensor) -> float:
    start = time.perf_counter()
    a @ b
    return time.perf_counter() - start


def _cuda_seconds(a: torch.Tensor, b: torch.Tensor) -> float:
    """GPU time of one matmul, from CUDA events (the host's clock would add launch and synchronisation time)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    a @ b
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def forward_flops(module: torch.nn.Module, batch: dict[str, torch.Tensor], phases: dict | None = None) -> float:
    """FLOPs of one forward pass of ``module`` on ``batch`` (every phase of a multi-phase task), counted by PyTorch."""
    from torch.utils.flop_counter import FlopCounterMode  # only image / vector tasks count FLOPs this way

    device = next(module.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    was_training = module.training
    module.eval()  # no batch-norm statistics update from this extra pass
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        for phase in phases or [None]:
            module(batch, phase) if phase else module(batch)
    module.train(was_training)
    return float(counter.get_total_flops())
