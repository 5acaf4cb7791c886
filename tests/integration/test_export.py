"""``pretune export``: ONNX (and int8) exports of every fine-tuned model kind predict as the original, are
refused when they do not, and run through the same ``pretune.load`` / ``pretune predict`` path."""

from __future__ import annotations

import json

import numpy as np
import pytest

import pretune
from pretune.cli import main
from pretune.errors import CheckpointError
from pretune.export import export
from pretune.recipe import load_recipe
from pretune.run import train
from tests.integration.test_finetune_tasks import FAST, finetune, keep_threads, task_data  # noqa: F401  (keep_threads: autouse)

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


@pytest.fixture(scope="module")
def text_run(tmp_path_factory, tiny_encoder, topics):
    run_dir = tmp_path_factory.mktemp("clf") / "run"
    assert main(["finetune", "recipes/text-classify.yaml", f"model={tiny_encoder}", f"run_dir={run_dir}", *FAST,
                 f"data.train={topics / 'train.csv'}", f"data.test={topics / 'test.csv'}", "trainer.epochs=2"]) == 0
    return run_dir


def agree(a: list[dict], b: list[dict], atol: float = 1e-5) -> bool:
    """Same decisions, and probabilities / values equal up to ``atol``."""
    for x, y in zip(a, b, strict=True):
        if {k: v for k, v in x.items() if k not in ("probabilities", "value")} != {k: v for k, v in y.items() if k not in ("probabilities", "value")}:
            return False
        if "probabilities" in x and not np.allclose(list(x["probabilities"].values()), list(y["probabilities"].values()), atol=atol):
            return False
        if "value" in x and abs(x["value"] - y["value"]) > atol:
            return False
    return True


def test_text_classifier_exports_with_parity_and_predicts_through_the_same_path(text_run, topics, tmp_path, capsys):
    model = text_run / "model"
    assert main(["export", str(model), "--out", str(tmp_path / "onnx")]) == 0
    printed = capsys.readouterr().out
    assert "parity on" in printed and "max |logit difference|" in printed
    folder = tmp_path / "onnx"
    meta = json.loads((folder / "pretune.json").read_text())
    assert meta["export"]["format"] == "onnx" and not meta["export"]["int8"]
    assert meta["export"]["parity"]["max_abs_diff"] < 1e-4 and meta["export"]["parity"]["agreement"] == 1.0
    assert meta["export"]["parity"]["data"].endswith("test.csv")  # no validation file: the run's test file
    assert (folder / "tokenizer.json").is_file() and not (folder / "model.onnx.data").exists()  # one self-contained graph
    assert "## Export" in (folder / "README.md").read_text()

    texts = [line.split(",")[0] for line in (topics / "test.csv").read_text().splitlines()[1:20]]
    exported, original = pretune.load(folder), pretune.load(model)
    assert exported.modality == "text" and exported.labels == original.labels
    assert agree(exported.predict(texts), original.predict(texts))
    assert agree(exported.predict(texts[0]), original.predict(texts[0]))  # one text, one length: dynamic axes
    assert main(["predict", str(folder), str(topics / "test.csv"), "--out", str(tmp_path / "p.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(rows) == len((topics / "test.csv").read_text().splitlines()) - 1 and "probabilities" in rows[0]
    assert main(["evaluate", str(folder), str(topics / "test.csv")]) == 0

    done = export(model, tmp_path / "int8", int8=True)
    parity = done.parity
    assert done.int8 and parity["size_mb"] < parity["original_size_mb"]
    assert abs(parity["metric_original"] - parity["metric_exported"]) <= 0.02
    assert "int8" in done.summary() and (tmp_path / "int8" / "model.onnx").is_file()
    import onnx

    ops = [node.op_type for node in onnx.load(str(tmp_path / "int8" / "model.onnx")).graph.node]
    fp32_ops = [node.op_type for node in onnx.load(str(tmp_path / "onnx" / "model.onnx")).graph.node]
    assert "DynamicQuantizeMatMul" in ops or "MatMulInteger" in ops  # the weight products are int8 ...
    assert "Gather" in ops and "DequantizeLinear" not in ops  # ... the embedding lookups are not (a quantised Gather is dequantised)
    assert 0 < ops.count("MatMul") < fp32_ops.count("MatMul")  # products of two activations stay float MatMuls


def test_an_export_that_fails_its_check_is_refused_in_one_line_and_leaves_nothing(text_run, tmp_path, capsys):
    with pytest.raises(CheckpointError, match=r"export refused: the ONNX model's logits differ .* \(tolerance -1\)"):
        export(text_run / "model", tmp_path / "onnx", tolerance=-1)
    assert not (tmp_path / "onnx").exists() and not (tmp_path / "onnx.partial").exists()
    assert main(["export", str(text_run / "model"), "--out", str(text_run / "model")]) == 5  # would overwrite the model
    assert "would overwrite" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nothing")]) == 5


@pytest.mark.parametrize("task", ["tag", "regress", "pair"])
def test_tagger_regressor_and_pair_classifier_export(tmp_path, tiny_encoder, task):
    recipe, overrides, key = task_data(tmp_path, task)
    assert finetune(recipe, tiny_encoder, tmp_path / "run", *overrides, "trainer.epochs=1") == 0
    done = export(tmp_path / "run" / "model", tmp_path / "onnx")
    assert done.parity["max_abs_diff"] < 1e-4
    sample = [["John", "lives", "in", "Paris", "today"]] if task == "tag" else ["cat dog bird", "cat"]
    pairs = ["bird dog cat", "dog"] if task == "pair" else None
    exported, original = pretune.load(tmp_path / "onnx"), pretune.load(tmp_path / "run" / "model")
    assert agree(exported.predict(sample, pairs), original.predict(sample, pairs)) and key in exported.predict(sample, pairs)[0]


IMAGE = ["trainer.progress=false", "trainer.tensorboard=false", "trainer.precision=fp32", "trainer.threads=1",
         "trainer.max_steps=10", "trainer.eval_every=10", "backbone.size=tiny", "data.size=8", "data.classes=[0,1,2]"]


@pytest.mark.parametrize("backbone", ["cnn", "mlp"])
def test_image_and_vector_classifiers_export(tmp_path, backbone):
    extra = ["backbone.name=mlp", "task.augment=null", "data.images=null", "data.vectors=builtin:digits"] if backbone == "mlp" else []
    run = train(load_recipe("recipes/image-classify.yaml", [f"run_dir={tmp_path / 'run'}", *IMAGE, *extra]), overwrite=True)
    done = export(run.model_dir, tmp_path / "onnx", data="builtin:digits", examples=64)
    assert done.parity["examples"] == 64 and done.parity["max_abs_diff"] < 1e-4
    exported, original = pretune.load(tmp_path / "onnx"), pretune.load(run.model_dir)
    assert exported.modality == original.modality == ("vector" if backbone == "mlp" else "image")
    x = original.read("builtin:digits").x[:9]
    assert agree(exported.predict(x), original.predict(x))
    assert agree(exported.predict(x[0]), original.predict(x[0]))  # batch of one


def test_every_run_writes_a_model_card_in_the_hub_layout(text_run, tiny_encoder, topics):
    import yaml

    card = (text_run / "model" / "README.md").read_text()
    _, header, body = card.split("---\n", 2)
    header = yaml.safe_load(header)
    assert header["library_name"] == "transformers" and header["pipeline_tag"] == "text-classification"
    assert {"pretune", "classify", "full"} <= set(header["tags"]) and "base_model" not in header  # a local base is not a Hub id
    for section in ("## Model description", "## Training data", "## Training procedure", "## Evaluation", "## Labels",
                    "## How to use", "## Intended use and limitations", "## Recipe"):
        assert section in body, section
    assert f"fine-tuned from `{tiny_encoder}`" in body and "pretrained by pretune with masked language modelling" in body
    lr = yaml.safe_load((text_run / "recipe.yaml").read_text())["trainer"]["lr"]
    assert str(topics / "train.csv") in body and f"learning rate {lr:g}," in body
    test = json.loads((text_run / "test_metrics.json").read_text())
    assert f"| accuracy | " in body and f"| {test['accuracy']:.4g} |" in body
    labels = json.loads((text_run / "model" / "pretune.json").read_text())["label_names"]
    assert all(f"| {i} | {name} |" in body for i, name in enumerate(labels))
    assert "AutoModelForSequenceClassification" in body

    pretrained = (tiny_encoder / "README.md").read_text()
    assert "pretrained with masked language modelling (BERT) from scratch" in pretrained and "pipeline_tag" not in pretrained
    assert "pretune finetune" in pretrained


def test_the_parity_sample_is_spread_over_the_file():
    from pretune.export import spread
    from pretune.predict import Examples

    examples = Examples([f"t{i}" for i in range(1000)], None, [i // 100 for i in range(1000)])  # sorted by class
    picked = spread(examples, 20)
    assert len(picked) == 20 and picked.inputs[0] == "t0" and picked.inputs[-1] == "t999" and len(set(picked.truth)) == 10
