"""Every benchmark row of issue 5 with one command, one after the other, and one summary table.

    flock /tmp/pretune-heavy.lock python benchmarks/run_all.py            # full size (the BENCHMARKS.md table)
    flock /tmp/pretune-heavy.lock python benchmarks/run_all.py --quick    # smoke size, for CI
    python benchmarks/run_all.py --summary-only [--quick]                 # re-print the table from results/

Runs ``bench_pretrain.py``, ``bench_finetune.py``, ``bench_linear_probe.py``, ``bench_simclr.py``
and ``bench_ddp.py`` in turn (never two at once: a benchmark measured beside another heavy job is
worthless), passing ``--quick`` (and ``--repeats``) through.  Each script alternates its own
contenders, measures the GEMM peak in its own run and writes ``results/NAME[-quick].json``;
this script reads those files and prints one row per target of the issue: the measured ratio, the
target, whether it is met (speed, and quality where the benchmark judges it), pretune's MFU and the
comparison's.  The table is also written to ``results/summary[-quick].json``.  It holds no lock
itself (wrap the command in ``flock``: a lock taken inside would deadlock under an outer one).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from common import RESULTS, report_header, write_results

HERE = Path(__file__).resolve().parent
# row name -> script; the JSON each one writes is results/<name>[-quick].json
BENCHMARKS = {"pretrain": "bench_pretrain.py", "finetune": "bench_finetune.py", "linear-probe": "bench_linear_probe.py",
              "simclr": "bench_simclr.py", "ddp": "bench_ddp.py"}
# workload -> target ratio against the strongest Trainer configuration measured (issue 17's targets)
PRETRAIN_TARGETS = {"mlm": 1.5, "mlm512": 2.0, "clm": 2.0, "clm512": 2.0, "clm1024": 2.0}
HAND_TARGETS = {"mlm": 1.5}  # issue 17 part 5: MLM seq 128 against the best hand-written loop
LINEAR_PROBE_TARGET, LINEAR_PROBE_POINTS, SIMCLR_TARGET = 10.0, 0.5, 1.0


def results_path(name: str, quick: bool) -> Path:
    return RESULTS / f"{name}{'-quick' if quick else ''}.json"


def summarize(name: str, report: dict) -> list[dict]:
    """The issue's target rows from one benchmark's results JSON.

    A benchmark that writes its own ``summary`` list (row, ratio, target, met, mfu, ...) is taken as
    it is; the others are read from their ``rows``."""
    if "summary" in report:
        return report["summary"]
    rows = report.get("rows", [])
    if name == "pretrain":
        out = []
        for workload, target in PRETRAIN_TARGETS.items():
            ours = next((r for r in rows if r["workload"] == workload and r["contender"] == "pretune"), None)
            other = next((r for r in rows if r["workload"] == workload and r.get("strongest")), None)
            if ours is None or other is None:
                continue
            label = f"{workload} pretraining vs the strongest HF Trainer ({other['contender'][3:]})"
            out.append({"row": label, "ratio": other["pretune_speedup"], "target": target, "met": other["pretune_speedup"] >= target,
                        "mfu": ours["mfu"], "mfu_other": other["mfu"], "unit": "tokens/s",
                        "quality": f"loss {ours['final_loss']:.3f} vs {other['final_loss']:.3f} (not judged)"})
            hand = next((r for r in rows if r["workload"] == workload and r["contender"] == "hand"), None)
            if hand is not None and workload in HAND_TARGETS:
                out.append({"row": f"{workload} pretraining vs a hand-written PyTorch loop", "ratio": hand["pretune_speedup"],
                            "target": HAND_TARGETS[workload], "met": hand["pretune_speedup"] >= HAND_TARGETS[workload],
                            "mfu": ours["mfu"], "mfu_other": hand["mfu"], "unit": "tokens/s",
                            "quality": f"loss {ours['final_loss']:.3f} vs {hand['final_loss']:.3f} (not judged)"})
        return out
    if name == "linear-probe":
        ours = next(r for r in rows if r["contender"] == "pretune")
        return [{"row": f"linear probe vs HF Trainer frozen {r['contender'][3:]}", "ratio": r["pretune_speedup"],
                 "target": LINEAR_PROBE_TARGET, "unit": "wall time",
                 "met": r["pretune_speedup"] >= LINEAR_PROBE_TARGET and abs(r["pretune_minus_this_points"]) <= LINEAR_PROBE_POINTS,
                 "quality_ok": abs(r["pretune_minus_this_points"]) <= LINEAR_PROBE_POINTS, "mfu": None, "mfu_other": None,
                 "quality": f"accuracy {ours['accuracy']:.2%} vs {r['accuracy']:.2%} ({r['pretune_minus_this_points']:+.1f} points, "
                            f"band ± {LINEAR_PROBE_POINTS})"}
                for r in rows if r["contender"].startswith("hf-")]
    if name == "simclr":
        out = []
        for r in rows:
            if r["contender"] != "pretune":
                continue
            plain = next((p for p in rows if p["contender"] == "plain" and p["batch"] == r["batch"]), {})
            out.append({"row": f"SimCLR batch {r['batch']} vs plain PyTorch loop", "ratio": r["ratio_vs_plain"],
                        "target": SIMCLR_TARGET, "met": r["ratio_vs_plain"] >= SIMCLR_TARGET, "mfu": r.get("mfu"),
                        "mfu_other": plain.get("mfu"), "unit": "images/s",
                        "quality": f"loss {r['final_loss']:.3f} vs {plain.get('final_loss', float('nan')):.3f} (not judged)"})
        return out
    return []


def quality_text(row: dict) -> str:
    if "quality" in row:
        return row["quality"]
    if "quality_ok" in row:
        return "within noise" if row["quality_ok"] else "NOT within noise"
    return ""


def percent(value: float | None) -> str:
    return "–" if value is None else f"{value:.1%}"


def table(summary: list[dict]) -> str:
    lines = ["| row | ratio | target | met? | MFU pretune | MFU comparison | quality at equal steps | measured |",
             "|---|---|---|---|---|---|---|---|"]
    for r in summary:
        if r.get("missing"):
            lines.append(f"| {r['row']} | – | – | {r['missing']} | – | – | – | – |")
            continue
        lines.append(f"| {r['row']} | {r['ratio']:.2f}× {r.get('unit', '')} | ≥ {r['target']}× | {'yes' if r['met'] else 'NO'} | "
                     f"{percent(r.get('mfu'))} | {percent(r.get('mfu_other'))} | {quality_text(r)} | {r.get('date', '')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke size of every benchmark")
    parser.add_argument("--repeats", type=int, default=None, help="passed to every benchmark")
    parser.add_argument("--only", default=None, help=f"comma-separated subset of: {', '.join(BENCHMARKS)}")
    parser.add_argument("--summary-only", action="store_true", help="run nothing; print the table from results/")
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")

    status: dict[str, str] = {}
    timings: dict[str, float] = {}
    for name in names if not args.summary_only else []:
        command = [sys.executable, str(HERE / BENCHMARKS[name]), *(["--quick"] if args.quick else []),
                   *(["--repeats", str(args.repeats)] if args.repeats else [])]
        print(f"\n=== {name}: {' '.join(command[1:])}", flush=True)
        started = time.time()
        done = subprocess.run(command, cwd=HERE.parent)  # output streams through; one benchmark at a time
        timings[name] = time.time() - started
        path = results_path(name, args.quick)
        fresh = path.is_file() and path.stat().st_mtime >= started
        status[name] = "ok" if done.returncode == 0 and fresh else f"failed (exit {done.returncode})"
        print(f"=== {name}: {status[name]} in {timings[name]:.0f}s", flush=True)

    summary: list[dict] = []
    for name in names:
        path = results_path(name, args.quick)
        if status.get(name, "ok") != "ok" or not path.is_file():
            summary.append({"benchmark": name, "row": name, "missing": status.get(name, f"no {path.name}")})
            continue
        report = json.loads(path.read_text())
        for row in summarize(name, report):
            summary.append({"benchmark": name, **row, "date": report.get("date", "")})
    print(f"\nissue 5 targets ({'quick' if args.quick else 'full'} size; each row measured side by side within its own benchmark run)\n")
    print(table(summary))
    if not args.summary_only:
        write_results("summary", args.quick, {**report_header(), "quick": args.quick, "wall_s": timings, "status": status,
                                              "rows": summary})
    if any(s != "ok" for s in status.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
