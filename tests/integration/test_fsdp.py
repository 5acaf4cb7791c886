"""trainer.distributed=fsdp over two CPU processes (gloo): the same model as one process with the same global
batch, half the weights + gradients + optimizer state per rank, sharded checkpoints that resume after a
kill and re-shard between 2 and 1 processes, and gradual unfreezing that syncs what it unfreezes."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from pretune.trainer import checkpoint, sharding
from tests.integration.helpers import ENV, TINY, pretune, weights

COMMON = [*TINY, "trainer.max_steps=6", "trainer.save_every=3", "trainer.lr=2e-3", "trainer.threads=1",
          "backbone.config.hidden_dropout_prob=0.0", "backbone.config.attention_probs_dropout_prob=0.0"]
FSDP = "trainer.distributed=fsdp"


def torchrun(*args, port, env=None, check=True):
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
                           "-m", "pretune", *args], env=env or ENV, capture_output=True, text=True, timeout=600)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def train_lines(run_dir):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]


def assert_same_model(a, b, exact=False):
    a, b = weights(a / "model"), weights(b / "model")
    assert a.keys() == b.keys()
    for name in a:
        if exact:
            assert torch.equal(a[name], b[name]), f"{name} differs"
        else:  # the same sums in another order (a reduce-scatter over 2 ranks against one process)
            torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=f"{name} differs")


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("fsdp") / "single"
    pretune("pretrain", "recipes/text-mlm.yaml", f"run_dir={run_dir}", *COMMON, "trainer.batch_size=8")
    return run_dir


def test_two_sharded_processes_equal_one_resume_after_a_kill_and_reshard_to_one(single, tmp_path):
    run_dir = tmp_path / "fsdp"
    args = ["pretrain", "recipes/text-mlm.yaml", f"run_dir={run_dir}", *COMMON, "trainer.batch_size=4", FSDP]
    killed = torchrun(*args, port=29651, env={**ENV, "PRETUNE_CRASH_AT": "micro:5:0@1"}, check=False)  # rank 1 dies mid-step 5
    assert killed.returncode != 0
    assert "exitcode  : -9" in killed.stderr and "rank      : 1" in killed.stderr, killed.stderr[-2000:]  # torchrun names it
    latest = checkpoint.latest_checkpoint(run_dir)
    assert latest.name == "step-00000003" and sharding.has_shards(latest)
    assert sorted(p.name for p in (latest / "dcp").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]  # one shard per rank
    assert not (latest / "module.safetensors").exists() and (latest / "model" / "model.safetensors").is_file()
    one = tmp_path / "one"
    shutil.copytree(run_dir, one)

    torchrun("pretrain", str(run_dir), "--resume", port=29652)  # 2 -> 2
    assert_same_model(single, run_dir)
    before = [r["loss"] for r in train_lines(run_dir) if r["step"] <= 2]
    assert before == pytest.approx([r["loss"] for r in train_lines(single) if r["step"] <= 2], rel=1e-5)
    state = train_lines(run_dir)[0]["state_mb"] / train_lines(single)[0]["state_mb"]
    assert 0.45 < state < 0.6, f"rank 0 holds {state:.2f} of one process's weights + gradients + optimizer state"

    pretune("pretrain", str(one), "--resume", "trainer.batch_size=8")  # 2 -> 1: the same 8 examples per step
    assert_same_model(single, one)


@pytest.mark.slow  # 2 -> 1 re-sharding runs in the default suite; this is the other direction
def test_a_one_process_sharded_checkpoint_resumes_on_two(single, tmp_path):
    run_dir = tmp_path / "fsdp1"
    killed = subprocess.run([sys.executable, "-m", "pretune", "pretrain", "recipes/text-mlm.yaml", f"run_dir={run_dir}", *COMMON,
                             "trainer.batch_size=8", FSDP], env={**ENV, "PRETUNE_CRASH_AT": "micro:5:0"}, capture_output=True, text=True)
    assert killed.returncode != 0
    assert sharding.has_shards(checkpoint.latest_checkpoint(run_dir))  # no process group: the same sharded format, one shard
    torchrun("pretrain", str(run_dir), "--resume", "trainer.batch_size=4", port=29653)  # 1 -> 2
    assert_same_model(single, run_dir)


def test_a_changed_global_batch_is_refused_in_one_line(single, tmp_path):
    run_dir = tmp_path / "copy"
    shutil.copytree(single, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step-00000006")
    done = pretune("pretrain", str(run_dir), "--resume", "trainer.batch_size=4", check=False)
    assert done.returncode != 0
    assert "trained with 8 examples per step" in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


@pytest.mark.slow
def test_sharded_resume_after_a_kill_is_bit_identical(tmp_path):
    args = [*COMMON, "trainer.batch_size=4", FSDP]
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    torchrun("pretrain", "recipes/text-mlm.yaml", f"run_dir={reference}", *args, port=29654)
    torchrun("pretrain", "recipes/text-mlm.yaml", f"run_dir={killed}", *args, port=29655,
             env={**ENV, "PRETUNE_CRASH_AT": "micro:5:0@1"}, check=False)
    torchrun("pretrain", str(killed), "--resume", port=29656)
    assert_same_model(reference, killed, exact=True)


@pytest.mark.slow
def test_gradual_unfreezing_under_fsdp_trains_what_it_unfreezes_on_both_ranks(tiny_encoder, topics, tmp_path):
    """Lightning-AI/pytorch-lightning#20340: unfrozen layers must sync across ranks.  2 x 4 sharded equals 1 x 8.
    (Slow: FSDP2 reduce-scatters every gradient that exists, with no registration step to miss; in one process
    tests/trainer/test_sharding.py checks every strategy sharded against unsharded.)"""
    common = ["finetune", "recipes/text-classify.yaml", f"model={tiny_encoder}", f"data.train={topics / 'train.csv'}",
              "strategy=gradual-unfreeze", "trainer.epochs=3", "trainer.progress=false", "trainer.tensorboard=false",
              "trainer.precision=fp32", "trainer.eval_every=epoch", "trainer.lr=1e-3", "trainer.warmup=0", "trainer.threads=1",
              "data.max_length=32", "backbone.config.hidden_dropout_prob=0.0", "backbone.config.attention_probs_dropout_prob=0.0",
              ]
    one, two = tmp_path / "one", tmp_path / "two"
    pretune(*common, f"run_dir={one}", "trainer.batch_size=8")
    torchrun(*common, f"run_dir={two}", "trainer.batch_size=4", FSDP, port=29657)
    assert_same_model(one, two)
    start, end = weights(tiny_encoder), weights(two / "model")
    moved = {k for k in end if k in start and not torch.equal(start[k], end[k])}
    assert any("layer.0." in k for k in moved)  # unfrozen by the last epoch: it trained
