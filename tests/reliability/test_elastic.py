"""Elastic runs under torchrun (gloo, 2 processes x 1 thread): a worker SIGKILLed mid-step under
``--max-restarts`` restarts the job, which resumes from its last checkpoint and ends with the weights
of an uninterrupted run; a worker that hangs instead ends the job after ``trainer.dist_timeout`` with
one line naming it and the step.  The in-process tests check which run directory a restart resumes.

torchrun runs here use the c10d rendezvous with ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``: with the
store shared between the agent and the workers (torch's default) a restarted worker can read its
peers' addresses from the attempt before and fail to connect (measured on torch 2.14)."""

import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

import pretune
from pretune.errors import CheckpointError
from tests.integration.helpers import ENV, TINY, weights
from tests.reliability.harness import assert_identical, assert_latest_is_loadable

ARGS = ["pretrain", "recipes/text-mlm.yaml", *TINY, "trainer.max_steps=12", "trainer.save_every=3", "trainer.threads=1",
        "trainer.batch_size=4"]


def torchrun(args: list[str], env: dict[str, str], port: int, restarts: int = 0,
             timeout: float = 300) -> tuple[int, list[tuple[float, str]]]:
    """``torchrun --nproc_per_node 2 --max-restarts RESTARTS -m pretune ARGS``: its exit code and its output
    lines (stdout and stderr of the launcher and the workers), each with the seconds since the start."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--max-restarts", str(restarts),
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"pretune-{port}", "-m", "pretune", *args]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env={**ENV, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    timer = threading.Timer(timeout, os.killpg, (proc.pid, signal.SIGKILL))  # the launcher and its workers
    timer.start()
    try:
        lines = [(time.perf_counter() - start, line.rstrip("\n")) for line in proc.stdout]
        code = proc.wait()
    finally:
        timer.cancel()
    return code, [*lines, (time.perf_counter() - start, f"(exit {code})")]


def seconds_from(lines: list[tuple[float, str]], text: str) -> float:
    """Seconds from the first line holding ``text`` to the end of the job."""
    return lines[-1][0] - next(t for t, line in lines if text in line)


def output(lines: list[tuple[float, str]]) -> str:
    return "\n".join(line for _, line in lines)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted torchrun run of ARGS."""
    run_dir = tmp_path_factory.mktemp("elastic") / "reference"
    code, lines = torchrun([*ARGS, f"run_dir={run_dir}"], {}, 29616)
    assert code == 0, output(lines)[-3000:]
    return run_dir


def test_a_killed_worker_restarts_the_job_which_resumes_exactly(reference, tmp_path):
    run_dir = tmp_path / "run"
    code, lines = torchrun([*ARGS, f"run_dir={run_dir}"], {"PRETUNE_CRASH_AT": "micro:8:0@1"}, 29617, restarts=2)
    text = output(lines)
    assert code == 0, text[-3000:]
    assert "(exitcode: -9) local_rank: 1" in text, text[-3000:]  # the kill did happen, once
    assert text.count("torchrun restarted the job") == 1
    assert "torchrun restarted the job (restart 1) after a process stopped; resuming from" in text
    assert "step-00000006 (step 6)" in text
    print(f"killed at step 8: restarted and finished {seconds_from(lines, 'exitcode: -9'):.1f} s after the kill")
    assert_identical(reference, run_dir, "torchrun --max-restarts 2, rank 1 killed in step 8")


@pytest.mark.slow
def test_a_worker_killed_before_the_first_checkpoint_starts_the_run_over(reference, tmp_path):
    run_dir = tmp_path / "run"
    code, lines = torchrun([*ARGS, f"run_dir={run_dir}"], {"PRETUNE_CRASH_AT": "micro:2:0@1"}, 29618, restarts=1)
    text = output(lines)
    assert code == 0, text[-3000:]
    assert "torchrun restarted the job (restart 1) after a process stopped; no checkpoint in" in text, text[-3000:]
    assert_identical(reference, run_dir, "torchrun --max-restarts 1, rank 1 killed in step 2")


@pytest.mark.parametrize("hung, port, who", [
    (1, 29619, "rank 0: rank 1 stopped answering"),
    pytest.param(0, 29620, "rank 1: rank 0 (or a rank it waits for) stopped answering", marks=pytest.mark.slow),
])
def test_a_hung_worker_ends_the_job_with_one_line_naming_it(tmp_path, hung, port, who):
    """Accumulation over 2 micro-batches: the hung rank stops after the first, so the other waits in the
    gradient all-reduce of step 5's second micro-batch until trainer.dist_timeout, then names it."""
    run_dir = tmp_path / "run"
    code, lines = torchrun([*ARGS, "trainer.accumulate=2", "trainer.dist_timeout=15", f"run_dir={run_dir}"],
                           {"PRETUNE_HANG_AT": f"micro:5:0@{hung}"}, port)
    text = output(lines)
    assert code != 0
    errors = [line for _, line in lines if line.startswith("pretune: error:")]
    assert len(errors) == 1, text[-3000:]
    assert errors[0].startswith(f"pretune: error: {who} (hung or too slow) at step 5: no collective within "
                                "trainer.dist_timeout=15 s; the last checkpoint"), errors[0]
    assert 'pretune/run.py", line' not in text  # no traceback from pretune (torchrun prints its own summary)
    seconds = seconds_from(lines, "hangs here")
    print(f"rank {hung} hung in step 5: the job ended {seconds:.1f} s later")
    assert seconds < 60, f"the job took {seconds:.0f} s to end after rank {hung} hung"
    assert assert_latest_is_loadable(run_dir).name == "step-00000003"


TINY_RUN = [*TINY, "trainer.max_steps=4", "trainer.save_every=2", "trainer.eval_every=100", "trainer.threads=1"]


def test_a_restarted_process_resumes_its_jobs_run_and_no_other(tmp_path, monkeypatch, capsys):
    """In process, as if torchrun had restarted it: the run directory written by this recipe is resumed
    (no 'already holds a run'); one another recipe wrote is neither resumed nor replaced."""
    args = [f"run_dir={tmp_path / 'run'}", *TINY_RUN]
    pretune.train(None, args)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    pretune.train(None, args)
    assert "torchrun restarted the job (restart 1) after a process stopped; resuming from" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="already holds a run; pass --resume"):
        pretune.train(None, [*args, "trainer.lr=1e-3"])


def test_a_restart_before_the_first_checkpoint_starts_over(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    args = [f"run_dir={run_dir}", *TINY_RUN]
    first = weights(pretune.train(None, args).model_dir)
    shutil.rmtree(run_dir / "checkpoints")  # as if the job died before its first checkpoint
    shutil.rmtree(run_dir / "model")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    again = weights(pretune.train(None, args).model_dir)
    assert "torchrun restarted the job (restart 2) after a process stopped; no checkpoint in" in capsys.readouterr().err
    assert all(torch.equal(first[name], again[name]) for name in first)
