"""The scaling benchmark's plumbing (``benchmarks/bench_scaling.py``) without running a model: the plan covers
every size pretune builds for it, each cell calls the right benchmark with the right shape, and the table
divides the right numbers.  Its real runs take over an hour; their output is in ``BENCHMARKS.md``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_scaling  # noqa: E402
import common  # noqa: E402

from pretune.backbones.transformers import SIZES  # noqa: E402


def test_the_plan_uses_pretunes_size_presets_and_whole_batches():
    assert set(bench_scaling.PLAN) <= set(SIZES)
    for plan in bench_scaling.PLAN.values():
        assert plan["tokens"] % 512 == 0 and plan["warmup"] < plan["steps"]


def fake_run(rows_by_contender, finetune=False):
    def run(command, check):
        out = Path(command[command.index("--out") + 1])
        rows = [{"contender": name, "precision": "fp32", "mfu": 0.5, "min": speed * 0.9, "max": speed * 1.1,
                 "pretune_speedup": 1.0, "peak_rss_mb": 1000.0, "foreign_load": 0.01,
                 **({"samples_per_s": speed, "real_length": 40.0, "padded_length": 60.0,
                     "runs": [{"samples_per_s": speed * f, "real_length": 40.0} for f in (0.9, 1.1)]}
                    if finetune else {"tokens_per_s": speed})}
                for name, speed in rows_by_contender.items()]
        out.write_text(json.dumps({"rows": rows}))
        run.command = command
    return run


def test_a_pretraining_cell_scales_the_batch_to_the_plan(monkeypatch, tmp_path):
    run = fake_run({"hf-fp32": 1000.0, "pretune": 1500.0})
    monkeypatch.setattr(bench_scaling.subprocess, "run", run)
    rows = bench_scaling.cell("clm", "base", 512, 2, "hf-fp32", tmp_path / "c.json")
    command = run.command
    assert Path(command[1]).name == "bench_pretrain.py"
    assert command[command.index("--workloads") + 1] == "clm512"
    assert int(command[command.index("--batch") + 1]) * 512 == bench_scaling.PLAN["base"]["tokens"]
    assert command[command.index("--contenders") + 1] == "hf-fp32,pretune"
    assert {r["contender"]: r["tokens_per_s"] for r in rows} == {"hf-fp32": 1000.0, "pretune": 1500.0}
    table = bench_scaling.table({"date": "now", "repeats": 2, "trainer": "hf-fp32", "rows": rows})
    assert "| clm | L12/H768 | 512 | 1500 | 1000 | **1.50×** (1.23–1.83) |" in table


def test_a_fine_tuning_cell_compares_real_tokens(monkeypatch, tmp_path):
    monkeypatch.setattr(bench_scaling.subprocess, "run", fake_run({"hf-fp32": 10.0, "pretune": 25.0}, finetune=True))
    rows = bench_scaling.cell("finetune", "mini", 128, 3, "hf-fp32", tmp_path / "c.json")
    assert {r["contender"]: r["tokens_per_s"] for r in rows} == pytest.approx({"hf-fp32": 400.0, "pretune": 1000.0})
    table = bench_scaling.table({"date": "now", "repeats": 3, "trainer": "hf-fp32", "rows": rows})
    assert "| 1000 | 400 | **2.50×** (2.05–3.06) |" in table  # each run's real tokens/s, not its samples/s


def test_peaks_are_measured_only_for_the_precisions_in_use(monkeypatch):
    from pretune.trainer import flops

    measured = []
    monkeypatch.setattr(flops, "measure_peak", lambda dtype, device, size=None, seconds=0.5: measured.append(dtype) or 1e11)
    monkeypatch.setattr("pretune.trainer.precision.resolve", lambda name, device: "fp32")
    assert common.gemm_peaks(["fp32", "auto"]) == {"fp32": 1e11}
    assert measured == [torch.float32]
    assert common.peaks_text({"peak_gflops": {"fp32": 132.4, "bf16": 425.0}}) == "GEMM peak fp32 132 / bf16 425 GFLOP/s"
