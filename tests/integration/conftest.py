import csv
import random

import pytest

from tests.integration.helpers import TINY


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory):
    """A nano BERT pretrained for a few steps by pretune itself (model/ folder)."""
    import pretune

    run_dir = tmp_path_factory.mktemp("enc") / "run"
    return pretune.train(None, [f"run_dir={run_dir}", *TINY, "trainer.max_steps=4", "data.tokenizer.vocab_size=600"]).model_dir


@pytest.fixture(scope="session")
def tiny_decoder(tmp_path_factory):
    import pretune

    run_dir = tmp_path_factory.mktemp("dec") / "run"
    return pretune.train(None, [f"run_dir={run_dir}", *TINY, "task=clm", "backbone.name=gpt2", "trainer.max_steps=4",
                                "data.tokenizer.vocab_size=600"]).model_dir


@pytest.fixture(scope="session")
def topics(tmp_path_factory):
    """A real labelled set: standard-library docstrings labelled by package (5 packages, CSV)."""
    from pretune.data.builtin import stdlib_topics

    data = stdlib_topics(min_count=60, max_classes=5)
    folder = tmp_path_factory.mktemp("topics")
    rows = [(" ".join(t.split()[:60]), l) for t, l in zip(data["text"], data["label"])]
    random.Random(0).shuffle(rows)
    rows = rows[::3]  # ~ 200 rows keep the tests fast
    for name, part in (("train.csv", rows[: int(len(rows) * 0.7)]), ("test.csv", rows[int(len(rows) * 0.7):])):
        with open(folder / name, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["text", "label"])
            writer.writerows(part)
    return folder
