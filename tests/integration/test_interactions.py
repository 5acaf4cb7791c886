"""Recommendation end to end on a synthetic log: pretrain (BERT4Rec / SASRec shapes), rank, recommend,
fine-tune ratings with a frozen or a trained backbone, predict, and DDP equal to one process."""

import json
import random
import subprocess
import sys

import pytest
import torch
import transformers

from tests.integration.helpers import ENV, pretune, weights


def cli(*args: str) -> None:
    """The command line in this process: the same code path without ~8 s of interpreter and import start-up
    (the subprocess ``pretune`` is kept where the one-line error output and torchrun are what is tested)."""
    from pretune.cli import main

    assert main(list(args)) == 0

QUICK = ["data.max_length=12", "backbone.size=nano", "trainer.batch_size=8", "trainer.progress=false", "trainer.tensorboard=false",
         "trainer.precision=fp32", "trainer.log_every=2"]


@pytest.fixture(scope="module")
def log(tmp_path_factory):
    """40 users walking a ring of 30 items (item t is followed by t + 1), rating = item mod 5 + 1."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("log") / "ratings.csv"
    lines = ["user_id,item_id,rating,timestamp"]
    for user in range(40):
        start = rng.randrange(30)
        lines += [f"u{user},m{(start + t) % 30},{(start + t) % 30 % 5 + 1},{100 * user + t}" for t in range(rng.randrange(6, 14))]
    path.write_text("\n".join(lines) + "\n")
    return path


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def sasrec(log, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "next"
    cli("pretrain", "recipes/interactions-next.yaml", f"data.file={log}", f"run_dir={run}", *QUICK,
            "trainer.epochs=8", "trainer.lr=3e-3")
    return run


def test_next_item_pretraining_ranks_validation_and_test(sasrec):
    rows = records(sasrec)
    validation = [r for r in rows if r["split"] == "validation"]
    assert validation[-1]["ndcg@10"] > validation[0]["ndcg@10"]  # it learned the ring
    test = [r for r in rows if r["split"] == "test"]
    assert test and 0 <= test[0]["ndcg@10"] <= 1 and test[0]["queries"] == 40
    model = transformers.AutoModelForCausalLM.from_pretrained(sasrec / "model")  # a standard Hugging Face folder
    tokenizer = transformers.AutoTokenizer.from_pretrained(sasrec / "model")
    assert model.config.vocab_size == len(tokenizer) == 30 + 5


def test_recommend_excludes_what_the_user_has_seen(sasrec, tmp_path):
    (tmp_path / "h.jsonl").write_text(json.dumps({"history": ["m3", "m4", "m5"]}) + "\n" + json.dumps({"history": "m10"}) + "\n")
    out = tmp_path / "p.jsonl"
    cli("predict", str(sasrec / "model"), str(tmp_path / "h.jsonl"), "--top-k", "5", "--out", str(out))
    first, second = map(json.loads, out.read_text().splitlines())
    assert len(first["items"]) == 5 and not {"m3", "m4", "m5"} & set(first["items"])
    assert first["scores"] == sorted(first["scores"], reverse=True) and "m10" not in second["items"]
    from pretune import load

    assert load(sasrec / "model").recommend([["m3", "m4", "m5"]], top_k=5)[0]["items"] == first["items"]


def test_evaluate_scores_the_logs_test_split(sasrec, log):
    cli("evaluate", str(sasrec / "model"), f"data={log}", "--out", str(sasrec / "eval.json"))
    scores = json.loads((sasrec / "eval.json").read_text())
    test = next(r for r in records(sasrec) if r["split"] == "test")
    assert scores["ndcg@10"] == pytest.approx(test["ndcg@10"]) and "hr@10" in scores


@pytest.fixture(scope="module")
def bert4rec(log, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "masked"
    cli("pretrain", "recipes/interactions-masked.yaml", f"data.file={log}", f"run_dir={run}", *QUICK, "trainer.max_steps=6",
            "trainer.eval_every=3")
    return run


def test_masked_item_model_is_a_masked_lm_folder(bert4rec):
    assert transformers.AutoModelForMaskedLM.from_pretrained(bert4rec / "model").config.vocab_size == 35
    meta = json.loads((bert4rec / "model" / "pretune.json").read_text())
    assert meta["task"] == "mlm" and meta["interactions"]["max_length"] == 12


@pytest.mark.parametrize("strategy", ["linear-probe", "full"])
def test_rating_fine_tuning_freezes_what_the_strategy_says(bert4rec, log, tmp_path, strategy):
    run = tmp_path / "rate"
    cli("finetune", "recipes/interactions-rate.yaml", f"model={bert4rec / 'model'}", f"data.file={log}", f"run_dir={run}",
        f"strategy={strategy}", *QUICK, "trainer.epochs=1")
    before, after = weights(bert4rec / "model"), weights(run / "model")
    name = "bert.encoder.layer.0.attention.self.query.weight"
    assert torch.equal(before[name], after[name]) == (strategy == "linear-probe")
    test = next(r for r in records(run) if r["split"] == "test")
    assert test["rmse"] > 0 and "mae" in test
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"history": "m1 m2 m3", "item": "m4"}) + "\n")
    cli("predict", str(run / "model"), str(tmp_path / "pairs.jsonl"), "--out", str(tmp_path / "r.jsonl"))
    assert isinstance(json.loads((tmp_path / "r.jsonl").read_text())["value"], float)


def test_a_missing_target_column_is_one_line(bert4rec, log, tmp_path):
    done = pretune("finetune", "recipes/interactions-rate.yaml", f"model={bert4rec / 'model'}", f"data.file={log}",
                   f"run_dir={tmp_path / 'x'}", "data.target=stars", *QUICK, check=False)
    assert done.returncode != 0 and "has no column 'stars'" in done.stderr and "Traceback" not in done.stderr


def test_a_text_model_is_refused_as_an_item_model_in_one_line(sasrec, tmp_path):
    from pretune.errors import RecipeError
    from pretune.recipe import load_recipe
    from pretune.run import compose

    text_model = tmp_path / "text"
    text_model.mkdir()
    (text_model / "config.json").write_text((sasrec / "model" / "config.json").read_text())  # a plain HF folder: no pretune.json
    with pytest.raises(RecipeError, match="is not an item model"):
        compose(load_recipe("recipes/interactions-rate.yaml", [f"model={text_model}"]))


@pytest.mark.slow  # DDP equality is tested on text in test_distributed.py; items share the padded-batch path
def test_ddp_two_processes_equal_one_on_item_sequences(log, tmp_path):
    common = [f"data.file={log}", *QUICK, "trainer.max_steps=4", "trainer.lr=2e-3", "trainer.eval_every=100",
              "backbone.config.resid_pdrop=0.0", "backbone.config.embd_pdrop=0.0", "backbone.config.attn_pdrop=0.0"]
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    cli("pretrain", "recipes/interactions-next.yaml", f"run_dir={single}", *common, "trainer.batch_size=8")
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29523",
         "-m", "pretune", "pretrain", "recipes/interactions-next.yaml", f"run_dir={ddp}", *common, "trainer.batch_size=4"],
        env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = weights(single / "model"), weights(ddp / "model")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=f"{name} differs")


def test_two_tower_retrieval_end_to_end(log, tmp_path):
    run = tmp_path / "towers"
    cli("pretrain", "recipes/interactions-two-tower.yaml", f"data.file={log}", f"run_dir={run}", *QUICK, "trainer.max_steps=6",
            "trainer.eval_every=3")
    test = next(r for r in records(run) if r["split"] == "test")
    assert 0 <= test["ndcg@10"] <= 1 and test["queries"] == 40
    from pretune import load

    recommender = load(run / "model")
    first = recommender.recommend(["m1 m2"], top_k=4)[0]
    assert len(first["items"]) == 4 and not {"m1", "m2"} & set(first["items"])
    assert all(abs(score) <= 1 / 0.1 + 1e-4 for score in first["scores"])  # cosine / temperature
    assert transformers.AutoModel.from_pretrained(run / "model").config.vocab_size == 35


def test_the_python_example_of_the_docs_runs(sasrec, bert4rec, log, tmp_path):
    from pathlib import Path

    rate = tmp_path / "rate"
    cli("finetune", "recipes/interactions-rate.yaml", f"model={bert4rec / 'model'}", f"data.file={log}", f"run_dir={rate}",
        *QUICK, "trainer.epochs=1")
    doc = (Path(__file__).parents[2] / "docs" / "recommendation.md").read_text()
    block = doc.split("```python\n", 1)[1].split("```", 1)[0]
    block = block.replace("runs/next/model", str(sasrec / "model")).replace("runs/rate/model", str(rate / "model"))
    shown = {}
    exec(compile(block.replace("recommender.recommend(", "shown['items'] = recommender.recommend(")
                 .replace("rater.predict(", "shown['value'] = rater.predict("), "docs/recommendation.md", "exec"), {"shown": shown})
    assert len(shown["items"]) == 2 and len(shown["items"][0]["items"]) == 10
    assert isinstance(shown["value"][0]["value"], float)


def test_a_study_compares_pretrained_and_scratch_on_the_logs_test_ratings(bert4rec, log, tmp_path):
    study = tmp_path / "study"
    cli("compare", "recipes/study-interactions.yaml", f"model={bert4rec / 'model'}", f"data.file={log}", f"run_dir={study}",
                   "budgets=[0.5,1.0]", "seeds=1", "scratch_lr_search=[1.0]", "scratch_epochs=1", *QUICK[:-1], "trainer.epochs=1")
    rows = json.loads((study / "study.json").read_text())["cells"]
    assert {(r["arm"], r["budget"]) for r in rows} >= {("scratch", 0.5), ("scratch", 1.0)}
    assert all(r["metric"] == "mse" and r["scored_on"] == "test" and r["score"] > 0 for r in rows)
    assert json.loads((study / "study.json").read_text())["headline"]
