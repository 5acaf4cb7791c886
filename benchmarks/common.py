"""What every benchmark here shares: contenders in their own processes, alternating, JSON results."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

MARK = "RESULT "
RESULTS = Path(__file__).resolve().parent / "results"


def report_result(result: dict) -> None:
    """Child side: hand one repetition's numbers to the parent, with this process's own peak RSS."""
    print(MARK + json.dumps({**result, "own_peak_rss_mb": own_peak_rss_mb()}), flush=True)


def own_peak_rss_mb() -> float | None:
    """This process's peak resident memory (``VmHWM``), in MiB.

    Measured in the child because the rusage a parent gets from ``wait4`` is not the child's own:
    Linux carries the forking parent's high-water mark across ``exec``, so a child of a 2 GB
    parent reports at least 2 GB whatever it used.  ``VmHWM`` belongs to the address space that
    ``exec`` created, so it starts afresh."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


# -- an honest machine: wait for quiet, measure what else ran, peak memory --------------------------
# On 2 cores one foreign busy thread slows a 2-thread torch job 2-9x, so every run waits for a quiet
# machine, records how many CPUs *other* processes kept busy while it ran, and is repeated if that was
# too many.  Linux only (/proc/stat, ru_maxrss in KiB).

QUIET_BELOW = 0.15     # CPUs busy over a window for the machine to count as quiet before a run
QUIET_WINDOW = 2.0     # seconds per quiet check
QUIET_TIMEOUT = 300.0  # give up waiting (with a warning) after this many seconds
MAX_LOAD = 0.25        # foreign load (CPUs) above which a run is repeated
RETRIES = 2            # repeats of one loaded run; the quietest attempt is kept
# /proc/stat columns after the label: user nice system idle iowait irq softirq steal guest guest_nice.
# Busy = all but idle and iowait; guest and guest_nice are already inside user and nice.
BUSY_COLUMNS = (0, 1, 2, 5, 6, 7)


def parse_cpu_busy(proc_stat: str, ticks_per_s: float) -> float:
    """Seconds of non-idle CPU time summed over all CPUs, from the text of ``/proc/stat`` (its ``cpu``
    line, in clock ticks).  Steal counts as busy: a hypervisor's other guests slow us like a process."""
    for line in proc_stat.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            ticks = [int(v) for v in fields[1:]]
            return sum(ticks[i] for i in BUSY_COLUMNS if i < len(ticks)) / ticks_per_s
    raise ValueError("no aggregate 'cpu' line in /proc/stat")


def cpu_busy() -> float:
    """Non-idle CPU seconds of the whole machine since boot (all CPUs, every process)."""
    return parse_cpu_busy(Path("/proc/stat").read_text(), os.sysconf("SC_CLK_TCK"))


def foreign_load(busy_s: float, own_cpu_s: float, wall_s: float) -> float:
    """Average number of CPUs kept busy by *other* processes over ``wall_s`` seconds, during which the
    machine was busy for ``busy_s`` CPU-seconds of which ``own_cpu_s`` were ours.  0.0 is a quiet machine,
    1.0 one foreign busy thread; clamped at 0 (the tick counts of /proc/stat are coarser than rusage)."""
    return max(0.0, (busy_s - own_cpu_s) / wall_s) if wall_s > 0 else 0.0


def wait_for_quiet(threshold: float = QUIET_BELOW, window: float = QUIET_WINDOW, timeout: float = QUIET_TIMEOUT) -> float:
    """Sample the machine until a ``window``-second interval has fewer than ``threshold`` CPUs busy (this
    process sleeps meanwhile, so all of it is other processes).  Prints one line if it has to wait and a
    warning if it gives up after ``timeout`` seconds; returns the last window's load."""
    start, told = time.monotonic(), False
    while True:
        busy, began = cpu_busy(), time.monotonic()
        time.sleep(window)
        load = foreign_load(cpu_busy() - busy, 0.0, time.monotonic() - began)
        waited = time.monotonic() - start
        if load < threshold:
            return load
        if waited >= timeout:
            print(f"WARNING: machine still busy ({load:.2f} CPUs) after {waited:.0f}s; running anyway", flush=True)
            return load
        if not told:
            told = True
            print(f"machine busy ({load:.2f} CPUs in use by other processes): waiting up to {timeout:.0f}s "
                  f"for below {threshold}", flush=True)


@dataclass
class ChildRun:
    """One finished child process and what it cost.  ``cpu_s`` and ``peak_rss_mb`` cover the child and
    every descendant it waited for (torchrun's workers): CPU time summed, memory the largest single process."""
    returncode: int
    stdout: str
    stderr: str
    wall_s: float
    cpu_s: float
    foreign_load: float
    peak_rss_mb: float


def run_measured(command: list[str], env: dict | None = None) -> ChildRun:
    """Run ``command`` to completion with its output captured, measuring the foreign load during the run
    and the peak RSS.  ``os.wait4`` gives this child's own rusage (not ``RUSAGE_CHILDREN``, whose
    ``ru_maxrss`` is the largest of every child this process ever waited for)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        self_before, busy_before, began = resource.getrusage(resource.RUSAGE_SELF), cpu_busy(), time.monotonic()
        child = subprocess.Popen(command, env=env, stdout=out, stderr=err)
        _, status, usage = os.wait4(child.pid, 0)
        wall, busy, self_after = time.monotonic() - began, cpu_busy() - busy_before, resource.getrusage(resource.RUSAGE_SELF)
        child.returncode = os.waitstatus_to_exitcode(status)  # reaped here: keep Popen from waiting again
        ours = (usage.ru_utime + usage.ru_stime + self_after.ru_utime + self_after.ru_stime
                - self_before.ru_utime - self_before.ru_stime)  # the harness's own (small) share is not foreign
        out.seek(0)
        err.seek(0)
        return ChildRun(child.returncode, out.read().decode(errors="replace"), err.read().decode(errors="replace"), wall,
                        usage.ru_utime + usage.ru_stime, foreign_load(busy, ours, wall), usage.ru_maxrss / 1024)


def run_alternating(contenders: list[tuple[str, str, str]], repeats: int, child_args: Callable[[str, str], list[str]],
                    env: dict, describe: Callable[[str, int, dict], str], *, max_load: float = MAX_LOAD,
                    retries: int = RETRIES) -> dict[str, list[dict]]:
    """Run each ``(name, tool, precision)`` contender ``repeats`` times, each run in a fresh process,
    reversing the order on odd repetitions so neither side always runs on a warm (or hot) machine.

    Each run starts on a quiet machine (:func:`wait_for_quiet`); a run during which other processes kept
    more than ``max_load`` CPUs busy is repeated up to ``retries`` times and the quietest attempt kept.
    Each result dict gains ``foreign_load`` (CPUs), ``peak_rss_mb`` (MiB) and ``attempts``."""
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in contenders}
    for rep in range(repeats):
        for name, tool, precision in (contenders if rep % 2 == 0 else contenders[::-1]):
            best = None
            for attempt in range(1, retries + 2):
                wait_for_quiet()
                done = run_measured([sys.executable, *child_args(tool, precision)], env)
                lines = [line for line in done.stdout.splitlines() if line.startswith(MARK)]
                if done.returncode != 0 or not lines:
                    sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
                if best is None or done.foreign_load < best[0].foreign_load:
                    best = done, lines[0]
                if done.foreign_load <= max_load:
                    break
                if attempt <= retries:
                    print(f"{name} rep {rep}: other processes kept {done.foreign_load:.2f} CPUs busy (> {max_load}); "
                          f"repeating (attempt {attempt + 1} of {retries + 1})", flush=True)
                else:
                    print(f"WARNING: {name} rep {rep}: all {attempt} attempts were loaded; keeping the quietest "
                          f"({best[0].foreign_load:.2f} CPUs)", flush=True)
            done, line = best
            reported = json.loads(line[len(MARK):])
            own = reported.pop("own_peak_rss_mb", None)  # the child's own figure: wait4's carries the parent's (own_peak_rss_mb)
            result = {**reported, "foreign_load": round(done.foreign_load, 3),
                      "peak_rss_mb": own if own is not None else round(done.peak_rss_mb, 1), "attempts": attempt}
            runs[name].append(result)
            print(f"{describe(name, rep, result)} [foreign load {result['foreign_load']:.2f} CPUs, "
                  f"peak RSS {result['peak_rss_mb']:.0f} MB]", flush=True)
    return runs


def load_summary(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Per contender, for a results table: the worst foreign load of its kept runs, the median peak RSS
    and how many of its runs needed more than one attempt."""
    return {name: {"max_foreign_load": max(r["foreign_load"] for r in rs),
                   "median_peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in rs),
                   "retried_runs": sum(r["attempts"] > 1 for r in rs)} for name, rs in runs.items() if rs}


def harness_settings() -> dict:
    """How :func:`run_alternating` guards against a busy machine (its defaults), for the results header."""
    return {"quiet_below_cpus": QUIET_BELOW, "quiet_window_s": QUIET_WINDOW, "quiet_timeout_s": QUIET_TIMEOUT,
            "max_foreign_load_cpus": MAX_LOAD, "retries": RETRIES,
            "load_average_1m_at_start": round(os.getloadavg()[0], 2)}


# -- helpers added for bench_finetune.py, bench_ddp.py and run_all.py ------------------------------

def bench_env(**extra: str) -> dict[str, str]:
    """The children's environment: no hub look-ups, no tokenizer thread pools, plus ``extra``."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **extra}


def torchrun(nproc: int, script: str, args: list[str]) -> list[str]:
    """Arguments after ``python`` that run ``script args`` under ``torchrun --nproc_per_node nproc``
    (``--standalone``: a free local rendezvous port, so repetitions never collide)."""
    return ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), script, *args]


def is_main_process() -> bool:
    """False on the ranks > 0 of a torchrun job: only rank 0 reports a result."""
    return int(os.environ.get("RANK", "0")) == 0


def spread(values: list[float]) -> dict[str, float]:
    """Median, min and max of the repetitions of one contender."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def trainer_clock(times: list[float], losses: list[float], cuda: bool = False):
    """A ``transformers.TrainerCallback`` that appends the end time of every Trainer step to ``times`` and each logged
    loss to ``losses`` (``cuda``: after the step's kernels finish, not only their launch; pretune's stamps follow a sync too)."""
    import torch
    import transformers

    class Clock(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    return Clock()


def pretune_step_times(run_dir: Path, steps: int) -> list[dict]:
    """The per-step ``train`` rows of a pretune run logged with ``trainer.log_every=1`` (each has the
    ``time`` stamp written right after its optimizer step, before any evaluation or save)."""
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    if [r["step"] for r in train] != list(range(1, steps + 1)):
        raise RuntimeError(f"{run_dir}: expected one train row per step 1..{steps} (trainer.log_every=1)")
    return train


def steady_seconds(times: list[float], warmup: int) -> float:
    """Wall time from the end of warm-up step ``warmup`` to the end of the last step."""
    return times[-1] - times[warmup - 1]


def tail_mean(losses: list[float]) -> float:
    """Mean training loss over the last quarter of the steps: the quality check at equal steps."""
    tail = losses[-max(1, len(losses) // 4):]
    return sum(tail) / len(tail)


def source_fingerprint() -> str:
    """The git commit plus a hash of pretune's source as it is on disk now (the working tree may differ
    from the commit): two results with the same fingerprint measured the same code."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for path in sorted((root / "src" / "pretune").rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    done = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return f"{done.stdout.strip() or 'unknown'}+src:{digest.hexdigest()[:12]}"


def report_header() -> dict:
    """Date, machine, versions, the source fingerprint and the harness's load guards, for the top of every
    results JSON."""
    import torch

    header = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "source": source_fingerprint(), "harness": harness_settings()}
    try:
        import transformers

        header["transformers"] = transformers.__version__
    except ImportError:
        pass
    return header


def write_results(name: str, quick: bool, report: dict) -> Path:
    """``results/NAME.json`` (``NAME-quick.json`` at smoke size)."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}{'-quick' if quick else ''}.json"
    path.write_text(json.dumps(report, indent=2))
    return path


def check_source(report: dict) -> None:
    """Flag a run during which pretune's source changed (its contenders may have run different code)."""
    now = source_fingerprint()
    if now != report["source"]:
        report["source_at_end"] = now
    if now.split("+src:")[1] != report["source"].split("+src:")[1]:  # a new commit of the same source is the same code
        print(f"WARNING: pretune's source changed during this run ({report['source']} -> {now}); "
              "repetitions may have measured different code", flush=True)


def write_topic_split(folder: Path, seed: int = 0, **select: int | None) -> dict:
    """train.csv / test.csv of the embedded stdlib-topics task (stratified 80/20), read by every contender."""
    import csv

    from pretune.data.builtin import stdlib_topics
    from pretune.data.labelled import stratified_split

    table = stdlib_topics(**select)  # min_count / max_classes as the benchmark chooses
    texts, labels = table["text"], table["label"]
    train, test = stratified_split(labels, 0.2, seed)
    for name, rows in (("train", train), ("test", test)):
        with open(folder / f"{name}.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["text", "label"])
            writer.writerows([texts[i], labels[i]] for i in rows)
    return {"train": len(train), "test": len(test), "classes": len(set(labels))}


def read_csv(path: Path) -> tuple[list[str], list[str]]:
    """(texts, labels) of a CSV written by :func:`write_topic_split`."""
    import csv

    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return [r["text"] for r in rows], [r["label"] for r in rows]


def gemm_peaks(precisions: list[str], device: str = "cpu", size: int | None = None) -> dict[str, float]:
    """The measured GEMM peak (FLOP/s) of each precision a contender uses (``auto``: what pretune resolves to
    here), and only those: on a CPU without native bf16 one emulated bf16 2048-matmul takes about a minute."""
    import torch

    from pretune.trainer.flops import measure_peak
    from pretune.trainer.precision import DTYPES, resolve

    names = sorted({resolve("auto", torch.device(device)) if p == "auto" else p for p in precisions})
    found = {name: measure_peak(DTYPES[name], torch.device(device), size, seconds=1.0) for name in names}
    if device == "cuda":
        torch.cuda.empty_cache()  # the contenders' processes get the GPU memory back
    return found


def peaks_text(report: dict) -> str:
    """``GEMM peak fp32 132 / bf16 425 GFLOP/s`` for a report's ``peak_gflops``."""
    return "GEMM peak " + " / ".join(f"{name} {value:.0f}" for name, value in report["peak_gflops"].items()) + " GFLOP/s"
