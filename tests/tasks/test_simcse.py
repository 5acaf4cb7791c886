"""SimCSE: two dropout views of each text in one pass, InfoNCE between them, a saved encoder that learns."""

import json

import pytest
import torch
import transformers

from pretune.cli import main
from pretune.errors import RecipeError
from pretune.recipe import load_recipe
from pretune.run import assemble
from pretune.tasks.contrastive import info_nce
from pretune.tasks.simcse import pool, uniformity
from tests.integration.helpers import TINY


def built(tmp_path, *overrides):
    recipe = load_recipe("recipes/text-simcse.yaml", [f"run_dir={tmp_path / 'run'}", *TINY, *overrides])
    task, data, module = assemble(recipe)
    return task, module, data


def test_views_differ_only_by_dropout_and_the_loss_is_info_nce(tmp_path):
    task, module, data = built(tmp_path)
    batch = task.collate({k: [row[k] for row in data.train.select(range(6))] for k in data.train.column_names}, list(range(6)))
    ids = batch["input_ids"]

    module.eval()  # no dropout: the two views are the same vector, and the loss is (summed) InfoNCE of z with itself
    out = module(batch)
    z = pool(module.model(input_ids=ids, attention_mask=batch.get("attention_mask")).last_hidden_state, batch.get("attention_mask"), "mean")
    expected, _ = info_nce(z, z, 0.05)
    torch.testing.assert_close(out["contrastive"], expected)
    assert "contrastive_correct" not in out  # with identical views it would always be 6 of 6: not informative
    zn = torch.nn.functional.normalize(z, dim=1)  # uniformity, written out over the 30 ordered pairs i != j
    pairs = [torch.exp(-2 * (zn[i] - zn[j]).pow(2).sum()) for i in range(6) for j in range(6) if i != j]
    torch.testing.assert_close(out["uniformity"] / 6, torch.log(torch.stack(pairs).mean()))

    module.train()
    torch.manual_seed(0)
    twice = module.model(input_ids=ids.repeat(2, 1)).last_hidden_state.mean(1)
    assert not torch.allclose(twice[:6], twice[6:])  # dropout: each copy of a text is a different view
    # the reference definition, written out: -log softmax of the cosine similarities / t, on the diagonal
    a, b = torch.nn.functional.normalize(twice[:6], dim=-1), torch.nn.functional.normalize(twice[6:], dim=-1)
    direct = -torch.log_softmax(a @ b.T / 0.05, dim=-1).diagonal().sum()  # summed; the trainer divides by units()
    torch.testing.assert_close(info_nce(twice[:6], twice[6:], 0.05)[0], direct)


def test_mean_pooling_ignores_padding():
    hidden = torch.tensor([[[1.0, 1.0], [3.0, 3.0], [100.0, 100.0]]])
    assert pool(hidden, torch.tensor([[1, 1, 0]]), "mean").tolist() == [[2.0, 2.0]]
    assert pool(hidden, None, "cls").tolist() == [[1.0, 1.0]]


def test_dropout_off_is_refused(tmp_path):
    with pytest.raises(RecipeError, match="hidden_dropout_prob"):
        built(tmp_path, "backbone.config={hidden_dropout_prob: 0.0}")


def test_simcse_learns_and_saves_an_encoder(tmp_path):
    run_dir = tmp_path / "run"
    assert main(["pretrain", "recipes/text-simcse.yaml", f"run_dir={run_dir}", *TINY, "trainer.max_steps=20", "trainer.lr=1e-3",
                 "trainer.warmup=0", "trainer.eval_every=10", "trainer.batch_size=16"]) == 0
    evals = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["split"] == "validation"]
    assert evals[-1]["contrastive_loss"] < 0.5 * evals[0]["contrastive_loss"]
    encoder = transformers.AutoModel.from_pretrained(run_dir / "model")
    assert json.loads((run_dir / "model" / "pretune.json").read_text())["task"] == "simcse"
    assert encoder.config.hidden_size == 32


def test_uniformity_is_zero_for_a_collapsed_encoder_and_negative_otherwise():
    assert float(uniformity(torch.ones(5, 4))) == pytest.approx(0.0, abs=1e-6)
    assert float(uniformity(torch.eye(4))) == pytest.approx(-4.0, abs=1e-5)  # orthonormal: every squared distance is 2
