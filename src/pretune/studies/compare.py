"""``pretune compare``: did pretraining pay off, per label budget?

A *study* fine-tunes one recipe many times: for every label **budget** x **seed** x **arm**, one
ordinary run (:func:`pretune.run.train`) in its own directory ``STUDY/cells/<cell>/``.  The arms
are the pretrained backbone under each fine-tuning **strategy**, plus **scratch**: the same
architecture randomly initialised (``backbone.pretrained=false``) and trained in full.  All arms
of one (budget, seed) keep the same labelled rows (``data.budget_seed = seed``) and are scored on
the same held-out set: ``data.test`` when the recipe has one, otherwise the last validation
evaluation (no model selection happens on the scored set then).

    pretune compare recipes/study-text.yaml model=runs/mlm/model data.train=train.csv data.test=test.csv \\
        budgets=[0.01,0.1,1.0] seeds=3 strategies=[linear-probe,full]

The study keys (``budgets``, ``seeds``, ``strategies``, ``scratch``) sit at the top of the study
file beside an ordinary fine-tuning recipe; ``run_dir`` is the study directory.  A finished cell
(``cell.json`` written) is never run again, an interrupted one resumes from its last checkpoint,
so the same command continues a study.  The headline is the smallest budget at which each
pretrained arm matches (mean >= scratch's mean, or <= for lower-is-better metrics) the scratch
arm at the largest budget (normally 100% of the labels).
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field, field_validator

from pretune.card import add_section
from pretune.data.labelled import check_budget
from pretune.errors import CheckpointError, RecipeError
from pretune.recipe import Recipe, Section, apply_overrides, read_yaml, validate
from pretune.studies.curves import Curve, fit
from pretune.studies.curves import worth as curve_worth
from pretune.studies.report import budget_label, read_metrics, study_report
from pretune.studies.selection import SELECTION, Selector
from pretune.studies.stats import Bootstrap

FAR = 10  # "worth k x the labels" is not stated when the fitted crossing lies over FAR x outside the budgets run
STUDY_FIELDS = ("budgets", "seeds", "strategies", "scratch", "scratch_lr_search", "scratch_epochs", "selection", "adapted")


class StudyConfig(Section):
    """The study keys of a study file (top level, beside the fine-tuning recipe)."""

    budgets: list[float | int] = [0.1, 1.0]  # fractions of the labels per class (0.1 = 10%), or rows per class (ints)
    seeds: int | list[int] = 1  # how many seeds (recipe seed, seed + 1, ...), or the list of seeds
    strategies: list[str] = ["full"]  # fine-tuning strategies of the pretrained arms
    scratch: bool = True  # also train the same architecture from random weights (strategy full)
    # a fair scratch arm: its own learning rate (these multiples of trainer.lr and head_lr, tried at the largest
    # budget and first seed, picked on validation) and a longer schedule with early stopping
    scratch_lr_search: list[float] = [0.3, 1.0, 3.0]
    scratch_epochs: float = Field(3.0, gt=0)  # times the recipe's trainer.epochs, with trainer.patience (3 when unset)
    # also label each budget's rows picked by TypiClust on the pretrained model's embeddings (pretune select), beside the
    # random per-class picks, for every pretrained arm (text studies; pretune.studies.selection)
    selection: bool = False
    # a model adapted from model=PATH (pretune adapt): its arms (every strategy) beside the original's, on the same rows
    adapted: str | None = None

    @field_validator("budgets")
    @classmethod
    def _budgets(cls, value: list) -> list:
        if not value:
            raise ValueError("needs at least one budget")
        for budget in value:
            check_budget(budget)
        if len({type(b) for b in value}) > 1:
            raise ValueError("mixes fractions (floats) and rows per class (integers); write 1.0, not 1, for all the labels")
        return sorted(set(value))

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, value: int | list[int]) -> int | list[int]:
        if isinstance(value, int) and value < 1 or isinstance(value, list) and not value:
            raise ValueError("needs at least one seed")
        return value


@dataclass
class Cell:
    """One fine-tuning run of a study: an arm at a budget and seed."""

    arm: str  # "pretrained full", "pretrained linear-probe", "scratch"
    strategy: str
    pretrained: bool
    budget: float | int
    seed: int
    extra: tuple[str, ...] = ()  # the arm's own settings (scratch: its searched lr, longer schedule; selection: its files)
    prefix: str = ""  # "lr-search-x3_" for the scratch arm's learning-rate search runs
    selection: str = ""  # "typiclust": the labelled rows are picked from the embeddings, not at random per class
    model: str = "pretrained"  # "adapted": the study's adapted model instead of model=PATH

    @property
    def name(self) -> str:
        arm = "scratch" if not self.pretrained else f"{self.model}-" + re.sub(r"[^A-Za-z0-9.]+", "-", self.strategy).strip("-")
        return f"{self.prefix}{arm}{'-' + self.selection if self.selection else ''}_budget-{self.budget}_seed-{self.seed}"

    def overrides(self, cells_dir: Path) -> list[str]:
        return [f"run_dir={cells_dir / self.name}", f"seed={self.seed}", f"strategy={self.strategy}",
                f"backbone.pretrained={str(self.pretrained).lower()}", f"data.budget={self.budget!r}", f"data.budget_seed={self.seed}",
                *self.extra]


@dataclass
class StudyResult:
    study_dir: Path
    metric: str
    mode: str  # "max" or "min": which way is better
    rows: list[dict[str, Any]]  # one per cell (results.csv)
    summary: list[dict[str, Any]]  # one per (arm, budget): mean, std, n
    headline: str
    matches: dict[str, Any] = field(default_factory=dict)  # arm -> smallest budget matching scratch at the largest budget
    report: Path | None = None


def load_study(path: str | Path, overrides: list[str] = ()) -> tuple[StudyConfig, dict[str, Any], Recipe]:
    """Split a study file (+ ``key=value`` overrides) into its study keys and its fine-tuning recipe."""
    raw = apply_overrides(read_yaml(path), ["kind=finetune", *overrides])
    study = validate(StudyConfig, {k: raw.pop(k) for k in STUDY_FIELDS if k in raw}, source=str(path))
    return study, raw, validate(Recipe, raw, source=str(path))


def plan(study: StudyConfig, base_seed: int) -> list[Cell]:
    """Every cell of the study, budget by budget (so a partial study already has whole budgets)."""
    seeds = study.seeds if isinstance(study.seeds, list) else [base_seed + i for i in range(study.seeds)]
    arms = [(f"pretrained {s}", s, True, "") for s in study.strategies] + ([("scratch", "full", False, "")] if study.scratch else [])
    arms += [(f"pretrained {s}, {SELECTION} labels", s, True, SELECTION) for s in study.strategies] if study.selection else []
    cells = [Cell(arm, strategy, pretrained, budget, seed, selection=selection)
             for budget in study.budgets for seed in seeds for arm, strategy, pretrained, selection in arms]
    if study.adapted:  # the adapted model under every strategy, on each (budget, seed)'s rows
        cells += [Cell(f"adapted {s}", s, True, budget, seed, extra=(f"backbone.path={study.adapted}",), model="adapted")
                  for budget in study.budgets for seed in seeds for s in study.strategies]
        cells.sort(key=lambda c: study.budgets.index(c.budget))  # still budget by budget
    return cells


def compare(path: str | Path, overrides: list[str] = (), *, report: bool = True, overwrite: bool = False) -> StudyResult:
    """Run (or continue) the study of the study file ``path``; write results.csv, study.json and the report."""
    study, raw, recipe = load_study(path, overrides)
    if study.strategies and not recipe.backbone.get("path"):
        raise RecipeError(f"{path}: recipe key 'backbone.path' (model=PATH): a study compares a pretrained model "
                          "with the same network from scratch; name the pretrained model folder")
    return run_study(raw, study, report=report, overwrite=overwrite)


def run_study(raw: dict[str, Any], study: StudyConfig, *, report: bool = True, overwrite: bool = False) -> StudyResult:
    """Run every cell of ``study`` over the fine-tuning recipe ``raw`` (a dict, as read from YAML)."""
    from pretune.run import build_task  # lazy: pretune.run imports torch and transformers

    recipe = validate(Recipe, raw)
    study_dir = Path(recipe.run_dir)
    if overwrite and study_dir.exists():
        shutil.rmtree(study_dir)
    metric, mode = build_task(recipe).monitor
    cells = plan(study, recipe.seed)
    print(f"pretune compare: {len(cells)} cells ({len(study.budgets)} budgets x {len(cells) // len(study.budgets)} runs) in {study_dir}")
    given = {arm: _settings(recipe) for arm in dict.fromkeys(c.arm for c in cells)}
    if study.scratch:
        extra, given["scratch"] = scratch_settings(raw, recipe, study, cells, study_dir / "cells", metric, mode)
        cells = [replace(c, extra=extra) if not c.pretrained else c for c in cells]
    if study.selection:
        selector = Selector(recipe, study_dir)
        cells = [replace(c, extra=selector.overrides(c.budget, c.seed)) if c.selection else c
                 for c in cells if not (c.selection and selector.whole_pool(c.budget, c.seed))]
    rows = []
    for number, cell in enumerate(cells, 1):
        print(f"cell {number}/{len(cells)}: {cell.arm}, budget {budget_label(cell.budget)}, seed {cell.seed}")
        rows.append(run_cell(raw, cell, study_dir / "cells", metric))
    return finish(study_dir, study, metric, mode, rows, report=report, base=recipe.backbone.get("path"), given=given)


def scratch_settings(raw: dict[str, Any], recipe: Recipe, study: StudyConfig, cells: list[Cell], cells_dir: Path, metric: str,
                     mode: str) -> tuple[tuple[str, ...], str]:
    """The scratch arm's own settings (He et al. 2019: from scratch catches up given its own tuning and a long
    enough schedule): ``scratch_epochs`` times the epochs with early stopping, and the learning rate (lr and
    head_lr scaled together) of ``scratch_lr_search`` with the best validation metric at the largest budget and
    first seed.  Returns the overrides and a sentence saying what the arm was given."""
    trainer = recipe.trainer
    schedule = ((f"trainer.epochs={trainer.epochs * study.scratch_epochs:g}", f"trainer.patience={trainer.patience or 3}")
                if study.scratch_epochs != 1 else ())
    scale = lambda m: tuple(f"trainer.{key}={value * m:g}" for key in ("lr", "head_lr")  # noqa: E731
                            if (value := getattr(trainer, key)) and m != 1)
    first = next(c for c in cells if not c.pretrained and c.budget == max(study.budgets))
    tried: dict[float, float] = {}
    for multiple in study.scratch_lr_search if len(study.scratch_lr_search) > 1 else []:
        probe = replace(first, extra=(*schedule, *scale(multiple)), prefix=f"lr-search-x{multiple:g}_")
        print(f"scratch learning-rate search: lr x {multiple:g} at budget {budget_label(first.budget)}, seed {first.seed}")
        run_cell(raw, probe, cells_dir, metric)
        tried[multiple] = best_validation(cells_dir / probe.name, metric, mode)
    pick = ((max if mode == "max" else min)(tried, key=tried.get) if tried else
            (study.scratch_lr_search[0] if study.scratch_lr_search else 1.0))
    extra = (*schedule, *scale(pick))
    searched = (f"; lr x {pick:g} picked from " + ", ".join(f"x{m:g}: {v:.4g}" for m, v in tried.items())
                + f" (validation {metric} at {budget_label(first.budget)}, seed {first.seed})") if tried else ""
    return extra, _settings(validate(Recipe, apply_overrides(raw, list(extra)))) + searched


def best_validation(run_dir: Path, metric: str, mode: str) -> float:
    """The best validation ``metric`` a run logged after step 0."""
    values = [r[metric] for r in read_metrics(run_dir) if r.get("split") == "validation" and r.get("step") and metric in r]
    if not values:
        raise RecipeError(f"{run_dir}: no validation {metric} to pick the scratch arm's learning rate; give data.validation "
                          "or keep the validation split")
    return (max if mode == "max" else min)(values)


def _settings(recipe: Recipe) -> str:
    t = recipe.trainer
    return (f"lr {t.lr:g}" + (f", head lr {t.head_lr:g}" if t.head_lr else "") + f", {t.epochs:g} epochs"
            + (f" (at least {t.min_steps} steps)" if t.min_steps else "") + (f", early stopping after {t.patience}" if t.patience else ""))


def finish(study_dir: Path, study: StudyConfig, metric: str, mode: str, rows: list[dict], report: bool = True,
           base: str | None = None, given: dict[str, str] | None = None) -> StudyResult:
    """Aggregate the cells, write results.csv and study.json, and (optionally) the report."""
    boot = Bootstrap(rows, metric)
    summary = summarise(rows, boot)
    headline, matches = find_headline(summary, mode, study.budgets, rows, boot)
    curves, worth = learning_curves(rows, summary, mode, boot)
    if worth:
        headline += "; " + "; ".join(worth_text(arm, w) for arm, w in worth.items())
    if (floor := boot.majority()) is not None and mode == "max":
        headline += "; " + majority_text(summary, floor, metric)
    cost = costs(rows, base, worth, study.budgets)
    selected = paired_effects(rows, boot, mode, lambda arm: arm[: -len(f", {SELECTION} labels")] if arm.endswith(f", {SELECTION} labels") else None,
                              f"{SELECTION} picks", "random per-class picks")
    adapted = paired_effects(rows, boot, mode, lambda arm: "pretrained" + arm[len("adapted"):] if arm.startswith("adapted ") else None,
                             "adapted", "original")
    write_results(study_dir / "results.csv", rows)
    (study_dir / "study.json").write_text(json.dumps(
        {"metric": metric, "mode": mode, "study": study.model_dump(), "headline": headline, "matches": matches,
         "curves": curves, "worth": worth, "cost": cost, "given": given or {}, "selection": selected, "adaptation": adapted,
         "summary": summary, "cells": rows}, indent=1))
    result = StudyResult(study_dir, metric, mode, rows, summary, headline, matches)
    for row in rows:  # every cell's model card says which study it belongs to and what the study concluded
        add_section(Path(row["run_dir"]) / "model", "Study", [
            f"One cell of the label-efficiency study `{study_dir}` ({row['arm']}, {budget_label(row['budget'])} of the labels, "
            f"seed {row['seed']}; `{study_dir / 'report.html'}`).", "", f"Did pretraining pay off? {headline}"])
    if report:
        result.report = study_report(study_dir)
    print(f"headline: {headline}")
    for line in cost["tradeoff"]:
        print(f"trade-off: {line}")
    for entry in selected:
        print(f"selected vs random labels: {entry['text']}")
    for entry in adapted:
        print(f"adapted vs original model: {entry['text']}")
    return result


def paired_effects(rows: list[dict[str, Any]], boot: Bootstrap, mode: str, baseline_of: Any, name: str,
                   baseline_name: str) -> list[dict[str, Any]]:
    """For each arm that ``baseline_of(arm)`` pairs with another arm (TypiClust labels with random ones, the adapted
    model with the original), and each budget: its score minus the other's on the same rows and seeds, with the
    95% interval."""
    groups = _groups(rows)
    out = []
    for (arm, budget), members in groups.items():
        if (other := baseline_of(arm)) is None or (other, budget) not in groups:
            continue
        diff = boot.difference(members, groups[(other, budget)])
        mean = lambda cells: statistics.fmean(c["score"] for c in cells)  # noqa: E731
        text = (f"{other} at {budget_label(budget)}: {name} {mean(members):.3f} vs {baseline_name} "
                f"{mean(groups[(other, budget)]):.3f}" + _noise(diff, mode))
        out.append({"arm": other, "budget": budget, "paired": mean(members), "baseline": mean(groups[(other, budget)]), **diff,
                    "text": text})
    return out


def run_cell(raw: dict[str, Any], cell: Cell, cells_dir: Path, metric: str) -> dict[str, Any]:
    """Fine-tune one cell (or reuse it when it is finished); its row of results.csv."""
    from pretune.run import train  # lazy, as above: torch and transformers
    from pretune.trainer.checkpoint import latest_checkpoint  # lazy: torch

    recipe = validate(Recipe, apply_overrides(raw, cell.overrides(cells_dir)))
    run_dir = Path(recipe.run_dir)
    done, saved = run_dir / "cell.json", run_dir / "recipe.yaml"
    if saved.is_file() and saved.read_text() != recipe.dump():
        raise CheckpointError(f"{run_dir}: this cell was run with another recipe; use a new run_dir for the study "
                              "(or --overwrite to start it again)")
    if done.is_file():
        return json.loads(done.read_text())
    resume = latest_checkpoint(run_dir) is not None
    started = time.perf_counter()
    result = train(recipe, resume=resume, overwrite=not resume, quiet=True)
    wall = time.perf_counter() - started
    test_scores = _read_json(run_dir / "test_metrics.json")
    source = "test" if f"test_{metric}" in result.metrics else "validation"
    score = result.metrics.get(f"test_{metric}" if source == "test" else metric)
    if score is None:
        raise RecipeError(f"{run_dir}: no {metric} to score the cell on; a study needs data.test or a validation split")
    labels = _read_json(run_dir / "tokenizer" / "pretune.json").get("label_names")
    row = {**asdict(cell), "cell": cell.name, "metric": metric, "score": float(score), "scored_on": source,
           "wall_s": round(wall, 3),  # of this attempt: a resumed cell counts the time after the resume only
           **logged_compute(read_metrics(run_dir)), "run_dir": str(run_dir),
           "confusion_matrix": (test_scores if source == "test" else result.metrics).get("confusion_matrix"),
           "labels": labels}
    done.with_suffix(".tmp").write_text(json.dumps(row))
    done.with_suffix(".tmp").replace(done)  # a cell is finished exactly when cell.json exists, complete
    return row


def logged_compute(history: list[dict[str, Any]]) -> dict[str, Any]:
    """``flops``, ``encode_flops`` and ``steps`` of a run from its ``metrics.jsonl`` rows.

    FLOPs are the model FLOPs the trainer logs on its train lines, plus those of ``encode`` lines:
    a linear probe's one-off encoding of the data by the frozen backbone, when the trainer logs it."""
    train = [r for r in history if r.get("split") == "train"]
    encode = sum(r.get("flops", 0.0) for r in history if r.get("split") == "encode")
    start = [r for r in history if r.get("split") == "start" and "examples" in r]
    return {"flops": sum(r.get("flops", 0.0) for r in train) + encode, "encode_flops": encode,
            "steps": max([r["step"] for r in train], default=0), "wall_s_logged": wall_time(history),
            **({"examples": start[-1]["examples"]} if start else {})}


def wall_time(history: list[dict[str, Any]]) -> float:
    """Seconds a run's processes spent, from the ``time`` stamps of its rows (each resumed process starts at 0)."""
    total, last = 0.0, 0.0
    for row in history:
        stamp = row.get("time")
        if not isinstance(stamp, (int, float)):
            continue
        if stamp < last:  # a new process: the previous one ran until its last stamp
            total += last
        last = stamp
    return total + last


def costs(rows: list[dict[str, Any]], base: str | None, worth: dict[str, Any], budgets: list) -> dict[str, Any]:
    """What the pretraining cost (read from the run that wrote ``base``, when it is a pretune pretraining run)
    and what the fine-tuning cells cost, and the trade-off in one line per pretrained arm."""
    out: dict[str, Any] = {"pretraining": None, "finetuning": {}, "tradeoff": []}
    for arm, members in _groups(rows).items():
        entry = out["finetuning"].setdefault(arm[0], {"flops": 0.0, "wall_s": 0.0, "cells": 0})
        entry["flops"] += sum(r["flops"] for r in members)
        entry["wall_s"] += sum(r["wall_s"] for r in members)
        entry["cells"] += len(members)
    run_dir = Path(base).parent if base else None
    if run_dir is not None and (run_dir / "metrics.jsonl").is_file() and (Path(base) / "pretune.json").is_file():
        meta = _read_json(Path(base) / "pretune.json")
        if meta.get("task") and "kind" not in meta:  # a pretraining run's model, not a fine-tuned one
            logged = logged_compute(read_metrics(run_dir))
            out["pretraining"] = {"run_dir": str(run_dir), "task": meta["task"], "flops": logged["flops"],
                                  "wall_s": logged["wall_s_logged"], "steps": logged["steps"]}
    top = max(budgets)
    labels = next((r["examples"] for r in rows if r["budget"] == top and "examples" in r), None)
    paid = out["pretraining"]
    for arm, w in worth.items():
        if not (w["k"] and labels):
            continue
        needed = labels / w["k"]
        cost = (f"{paid['wall_s'] / 3600:.2g} hours and {paid['flops'] / 1e15:.3g} PFLOPs of pretraining ({paid['task']}) on this "
                "machine" if paid else "pretraining (its cost is not in a pretune run directory beside the model)")
        out["tradeoff"].append(f"{cost} saved about {labels - needed:,.0f} of {labels:,} labels for {arm} "
                               f"(it needs ~{needed:,.0f} to match scratch with all {labels:,})")
    return out


def summarise(rows: list[dict[str, Any]], boot: Bootstrap | None = None) -> list[dict[str, Any]]:
    """Mean, sample standard deviation (n - 1; 0 for one seed) and, with ``boot``, the 95% interval
    (``low``, ``high``; None from one seed without per-example predictions) of the score per (arm, budget)."""
    out = []
    for (arm, budget), members in _groups(rows).items():
        scores = [r["score"] for r in members]
        entry = {"arm": arm, "budget": budget, "mean": statistics.fmean(scores),
                 "std": statistics.stdev(scores) if len(scores) > 1 else 0.0, "n": len(scores),
                 "wall_s": sum(r["wall_s"] for r in members), "flops": sum(r["flops"] for r in members)}
        if boot is not None:
            entry["low"], entry["high"] = boot.interval(members) or (None, None)
        out.append(entry)
    return out


def _groups(rows: list[dict[str, Any]]) -> dict[tuple[str, Any], list[dict]]:
    groups: dict[tuple[str, Any], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["arm"], row["budget"]), []).append(row)
    return groups


def find_headline(summary: list[dict[str, Any]], mode: str, budgets: list, rows: list[dict[str, Any]] | None = None,
                  boot: Bootstrap | None = None) -> tuple[str, dict[str, Any]]:
    """The smallest budget at which each pretrained arm's mean matches scratch at the largest budget; with
    the cells (``rows``) and a :class:`Bootstrap`, each claim says whether its difference is outside the noise."""
    means = {(s["arm"], s["budget"]): s["mean"] for s in summary}
    groups = _groups(rows) if rows is not None and boot is not None else {}
    top = max(budgets)
    if ("scratch", top) not in means:
        return "no scratch arm: nothing to compare with", {}
    reference = means[("scratch", top)]
    better = (lambda a, b: a >= b) if mode == "max" else (lambda a, b: a <= b)
    arms = sorted({s["arm"] for s in summary if s["arm"] != "scratch"})
    matches, parts = {}, []
    scratch = f"scratch + {budget_label(top)} labels: {reference:.3f}"
    for arm in arms:
        hit = next((b for b in sorted(budgets) if (arm, b) in means and better(means[(arm, b)], reference)), None)
        matches[arm] = hit
        if hit is not None:
            parts.append(f"{arm} + {budget_label(hit)} labels: {means[(arm, hit)]:.3f} vs {scratch}"
                         + (_noise(boot.difference(groups[(arm, hit)], groups[("scratch", top)]), mode) if groups else ""))
        else:
            best = (max if mode == "max" else min)(means[(arm, b)] for b in budgets if (arm, b) in means)
            parts.append(f"{arm} never matches {scratch} (its best: {best:.3f})")
    headline = "; ".join(parts)
    return headline, matches


def learning_curves(rows: list[dict[str, Any]], summary: list[dict[str, Any]], mode: str,
                    boot: Bootstrap) -> tuple[dict[str, Any], dict[str, Any]]:
    """Each arm's fitted curve (:mod:`pretune.studies.curves`; three budgets or more) and, for each pretrained
    arm, how many times the labels pretraining was worth against scratch at the largest budget, with a 95%
    interval from refitting every bootstrap replicate (when the cells kept per-example predictions)."""
    groups = _groups(rows)
    budgets = sorted({s["budget"] for s in summary})
    arms = list(dict.fromkeys(s["arm"] for s in summary))
    means = {(s["arm"], s["budget"]): s["mean"] for s in summary}
    curves: dict[str, Any] = {}
    for arm in arms:
        if all((arm, b) in means for b in budgets) and (curve := fit(budgets, np.array([means[(arm, b)] for b in budgets]), mode)[0]):
            curves[arm] = vars(curve)
    worth: dict[str, Any] = {}
    if "scratch" not in arms or len(budgets) < 3 or not all(("scratch", b) in means for b in budgets):
        return curves, worth
    top = max(budgets)
    target = means[("scratch", top)]
    scratch_top = boot.replicates(groups[("scratch", top)])
    for arm in arms:
        if arm == "scratch" or arm not in curves:
            continue
        needed = Curve(**curves[arm]).needed(target)
        entry = {"target": target, "needed_budget": needed, "k": top / needed if needed else 0.0,
                 "extrapolated": bool(needed) and not min(budgets) <= needed <= top, "low": None, "high": None,
                 # a crossing more than 10x outside the budgets run is the fit talking, not the data
                 "far": bool(needed) and not min(budgets) / FAR <= needed <= top * FAR}
        if scratch_top is not None:
            replicates = np.stack([boot.replicates(groups[(arm, b)]) for b in budgets], axis=1)
            k = curve_worth(budgets, replicates, scratch_top, mode)
            k = k[np.isfinite(k)]
            if len(k):
                entry["low"], entry["high"] = (float(v) for v in np.percentile(k, [2.5, 97.5]))
        worth[arm] = entry
    return curves, worth


def majority_text(summary: list[dict[str, Any]], floor: float, metric: str) -> str:
    """Which arms never beat always answering the most frequent test class (their comparisons say little)."""
    best = {}
    for s in summary:
        best[s["arm"]] = max(best.get(s["arm"], float("-inf")), s["mean"])
    below = [arm for arm, score in best.items() if score <= floor]
    text = f"the most frequent test class alone scores {floor:.3f} {metric}"
    if not below:
        return text + ": every arm beats it"
    if len(below) == len(best):
        return text + ": no arm beats it, so these comparisons are between failures"
    return text + f": {', '.join(below)} never beat{'s' if len(below) == 1 else ''} it"


def worth_text(arm: str, w: dict[str, Any]) -> str:
    """``pretrained full was worth about 6.2x the labels of scratch (95% interval 3.1x to 14x)``."""
    if not w["k"]:
        return f"{arm}'s fitted curve never reaches scratch at its largest budget ({w['target']:.3f})"
    if w.get("far"):
        return (f"how many labels {arm} was worth cannot be estimated from these budgets (its fitted curve would reach "
                f"scratch's {w['target']:.3f} at a budget of {w['needed_budget']:.2g}, over {FAR}x outside the budgets run)")
    text = f"{arm} was worth about {w['k']:.2g}x the labels of scratch"
    if w["low"] is not None:
        text += f" (95% interval {w['low']:.2g}x to {w['high']:.2g}x)"
    return text + (" (extrapolated beyond the budgets run)" if w["extrapolated"] else "")


def _noise(diff: dict[str, Any], mode: str) -> str:
    """`` (difference +0.012, 95% interval -0.008 to +0.031: inside the noise)`` for a headline claim."""
    if diff["low"] is None:
        return " (one seed: no interval; run seeds=3 to know whether this is noise)"
    if diff["inside_noise"]:
        verdict = "inside the noise: as good as, not better than"
    else:
        clearly = (diff["low"] > 0) == (mode == "max")
        verdict = "outside the noise: better" if clearly else "outside the noise: worse"
    return f" (difference {diff['difference']:+.3f}, 95% interval {diff['low']:+.3f} to {diff['high']:+.3f}: {verdict})"


COLUMNS = ["arm", "strategy", "pretrained", "budget", "seed", "metric", "score", "scored_on", "wall_s", "flops", "steps", "run_dir"]


def write_results(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}
