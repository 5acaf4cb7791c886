"""pretune on one GPU in under 10 minutes: the device, whether DDP and FSDP train exactly like one process,
and tokens/s and MFU against the Hugging Face Trainer.

    bash benchmarks/gpu_check.sh                 # from the repo root, after the README's setup, with one NVIDIA GPU
    bash benchmarks/gpu_check.sh --dry-run-cpu   # the same flow on the CPU at tiny sizes: checks this script only

1. Device: name, compute capability, SMs, memory; the dense bf16 / fp16 tensor-core peak of its datasheet
   (:data:`PEAKS`, "unknown" for GPUs not in the table) and the measured bf16 peak of 8192 x 8192 matmuls
   timed with CUDA events (:func:`pretune.trainer.flops.measure_peak`).
2. Correctness: a tiny MLM (BERT L2/H128, fp32, dropout off, AdamW, no warm-up) trained for a few steps as one
   process with ``trainer.batch_size=8``, then under ``torchrun --nproc_per_node 1`` with ``trainer.distributed=ddp``
   and ``=fsdp`` and ``batch_size=4 accumulate=2``: the same 8 examples per optimizer step with the same masks
   (pretune seeds them per example) and every loss a sum divided by the window's unit count.  So the runs
   differ only in the order of fp32 additions (two micro-batches of 4 against one of 8; FSDP's fp32
   reduce-scatter): a few ulps per gradient, relative ~1e-6.  PASS when at every step the loss and the
   pre-clipping gradient norm agree within a relative ``1e-4`` (a gradient scaled wrongly, e.g. a mean per
   micro-batch instead of per window, is off by ~10% or more; AdamW itself would hide a uniform scale), and in
   every weight tensor the root-mean-square difference of the final weights is at most ``0.05 * lr``.  AdamW
   moves each weight by about lr per step whatever the gradient's size, so a wrong gradient, a lost reduction
   or a skipped update of a tensor in one step differs by ~lr over that tensor; rounding moves each weight by
   ~1e-6 lr per step, and a rare weight whose gradient is itself at the rounding level (its sign a coin toss)
   by up to 2 lr: a root mean square, not a maximum, lets those few through (both are printed).
3. Speed: ``bench_pretrain.py --device cuda`` on its ``mlm`` (seq 128, batch 32), ``mlm512`` (seq 512, batch 8)
   and ``clm`` (GPT-2, seq 256, batch 16) workloads (BERT / GPT-2 L4/H256), pretune (``precision=auto``: bf16
   on GPUs with bf16 tensor cores) against the Trainer with ``bf16=True`` (both fp16 on older GPUs), same model
   and packed data, steady-state tokens/s after a warm-up, MFU against the measured and the datasheet peak.

Exits 1 with one line when no CUDA GPU is visible, 2 when a correctness check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_pretrain import WORKLOADS, build_data, model_overrides
from common import bench_env, torchrun

HERE = Path(__file__).resolve().parent
# Datasheet dense tensor-core TFLOP/s (no sparsity) with fp32 accumulation, what PyTorch's matmuls use
# (GeForce cards run fp16 at twice these with fp16 accumulation): (name pattern, bf16, fp16); bf16 None =
# no bf16 tensor cores.  First match wins, so specific variants come before the family.
PEAKS = [
    (r"GH200|H200", 989.0, 989.0), (r"H100.*PCIe", 756.0, 756.0), (r"H100.*NVL", 835.0, 835.0), (r"H100", 989.0, 989.0),
    (r"A100", 312.0, 312.0), (r"\bA30\b", 165.0, 165.0), (r"\bA10\b", 125.0, 125.0), (r"L40S", 362.0, 362.0),
    (r"\bL40\b", 181.0, 181.0), (r"\bL4\b", 121.0, 121.0), (r"RTX A6000", 155.0, 155.0), (r"RTX 4090", 165.0, 165.0),
    (r"RTX 3090(?! Ti)", 71.0, 71.0), (r"V100.*PCIE", None, 112.0), (r"V100", None, 125.0), (r"\bT4\b", None, 65.0),
]
LOSS_RTOL, NORM_RTOL, WEIGHT_RMS = 1e-4, 1e-4, 0.05  # see the module doc; weights: RMS per tensor <= WEIGHT_RMS * lr
LR = 5e-4


def expected_peak(name: str) -> tuple[float | None, float | None] | None:
    """``(bf16, fp16)`` datasheet TFLOP/s of the GPU called ``name`` (``torch.cuda.get_device_name``), None if unknown."""
    for pattern, bf16, fp16 in PEAKS:
        if re.search(pattern, name, re.IGNORECASE):
            return bf16, fp16
    return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run-cpu", action="store_true", default=os.environ.get("PRETUNE_GPU_CHECK_DRY_RUN") == "1",
                        help="run the same flow on the CPU at tiny sizes (checks the script; the numbers mean nothing)")
    parser.add_argument("--parts", default="device,correctness,speed", help="comma-separated subset of device, correctness, speed")
    parser.add_argument("--steps", type=int, default=None, help="speed: steps per run (default 200 on a GPU, 4 dry)")
    parser.add_argument("--out", default=None, help="results JSON (default results/gpu-check.json; a temporary file dry)")
    args = parser.parse_args(argv)
    unknown = set(args.parts.split(",")) - {"device", "correctness", "speed"}
    if unknown:
        parser.error(f"--parts: unknown {', '.join(sorted(unknown))}; choose from device, correctness, speed")
    return args


def device_report(dry: bool) -> dict:
    import platform

    import torch

    from pretune.trainer.flops import measure_peak

    if dry:
        device, name = torch.device("cpu"), platform.processor() or platform.machine()
        info = {"name": name, "cores": os.cpu_count()}
        measured = measure_peak(torch.bfloat16, device, size=512, seconds=0.2)
    else:
        device = torch.device("cuda")
        props = torch.cuda.get_device_properties(device)
        info = {"name": props.name, "capability": f"{props.major}.{props.minor}", "sms": props.multi_processor_count,
                "memory_gb": round(props.total_memory / 2**30, 1)}
        measured = measure_peak(torch.bfloat16, device, seconds=1.0)
        torch.cuda.empty_cache()
    peak = expected_peak(info["name"])
    info.update(datasheet_bf16_tflops=peak and peak[0], datasheet_fp16_tflops=peak and peak[1],
                measured_bf16_tflops=round(measured / 1e12, 2), torch=torch.__version__, cuda=torch.version.cuda)
    print("device:  " + ", ".join(f"{k} {v}" for k, v in info.items() if not k.startswith(("datasheet", "measured"))))
    datasheet = ("unknown (not in gpu_check.PEAKS)" if peak is None else
                 f"bf16 {peak[0] or 'none (no bf16 tensor cores)'} / fp16 {peak[1]} TFLOP/s dense")
    print(f"peak:    datasheet {datasheet}; measured bf16 GEMM {measured / 1e12:.3g} TFLOP/s"
          + (f" ({measured / 1e12 / peak[0]:.0%} of the datasheet)" if peak and peak[0] else ""))
    return info


# -- 2. correctness --------------------------------------------------------------------------------

def correctness(work: Path, dry: bool, env: dict) -> dict:
    """One process (batch 8) against torchrun DDP and FSDP (batch 4 x accumulate 2); see the module doc."""
    import datasets

    datasets.disable_progress_bars()
    steps = 4 if dry else 20
    data_dir = build_data("mlm", work / "data")
    common = [*model_overrides(WORKLOADS["mlm"]), f"data.tokenizer.path={data_dir / 'tokenizer'}", "backbone.size=tiny",
              "data.block_size=64", "backbone.config.hidden_dropout_prob=0.0", "backbone.config.attention_probs_dropout_prob=0.0",
              "trainer.precision=fp32", f"trainer.max_steps={steps}", "trainer.log_every=1", "trainer.progress=false",
              "trainer.tensorboard=false", f"trainer.save_every={steps + 1}", "trainer.warmup=0", f"trainer.lr={LR}"]
    runs = {"1 process, batch 8": ([__file__, "--child"], ["trainer.batch_size=8", "trainer.accumulate=1"])}
    for kind in ("ddp", "fsdp"):
        runs[f"torchrun {kind}, 4 x 2"] = (torchrun(1, __file__, ["--child"]),
                                           ["trainer.batch_size=4", "trainer.accumulate=2", f"trainer.distributed={kind}"])
    found = {}
    for name, (launch, layout) in runs.items():
        run_dir = work / "runs" / re.sub(r"\W+", "-", name)
        started = time.time()
        done = subprocess.run([sys.executable, *launch, *common, *layout, f"run_dir={run_dir}"], env=env, capture_output=True, text=True)
        if done.returncode != 0:
            last = next((line for line in reversed(done.stderr.splitlines()) if line.strip()), f"exit {done.returncode}")
            found[name] = {"error": last.strip()[:300]}
        else:
            found[name] = read_run(run_dir)
        print(f"  {name}: {'failed: ' + found[name]['error'] if 'error' in found[name] else 'trained'} ({time.time() - started:.0f}s)",
              flush=True)
    reference = next(iter(found))
    checks = {}
    for name in list(found)[1:]:
        broken = next((run for run in (found[reference], found[name]) if "error" in run), None)
        checks[name] = compare(found[reference], found[name]) if broken is None else {"pass": False, **broken}
        verdict = checks[name]
        detail = verdict.get("error") or (f"loss rel {verdict['loss_rel']:.1e} (<= {LOSS_RTOL:g}), grad norm rel {verdict['norm_rel']:.1e} "
                                         f"(<= {NORM_RTOL:g}), weights RMS {verdict['weight_rms']:.1e} in {verdict['worst']} "
                                         f"(<= {WEIGHT_RMS * LR:.1e}), max abs {verdict['weight_abs']:.1e}")
        print(f"{'PASS' if verdict['pass'] else 'FAIL'}: {name} vs {reference}: {detail}")
    return checks


def read_run(run_dir: Path) -> dict:
    """Per-step training loss and gradient norm (metrics.jsonl), and the final weights (model/*.safetensors)."""
    from safetensors.torch import load_file

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    weights = {}
    for path in sorted((run_dir / "model").glob("*.safetensors")):
        weights.update(load_file(str(path)))
    return {"loss": [r["loss"] for r in train], "grad_norm": [r["grad_norm"] for r in train], "weights": weights}


def relative(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b, strict=True))


def compare(reference: dict, other: dict) -> dict:
    """The largest relative difference of the per-step losses and gradient norms, and of the final weights the
    largest root-mean-square difference of a tensor (``worst``) and the largest absolute one."""
    if set(reference["weights"]) != set(other["weights"]) or len(reference["loss"]) != len(other["loss"]):
        return {"pass": False, "error": "the runs saved different weights or logged different steps"}
    loss_rel, norm_rel = relative(reference["loss"], other["loss"]), relative(reference["grad_norm"], other["grad_norm"])
    differences = {k: reference["weights"][k].double() - other["weights"][k].double() for k in reference["weights"]}
    rms = {k: float(d.square().mean().sqrt()) for k, d in differences.items()}
    worst = max(rms, key=rms.get)
    return {"pass": loss_rel <= LOSS_RTOL and norm_rel <= NORM_RTOL and rms[worst] <= WEIGHT_RMS * LR,
            "loss_rel": loss_rel, "norm_rel": norm_rel, "weight_rms": rms[worst], "worst": worst,
            "weight_abs": max(float(d.abs().max()) for d in differences.values())}


# -- 3. speed ---------------------------------------------------------------------------------------

def speed(work: Path, dry: bool, steps: int | None, env: dict, info: dict) -> list[dict]:
    """bench_pretrain.py on this device: pretune against the Trainer, one repetition per workload."""
    from pretune.trainer.precision import cuda_has_fast_bf16

    if dry:  # bf16 only where this CPU has bf16 matmuls (an AVX2 CPU emulates them ~500x slower than fp32)
        from pretune.trainer.precision import cpu_has_fast_bf16

        hf = "hf-bf16" if cpu_has_fast_bf16() else "hf-fp32"
        device, workloads, steps, warmup, extra = "cpu", "mlm,clm", steps or 4, 1, ["--peak-size", "256"]
    else:
        import torch

        hf = "hf-bf16" if cuda_has_fast_bf16(torch.device("cuda")) else "hf-fp16"
        device, workloads, steps, warmup, extra = "cuda", "mlm,mlm512,clm", steps or 200, 20, []
    out = work / "pretrain.json"
    command = [sys.executable, str(HERE / "bench_pretrain.py"), "--device", device, "--workloads", workloads, "--contenders",
               f"{hf},pretune", "--repeats", "1", "--steps", str(steps), "--warmup", str(warmup), "--out", str(out), *extra]
    done = subprocess.run(command, env=env, cwd=HERE.parent)
    if done.returncode != 0:
        sys.exit(f"gpu_check: bench_pretrain.py failed (exit {done.returncode}); its output is above")
    report = json.loads(out.read_text())
    datasheet = {"bf16": info.get("datasheet_bf16_tflops"), "fp16": info.get("datasheet_fp16_tflops")}
    rows = []
    print(f"\n{'workload':10} {'seq':>4}  {'contender':18} {'tokens/s':>10}  {'MFU measured':>12}  {'MFU datasheet':>13}  pretune ÷")
    for r in report["rows"]:
        peak = report["peak_gflops"][r["precision"]]
        sheet = datasheet.get(r["precision"])
        mfu_sheet = r["mfu"] * peak / (sheet * 1e3) if sheet else None
        rows.append({**r, "mfu_datasheet": mfu_sheet})
        print(f"{r['workload']:10} {r['seq']:>4}  {r['contender'] + ' (' + r['precision'] + ')':18} {r['tokens_per_s']:>10.0f}  "
              f"{r['mfu']:>12.1%}  {'–' if mfu_sheet is None else format(mfu_sheet, '.1%'):>13}  {r['pretune_speedup']:.2f}x")
    return rows


def child(overrides: list[str]) -> None:
    """One correctness run (under torchrun: one of its processes)."""
    import pretune

    pretune.train(None, overrides)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        child(argv[1:])
        return 0
    args = parse_args(argv)
    import torch

    if not args.dry_run_cpu and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA GPU visible (torch.cuda.is_available() is False); --dry-run-cpu runs the flow on the CPU")
    started, parts = time.time(), args.parts.split(",")
    env = bench_env(**({"CUDA_VISIBLE_DEVICES": ""} if args.dry_run_cpu else {}))
    report: dict = {"dry_run_cpu": args.dry_run_cpu}
    with tempfile.TemporaryDirectory(prefix="pretune-gpu-check-") as tmp:
        work = Path(tmp)
        report["device"] = device_report(args.dry_run_cpu) if "device" in parts or "speed" in parts else {}
        if "correctness" in parts:
            print("\ncorrectness: tiny MLM, fp32, dropout off: 1 process against torchrun --nproc_per_node 1", flush=True)
            report["correctness"] = correctness(work, args.dry_run_cpu, env)
        if "speed" in parts:
            print("\nspeed: bench_pretrain.py, pretune against the Hugging Face Trainer, same model and data", flush=True)
            report["speed"] = speed(work, args.dry_run_cpu, args.steps, env, report["device"])
        out = Path(args.out or (work / "gpu-check.json" if args.dry_run_cpu else HERE / "results" / "gpu-check.json"))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
        failed = [name for name, check in report.get("correctness", {}).items() if not check["pass"]]
        print(f"\ngpu_check: {'FAIL (' + ', '.join(failed) + ')' if failed else 'PASS' if 'correctness' in parts else 'done'} "
              f"in {time.time() - started:.0f}s" + ("" if args.dry_run_cpu else f"; results in {out}"))
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
