"""Learning-curve fits recover known parameters; labels needed and "worth k× the labels" on known curves."""

from __future__ import annotations

import numpy as np
import pytest

from pretune.studies import compare as C
from pretune.studies.curves import fit, worth
from pretune.studies.stats import Bootstrap
from tests.studies.test_stats import cells_from

BUDGETS = [0.01, 0.03, 0.1, 0.3, 1.0]


def scratch(x):
    return 0.9 - 0.1 * np.power(x, -0.5)


def pretrained(x):  # the scratch curve with ten times the labels
    return scratch(10 * np.asarray(x))


def test_the_fit_recovers_known_parameters_exactly_and_under_noise():
    x = np.array(BUDGETS)
    curve = fit(x, scratch(x))[0]
    assert (curve.a, curve.b, curve.c) == pytest.approx((0.9, 0.1, 0.5), abs=1e-6)
    assert curve.needed(0.8) == pytest.approx(1.0) and curve.needed(0.95) is None  # above the asymptote: never
    noisy = scratch(x) + np.random.default_rng(0).normal(0, 0.003, (200, len(x)))
    c = np.array([k.c for k in fit(x, noisy)])
    assert abs(np.median(c) - 0.5) < 0.05
    lower = fit(x, 0.1 + 0.2 * x ** -0.7, mode="min")[0]  # a loss: lower is better
    assert (lower.a, lower.b, lower.c) == pytest.approx((-0.1, 0.2, 0.7), abs=1e-6)  # fitted as -loss = a - b x^-c
    assert lower(np.array([1.0]))[0] == pytest.approx(0.3) and lower.needed(0.3) == pytest.approx(1.0)
    assert fit([0.1, 1.0], [0.5, 0.6]) == [None]  # two budgets cannot fix three parameters


def test_ten_times_the_labels_is_worth_ten():
    x = np.array(BUDGETS)
    k = worth(BUDGETS, pretrained(x)[None], np.array([scratch(1.0)]))
    assert k[0] == pytest.approx(10.0)
    assert worth(BUDGETS, (scratch(x) - 0.2)[None], np.array([scratch(1.0)]))[0] == 0.0  # never reaches scratch


def test_a_study_reports_worth_with_an_interval(tmp_path):
    rng = np.random.default_rng(0)
    n = 2000
    truth = rng.integers(0, 2, n)
    rows = []
    for arm, curve in (("scratch", scratch), ("pretrained full", pretrained)):
        for budget in BUDGETS:
            folder = tmp_path / f"{arm}-{budget}"
            folder.mkdir()
            predictions = [np.where(rng.random(n) < curve(budget), truth, 1 - truth) for _ in range(3)]
            for cell in cells_from(folder, arm, truth, predictions):
                rows.append({**cell, "budget": budget})
    boot = Bootstrap(rows, "accuracy", replicates=300)
    summary = C.summarise(rows, boot)
    curves, found = C.learning_curves(rows, summary, "max", boot)
    assert set(curves) == {"scratch", "pretrained full"} and curves["scratch"]["c"] == pytest.approx(0.5, abs=0.25)
    w = found["pretrained full"]
    assert 5 < w["k"] < 20 and w["low"] < w["k"] < w["high"] and w["low"] < 10 < w["high"]
    assert "pretrained full was worth about" in C.worth_text("pretrained full", w) and "95% interval" in C.worth_text("pretrained full", w)
    far = {**w, "k": 7.4e6, "needed_budget": 1e-7, "extrapolated": True, "far": True}  # a crossing the budgets cannot support
    assert "cannot be estimated" in C.worth_text("pretrained full", far) and "worth about" not in C.worth_text("pretrained full", far)


def test_cost_accounting_reads_the_pretraining_run_and_states_the_trade_off(tmp_path):
    import json

    run = tmp_path / "mlm"
    (run / "model").mkdir(parents=True)
    (run / "model" / "pretune.json").write_text(json.dumps({"task": "mlm"}))
    logged = [{"step": 0, "split": "validation", "time": 1.0}, {"step": 10, "split": "train", "time": 60.0, "flops": 2e12},
              {"step": 20, "split": "train", "time": 120.0, "flops": 2e12},  # killed here, resumed: time restarts
              {"step": 30, "split": "train", "time": 50.0, "flops": 2e12}, {"step": 30, "split": "validation", "time": 55.0}]
    (run / "metrics.jsonl").write_text("\n".join(map(json.dumps, logged)))
    assert C.wall_time(logged) == pytest.approx(175.0)
    rows = [{"arm": arm, "budget": b, "seed": 0, "flops": 1e9, "wall_s": 2.0, "examples": int(1000 * b)}
            for arm in ("scratch", "pretrained full") for b in BUDGETS]
    worth = {"pretrained full": {"k": 10.0}}
    cost = C.costs(rows, str(run / "model"), worth, BUDGETS)
    assert cost["pretraining"] == {"run_dir": str(run), "task": "mlm", "flops": 6e12, "wall_s": 175.0, "steps": 30}
    assert cost["finetuning"]["scratch"] == {"flops": 5e9, "wall_s": 10.0, "cells": 5}
    assert cost["tradeoff"] == ["0.049 hours and 0.006 PFLOPs of pretraining (mlm) on this machine saved about 900 of 1,000 "
                                "labels for pretrained full (it needs ~100 to match scratch with all 1,000)"]
    assert C.costs(rows, None, worth, BUDGETS)["pretraining"] is None
