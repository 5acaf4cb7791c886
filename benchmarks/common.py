"""What every benchmark here shares: contenders in their own processes, alternating, JSON results."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

MARK = "RESULT "
RESULTS = Path(__file__).resolve().parent / "results"


def report_result(result: dict) -> None:
    """Child side: hand one repetition's numbers to the parent."""
    print(MARK + json.dumps(result), flush=True)


def run_alternating(contenders: list[tuple[str, str, str]], repeats: int, child_args: Callable[[str, str], list[str]],
                    env: dict, describe: Callable[[str, int, dict], str]) -> dict[str, list[dict]]:
    """Run each ``(name, tool, precision)`` contender ``repeats`` times, each run in a fresh process,
    reversing the order on odd repetitions so neither side always runs on a warm (or hot) machine."""
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in contenders}
    for rep in range(repeats):
        for name, tool, precision in (contenders if rep % 2 == 0 else contenders[::-1]):
            done = subprocess.run([sys.executable, *child_args(tool, precision)], env=env, capture_output=True, text=True)
            lines = [line for line in done.stdout.splitlines() if line.startswith(MARK)]
            if done.returncode != 0 or not lines:
                sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
            runs[name].append(json.loads(lines[0][len(MARK):]))
            print(describe(name, rep, runs[name][-1]), flush=True)
    return runs


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
    """Date, machine, versions and the source fingerprint, for the top of every results JSON."""
    import torch

    header = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "source": source_fingerprint()}
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
