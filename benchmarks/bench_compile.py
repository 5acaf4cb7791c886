"""Does ``torch.compile`` pay on this CPU?  pretune's own training step, eager against compiled variants.

    python benchmarks/bench_compile.py                       # MLM seq 128 and CLM seq 256, every variant
    python benchmarks/bench_compile.py --workloads mlm --variants eager,blocks-native

The step is the loop's own (:meth:`pretune.trainer.loop.Trainer.step`, built by ``profile_step.build_trainer``):
forward under the run's precision, loss, backward, clipping, fused AdamW.  Variants:

- ``eager``: the defaults (cheap dropout masks, pretune's attention function, no compilation);
- ``eager-native``: the same with PyTorch's own dropout (``trainer.fast_dropout=false``);
- ``whole``: ``trainer.compile=true``, the whole task module compiled (its MLM position selection
  has a data-dependent shape, so the graph breaks there);
- ``blocks``: each repeated block (``BertLayer``, ``GPT2Block``) compiled on its own, every step the
  same shapes (packed blocks), so it compiles once; the cheap masks stay (opaque to Inductor);
- ``blocks-native``: the same with PyTorch's dropout, which Inductor turns into its own fused random
  numbers: dropout, the residual add and layer norm become one kernel (the issue's "fused
  residual+dropout+norm").

Each variant runs in its own process; compilation time is reported apart from the steady step time
(median over ``--steps`` steps after ``--warmup``); variants alternate over ``--repeats``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_pretrain import WORKLOADS  # noqa: E402
from common import bench_env, load_summary, report_result, run_alternating  # noqa: E402
from profile_step import build_trainer  # noqa: E402

VARIANTS = {"eager": [], "eager-native": ["trainer.fast_dropout=false"], "whole": ["trainer.compile=true"],
            "blocks": [], "blocks-native": ["trainer.fast_dropout=false"]}


def child(workload: str, variant: str, steps: int, warmup: int) -> dict:
    from pretune.trainer import sharding

    w = WORKLOADS[workload]
    trainer, task, data = build_trainer(w, VARIANTS[variant])
    if variant.startswith("blocks"):
        for block in sharding.blocks(trainer.module):
            block.compile()
    trainer.start_epoch(0)
    batches = [task.collate(data.train[i * w["batch"]:(i + 1) * w["batch"]], list(range(w["batch"])))
               for i in range(4)]
    times = []
    started = time.perf_counter()
    for i in range(warmup + steps):
        begin = time.perf_counter()
        trainer.step([batches[i % len(batches)]], i)
        times.append(time.perf_counter() - begin)
    return {"ms_per_step": 1000 * statistics.median(times[warmup:]), "first_steps_s": sum(times[:warmup]),
            "total_s": time.perf_counter() - started, "precision": trainer.precision}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="mlm,clm")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", nargs=2, metavar=("WORKLOAD", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return report_result(child(*args.child, args.steps, args.warmup))
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
              "rows": []}
    for workload in args.workloads.split(","):
        variants = [(v, workload, v) for v in args.variants.split(",")]
        runs = run_alternating(variants, args.repeats,
                               lambda wl, v: [__file__, "--child", wl, v, "--steps", str(args.steps), "--warmup", str(args.warmup)],
                               bench_env(), lambda name, rep, r: f"{workload} {name} rep {rep}: {r['ms_per_step']:.0f} ms/step, "
                                                                 f"first {args.warmup} steps {r['first_steps_s']:.1f} s")
        loads = load_summary(runs)
        eager = statistics.median(r["ms_per_step"] for r in runs["eager"]) if "eager" in runs else None
        for name, _, _ in variants:
            ms = [r["ms_per_step"] for r in runs[name]]
            report["rows"].append({"workload": workload, "variant": name, "precision": runs[name][0]["precision"],
                                   "ms_per_step": statistics.median(ms), "min": min(ms), "max": max(ms),
                                   "first_steps_s": statistics.median(r["first_steps_s"] for r in runs[name]),
                                   "eager_over_this": eager / statistics.median(ms) if eager else None,
                                   "foreign_load": loads[name]["max_foreign_load"], "peak_rss_mb": loads[name]["median_peak_rss_mb"]})
    (HERE / "results" / "compile.json").write_text(json.dumps(report, indent=2))
    print("| workload | variant | precision | ms/step (min–max) | speed-up over eager | first steps (s) | peak RSS MB | foreign load |")
    print("|---|---|---|---|---|---|---|---|")
    for r in report["rows"]:
        print(f"| {r['workload']} | {r['variant']} | {r['precision']} | {r['ms_per_step']:.0f} ({r['min']:.0f}–{r['max']:.0f}) | "
              f"{r['eager_over_this']:.2f}× | {r['first_steps_s']:.1f} | {r['peak_rss_mb']:.0f} | {r['foreign_load']:.2f} |")


if __name__ == "__main__":
    main()
