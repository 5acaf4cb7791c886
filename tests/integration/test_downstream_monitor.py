"""``task.monitor``: a text pretraining run scores its features on a small labelled set at every evaluation
(k-NN accuracy), can stop when that has flattened, and the logged value is what the saved model gives."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import pretune
from pretune.data.labelled import LabelledDataConfig, build_labelled
from pretune.errors import RecipeError
from pretune.evaluate.knn import knn_accuracy
from tests.integration.helpers import TINY


@pytest.mark.parametrize("task", ["mlm", "clm"])
def test_pretraining_logs_probe_accuracy_and_stops_when_it_flattens(tmp_path, topics, task):
    run_dir = tmp_path / "run"
    extra = ["backbone.name=gpt2"] if task == "clm" else []
    pretune.train(None, [f"run_dir={run_dir}", *TINY, f"task={task}", *extra, "trainer.max_steps=40", "trainer.eval_every=4",
                         f"task.monitor.data={topics / 'train.csv'}", "trainer.monitor=probe_knn_accuracy", "trainer.patience=2"])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["split"] == "validation"]
    values = [r["probe_knn_accuracy"] for r in evals]
    assert evals[0]["step"] == 0 and all(0 <= v <= 1 for v in values)
    # the first evaluation after step 0 with the best value (step 0 is the untrained baseline, never a checkpoint)
    best = max(range(1, len(values)), key=lambda i: (values[i], -i))
    assert len(values) - 1 - best <= 2  # stopped within `patience` evaluations of the last improvement (or at max_steps)
    assert evals[-1]["step"] == 40 or len(values) - 1 - best == 2

    # the best value is what the saved model (the best checkpoint) gives, computed here without pretune's monitor code
    model = transformers.AutoModel.from_pretrained(str(run_dir / "model")).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(run_dir / "model"))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    data = build_labelled(LabelledDataConfig(train=str(topics / "train.csv"), validation_fraction=0.5), "single", 0)

    def encode(texts):
        batch = tokenizer(list(texts), padding=True, truncation=True, max_length=128, return_tensors="pt")
        with torch.no_grad():
            hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        mask = batch["attention_mask"][..., None].float()
        return (hidden * mask).sum(1) / mask.sum(1)

    accuracy = knn_accuracy(encode(data.train["text"]), torch.tensor(data.train["labels"]), encode(data.validation["text"]),
                            torch.tensor(data.validation["labels"]), len(data.label_names), 20, 0.1)
    assert accuracy == pytest.approx(values[best], abs=1e-6)


def test_a_bad_monitor_key_is_one_line(tmp_path):
    with pytest.raises(RecipeError, match="task.monitor.k"):
        pretune.train(None, [f"run_dir={tmp_path / 'run'}", *TINY, "task.monitor.data=x.csv", "task.monitor.k=0"])
