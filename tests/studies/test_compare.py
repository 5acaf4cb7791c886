"""``pretune compare``: cells, identical label subsets across arms, mean ± std, headline, resume."""

import csv
import json
import statistics

import pytest

from pretune.errors import RecipeError
from pretune.recipe import load_recipe
from pretune.studies import compare as C
from tests.studies.conftest import FAST, ROOT


def test_plan_gives_every_arm_the_same_budget_seed():
    study = C.StudyConfig(budgets=[1.0, 0.1], seeds=2, strategies=["linear-probe", "lora:r=8"])
    cells = C.plan(study, base_seed=5)
    assert len(cells) == 2 * 2 * 3
    assert [c.budget for c in cells[:6]] == [0.1] * 6  # budget by budget, smallest first
    assert {c.seed for c in cells} == {5, 6}
    names = {c.name for c in cells}
    assert len(names) == len(cells) and "pretrained-lora-r-8_budget-0.1_seed-5" in names
    for budget in (0.1, 1.0):
        for seed in (5, 6):
            group = [c for c in cells if c.budget == budget and c.seed == seed]
            overrides = [dict(o.split("=", 1) for o in c.overrides(ROOT)) for c in group]
            assert {o["data.budget"] for o in overrides} == {repr(budget)}
            assert {o["data.budget_seed"] for o in overrides} == {str(seed)}  # the same rows for every arm
            assert [o["backbone.pretrained"] for o in overrides] == ["true", "true", "false"]


def test_summary_is_mean_and_sample_std():
    rows = [{"arm": "a", "budget": 0.1, "score": s, "wall_s": 1.0, "flops": 2.0} for s in (0.5, 0.7, 0.9)]
    rows.append({"arm": "a", "budget": 1.0, "score": 0.8, "wall_s": 1.0, "flops": 2.0})
    summary = {s["budget"]: s for s in C.summarise(rows)}
    assert summary[0.1]["mean"] == pytest.approx(0.7)
    assert summary[0.1]["std"] == pytest.approx(((0.2**2 + 0 + 0.2**2) / 2) ** 0.5)
    assert summary[1.0]["std"] == 0.0 and summary[1.0]["n"] == 1 and summary[0.1]["flops"] == 6.0


def test_headline_finds_the_smallest_matching_budget():
    summary = [{"arm": arm, "budget": b, "mean": m} for arm, b, m in [
        ("scratch", 0.1, 0.40), ("scratch", 0.5, 0.70), ("scratch", 1.0, 0.79),
        ("pretrained full", 0.1, 0.84), ("pretrained full", 0.5, 0.9), ("pretrained full", 1.0, 0.95),
        ("pretrained linear-probe", 0.1, 0.5), ("pretrained linear-probe", 0.5, 0.79), ("pretrained linear-probe", 1.0, 0.8)]]
    text, matches = C.find_headline(summary, "max", [0.1, 0.5, 1.0])
    assert matches == {"pretrained full": 0.1, "pretrained linear-probe": 0.5}  # 0.79 >= 0.79 matches
    assert "pretrained full + 10% labels: 0.840 vs scratch + 100% labels: 0.790" in text
    text, matches = C.find_headline(summary, "min", [0.1, 0.5, 1.0])  # as if lower were better (e.g. MSE)
    assert matches == {"pretrained full": None, "pretrained linear-probe": 0.1}
    assert "pretrained full never matches scratch + 100% labels: 0.790 (its best: 0.840)" in text
    assert C.budget_label(0.005) == "0.5%" and C.budget_label(0.05) == "5%" and C.budget_label(4) == "4 per class"


def test_bad_study_keys_are_one_line_errors(tmp_path):
    with pytest.raises(RecipeError, match="budgets.*write 1.0, not 1"):
        C.load_study(ROOT / "recipes/study-text.yaml", ["budgets=[0.1,1]"])
    with pytest.raises(RecipeError, match="budgets"):
        C.load_study(ROOT / "recipes/study-text.yaml", ["budgets=[1.5]"])
    with pytest.raises(RecipeError, match="unknown recipe key 'budget'"):
        C.load_study(ROOT / "recipes/study-text.yaml", ["budget=[0.5]"])
    with pytest.raises(RecipeError, match="backbone.path"):
        C.compare(ROOT / "recipes/study-text.yaml", [f"run_dir={tmp_path}"])


def test_text_study_end_to_end_and_resume(tmp_path, tiny_encoder, topics, monkeypatch):
    """Text classification: 2 budgets x 2 seeds x (linear probe, full, scratch), scored on the test file."""
    import pretune.run
    from pretune.recipe import load_recipe
    from pretune.run import compose, data_reader

    study_dir = tmp_path / "study"
    args = [f"model={tiny_encoder}", f"data.train={topics / 'train.csv'}", f"data.test={topics / 'test.csv'}",
            f"run_dir={study_dir}", "budgets=[0.5,1.0]", "seeds=2", "scratch_lr_search=[1.0]", "scratch_epochs=1", "strategies=[linear-probe,full]",
            "data.max_length=32", "trainer.batch_size=8", "trainer.epochs=1", "trainer.min_steps=10", "trainer.log_every=2", *FAST]
    result = C.compare(ROOT / "recipes/study-text.yaml", args)
    rows = list(csv.DictReader(open(study_dir / "results.csv")))
    assert len(rows) == 12 and {r["scored_on"] for r in rows} == {"test"}
    assert {r["arm"] for r in rows} == {"pretrained linear-probe", "pretrained full", "scratch"}
    # each cell's score is what the test scoring of that run wrote
    for row in rows:
        assert float(row["score"]) == pytest.approx(json.load(open(f"{row['run_dir']}/test_metrics.json"))["accuracy"])
        assert float(row["flops"]) > 0 and float(row["wall_s"]) > 0
    # 95% intervals from each cell's per-example test predictions, and a headline that says what they support
    assert all(s["low"] <= s["mean"] <= s["high"] for s in result.summary)
    assert all(json.load(open(f"{row['run_dir']}/test_predictions.json"))["truth"] for row in rows)
    assert "95% interval" in result.headline or "never matches" in result.headline
    # mean ± std against a direct computation from results.csv
    for s in result.summary:
        scores = [float(r["score"]) for r in rows if r["arm"] == s["arm"] and float(r["budget"]) == s["budget"]]
        assert s["mean"] == pytest.approx(statistics.fmean(scores)) and s["std"] == pytest.approx(statistics.stdev(scores))

    # identical labelled rows across arms for a budget and seed; other seeds draw other rows
    def train_texts(cell_dir):
        recipe = load_recipe(cell_dir / "recipe.yaml")
        return sorted(data_reader(compose(recipe), recipe)(str(tiny_encoder), None).train["text"])

    cells = study_dir / "cells"
    half = [train_texts(cells / f"{arm}_budget-0.5_seed-0") for arm in ("pretrained-linear-probe", "pretrained-full", "scratch")]
    assert half[0] == half[1] == half[2]
    assert train_texts(cells / "scratch_budget-0.5_seed-1") != half[0]
    assert len(half[0]) < len(train_texts(cells / "scratch_budget-1.0_seed-0"))

    # the report: one image per plot, all embedded
    html = (study_dir / "report.html").read_text()
    assert html.count("<img") == html.count('src="data:image/png;base64,') >= 3
    md = (study_dir / "report.md").read_text()
    assert "![" in md and all((study_dir / p).is_file() for p in ["plots/label-efficiency.png", "plots/confusion-matrix.png"])
    assert result.headline in html
    card = (cells / "scratch_budget-0.5_seed-1" / "model" / "README.md").read_text()  # each cell's card names its study
    assert card.count("## Study") == 1 and f"Did pretraining pay off? {result.headline}" in card and "seed 1" in card

    # resuming: finished cells are not run again; a cell without cell.json is
    calls = []
    real_train = pretune.run.train
    monkeypatch.setattr(pretune.run, "train", lambda *a, **k: calls.append(a) or real_train(*a, **k))
    again = C.compare(ROOT / "recipes/study-text.yaml", args)
    assert calls == [] and again.headline == result.headline
    (cells / "scratch_budget-1.0_seed-1" / "cell.json").unlink()
    C.compare(ROOT / "recipes/study-text.yaml", args)
    assert len(calls) == 1 and calls[0][0].run_dir.endswith("scratch_budget-1.0_seed-1")
    # a changed recipe does not silently reuse cells run with another one
    with pytest.raises(Exception, match="another recipe"):
        C.compare(ROOT / "recipes/study-text.yaml", [*args, "trainer.lr=0.01"])


def test_image_study(image_study):
    """Images (digits): the study works for the image family, scored on the validation split."""
    rows = image_study.rows
    assert len(rows) == 2 * 2 * 2 and {r["scored_on"] for r in rows} == {"validation"}
    assert all(0.0 <= r["score"] <= 1.0 for r in rows)
    by_budget = {b: [r["steps"] for r in rows if r["budget"] == b] for b in (0.1, 1.0)}
    # 10% of the labels fill fewer steps per epoch, but trainer.min_steps (20 here, 200 in study-images.yaml)
    # still gives every cell at least 20 optimizer steps: a small budget is not left under-trained
    assert min(by_budget[0.1]) >= 20 and max(by_budget[0.1]) <= min(by_budget[1.0])
    best = max(rows, key=lambda r: r["score"])
    assert len(best["confusion_matrix"]) == 10 and sum(map(sum, best["confusion_matrix"])) == 359  # the held-out digits
    assert json.loads((image_study.study_dir / "study.json").read_text())["headline"] == image_study.headline


def test_cli_errors_are_one_line(capsys, tmp_path):
    from pretune.cli import main

    assert main(["compare", str(ROOT / "recipes/study-text.yaml"), "budgets=[2.0]"]) == 3
    err = capsys.readouterr().err.strip()
    assert err.startswith("pretune: error:") and "budgets" in err and "\n" not in err
    assert main(["search", str(ROOT / "recipes/text-classify.yaml"), f"run_dir={tmp_path}", "space.lr=[1,2,3]"]) == 3
    assert "space.lr" in capsys.readouterr().err


def test_the_scratch_arm_gets_its_own_learning_rate_and_a_longer_schedule(tmp_path, tiny_encoder, topics):
    study_dir = tmp_path / "study"
    args = [f"model={tiny_encoder}", f"data.train={topics / 'train.csv'}", f"data.test={topics / 'test.csv'}",
            f"run_dir={study_dir}", "budgets=[0.5,1.0]", "seeds=1", "strategies=[full]", "scratch_lr_search=[0.1,10.0]",
            "scratch_epochs=2", "data.max_length=32", "trainer.batch_size=8", "trainer.epochs=1", "trainer.min_steps=10", "trainer.log_every=2", *FAST]
    result = C.compare(ROOT / "recipes/study-text.yaml", args)
    cells = study_dir / "cells"
    searched = {m: C.best_validation(cells / f"lr-search-x{m}_scratch_budget-1.0_seed-0", "accuracy", "max") for m in ("0.1", "10")}
    pick = max(searched, key=searched.get) if searched["0.1"] != searched["10"] else "0.1"
    recipe = load_recipe(cells / "scratch_budget-0.5_seed-0" / "recipe.yaml")
    base = load_recipe(cells / "pretrained-full_budget-0.5_seed-0" / "recipe.yaml")
    assert recipe.trainer.lr == pytest.approx(base.trainer.lr * float(pick)) and recipe.trainer.epochs == 2 * base.trainer.epochs
    assert recipe.trainer.patience == 3 and base.trainer.patience == C.load_study(ROOT / "recipes/study-text.yaml", args)[2].trainer.patience
    given = json.load(open(study_dir / "study.json"))["given"]
    assert f"lr x {pick} picked from x0.1:" in given["scratch"] and "lr x" not in given["pretrained full"]
    assert "What each arm was given" in (study_dir / "report.html").read_text()
    assert {r["arm"] for r in result.rows} == {"pretrained full", "scratch"} and len(result.rows) == 4  # search runs are not cells


def test_selection_arms_label_typiclust_picks_and_validate_on_the_random_arms_rows(tmp_path, tiny_encoder, topics):
    from pretune.select import typiclust
    from pretune.studies.selection import Selector

    study_dir = tmp_path / "study"
    args = [f"model={tiny_encoder}", f"data.train={topics / 'train.csv'}", f"data.test={topics / 'test.csv'}",
            f"run_dir={study_dir}", "budgets=[2,4]", "seeds=1", "strategies=[full]", "scratch=false", "selection=true",
            "data.max_length=32", "trainer.batch_size=8", "trainer.epochs=1", "trainer.min_steps=10", *FAST]
    result = C.compare(ROOT / "recipes/study-text.yaml", args)
    assert {r["arm"] for r in result.rows} == {"pretrained full", "pretrained full, typiclust labels"} and len(result.rows) == 4
    picked = study_dir / "selected" / "budget-2_seed-0"
    train = list(csv.DictReader(open(picked / "train.csv")))
    assert len(train) == 2 * 5  # as many labels as 2 per class of the 5 classes, picked without looking at them
    # the picks are TypiClust's on the pool (training file minus the seed's validation rows), deterministic
    _, _, recipe = C.load_study(ROOT / "recipes/study-text.yaml", args)
    selector = Selector(recipe, tmp_path / "again")
    from pretune.data.labelled import build_labelled
    pool = list(build_labelled(selector.data_cfg, "single", 0).train["text"])
    rows = [r for r, _ in typiclust(selector.embed(pool), 10, 0)]
    assert [r["text"] for r in train] == [pool[r] for r in rows]
    # both arms validate on the same rows; the selection cell's label set is every class of the training file
    cell = load_recipe(study_dir / "cells" / "pretrained-full-typiclust_budget-2_seed-0" / "recipe.yaml")
    assert cell.data["labels"] == sorted({r["label"] for r in csv.DictReader(open(topics / "train.csv"))})
    validation = [r["text"] for r in csv.DictReader(open(picked / "validation.csv"))]
    assert validation and not set(validation) & set(pool)
    effects = json.load(open(study_dir / "study.json"))["selection"]
    assert [(e["arm"], e["budget"]) for e in effects] == [("pretrained full", 2), ("pretrained full", 4)]
    assert "typiclust picks" in effects[0]["text"] and "Which rows to label" in (study_dir / "report.md").read_text()


def test_plan_adds_the_adapted_models_arms_on_the_same_rows():
    study = C.StudyConfig(budgets=[1.0, 0.1], seeds=2, strategies=["full"], adapted="runs/dapt/model")
    cells = C.plan(study, base_seed=0)
    assert [c.budget for c in cells[:6]] == [0.1] * 6  # still budget by budget
    adapted = [c for c in cells if c.arm == "adapted full"]
    assert len(adapted) == 4 and {c.name for c in adapted} >= {"adapted-full_budget-0.1_seed-0"}
    overrides = dict(o.split("=", 1) for o in adapted[0].overrides(ROOT))
    assert overrides["backbone.path"] == "runs/dapt/model" and overrides["data.budget_seed"] == str(adapted[0].seed)


def test_a_study_with_an_adapted_model_reports_adapted_vs_original(tmp_path, tiny_encoder, topics):
    import pretune

    adapted = pretune.train(ROOT / "recipes/text-adapt-mlm.yaml", [
        f"model={tiny_encoder}", f"run_dir={tmp_path / 'dapt'}", "data.max_documents=200", "data.block_size=32",
        "data.general=null", "trainer.max_steps=3", "trainer.batch_size=8", "trainer.progress=false",
        "trainer.tensorboard=false"]).model_dir
    study_dir = tmp_path / "study"
    result = C.compare(ROOT / "recipes/study-text.yaml", [
        f"model={tiny_encoder}", f"adapted={adapted}", f"data.train={topics / 'train.csv'}", f"data.test={topics / 'test.csv'}",
        f"run_dir={study_dir}", "budgets=[1.0]", "seeds=1", "strategies=[full]", "scratch=false", "data.max_length=32",
        "trainer.batch_size=8", "trainer.epochs=1", *FAST])
    assert {r["arm"] for r in result.rows} == {"pretrained full", "adapted full"}
    effects = json.load(open(study_dir / "study.json"))["adaptation"]
    assert [(e["arm"], e["budget"]) for e in effects] == [("pretrained full", 1.0)]
    assert "adapted" in effects[0]["text"] and "Did adapting the model" in (study_dir / "report.md").read_text()
