"""Image and vector classifiers after fine-tuning: ``pretune.load(path).predict``, ``pretune predict``,
``pretune evaluate``, and ``data.test`` scored at the end of a run; tiny models on the embedded digits."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import pretune
from pretune.backbones.arrays import load_backbone
from pretune.cli import main
from pretune.data.images import load_digits
from pretune.errors import CheckpointError, DataError
from pretune.recipe import load_recipe
from pretune.run import score_test, train
from pretune.predict import evaluate_file, predict_file
from tests.integration.helpers import weights

FAST = ["trainer.progress=false", "trainer.tensorboard=false", "trainer.precision=fp32", "trainer.threads=1",
        "trainer.max_steps=25", "trainer.lr=3e-3", "trainer.warmup=0", "trainer.eval_every=25", "backbone.size=tiny"]
CLASSES = ["0", "1", "2", "3"]  # what the image model learns; the PNG folder also holds a "4"


@pytest.fixture(scope="module")
def pngs(tmp_path_factory):
    """Digits as PNG files, 5 per class 0-4 in class folders; every other one 16x16 (resized on reading)."""
    folder = tmp_path_factory.mktemp("pngs") / "digits"
    x, keys = load_digits()
    for digit in ["0", "1", "2", "3", "4"]:
        (folder / digit).mkdir(parents=True)
        rows = [i for i, key in enumerate(keys) if key == digit][:5]
        for n, row in enumerate(rows):
            image = Image.fromarray((x[row, 0].numpy() * 255).round().astype(np.uint8), mode="L")
            if n % 2:
                image = image.resize((16, 16), Image.Resampling.NEAREST)
            image.save(folder / digit / f"{n}.png")
    return folder


@pytest.fixture(scope="module")
def image_run(tmp_path_factory, pngs):
    """A tiny CNN fine-tuned on digits 0-3 (8x8) whose recipe sets data.test to the PNG folder (digits 0-4)."""
    run_dir = tmp_path_factory.mktemp("img") / "run"
    recipe = load_recipe("recipes/image-classify.yaml", [f"run_dir={run_dir}", *FAST, "data.size=8", f"data.classes={CLASSES}",
                                                        f"data.test={pngs}"])
    return train(recipe, overwrite=True)


@pytest.fixture(scope="module")
def vector_run(tmp_path_factory):
    """A tiny MLP fine-tuned on digit vectors (classes 0-2) from a CSV whose label column is 'y'."""
    folder = tmp_path_factory.mktemp("vec")
    x, keys = load_digits()
    rows = [i for i, key in enumerate(keys) if key in ("0", "1", "2")]
    x = x.flatten(1)[rows].numpy() * 16
    labels = [keys[i] for i in rows]
    with open(folder / "train.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*(f"p{i}" for i in range(64)), "y"])
        writer.writerows([*map(float, row), label] for row, label in zip(x, labels))
    np.save(folder / "unlabelled.npy", x[:7])
    recipe = load_recipe("recipes/image-classify.yaml", [f"run_dir={folder / 'run'}", *FAST, "data.images=null",
                                                        f"data.vectors={folder / 'train.csv'}", "data.label=y",
                                                        "backbone.name=mlp", "task.augment=null"])
    return train(recipe, overwrite=True), folder, torch.from_numpy(x).float(), labels


def direct_logits(model_dir, x: torch.Tensor) -> torch.Tensor:
    """The classifier computed by hand: the saved backbone, then the head's weights from the safetensors file."""
    backbone = load_backbone(model_dir).eval()
    saved = weights(model_dir)
    with torch.no_grad():
        return backbone(x) @ saved["head.weight"].T + saved["head.bias"]


def same(results: list[dict], expected: list[dict]) -> bool:
    """The same labels and probabilities up to float noise (a batch of 1 and of 25 may round differently)."""
    return len(results) == len(expected) and all(
        r["label"] == e["label"] and r["probabilities"].keys() == e["probabilities"].keys()
        and np.allclose(list(r["probabilities"].values()), list(e["probabilities"].values()), atol=1e-6)
        for r, e in zip(results, expected))


def read_pngs(paths) -> torch.Tensor:
    """Pixels of PNG files read independently of pretune: gray, bilinear to 8x8, in [0, 1]."""
    arrays = [np.asarray(Image.open(p).convert("L").resize((8, 8), Image.Resampling.BILINEAR)) for p in paths]
    return torch.from_numpy(np.stack(arrays)[:, None] / 255).float()


def test_predict_a_folder_of_pngs_a_file_and_a_list(image_run, pngs):
    model = pretune.load(image_run.model_dir)
    assert model.labels == CLASSES and model.input_shape == (1, 8, 8)
    results = model.predict(pngs)
    paths = sorted(pngs.rglob("*.png"))
    assert len(results) == len(paths) == 25
    expected = direct_logits(image_run.model_dir, read_pngs(paths)).softmax(-1)
    for result, probs in zip(results, expected):
        assert result["label"] == CLASSES[int(probs.argmax())]
        assert list(result["probabilities"]) == CLASSES
        np.testing.assert_allclose(list(result["probabilities"].values()), probs.tolist(), atol=1e-5)
    assert len({r["label"] for r in results}) > 1  # the model learned something: not one class for all
    assert same(model.predict([str(p) for p in paths[:3]]), results[:3])
    assert same(model.predict(paths[4]), results[4:5])  # one file -> a list of one result


def test_predict_tensors_and_arrays(image_run):
    model = pretune.load(image_run.model_dir)
    x, _ = load_digits()
    x = x[:10]
    results = model.predict(x)
    probs = direct_logits(image_run.model_dir, x).softmax(-1)
    assert [r["label"] for r in results] == [CLASSES[int(i)] for i in probs.argmax(-1)]
    np.testing.assert_allclose([list(r["probabilities"].values()) for r in results], probs.numpy(), atol=1e-5)
    assert same(model.predict(x.numpy()), results)
    assert same(model.predict(x[3]), results[3:4])  # one example without the batch dimension
    pixels = (x.numpy() * 255).round().astype(np.uint8)  # uint8 images are divided by 255
    assert [r["label"] for r in model.predict(pixels)] == [r["label"] for r in model.predict(torch.from_numpy(pixels).float() / 255)]
    with pytest.raises(DataError, match=r"shape \(10, 1, 16, 16\).*\(1, 8, 8\)"):
        model.predict(torch.zeros(10, 1, 16, 16))


def test_evaluate_a_labelled_folder_equals_a_direct_computation(image_run, pngs, tmp_path):
    known = tmp_path / "known"
    for digit in CLASSES:
        shutil.copytree(pngs / digit, known / digit)
    out = tmp_path / "metrics.json"
    scores = evaluate_file(str(image_run.model_dir), str(known), str(out))
    paths = sorted(known.rglob("*.png"))
    truth = torch.tensor([CLASSES.index(p.parent.name) for p in paths])
    predicted = direct_logits(image_run.model_dir, read_pngs(paths)).argmax(-1)
    assert scores["accuracy"] == pytest.approx((predicted == truth).float().mean().item())
    assert list(scores["per_class"]) == CLASSES and sum(map(sum, scores["confusion_matrix"])) == 20
    assert json.loads(out.read_text()) == scores

    with pytest.raises(DataError, match=r"^class '4' of .*digits is not in the label map \(0, 1, 2, 3\)$"):
        evaluate_file(str(image_run.model_dir), str(pngs))  # digit 4 is not one of the model's classes
    with pytest.raises(DataError, match="no labels"):
        evaluate_file(str(image_run.model_dir), str(known / "0"))  # a flat folder


def test_data_test_is_scored_at_the_end_of_the_run(image_run, pngs):
    """data.test = all five digit folders; data.classes keeps 0-3 of them, as training did."""
    saved = json.loads((image_run.run_dir / "test_metrics.json").read_text())
    assert saved == evaluate_file(str(image_run.model_dir), str(pngs), classes=CLASSES)
    assert sum(map(sum, saved["confusion_matrix"])) == 20
    assert image_run.metrics["test_accuracy"] == saved["accuracy"]
    logged = [json.loads(line) for line in (image_run.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["split"] == "test" and logged[-1]["accuracy"] == saved["accuracy"]


def test_a_pretrained_backbone_without_head_cannot_predict_and_is_not_scored(image_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(image_run.run_dir / "model", run_dir / "model")
    shutil.copy(image_run.run_dir / "recipe.yaml", run_dir / "recipe.yaml")
    (run_dir / "model" / "pretune.json").write_text(json.dumps({"task": "simclr", "modality": "image", "input_shape": [1, 8, 8]}))
    with pytest.raises(CheckpointError, match="simclr model has no task head"):
        pretune.load(run_dir / "model")
    assert score_test(run_dir, "builtin:digits") == {}


def test_vector_model_predicts_and_evaluates_files(vector_run, tmp_path):
    result, folder, x, labels = vector_run
    model = pretune.load(result.model_dir)
    assert model.input_shape == (64,) and model.labels == ["0", "1", "2"] and model.meta["label"] == "y"
    probs = direct_logits(result.model_dir, x).softmax(-1)

    out = tmp_path / "predictions.jsonl"
    assert predict_file(str(result.model_dir), str(folder / "unlabelled.npy"), str(out)) == 7
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(7))
    np.testing.assert_allclose([list(r["probabilities"].values()) for r in rows], probs[:7].numpy(), atol=1e-5)
    assert same(model.predict(x[:7]), rows)

    table = tmp_path / "predictions.csv"  # the label column 'y' of the input is left out of the features
    assert predict_file(str(result.model_dir), str(folder / "train.csv"), str(table)) == len(x)
    with open(table, newline="") as handle:
        written = list(csv.DictReader(handle))
    assert list(written[0]) == ["index", "label", "probability_0", "probability_1", "probability_2"]
    assert [r["label"] for r in written] == [["0", "1", "2"][int(i)] for i in probs.argmax(-1)]

    scores = evaluate_file(str(result.model_dir), str(folder / "train.csv"))
    truth = torch.tensor([int(label) for label in labels])
    assert scores["accuracy"] == pytest.approx((probs.argmax(-1) == truth).float().mean().item())
    assert scores["accuracy"] > 0.5  # chance is 1/3
    with pytest.raises(DataError, match="has no labels"):
        evaluate_file(str(result.model_dir), str(folder / "unlabelled.npy"))
    np.save(tmp_path / "narrow.npy", x[:3, :10].numpy())
    with pytest.raises(DataError, match="have 10 features but the model takes inputs of shape \\(64,\\)"):
        model.predict(str(tmp_path / "narrow.npy"))


def test_cli_predict_and_evaluate_an_image_model(image_run, pngs, tmp_path, capsys):
    model = str(image_run.model_dir)
    out = tmp_path / "predictions.jsonl"
    assert main(["predict", model, str(pngs), "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["path"] for r in rows] == [str(p) for p in sorted(pngs.rglob("*.png"))]
    assert same(rows, pretune.load(model).predict(pngs))
    assert "25 predictions written" in capsys.readouterr().out

    assert main(["evaluate", model, f"data={pngs}"]) == 4  # digit 4 is unknown to the model
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "class '4'" in err and "not in the label map" in err

    known = tmp_path / "known"
    for digit in CLASSES:
        shutil.copytree(pngs / digit, known / digit)
    assert main(["evaluate", model, f"data={known}", "--out", str(tmp_path / "m.json")]) == 0
    assert "accuracy" in capsys.readouterr().out
    assert json.loads((tmp_path / "m.json").read_text())["accuracy"] == evaluate_file(model, str(known))["accuracy"]

    capsys.readouterr()
    assert main(["predict", model, str(tmp_path / "missing"), "--out", str(out)]) == 4
    err = capsys.readouterr().err
    assert err == f"pretune: error: {tmp_path / 'missing'}: no such image folder or file\n"
    assert main(["predict", str(tmp_path / "nomodel"), str(pngs)]) == 5
    assert capsys.readouterr().err.count("\n") == 1
