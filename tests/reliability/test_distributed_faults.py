"""Under torchrun (gloo, 2 processes x 1 thread), one rank SIGKILLed mid-step ends the whole job
within a bounded time with a message naming the failed rank, and ``--resume`` then finishes the run."""

import subprocess
import sys
import time

import pytest

from pretune.trainer import checkpoint
from tests.integration.helpers import ENV, TINY

ARGS = ["pretrain", "recipes/text-mlm.yaml", *TINY, "trainer.max_steps=12", "trainer.save_every=3", "trainer.threads=1",
        "trainer.batch_size=4"]


def torchrun(args, env, port, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port), "-m", "pretune", *args]
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    return done, time.perf_counter() - start


@pytest.mark.slow  # a SIGKILLed rank ending the job and resuming is tested by test_fsdp.py and test_elastic.py
def test_a_dead_rank_ends_the_job_and_the_run_resumes(tmp_path):
    run_dir = tmp_path / "ddp"
    done, seconds = torchrun([*ARGS, f"run_dir={run_dir}"], {**ENV, "PRETUNE_CRASH_AT": "micro:8:0@1"}, 29531)
    assert done.returncode != 0
    assert "exitcode  : -9" in done.stderr and "rank      : 1" in done.stderr, done.stderr[-2000:]
    assert seconds < 120, f"the job took {seconds:.0f}s to end after a rank died"
    latest = checkpoint.latest_checkpoint(run_dir)
    assert latest is not None and latest.name == "step-00000006"
    checkpoint.load_state(latest)
    done, _ = torchrun(["pretrain", str(run_dir), "--resume"], ENV, 29532)
    assert done.returncode == 0, done.stderr[-3000:]
    assert checkpoint.load_state(checkpoint.latest_checkpoint(run_dir))["progress"]["step"] == 12
    assert (run_dir / "model" / "model.safetensors").is_file()
