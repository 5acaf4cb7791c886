"""Kill a real ``python -m pretune`` run with SIGKILL at a chosen point, resume it, compare weights.

Kill points are named by ``PRETUNE_CRASH_AT`` (see :func:`pretune.trainer.checkpoint.crash_point`):
``micro:S:I`` after micro-batch I of step S (mid gradient accumulation), ``eval:S`` inside the
evaluation at step S, ``save:NAME`` / ``swap:NAME`` while writing the folder NAME (a checkpoint
``step-…``, ``best`` or ``model``), or ``time:T`` for a plain kill T seconds after training starts.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from pretune.cli import main
from pretune.trainer import checkpoint
from tests.integration.helpers import ENV, TINY

PRETRAIN = ["pretrain", "recipes/text-mlm.yaml", *TINY, "trainer.max_steps=24", "trainer.save_every=3",
            "trainer.accumulate=2", "trainer.eval_every=5", "trainer.threads=1", "trainer.log_every=1",
            "backbone.config.hidden_dropout_prob=0.1", "backbone.config.attention_probs_dropout_prob=0.1"]


def finetune_args(encoder: Path, train_csv: Path) -> list[str]:
    """Fine-tuning with dropout, accumulation, a linear schedule and early stopping (patience 2)."""
    return ["finetune", "recipes/text-classify.yaml", f"model={encoder}", f"data.train={train_csv}", "data.max_length=24",
            "trainer.batch_size=8", "trainer.accumulate=2", "trainer.epochs=8", "trainer.eval_every=2", "trainer.patience=2",
            "trainer.save_every=3", "trainer.lr=1e-3", "trainer.threads=1", "trainer.progress=false",
            "trainer.tensorboard=false", "trainer.precision=fp32", "trainer.log_every=1"]


def run_in_process(args: list[str], run_dir: Path) -> Path:
    """An uninterrupted run (or a resume) in this process; returns the run directory."""
    code = main([*args, f"run_dir={run_dir}"] if args[1] != str(run_dir) else args)
    assert code == 0, f"pretune {' '.join(args)} exited with {code}"
    return run_dir


def run_killed(args: list[str], run_dir: Path, point: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Start ``python -m pretune ARGS`` and have it SIGKILLed at ``point``; returns the finished process."""
    cmd = [sys.executable, "-m", "pretune", *args] + ([f"run_dir={run_dir}"] if "--resume" not in args else [])
    if not point.startswith("time:"):
        done = subprocess.run(cmd, env={**ENV, "PRETUNE_CRASH_AT": point}, capture_output=True, text=True, timeout=timeout)
        return done
    delay = float(point.split(":")[1])  # a plain kill at a random moment after training started
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    log = run_dir / "metrics.jsonl"
    while not (log.exists() and log.stat().st_size) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    out, err = proc.communicate()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def assert_latest_is_loadable(run_dir: Path) -> Path | None:
    """The newest complete checkpoint loads: its trainer state (restricted unpickler) and weights (safetensors)."""
    latest = checkpoint.latest_checkpoint(run_dir)
    if latest is not None:
        state = checkpoint.load_state(latest)
        assert state["progress"]["step"] == int(latest.name.split("-")[1])
        assert load_file(str(latest / "module.safetensors"))
    return latest


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model" / "model.safetensors"))


def assert_identical(reference: Path, resumed: Path, context: str) -> None:
    """Final model bit-identical; the same best step and early-stopping state."""
    a, b = final_weights(reference), final_weights(resumed)
    assert a.keys() == b.keys(), context
    for name in a:
        assert torch.equal(a[name], b[name]), f"{context}: {name} differs after resume"
    state_a = checkpoint.load_state(checkpoint.latest_checkpoint(reference))["progress"]
    state_b = checkpoint.load_state(checkpoint.latest_checkpoint(resumed))["progress"]
    for key in ("step", "epoch", "position", "best", "best_step", "bad_evals"):
        assert state_a[key] == state_b[key], f"{context}: progress.{key} {state_a[key]} != {state_b[key]}"


def kill_and_resume(args: list[str], run_dir: Path, points: list[str]) -> list[int]:
    """Kill the run at each point in turn (the first kill in a fresh run, the next ones during resumes),
    check the latest checkpoint after every kill, then resume to the end in this process."""
    codes = []
    for n, point in enumerate(points):
        if n == 0:
            command = args
        elif checkpoint.latest_checkpoint(run_dir) is None:  # killed before the first checkpoint: start again, as a user would
            command = [*args, "--overwrite"]
        else:
            command = [args[0], str(run_dir), "--resume"]
        done = run_killed(command, run_dir, point)
        codes.append(done.returncode)
        if n > 0 and done.returncode == 0:  # the resumed run began after this point and finished: nothing to kill
            break
        assert done.returncode == -signal.SIGKILL, f"kill at {point} did not happen (exit {done.returncode}): {done.stderr[-2000:]}"
        assert not any(p.name.startswith("step-") and not (p / "state.pt").is_file()
                       for p in (run_dir / "checkpoints").glob("*")) if (run_dir / "checkpoints").is_dir() else True
        assert_latest_is_loadable(run_dir)
    if checkpoint.latest_checkpoint(run_dir) is None:  # killed before the first checkpoint: start again
        run_in_process([*args, "--overwrite"], run_dir)
    else:
        run_in_process([args[0], str(run_dir), "--resume"], run_dir)
    return codes


def eval_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["split"] == "validation"]
