"""Two CPU processes under torchrun give the same model as one process with the same global batch."""

import json
import subprocess
import sys

import pytest
import torch

from tests.integration.helpers import ENV, TINY, assert_same_training, pretune, weights

COMMON = [*TINY, "trainer.max_steps=6", "trainer.precision=fp32", "trainer.lr=2e-3",
          "backbone.config.hidden_dropout_prob=0.0", "backbone.config.attention_probs_dropout_prob=0.0"]


def test_ddp_two_processes_equals_single_process(tmp_path):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    pretune("pretrain", "recipes/text-mlm.yaml", f"run_dir={single}", *COMMON, "trainer.batch_size=8")
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
         "-m", "pretune", "pretrain", "recipes/text-mlm.yaml", f"run_dir={ddp}", *COMMON, "trainer.batch_size=4"],
        env=ENV, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_training(single, ddp)


@pytest.mark.slow  # the global-batch NT-Xent under 2 processes is tested in-process by tests/tasks/test_contrastive.py
def test_simclr_under_ddp_uses_the_global_batch(tmp_path):
    """Negatives are gathered from both ranks: 2 x 16 trains exactly like 1 x 32 (no batch norm, whose
    statistics are per rank).  SGD, not Adam: Adam's first updates are about lr * sign(gradient), so
    float rounding in near-zero gradients (summed in a different order by the all-reduce) would flip
    whole lr-sized updates and hide what this test compares.  An MLP: the tiny CNN without batch norm
    starts collapsed (gradient norm ~1e-5), too flat to show a difference."""
    common = ["backbone.name=mlp", "backbone.size=tiny", "backbone.norm=false", "task.projection_norm=false", "data.size=8", "trainer.max_steps=4",
              "trainer.optimizer=sgd", "trainer.lr=0.5", "trainer.warmup=0",
              "trainer.precision=fp32", "trainer.progress=false", "trainer.tensorboard=false", "trainer.eval_every=100",
              "trainer.log_every=1"]
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    pretune("pretrain", "recipes/image-simclr.yaml", f"run_dir={single}", *common, "trainer.batch_size=32")
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29518",
         "-m", "pretune", "pretrain", "recipes/image-simclr.yaml", f"run_dir={ddp}", *common, "trainer.batch_size=16"],
        env=ENV, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = weights(single / "model"), weights(ddp / "model")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=f"{name} differs")
    losses = [[r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]
              for run in (single, ddp)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
