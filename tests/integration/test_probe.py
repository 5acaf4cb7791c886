"""The default linear probe end to end: fitted to convergence on cached features, never below
scikit-learn's LogisticRegression on the same frozen features; and the minimum number of steps."""

import csv
import inspect
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import pretune
from pretune.backbones.transformers import declared_pooling
from pretune.cli import main

sklearn = pytest.importorskip("sklearn")
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

FAST = ["trainer.batch_size=8", "trainer.progress=false", "trainer.tensorboard=false", "trainer.precision=fp32",
        "trainer.eval_every=epoch", "data.max_length=48"]


def rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def write(path, table):
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    return path


def logged(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def split(tmp_path_factory, topics):
    """The topics' train.csv cut into train / validation files, so scikit-learn trains on the same rows."""
    folder = tmp_path_factory.mktemp("split")
    table = rows(topics / "train.csv")
    return write(folder / "train.csv", table[: len(table) * 4 // 5]), write(folder / "dev.csv", table[len(table) * 4 // 5:]), topics / "test.csv"


def probe(tmp_path, model, split, *extra, name="probe"):
    train, dev, test = split
    run_dir = tmp_path / name
    assert main(["finetune", "recipes/text-classify.yaml", f"model={model}", f"run_dir={run_dir}", f"data.train={train}",
                 f"data.validation={dev}", f"data.test={test}", "strategy=linear-probe", "trainer.epochs=2", "trainer.save_every=1",
                 "trainer.keep_last=100", *FAST, *extra]) == 0
    return run_dir


def test_the_probe_is_fitted_once_and_beats_or_matches_logistic_regression(tmp_path, tiny_encoder, split):
    run_dir = probe(tmp_path, tiny_encoder, split)
    lines = logged(run_dir)
    notes = [r for r in lines if r.get("split") == "epoch"]
    assert any("L-BFGS" in str(r) for r in notes), notes
    assert not any(r.get("split") == "warning" for r in lines)  # the fitted head beats the untrained one at step 0
    heads = [load_file(str(c / "model" / "head.safetensors")) for c in sorted((run_dir / "checkpoints").iterdir())]
    assert len(heads) > 2 and all(torch.equal(h["classifier.weight"], heads[0]["classifier.weight"]) for h in heads)  # lr 0 after the fit

    # scikit-learn's LogisticRegression (C=1, max_iter=1000) on the same frozen features, standardised
    predictor = pretune.load(run_dir / "model")
    assert predictor.meta["pooling"] == "cls"  # a linear probe reads [CLS] itself, not a new random pooler
    assert declared_pooling(run_dir / "model") == "cls"  # model/ (copied from best/) keeps sentence-transformers' 1_Pooling/

    def encode(path):
        table = rows(path)
        batch = predictor.tokenizer([r["text"] for r in table], padding=True, truncation=True, max_length=48, return_tensors="pt")
        with torch.no_grad():
            x = predictor.model.encode({k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch})
        return x.numpy(), [r["label"] for r in table]

    (x_train, y_train), (x_test, y_test) = encode(split[0]), encode(split[2])
    scaler = StandardScaler().fit(x_train)
    reference = LogisticRegression(max_iter=1000).fit(scaler.transform(x_train), y_train).score(scaler.transform(x_test), y_test)
    ours = json.loads((run_dir / "test_metrics.json").read_text())["accuracy"]
    print(f"linear probe: pretune {ours:.3f}, scikit-learn LogisticRegression {reference:.3f} on {len(y_test)} test rows")
    assert ours >= reference - 0.05  # 3 of ~60 test rows: noise


def test_cached_and_uncached_features_fit_the_same_probe(tmp_path, tiny_encoder, split):
    cached = probe(tmp_path, tiny_encoder, split, name="cached")
    plain = probe(tmp_path, tiny_encoder, split, "task.cache_features=false", name="plain")
    a, b = (load_file(str(run / "model" / "head.safetensors")) for run in (cached, plain))
    torch.testing.assert_close(a["classifier.weight"], b["classifier.weight"])


def test_an_sgd_probe_keeps_the_architectures_head(tmp_path, tiny_encoder, split):
    run_dir = probe(tmp_path, tiny_encoder, split, "task.probe=sgd", "trainer.lr=1e-2")
    assert not (run_dir / "model" / "head.safetensors").exists()  # BertForSequenceClassification, as before
    assert not any("L-BFGS" in str(r) for r in logged(run_dir))


def test_vectors_through_a_random_network_against_logistic_regression(tmp_path):
    """The digits as 64-feature vectors through a random (untrained) MLP: pretune's default probe
    against LogisticRegression on the same features, on a held-out test file."""
    from sklearn.datasets import load_digits

    from pretune.backbones.arrays import ArrayClassifier, load_backbone, save_model
    from pretune.backbones.builtin import Builtin, BuiltinConfig
    from pretune.recipe import load_recipe
    from pretune.run import assemble

    x, y = load_digits(return_X_y=True)
    order = np.random.RandomState(0).permutation(len(x))
    header = [f"f{i}" for i in range(64)] + ["label"]
    for name, part in (("train.csv", order[:1200]), ("test.csv", order[1200:])):
        with open(tmp_path / name, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            writer.writerows([[*map(float, x[i]), int(y[i])] for i in part])
    data_args = ["data.images=null", f"data.vectors={tmp_path / 'train.csv'}", "data.size=null", "task.augment=null",
                 "trainer.progress=false", "trainer.tensorboard=false", "trainer.precision=fp32"]
    _, data, _ = assemble(load_recipe("recipes/image-classify.yaml", [*data_args, "backbone=mlp"]))
    torch.manual_seed(0)
    backbone = Builtin(BuiltinConfig(name="mlp", size="tiny")).build(data)
    (tmp_path / "random").mkdir()
    save_model(tmp_path / "random", ArrayClassifier(backbone, 10), backbone)
    run = pretune.train("recipes/image-classify.yaml", [*data_args, f"model={tmp_path / 'random'}", f"data.test={tmp_path / 'test.csv'}",
                                                        "strategy=linear-probe", "trainer.epochs=1", f"run_dir={tmp_path / 'run'}"])
    ours = run.metrics["test_accuracy"]
    frozen = load_backbone(tmp_path / "random").eval()
    with torch.no_grad():
        f_train = frozen(data.train.x).numpy()
        f_test = frozen(torch.tensor(x[order[1200:]], dtype=torch.float32)).numpy()
    y_train = [int(data.label_names[i]) for i in data.train.labels.tolist()]
    scaler = StandardScaler().fit(f_train)
    reference = LogisticRegression(max_iter=1000).fit(scaler.transform(f_train), y_train).score(scaler.transform(f_test), y[order[1200:]])
    print(f"random MLP probe: pretune {ours:.3f}, scikit-learn {reference:.3f} on {len(order) - 1200} test rows")
    assert ours >= reference - 0.015  # 9 of 597 test rows (one standard error: 0.017)


def test_min_steps_stretches_a_small_budget(tmp_path, tiny_encoder, split):
    """``trainer.min_steps``: at least that many optimizer steps, however few the labels (needs the
    ``total_steps = max(total_steps, cfg.min_steps or 0)`` line of ``trainer/loop.py``)."""
    from pretune.trainer import loop

    if "min_steps" not in inspect.getsource(loop.fit):
        pytest.skip("trainer/loop.py does not read trainer.min_steps yet")
    train, dev, _ = split
    run_dir = tmp_path / "small"
    assert main(["finetune", "recipes/text-classify.yaml", f"model={tiny_encoder}", f"run_dir={run_dir}", f"data.train={train}",
                 f"data.validation={dev}", "data.budget=2", "trainer.epochs=1", "trainer.min_steps=12", "trainer.patience=null",
                 *FAST]) == 0
    lines = logged(run_dir)
    assert max(r["step"] for r in lines if r["split"] == "train") == 12
    assert len([r for r in lines if r["split"] == "validation" and r["step"] > 0]) <= 2  # "epoch" evaluations as the recipe's 1 epoch
