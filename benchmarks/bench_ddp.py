"""DDP and FSDP scaling on CPU: pretune MLM pretraining, 2 processes x 1 thread against 1 process x 1 thread.

    python benchmarks/bench_ddp.py            # full size: 60 steps (10 warm-up) x 3 repeats
    python benchmarks/bench_ddp.py --quick    # smoke size: 12 steps (4 warm-up) x 1 repeat

Workload: the MLM row of ``bench_pretrain.py`` (BERT L4/H256/A4, ``backbone.size=mini``, packed
blocks of 128 tokens of the embedded corpus, the same tokenizer, AdamW lr 5e-4, cosine, 10%
warm-up, default precision: bf16 autocast on AVX512-BF16 CPUs, else fp32), 32 blocks per process per micro-batch.
Every process runs with one thread (``trainer.threads=1`` and ``OMP_NUM_THREADS=1``).

Contenders, each in its own process (group), alternating, several repetitions:

- ``2x1-ddp``: ``torchrun --standalone --nproc_per_node 2`` (gloo on CPU), batch 32 per process,
  so 64 blocks per optimizer step.
- ``1x1``: one process, batch 32, one micro-batch per step: the same per-process work as each DDP
  rank, without the other rank and the gradient all-reduce.  The speed target (>= 1.6x global
  samples/s) is against this one.
- ``1x1-acc2``: one process, batch 32, ``trainer.accumulate=2``: the same 64 blocks per step as
  DDP (pretune splits a global batch identically over ranks or accumulation steps, and masks are
  seeded per example), so at equal steps both have seen exactly the same samples with the same
  masks and learning rate; only dropout draws differ.  This is the loss check at equal samples.
  (It also does half the optimizer steps per sample of ``1x1``, so its speed is shown too.)
- ``2x1-fsdp``: as ``2x1-ddp`` with ``trainer.distributed=fsdp``: weights, gradients and AdamW state
  sharded over the 2 ranks (FSDP2, one group per BERT layer).  Its rows add what rank 0 holds of
  weights + gradients + optimizer state (``state_mb``, from the run's log) and its peak RSS, beside DDP's.
- ``2x1-independent``: the ceiling, not a contender: two ``1x1`` runs launched together (by
  torchrun, but each its own world of one process: no process group, no gradient all-reduce), their
  samples/s added.  What two single-threaded processes get from this machine without any
  communication; ``2x1-ddp`` below it is the cost of DDP itself, ``1x1`` x 2 above it the cost of
  sharing the machine (memory bandwidth, caches, clocks).

Throughput: global samples/s (blocks of 128 tokens, all ranks) between the end of warm-up step W
and the end of the last step, from the ``time`` stamps of rank 0's per-step JSONL rows.  MFU of
the cores used: model FLOPs (``bench_pretrain.model_flops_per_step``: 6N per token + attention +
the output projection at the masked positions) / time / (cores used x the GEMM peak of one
thread in the precision the runs use, measured in this run before and after the contenders, the higher of the two).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from bench_pretrain import WORKLOADS, build_data, model_flops_per_step, model_overrides
from common import (bench_env, check_source, is_main_process, pretune_step_times, report_header, report_result,
                    run_alternating, spread, steady_seconds, tail_mean, torchrun, write_results)

BATCH = WORKLOADS["mlm"]["batch"]
BLOCK = WORKLOADS["mlm"]["block"]
# contender name -> (tool, ""); tool = how it is launched
CONTENDERS = [("1x1", "single-acc1", ""), ("1x1-acc2", "single-acc2", ""), ("2x1-ddp", "ddp", ""), ("2x1-fsdp", "fsdp", ""),
              ("2x1-independent", "independent", "")]
LAYOUT = {"single-acc1": (1, 1), "single-acc2": (1, 2), "ddp": (2, 1), "fsdp": (2, 1), "independent": (2, 1)}  # tool -> (processes, accumulate)
TARGET_SPEEDUP, LOSS_TOLERANCE = 1.6, 0.01  # loss: relative difference of the last-quarter mean training loss


def child(args: argparse.Namespace) -> None:
    """One contender, one repetition: a pretune run (on every rank under torchrun); rank 0 reports."""
    import pretune

    processes, accumulate = LAYOUT[args.tool]
    run_dir, rank = Path(args.run_dir), int(os.environ.get("RANK", "0"))
    if args.tool == "independent":  # launched by torchrun, but each process trains alone (a world of one)
        os.environ.update(WORLD_SIZE="1", RANK="0", LOCAL_RANK="0")
        run_dir = run_dir.with_name(f"{run_dir.name}-{rank}")
    pretune.train(None, [
        *model_overrides(WORKLOADS["mlm"]), f"run_dir={run_dir}", f"data.tokenizer.path={args.tokenizer}",
        f"trainer.batch_size={BATCH}", f"trainer.accumulate={accumulate}", f"trainer.max_steps={args.steps}",
        "trainer.threads=1", "trainer.log_every=1", "trainer.progress=false", "trainer.tensorboard=false",
        f"trainer.save_every={args.steps + 1}", "trainer.warmup=0.1", "trainer.lr=5e-4",
        f"trainer.distributed={'fsdp' if args.tool == 'fsdp' else 'ddp'}",
    ])
    if args.tool == "independent":
        return report_independent(run_dir, rank, args.steps, args.warmup)
    if not is_main_process():
        return
    train = pretune_step_times(run_dir, args.steps)
    seconds = steady_seconds([r["time"] for r in train], args.warmup)
    samples = (args.steps - args.warmup) * BATCH * accumulate * processes
    shutil.rmtree(run_dir, ignore_errors=True)
    report_result({"seconds": seconds, "samples_per_s": samples / seconds, "losses": [r["loss"] for r in train],
                   "final_loss": tail_mean([r["loss"] for r in train]), "processes": processes, "accumulate": accumulate,
                   "state_mb": train[-1].get("state_mb"), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


def report_independent(run_dir: Path, rank: int, steps: int, warmup: int) -> None:
    """Each of the two lone processes leaves its speed in a file; rank 0 adds them up and reports."""
    train = pretune_step_times(run_dir, steps)
    seconds = steady_seconds([r["time"] for r in train], warmup)
    mine = {"samples_per_s": (steps - warmup) * BATCH / seconds, "losses": [r["loss"] for r in train]}
    done = run_dir.parent / f"{run_dir.name}.json"
    done.with_suffix(".tmp").write_text(json.dumps(mine))
    done.with_suffix(".tmp").replace(done)  # appears complete or not at all
    if rank != 0:
        return
    other = run_dir.parent / f"{run_dir.name[:-2]}-1.json"
    deadline = time.time() + 600
    while not other.is_file() and time.time() < deadline:
        time.sleep(0.2)
    theirs = json.loads(other.read_text())
    report_result({"seconds": seconds, "samples_per_s": mine["samples_per_s"] + theirs["samples_per_s"],
                   "per_process": [mine["samples_per_s"], theirs["samples_per_s"]], "losses": mine["losses"],
                   "final_loss": tail_mean(mine["losses"]), "processes": 2, "accumulate": 1})


def precision() -> str:
    """What ``trainer.precision: auto`` trains in on this CPU (bf16 with AVX512-BF16 or AMX, else fp32)."""
    import torch

    from pretune.trainer.precision import resolve

    return resolve("auto", torch.device("cpu"))


def peaks() -> dict:
    """GEMM peak, in the precision the runs use, of one thread (the unit of the MFU here) and of the whole machine."""
    import torch

    from pretune.trainer.flops import measure_peak

    dtype = torch.bfloat16 if precision() == "bf16" else torch.float32  # an emulated bf16 GEMM takes minutes and means nothing
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    one = measure_peak(dtype, torch.device("cpu"), seconds=1.0)
    torch.set_num_threads(threads)
    return {"gemm_1_thread": one, "gemm_machine": measure_peak(dtype, torch.device("cpu"), seconds=1.0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke size for CI")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tool", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.steps = args.steps or (12 if args.quick else 60)
    args.warmup = args.warmup or (4 if args.quick else 10)
    if args.child:
        return child(args)

    from transformers import AutoTokenizer

    repeats = args.repeats or (1 if args.quick else 3)
    work = Path(tempfile.mkdtemp(prefix="pretune-bench-ddp-"))
    try:
        peak = peaks()
        tokenizer = build_data("mlm", work) / "tokenizer"
        flops_per_micro_batch = model_flops_per_step("mlm", len(AutoTokenizer.from_pretrained(str(tokenizer))))
        report = {**report_header(), "workload": f"MLM, BERT L4/H256/A4, seq 128, batch 32 per process, {precision()} (trainer.precision=auto)",
                  "steps": args.steps, "warmup": args.warmup, "repeats": repeats,
                  "peak_gflops": {k: v / 1e9 for k, v in peak.items()}, "rows": []}

        def child_args(tool: str, _: str) -> list[str]:
            own = ["--child", "--tool", tool, "--run-dir", str(work / f"run-{uuid.uuid4().hex}"), "--tokenizer", str(tokenizer),
                   "--steps", str(args.steps), "--warmup", str(args.warmup)]
            processes = LAYOUT[tool][0]
            return torchrun(processes, __file__, own) if processes > 1 else [__file__, *own]

        runs = run_alternating(CONTENDERS, repeats, child_args, bench_env(OMP_NUM_THREADS="1"),
                               lambda name, rep, r: f"{name} rep {rep}: {r['samples_per_s']:.1f} samples/s, loss {r['final_loss']:.4f}")
        peak = {k: max(v, w) for (k, v), w in zip(peak.items(), peaks().values())}  # before and after: the best of both
        report["peak_gflops"] = {k: v / 1e9 for k, v in peak.items()}
        check_source(report)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = statistics.median(r["samples_per_s"] for r in runs["1x1"])
    for name, tool, _ in CONTENDERS:
        processes, accumulate = LAYOUT[tool]
        speed = spread([r["samples_per_s"] for r in runs[name]])
        report["rows"].append({
            "contender": name, "processes": processes, "threads_per_process": 1, "accumulate": accumulate,
            "global_batch": BATCH * processes * accumulate, "samples_per_s": speed["median"], "min": speed["min"], "max": speed["max"],
            "tokens_per_s": speed["median"] * BLOCK, "speedup_vs_1x1": speed["median"] / base,
            "mfu": speed["median"] / BATCH * flops_per_micro_batch / (processes * peak["gemm_1_thread"]),
            "final_loss": statistics.median(r["final_loss"] for r in runs[name]), "losses": runs[name][0]["losses"],
            "state_mb": runs[name][0].get("state_mb"), "peak_rss_mb": statistics.median(r.get("peak_rss_mb") or 0 for r in runs[name]),
        })
    rows = {r["contender"]: r for r in report["rows"]}
    ddp, reference = rows["2x1-ddp"], rows["1x1-acc2"]
    rows["2x1-independent"]["per_process"] = runs["2x1-independent"][0]["per_process"]
    report["ddp_vs_ceiling"] = ddp["samples_per_s"] / rows["2x1-independent"]["samples_per_s"]
    steps = [abs(a - b) / b for a, b in zip(ddp["losses"], reference["losses"])]
    report["loss_check"] = {"ddp_final_loss": ddp["final_loss"], "reference_final_loss": reference["final_loss"],
                            "relative_difference": abs(ddp["final_loss"] - reference["final_loss"]) / reference["final_loss"],
                            "max_step_relative_difference": max(steps), "median_step_relative_difference": statistics.median(steps),
                            "tolerance": LOSS_TOLERANCE}
    quality = report["loss_check"]["relative_difference"] <= LOSS_TOLERANCE
    fsdp = rows["2x1-fsdp"]
    report["fsdp_vs_ddp"] = {"samples_per_s": fsdp["samples_per_s"] / ddp["samples_per_s"],
                             "state_mb": (fsdp["state_mb"] or 0) / (ddp["state_mb"] or 1),
                             "peak_rss_mb": fsdp["peak_rss_mb"] / ddp["peak_rss_mb"],
                             "final_loss_relative_difference": abs(fsdp["final_loss"] - reference["final_loss"]) / reference["final_loss"]}
    report["summary"] = [{"row": "DDP 2 processes × 1 thread vs 1 × 1", "ratio": ddp["speedup_vs_1x1"], "target": TARGET_SPEEDUP,
                          "quality_ok": quality, "met": ddp["speedup_vs_1x1"] >= TARGET_SPEEDUP and quality,
                          "mfu": ddp["mfu"], "mfu_other": rows["1x1"]["mfu"], "unit": "samples/s",
                          "quality": f"loss {ddp['final_loss']:.4f} vs {reference['final_loss']:.4f} at equal samples "
                                     f"({report['loss_check']['relative_difference']:.2%}, tolerance {LOSS_TOLERANCE:.0%})"}]
    write_results("ddp", args.quick, report)
    print(table(report))


def table(report: dict) -> str:
    lines = [f"{report['date']} · {report['machine']} · torch {report['torch']} · {report['workload']} · {report['steps']} steps "
             f"({report['warmup']} warm-up) × {report['repeats']} repeats · GEMM peak 1 thread "
             f"{report['peak_gflops']['gemm_1_thread']:.0f} / machine {report['peak_gflops']['gemm_machine']:.0f} GFLOP/s", "",
             "| contender | processes × threads | global batch | samples/s (median) | min–max | tokens/s | MFU (cores used) | final loss | ÷ 1x1 "
             "| rank 0: weights + grads + AdamW (MB) | rank 0 peak RSS (MB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        layout = " (accumulate 2)" if r["accumulate"] > 1 else " (no communication: ceiling)" if r["contender"] == "2x1-independent" else ""
        lines.append(f"| {r['contender']} | {r['processes']} × 1{layout} | {r['global_batch']} | "
                     f"{r['samples_per_s']:.1f} | {r['min']:.1f}–{r['max']:.1f} | {r['tokens_per_s']:.0f} | {r['mfu']:.1%} | "
                     f"{r['final_loss']:.4f} | {r['speedup_vs_1x1']:.2f}× | {r['state_mb'] or 0:.1f} | {r['peak_rss_mb']:.0f} |")
    check = report["loss_check"]
    summary = report["summary"][0]
    lines.append(f"loss at equal samples (2x1-ddp vs 1x1-acc2, same 64 blocks and masks per step): last-quarter mean "
                 f"{check['ddp_final_loss']:.4f} vs {check['reference_final_loss']:.4f} ({check['relative_difference']:.2%}; "
                 f"per step median {check['median_step_relative_difference']:.2%}, max {check['max_step_relative_difference']:.2%}; "
                 f"tolerance {check['tolerance']:.0%})")
    lines.append(f"2x1-ddp reaches {report['ddp_vs_ceiling']:.0%} of the no-communication ceiling (2x1-independent)")
    f = report["fsdp_vs_ddp"]
    lines.append(f"2x1-fsdp vs 2x1-ddp: {f['samples_per_s']:.2f}x the samples/s, {f['state_mb']:.2f}x the weights + gradients + "
                 f"optimizer state per rank, {f['peak_rss_mb']:.2f}x the peak RSS; final loss within "
                 f"{f['final_loss_relative_difference']:.2%} of 1x1-acc2")
    lines.append(f"target: ≥ {summary['target']}× global samples/s of 1x1 with the loss within tolerance: "
                 f"{'met' if summary['met'] else 'NOT met'} ({summary['ratio']:.2f}×)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
