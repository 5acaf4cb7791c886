"""``pretune search``: Optuna over a fine-tuning recipe finds a better learning rate than a bad default; resumes."""

import csv

import pytest
import yaml

from pretune.errors import RecipeError
from pretune.studies import search as S
from tests.studies.conftest import FAST, ROOT

# a CNN from scratch on the embedded digits, 1 epoch: the default lr (1e-6) learns nothing
DIGITS = ["backbone.size=tiny", "trainer.lr=1e-6", "trainer.epochs=1", *FAST]
SPACE = ["space.lr=[1e-3,3e-2]", "space.batch_size=[32]", "space.epochs=[2]", "space.weight_decay=null"]


def test_search_beats_a_bad_learning_rate_and_resumes(tmp_path):
    import pretune

    baseline = pretune.train(ROOT / "recipes/image-classify.yaml", [f"run_dir={tmp_path / 'default'}", *DIGITS, "trainer.epochs=2"])
    found = S.search(ROOT / "recipes/image-classify.yaml", [f"run_dir={tmp_path / 'search'}", *DIGITS, *SPACE, "trials=3"])
    assert found.metric == "accuracy" and found.mode == "max"
    assert found.best_value > baseline.metrics["accuracy"] + 0.3  # ~0.1 (chance) with the default, ~0.9 after the search
    assert 1e-3 <= found.best_params["trainer.lr"] <= 3e-2 and found.best_params["trainer.epochs"] == 2
    best = yaml.safe_load(found.best_recipe.read_text())
    assert best["trainer"]["lr"] == pytest.approx(found.best_params["trainer.lr"]) and best["kind"] == "finetune"
    rows = list(csv.DictReader(open(tmp_path / "search" / "results.csv")))
    assert len(rows) == 3 and rows[0]["state"] == "complete" and float(rows[0]["accuracy"]) == pytest.approx(found.best_value)
    # the best value is the best validation accuracy that trial logged
    import json

    logged = [r["accuracy"] for r in map(json.loads, open(f"{rows[0]['run_dir']}/metrics.jsonl")) if r["split"] == "validation" and r["step"]]
    assert max(logged) == pytest.approx(found.best_value)
    # continuing the search (same SQLite storage) runs only the missing trial, with new draws
    again = S.search(ROOT / "recipes/image-classify.yaml", [f"run_dir={tmp_path / 'search'}", *DIGITS, *SPACE, "trials=4"])
    assert len(again.rows) == 4
    lrs = [float(r["trainer.lr"]) for r in again.rows]
    assert len(set(lrs)) == 4


class FakeTrial:
    def __init__(self, prune):
        self.reports, self.prune = [], prune

    def report(self, value, step):
        self.reports.append((step, value))

    def should_prune(self):
        return self.prune


def test_pruning_callback_reports_each_evaluation_and_prunes():
    import optuna

    trial = FakeTrial(prune=False)
    callback = S.pruning_callback(trial, "accuracy", prune=True)
    callback(0, {"accuracy": 0.1})  # the step-0 evaluation (before training) is not reported
    callback(10, {"accuracy": 0.5})
    callback(20, {"accuracy": 0.7, "loss": 1.0})
    assert trial.reports == [(1, 0.5), (2, 0.7)]
    with pytest.raises(optuna.TrialPruned):
        S.pruning_callback(FakeTrial(prune=True), "accuracy", prune=True)(10, {"accuracy": 0.2})
    S.pruning_callback(FakeTrial(prune=True), "accuracy", prune=False)(10, {"accuracy": 0.2})  # prune=false: never


def test_space_sampling_and_errors():
    import optuna

    space = S.SpaceConfig(strategy=["llrd", "lora", "freeze-bottom"], lr=[1e-4], epochs=[2, 4])
    seen = set()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(30):
        params = S.sample(study.ask(), space)
        assert params["trainer.lr"] == 1e-4 and 2 <= params["trainer.epochs"] <= 4 and params["trainer.batch_size"] in (16, 32, 64)
        seen.add(params["strategy"].split(":")[0])
        kind, _, value = params["strategy"].partition(":")
        if kind == "llrd":
            assert 0.5 <= float(value) <= 0.95
        elif kind == "lora":
            assert value in ("r=4", "r=8", "r=16")
        else:
            assert value in ("1", "2")
    assert seen == {"llrd", "lora", "freeze-bottom"}
    with pytest.raises(RecipeError, match="space.strategy"):
        S.load_search(ROOT / "recipes/text-classify.yaml", ["space.strategy=[fast]"])
    with pytest.raises(RecipeError, match="space.lr"):
        S.load_search(ROOT / "recipes/text-classify.yaml", ["space.lr=[1,2,3]"])
    with pytest.raises(RecipeError, match="trials"):
        S.load_search(ROOT / "recipes/text-classify.yaml", ["trials=many"])
