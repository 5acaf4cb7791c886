"""The study's intervals on known inputs: metric formulas, coverage on a simulated study, paired differences,
the t fallback, and headlines that never claim what the interval does not support."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score

from pretune.studies import compare as C
from pretune.studies.stats import Bootstrap, metric_of, t_interval, welch


def cells_from(tmp_path, name, truth, predictions) -> list[dict]:
    """Study cells (one per seed) whose run directories hold per-example test predictions."""
    cells = []
    for seed, predicted in enumerate(predictions):
        folder = tmp_path / f"{name}-{seed}"
        folder.mkdir()
        (folder / "test_predictions.json").write_text(json.dumps({"truth": list(map(int, truth)), "predicted": list(map(int, predicted))}))
        cells.append({"arm": name, "budget": 1.0, "seed": seed, "score": float(np.mean(np.asarray(predicted) == truth)),
                      "run_dir": str(folder), "scored_on": "test", "wall_s": 1.0, "flops": 1.0})
    return cells


def test_metrics_match_scikit_learn():
    rng = np.random.default_rng(0)
    truth, predicted = rng.integers(0, 4, 200), rng.integers(0, 4, 200)
    predicted[:50] = truth[:50]
    assert metric_of(truth, predicted, "accuracy", 4) == pytest.approx(accuracy_score(truth, predicted))
    assert metric_of(truth, predicted, "f1_macro", 4) == pytest.approx(f1_score(truth, predicted, average="macro", labels=range(4)))
    batch = metric_of(np.stack([truth, truth]), np.stack([predicted, truth]), "f1_macro", 4)  # over the last axis
    assert batch.tolist() == pytest.approx([f1_score(truth, predicted, average="macro"), 1.0])


def test_the_interval_covers_the_true_accuracy_about_95_percent_of_the_time(tmp_path):
    """Simulated studies: each test example has a difficulty, each seed a skill; the true value is the
    accuracy averaged over the population of examples and seeds.  With 3 seeds the two-way bootstrap
    covers it in about 93% of studies (a percentile bootstrap from 3 seeds is a little narrow)."""
    rng = np.random.default_rng(0)
    skill, difficulty = rng.normal(0, 0.3, 4000)[:, None], rng.normal(0, 1.5, 4000)[None, :]
    true_value = float((1 / (1 + np.exp(-(1 + skill - difficulty)))).mean())
    hits, studies = 0, 120
    for study in range(studies):
        d, a = rng.normal(0, 1.5, 300), rng.normal(0, 0.3, 3)
        truth = rng.integers(0, 3, 300)
        predictions = []
        for s in range(3):
            correct = rng.random(300) < 1 / (1 + np.exp(-(1 + a[s] - d)))
            predictions.append(np.where(correct, truth, (truth + 1) % 3))
        cells = cells_from(tmp_path / str(study), "arm", truth, predictions) if (tmp_path / str(study)).mkdir() is None else None
        low, high = Bootstrap(cells, "accuracy", seed=study, replicates=800).interval(cells)
        hits += low <= true_value <= high
    assert 0.85 <= hits / studies <= 0.99, hits / studies


def test_a_paired_difference_sees_through_shared_test_noise(tmp_path):
    rng = np.random.default_rng(1)
    truth = rng.integers(0, 2, 300)
    base = [np.where(rng.random(300) < 0.7, truth, 1 - truth) for _ in range(3)]
    better = [b.copy() for b in base]
    for b in better:  # the same predictions, with 15 of the errors fixed: +0.05 on every seed
        wrong = np.flatnonzero(b != truth)[:15]
        b[wrong] = truth[wrong]
    same = cells_from(tmp_path, "a", truth, base)
    boot = Bootstrap(same + cells_from(tmp_path, "b", truth, better), "accuracy", replicates=1000)
    diff = boot.difference(cells_from(tmp_path, "c", truth, better), same)
    assert diff["difference"] == pytest.approx(0.05) and 0 < diff["low"] < 0.05 < diff["high"] and not diff["inside_noise"]
    assert boot.difference(same, same)["inside_noise"]


def test_without_per_example_predictions_the_interval_is_student_t_over_seeds():
    assert t_interval([0.7, 0.8, 0.9]) == pytest.approx((0.8 - 4.303 * 0.1 / 3 ** 0.5, 0.8 + 4.303 * 0.1 / 3 ** 0.5))
    assert t_interval([0.7]) is None and welch([0.7], [0.6, 0.5]) is None
    cells = [{"score": s, "run_dir": "/nonexistent", "scored_on": "test"} for s in (0.7, 0.8, 0.9)]
    assert Bootstrap(cells, "accuracy").interval(cells) == pytest.approx(t_interval([0.7, 0.8, 0.9]))


def test_headlines_say_whether_a_match_is_inside_the_noise(tmp_path):
    rng = np.random.default_rng(2)
    truth = rng.integers(0, 2, 400)
    scratch = [np.where(rng.random(400) < 0.70, truth, 1 - truth) for _ in range(3)]
    far = [np.where(rng.random(400) < 0.90, truth, 1 - truth) for _ in range(3)]
    close = [s.copy() for s in scratch]
    for c in close:  # scratch's own predictions with two errors fixed: +0.005, a match inside the noise
        wrong = np.flatnonzero(c != truth)[:2]
        c[wrong] = truth[wrong]
    rows = [*cells_from(tmp_path, "scratch", truth, scratch), *cells_from(tmp_path, "pretrained full", truth, far),
            *cells_from(tmp_path, "pretrained linear-probe", truth, close)]
    boot = Bootstrap(rows, "accuracy", replicates=1000)
    summary = C.summarise(rows, boot)
    assert all(s["low"] < s["mean"] < s["high"] for s in summary)
    text, matches = C.find_headline(summary, "max", [1.0], rows, boot)
    parts = dict(part.split(" + ", 1) for part in text.split("; "))
    assert matches == {"pretrained full": 1.0, "pretrained linear-probe": 1.0}
    assert "outside the noise: better" in parts["pretrained full"]
    assert "difference +0.005" in parts["pretrained linear-probe"] and "inside the noise" in parts["pretrained linear-probe"]
    one_seed = [r for r in rows if r["seed"] == 0]
    text, _ = C.find_headline(C.summarise(one_seed), "max", [1.0], one_seed, Bootstrap([], "score"))
    assert text.count("(one seed: no interval; run seeds=3 to know whether this is noise)") == 2


def test_the_majority_class_floor_is_computed_and_named_in_the_headline(tmp_path):
    from pretune.studies.compare import majority_text

    truth = np.array([0] * 6 + [1] * 3 + [2] * 1)  # always answering 0 scores 0.6
    cells = cells_from(tmp_path, "scratch", truth, [np.zeros(10, int), np.ones(10, int)])
    assert Bootstrap(cells, "accuracy").majority() == pytest.approx(0.6)
    assert Bootstrap(cells, "f1_macro").majority() == pytest.approx(f1_score(truth, np.zeros(10), average="macro", labels=range(3)))
    summary = [{"arm": "scratch", "budget": 1.0, "mean": 0.5}, {"arm": "pretrained full", "budget": 1.0, "mean": 0.7}]
    assert "scratch never beats it" in majority_text(summary, 0.6, "accuracy")
    assert "no arm beats it" in majority_text(summary, 0.8, "accuracy") and "every arm" in majority_text(summary, 0.4, "accuracy")
