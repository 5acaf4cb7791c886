"""Ratios as the work grows: every pretraining and fine-tuning row at three model sizes and two lengths.

    python benchmarks/bench_scaling.py                          # the table in BENCHMARKS.md (~2 h on 2 cores)
    python benchmarks/bench_scaling.py --sizes mini --seqs 128 --repeats 1 --rows mlm   # one smoke cell

Rows: MLM (BERT), CLM (GPT-2) and full fine-tuning (BERT, sequence classification on the embedded
stdlib topics with their natural lengths cut at the sequence length).  Sizes: ``backbone.size`` mini
(L4/H256/A4), small (L4/H512/A8) and base (L12/H768/A12, BERT-base's shape).  Lengths: 128 and 512.
Each cell is one run of ``bench_pretrain.py`` or ``bench_finetune.py`` (their contenders, their
noise gate, their alternating repeats, their MFU formula), so a cell here and a row there are
measured the same way.  Larger models run fewer tokens per step and fewer steps, so that one
contender's run stays near a minute: ``PLAN`` below.

The contender is the strongest Trainer configuration on this machine: ``bf16=True`` where pretune's
``precision: auto`` resolves to bf16 (a CPU with AVX512-BF16 or AMX), its fp32 default elsewhere (on an
AVX2-only CPU bf16 matmuls are emulated and run ~400x slower than fp32).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

# tokens per step (batch x length: pretraining; batch x 128 texts: fine-tuning), steps, warm-up steps
PLAN = {"mini": {"tokens": 4096, "steps": 20, "warmup": 5},
        "small": {"tokens": 2048, "steps": 14, "warmup": 4},
        "base": {"tokens": 1024, "steps": 8, "warmup": 3}}
PRETRAIN = {("mlm", 128): "mlm", ("mlm", 512): "mlm512", ("clm", 128): "clm128", ("clm", 512): "clm512"}


def strongest_trainer() -> str:
    """``hf-bf16`` where pretune's default precision is bf16 on this CPU, else ``hf-fp32``."""
    import torch

    from pretune.trainer.precision import resolve

    return "hf-bf16" if resolve("auto", torch.device("cpu")) == "bf16" else "hf-fp32"


def cell(row: str, size: str, seq: int, repeats: int, trainer: str, out: Path) -> list[dict]:
    """Run one (row, size, length) cell through its benchmark; its rows, one per contender."""
    plan = PLAN[size]
    common = ["--size", size, "--steps", str(plan["steps"]), "--warmup", str(plan["warmup"]), "--repeats", str(repeats),
              "--contenders", f"{trainer},pretune", "--out", str(out)]
    if row == "finetune":
        command = [str(HERE / "bench_finetune.py"), *common, "--max-length", str(seq), "--batch", str(plan["tokens"] // 128),
                   "--pretrain-steps", "2", "--test-rows", "64"]
    else:
        command = [str(HERE / "bench_pretrain.py"), *common, "--workloads", PRETRAIN[row, seq],
                   "--batch", str(plan["tokens"] // seq)]
    print(f"== {row} {size} seq {seq}: {' '.join(command[1:])}", flush=True)
    subprocess.run([sys.executable, *command], check=True)
    report = json.loads(out.read_text())
    rows = []
    for r in report["rows"]:
        # fine-tuning: real (unpadded) tokens/s, since the few timed steps of each tool saw texts of different lengths
        each = [x["samples_per_s"] * x["real_length"] for x in r.get("runs", [])] if row == "finetune" else []
        tokens = r["tokens_per_s"] if row != "finetune" else statistics.median(each or [r["samples_per_s"] * r["real_length"]])
        rows.append({"row": row, "size": size, "seq": seq, "contender": r["contender"], "precision": r["precision"],
                     "tokens_per_s": tokens, "min": min(each, default=r["min"]), "max": max(each, default=r["max"]),
                     "range_unit": "samples" if row == "finetune" and not each else "tokens", "mfu": r["mfu"],
                     "pretune_speedup": r["pretune_speedup"], "peak_rss_mb": r.get("peak_rss_mb"),
                     "foreign_load": r.get("foreign_load"), "batch": report.get("batch") or r.get("batch"),
                     **({"padded_length": r["padded_length"], "real_length": r["real_length"]} if row == "finetune" else {})})
    return rows


def table(report: dict) -> str:
    lines = [f"{report['date']} · {report['repeats']} repeats per cell · contender: {report['trainer']}", "",
             "| row | model | seq | pretune tokens/s | Trainer tokens/s | pretune ÷ Trainer (worst–best pairing of runs) | MFU pretune / Trainer "
             "| peak RSS MB pretune / Trainer | foreign load (max) |", "|---|---|---|---|---|---|---|---|---|"]
    names = {"mini": "L4/H256", "small": "L4/H512", "base": "L12/H768"}
    cells: dict[tuple, dict] = {}
    for r in report["rows"]:
        cells.setdefault((r["row"], r["size"], r["seq"]), {})[r["contender"]] = r
    for (row, size, seq), both in cells.items():
        ours, theirs = both["pretune"], both[report["trainer"]]
        unit = "" if row != "finetune" else f" (padded {ours['padded_length']:.0f} / {theirs['padded_length']:.0f})"
        lines.append(f"| {row} | {names[size]} | {seq}{unit} | {ours['tokens_per_s']:.0f} | {theirs['tokens_per_s']:.0f} | "
                     f"**{ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}×** ({ours['min'] / theirs['max']:.2f}–"
                     f"{ours['max'] / theirs['min']:.2f}{' in samples/s' if ours.get('range_unit') == 'samples' else ''}) | "
                     f"{ours['mfu']:.0%} / {theirs['mfu']:.0%} | {ours['peak_rss_mb']:.0f} / {theirs['peak_rss_mb']:.0f} | "
                     f"{max(ours['foreign_load'], theirs['foreign_load']):.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="mlm,clm,finetune")
    parser.add_argument("--sizes", default="mini,small,base")
    parser.add_argument("--seqs", default="128,512")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS / "scaling.json"))
    args = parser.parse_args()
    trainer = strongest_trainer()
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "repeats": args.repeats, "trainer": trainer, "plan": PLAN, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes.split(","):
            for seq in map(int, args.seqs.split(",")):
                for row in args.rows.split(","):
                    report["rows"] += cell(row, size, seq, args.repeats, trainer, Path(tmp) / f"{row}-{size}-{seq}.json")
                    Path(args.out).write_text(json.dumps(report, indent=2))  # a cell at a time: a long run keeps what it did
    print(table(report))


if __name__ == "__main__":
    main()
