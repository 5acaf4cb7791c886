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
    """``auto`` -> ``bf16`` on AMX/AVX512-BF16 CPUs and GPUs with bf16 tensor cores, ``fp16`` on older GPUs
    (the loop scales its loss), else ``fp32``."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if cuda_has_fast_bf16(device) else "fp16"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def cuda_has_fast_bf16(device: torch.device) -> bool:
    """True on GPUs with bf16 tensor cores: NVIDIA compute capability 8.0+ (Ampere, Ada, Hopper...), and ROCm.

    Not ``torch.cuda.is_bf16_supported()``: by default it also says True where bf16 is only emulated
    (T4, V100), and there fp16 with a gradient scaler is several times faster."""
    return bool(torch.version.hip) or torch.cuda.get_device_capability(device)[0] >= 8


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}  # what the matmuls of each precision run in


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])
