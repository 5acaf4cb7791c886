"""Kill a run with SIGKILL mid-way, resume it, and get bit-identical final weights."""

import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.integration.helpers import ENV, TINY, pretune, weights

STEPS = 24
COMMON = [*TINY, f"trainer.max_steps={STEPS}", "trainer.save_every=3", "trainer.accumulate=2",
          "trainer.precision=auto", "trainer.eval_every=5", "backbone.config.hidden_dropout_prob=0.1"]


def kill_after_checkpoint(run_dir, args, after: int):
    """Start a run, SIGKILL it once checkpoint ``after`` exists, return its exit code."""
    proc = subprocess.Popen([sys.executable, "-m", "pretune", "pretrain", *args], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    target = run_dir / "checkpoints" / f"step-{after:08d}"
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return proc.returncode


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    pretune("pretrain", "recipes/text-mlm.yaml", f"run_dir={run_dir}", *COMMON)
    return weights(run_dir / "model")


def check_resumed_equals(reference, tmp_path, kills: list[int]):
    run_dir = tmp_path / "run"
    args = ["recipes/text-mlm.yaml", f"run_dir={run_dir}", *COMMON]
    code = kill_after_checkpoint(run_dir, args, kills[0])
    assert code == -signal.SIGKILL, "the run ended before it could be killed"
    for after in kills[1:]:
        kill_after_checkpoint(run_dir, [str(run_dir), "--resume"], after)
    pretune("pretrain", str(run_dir), "--resume")
    resumed = weights(run_dir / "model")
    assert resumed.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(resumed[name], tensor), f"{name} differs after resume"


def test_sigkill_then_resume_is_bit_identical(reference, tmp_path):
    check_resumed_equals(reference, tmp_path, kills=[6])


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(20))
def test_sigkill_at_random_steps(reference, tmp_path, trial):
    rng = random.Random(trial)
    kills = sorted(rng.sample(range(3, STEPS, 3), 2))
    check_resumed_equals(reference, tmp_path, kills)


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    done = pretune("pretrain", str(tmp_path), "--resume", check=False)
    assert done.returncode != 0 and "pretune: error:" in done.stderr and "Traceback" not in done.stderr
