"""Mixed precision: bf16 autocast where the hardware makes it fast, fp32 elsewhere."""

from __future__ import annotations

import contextlib

import torch


def cpu_has_fast_bf16() -> bool:
    """True on CPUs with AVX512-BF16 or AMX (bf16 matmuls several times faster than fp32)."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags


def resolve(precision: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` on AMX/AVX512-BF16 CPUs and bf16-capable GPUs, else ``fp32``."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
