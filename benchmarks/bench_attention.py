"""Training attention with dropout on a CPU: forward + backward of one attention layer, per path.

    python benchmarks/bench_attention.py          # BERT-mini heads (4 x 64), seq 128 .. 1024, 4,096 tokens per batch

Paths, all with attention dropout 0.1 except the last:
- ``sdpa-math``: ``F.scaled_dot_product_attention(dropout_p=0.1)``, PyTorch's own (on a CPU its fused
  kernels refuse dropout, so this is the math path with a ``bernoulli_`` mask);
- ``unblocked``: pretune's previous path: full score matrix, fp32 softmax, cheap 16-bit mask;
- ``blocked``: ``pretune.trainer.attention.dropout_attention`` (what training uses from 256 keys);
- ``flash-no-dropout``: SDPA's fused flash kernel with dropout off: the ceiling a dropout path can reach.

Medians (and minimum) of 7 timed repetitions after one warm-up, one process, all cores; the
machine's foreign load over the whole run is printed (``common.cpu_busy``).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common import cpu_busy, report_header, wait_for_quiet  # noqa: E402
from pretune.trainer.attention import dropout_attention, keep_mask  # noqa: E402

HEADS, DIM, TOKENS, P = 4, 64, 4096, 0.1


def unblocked(q, k, v):
    probs = torch.softmax((q @ k.transpose(-1, -2) * DIM ** -0.5).float(), -1).to(v.dtype)
    keep, factor = keep_mask(probs.shape, P)
    return (probs * keep * factor) @ v


PATHS = {
    "sdpa-math": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, dropout_p=P),
    "unblocked": unblocked,
    "blocked": lambda q, k, v: dropout_attention(q, k, v, dropout=P),
    "flash-no-dropout": lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
}


def timed(path, length: int, repeats: int = 7) -> list[float]:
    torch.manual_seed(0)
    q, k, v = (torch.randn(TOKENS // length, HEADS, length, DIM, requires_grad=True) for _ in range(3))
    grad = torch.randn_like(q)
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        path(q, k, v).backward(grad)
        if i:
            times.append(1e3 * (time.perf_counter() - start))
    return times


def main() -> None:
    wait_for_quiet()
    busy, start = cpu_busy(), time.perf_counter()
    own = time.process_time()
    rows = []
    for length in (128, 256, 512, 1024):
        row = {"seq": length, "batch": TOKENS // length}
        for name, path in PATHS.items():
            times = timed(path, length)
            row[name] = {"median_ms": statistics.median(times), "min_ms": min(times)}
        rows.append(row)
        print(f"seq {length:5d}: " + ", ".join(f"{n} {row[n]['median_ms']:.0f} ms" for n in PATHS), flush=True)
    foreign = max(0.0, (cpu_busy() - busy - (time.process_time() - own)) / (time.perf_counter() - start))
    report = {**report_header(), "threads": torch.get_num_threads(), "heads": HEADS, "head_dim": DIM, "tokens": TOKENS,
              "dropout": P, "foreign_load": foreign, "rows": rows}
    (HERE / "results" / "attention.json").write_text(json.dumps(report, indent=2))
    print(f"foreign load over the run: {foreign:.2f} CPUs ({os.cpu_count()} cores)")
    print("| seq (batch) | " + " | ".join(PATHS) + " | blocked ÷ unblocked | blocked ÷ sdpa-math |")
    print("|---" * (len(PATHS) + 3) + "|")
    for r in rows:
        cells = " | ".join(f"{r[n]['median_ms']:.0f} ({r[n]['min_ms']:.0f})" for n in PATHS)
        print(f"| {r['seq']} ({r['batch']}) | {cells} | {r['unblocked']['median_ms'] / r['blocked']['median_ms']:.2f}× | "
              f"{r['sdpa-math']['median_ms'] / r['blocked']['median_ms']:.2f}× |")


if __name__ == "__main__":
    main()
