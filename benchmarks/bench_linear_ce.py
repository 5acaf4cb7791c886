"""Plain vs chunked linear + cross-entropy (``pretune.trainer.linear_ce``): time and peak memory.

For each shape (N tokens, H hidden, V vocabulary) and precision (fp32, CPU bf16 autocast), each of

    plain    F.cross_entropy(F.linear(h, W, b).float(), y, reduction="sum").backward()
    chunked  linear_cross_entropy(h, W, b, y).backward()

runs in a fresh process: the peak extra memory of its first forward + backward (the rise of the
resident set's high-water mark, VmHWM, reset just before, over the RSS with the inputs allocated),
then one warm-up and the median of 5 timed forward + backward (2-4 when a step takes over 10 s, as bf16
does on CPUs without bf16 instructions).  Writes results/linear_ce.json.

    flock /tmp/pretune-heavy.lock .venv/bin/python benchmarks/bench_linear_ce.py
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

SHAPES = [(4080, 256, 8000), (2048, 576, 49152)]
PRECISIONS = ["fp32", "bf16"]
METHODS = ["plain", "chunked"]
REPEATS = 5  # timed steps after a warm-up, fewer once BUDGET seconds are spent
BUDGET = 45.0
SLOW = 10.0  # a first step longer than this is the only one (CPU bf16 without bf16 instructions: minutes)
TIMEOUT = 150  # seconds per variant, a failure past it: the machine is shared (plain CPU bf16 at V = 49152 takes minutes)
RESULTS = Path(__file__).resolve().parent / "results"
MARK = "RESULT "
NAN = float("nan")


def rss_mb() -> float:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    """VmHWM: the resident set's high-water mark since the last reset."""
    line = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def child(n: int, h: int, v: int, precision: str, method: str) -> dict:
    import torch
    import torch.nn.functional as F

    from pretune.trainer.linear_ce import default_chunk_rows, linear_cross_entropy

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=g).requires_grad_()
    weight = (torch.randn(v, h, generator=g) * h**-0.5).requires_grad_()
    bias = torch.zeros(v, requires_grad=True)
    targets = torch.randint(v, (n,), generator=g)

    def step() -> float:
        for t in (hidden, weight, bias):
            t.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            if method == "plain":
                loss = F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, reduction="sum")
            else:
                loss = linear_cross_entropy(hidden, weight, bias, targets)
        loss.backward()
        return float(loss.detach())

    before = rss_mb()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    start, start_cpu = time.perf_counter(), time.process_time()
    loss = step()
    times, cpu = [time.perf_counter() - start], [time.process_time() - start_cpu]
    extra = peak_rss_mb() - before
    if times[0] < SLOW:  # else that one step is the timing: set-up costs are negligible against it
        step()  # warm-up
        times, cpu = [], []
        while len(times) < REPEATS and sum(times) < BUDGET:
            start, start_cpu = time.perf_counter(), time.process_time()
            step()
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
    return {"N": n, "H": h, "V": v, "precision": precision, "method": method, "loss": loss,
            "chunk_rows": default_chunk_rows(v) if method == "chunked" else None, "seconds": statistics.median(times),
            "seconds_all": times, "cpu_seconds_all": cpu, "peak_extra_mb": extra,
            "full_logits_fp32_mb": n * v * 4 / 2**20, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "load_average": os.getloadavg()}


def run_child(n: int, h: int, v: int, precision: str, method: str) -> dict:
    """One variant in a fresh process; a failure (crash, signal, timeout) is recorded, not fatal."""
    failed = {"N": n, "H": h, "V": v, "precision": precision, "method": method}
    try:
        done = subprocess.run([sys.executable, __file__, "--child", str(n), str(h), str(v), precision, method],
                              capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        return {**failed, "error": f"over {TIMEOUT} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith(MARK)]
    if done.returncode != 0 or not lines:
        return {**failed, "error": f"exit code {done.returncode}: {done.stderr[-500:].strip()}"}
    return json.loads(lines[0][len(MARK):])


def main() -> None:
    runs = []
    for n, h, v in SHAPES:
        for precision in PRECISIONS:
            for method in METHODS:
                runs.append(run_child(n, h, v, precision, method))
                save({"runs": runs})  # what is done so far survives an interrupted run
                r = runs[-1]
                print(f"  {n}x{h}x{v} {precision} {method}: " + (r["error"] if "error" in r else
                      f"{r['seconds'] * 1000:.0f} ms ({len(r['seconds_all'])} runs), +{r['peak_extra_mb']:.0f} MB"), flush=True)
    print(f"\n{'N x H x V':>18} {'prec':>5} {'plain ms':>9} {'chunked ms':>11} {'speed-up':>8} {'plain MB':>9} "
          f"{'chunked MB':>11} {'rel. loss diff':>14}")
    table = []
    for plain, chunked in zip(runs[::2], runs[1::2]):  # a failed variant has no numbers: nan
        p, c = ({"seconds": NAN, "peak_extra_mb": NAN, "loss": NAN} | r for r in (plain, chunked))
        row = {"shape": [plain["N"], plain["H"], plain["V"]], "precision": plain["precision"],
               "plain_ms": p["seconds"] * 1000, "chunked_ms": c["seconds"] * 1000, "speedup": p["seconds"] / c["seconds"],
               "plain_extra_mb": p["peak_extra_mb"], "chunked_extra_mb": c["peak_extra_mb"], "chunk_rows": c.get("chunk_rows"),
               "rel_loss_diff": abs(c["loss"] - p["loss"]) / abs(p["loss"])}
        table.append({k: None if v != v else v for k, v in row.items()})  # nan -> null in the JSON
        print(f"{'x'.join(map(str, row['shape'])):>18} {row['precision']:>5} {row['plain_ms']:>9.0f} {row['chunked_ms']:>11.0f} "
              f"{row['speedup']:>7.2f}x {row['plain_extra_mb']:>9.0f} {row['chunked_extra_mb']:>11.0f} {row['rel_loss_diff']:>14.1e}")
    print(f"\nwrote {save({'table': table, 'runs': runs})}")


def save(results: dict) -> Path:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "linear_ce.json"
    out.write_text(json.dumps({"machine": {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version()},
                               "repeats": REPEATS, "budget_s": BUDGET, "timeout_s": TIMEOUT, **results}, indent=1) + "\n")
    return out


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        n, h, v, precision, method = sys.argv[2:]
        print(MARK + json.dumps(child(int(n), int(h), int(v), precision, method)), flush=True)
    else:
        main()
