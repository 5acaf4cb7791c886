"""Shared fixtures of the reliability tests: a tiny pretrained encoder and a small labelled CSV."""

import csv
import random

import pytest
import torch

from tests.integration.helpers import TINY


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """In-process runs may set torch's thread count (trainer.threads); put it back for the next test."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def encoder(tmp_path_factory):
    """A nano BERT pretrained for two steps by pretune (a RUN_DIR/model folder, safetensors weights)."""
    import pretune

    run_dir = tmp_path_factory.mktemp("encoder") / "run"
    return pretune.train(None, [f"run_dir={run_dir}", *TINY, "trainer.max_steps=2", "trainer.eval_every=100"]).model_dir


@pytest.fixture(scope="session")
def labelled(tmp_path_factory):
    """``train.csv`` with 96 short texts in two classes whose words differ (learnable in a few steps)."""
    rng = random.Random(0)
    words = {"pos": "good great fine nice calm warm bright".split(), "neg": "bad awful poor dull cold dark grim".split()}
    common = "the a day film story plot it was and very".split()
    rows = [(" ".join(rng.choice(words[label] + common) for _ in range(8)), label) for label in ("pos", "neg") * 48]
    folder = tmp_path_factory.mktemp("labelled")
    with open(folder / "train.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return folder / "train.csv"
