"""Tiny end-to-end settings: a 1-layer, 32-wide model (``nano``) on 300 documents of the embedded corpus."""

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

TINY = [
    "data.max_documents=300", "data.block_size=32", "data.validation=0.1", "data.tokenizer.vocab_size=400",
    "backbone.size=nano",
    "trainer.batch_size=8", "trainer.log_every=2", "trainer.eval_every=4", "trainer.eval_batches=2",
    "trainer.progress=false", "trainer.tensorboard=false", "trainer.precision=fp32",
]

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "OMP_NUM_THREADS": "1"}


def pretune(*args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pretune", *args], env=ENV, capture_output=True, text=True,
                          check=False, **kwargs) if not check else _checked([sys.executable, "-m", "pretune", *args], **kwargs)


def _checked(cmd, **kwargs):
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(model_dir) / "model.safetensors"))


def assert_same_training(expected_run: Path, run: Path) -> None:
    """``run`` trained the model of ``expected_run``: the same weights (1e-4 / 1e-5: the same sums in another
    order, over ranks) and the same global loss at every logged step, and training moved the loss."""
    import json

    import pytest

    a, b = weights(expected_run / "model"), weights(run / "model")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=f"{name} differs")
    losses = [[r["loss"] for r in map(json.loads, (r_dir / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]
              for r_dir in (expected_run, run)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)  # the same global loss at every logged step
    assert losses[0][-1] < losses[0][0]  # and training moved the weights
