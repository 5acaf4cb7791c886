"""``benchmarks/gpu_check.py`` without a GPU: the datasheet peak table, the command line, the one-line exit when
no GPU is visible, and the correctness verdict on hand-made runs.  The whole ``--dry-run-cpu`` flow takes 5.5
minutes on the 2-core development machine (three tiny trainings, four benchmark runs), too long for a unit test;
it is run by hand: ``flock /tmp/pretune-heavy.lock sh benchmarks/gpu_check.sh --dry-run-cpu``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import gpu_check  # noqa: E402


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", (989.0, 989.0)), ("NVIDIA H100 PCIe", (756.0, 756.0)), ("NVIDIA H100 NVL", (835.0, 835.0)),
    ("NVIDIA A100-SXM4-80GB", (312.0, 312.0)), ("NVIDIA A100 80GB PCIe", (312.0, 312.0)), ("NVIDIA A10", (125.0, 125.0)),
    ("NVIDIA L4", (121.0, 121.0)), ("NVIDIA L40S", (362.0, 362.0)), ("NVIDIA GeForce RTX 4090", (165.0, 165.0)),
    ("NVIDIA GeForce RTX 3090", (71.0, 71.0)), ("Tesla T4", (None, 65.0)), ("Tesla V100-SXM2-16GB", (None, 125.0)),
    ("Tesla V100-PCIE-32GB", (None, 112.0)), ("NVIDIA GH200 480GB", (989.0, 989.0)),
])
def test_known_gpus_have_their_datasheet_peak(name, peak):
    assert gpu_check.expected_peak(name) == peak


@pytest.mark.parametrize("name", ["NVIDIA A10G", "NVIDIA GeForce RTX 3090 Ti", "NVIDIA B200", "AMD Instinct MI300X", "x86_64"])
def test_other_devices_are_unknown_not_a_near_miss(name):
    assert gpu_check.expected_peak(name) is None


def test_arguments(monkeypatch):
    monkeypatch.delenv("PRETUNE_GPU_CHECK_DRY_RUN", raising=False)
    args = gpu_check.parse_args([])
    assert (args.dry_run_cpu, args.parts, args.steps) == (False, "device,correctness,speed", None)
    assert gpu_check.parse_args(["--dry-run-cpu", "--parts", "speed", "--steps", "8"]).steps == 8
    monkeypatch.setenv("PRETUNE_GPU_CHECK_DRY_RUN", "1")
    assert gpu_check.parse_args([]).dry_run_cpu
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--parts", "device,speeed"])


def test_without_a_gpu_it_exits_with_one_line(monkeypatch):
    monkeypatch.delenv("PRETUNE_GPU_CHECK_DRY_RUN", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_:
        gpu_check.main([])
    assert str(exit_.value).startswith("gpu_check: no CUDA GPU visible") and "\n" not in str(exit_.value)


def run(weights: dict[str, torch.Tensor], loss=(9.0, 8.5), grad_norm=(3.0, 2.5)) -> dict:
    return {"loss": list(loss), "grad_norm": list(grad_norm), "weights": weights}


def test_the_verdict_passes_rounding_and_fails_a_wrong_update():
    torch.manual_seed(0)
    lr = gpu_check.LR
    weights = {"embeddings": torch.randn(8000, 128), "norm.bias": torch.randn(128)}
    reference = run(weights)
    rounding = {k: v * (1 + 1e-7 * torch.randn_like(v)) for k, v in weights.items()}
    rounding["embeddings"][5, 7] += 2 * lr  # one weight whose gradient sat at the rounding level: its update flipped
    assert gpu_check.compare(reference, run(rounding, loss=(9.0000001, 8.5), grad_norm=(3.0, 2.5000002)))["pass"]
    wrong = {**weights, "norm.bias": weights["norm.bias"] + lr * torch.randn(128).sign()}  # one tensor, one step off
    verdict = gpu_check.compare(reference, run(wrong))
    assert not verdict["pass"] and verdict["worst"] == "norm.bias"
    assert not gpu_check.compare(reference, run(weights, grad_norm=(3.0, 2.7)))["pass"]  # a gradient off by 8%
    assert not gpu_check.compare(reference, run({"embeddings": weights["embeddings"]}))["pass"]  # a tensor missing
