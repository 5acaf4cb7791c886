"""Tiny studies shared by the tests of this folder (each runs once per session)."""

from pathlib import Path

import pytest

from tests.integration.conftest import tiny_encoder, topics  # noqa: F401  (session fixtures reused here)

ROOT = Path(__file__).parents[2]
FAST = ["trainer.progress=false", "trainer.tensorboard=false", "trainer.precision=fp32"]


@pytest.fixture(scope="session")
def simclr_model(tmp_path_factory):
    """A tiny CNN after 3 SimCLR steps on the embedded digits (16x16)."""
    import pretune

    run_dir = tmp_path_factory.mktemp("simclr") / "run"
    return pretune.train(ROOT / "recipes/image-simclr.yaml", [f"run_dir={run_dir}", "backbone.size=tiny", "data.size=16",
                                                              "trainer.max_steps=3", "trainer.batch_size=64", "trainer.eval_every=3",
                                                              "trainer.monitor=loss", *FAST]).model_dir  # k-NN may not beat step 0 in 3 steps


@pytest.fixture(scope="session")
def image_study(tmp_path_factory, simclr_model):
    """Budgets 10% and 100% x 2 seeds x (pretrained full, scratch) on the digits, 1 epoch each (~10 s)."""
    from pretune.studies.compare import compare

    study_dir = tmp_path_factory.mktemp("study") / "images"
    return compare(ROOT / "recipes/study-images.yaml", [f"model={simclr_model}", f"run_dir={study_dir}", "budgets=[0.1,1.0]", "seeds=2", "scratch_lr_search=[1.0]", "scratch_epochs=1",
                                                        "strategies=[full]", "backbone.size=tiny", "trainer.epochs=1", "trainer.min_steps=20",
                                                        "trainer.log_every=4", *FAST])
