"""``pretune search``: hyperparameter search over a fine-tuning recipe with Optuna.

    pretune search recipes/text-classify.yaml model=runs/mlm/model data.train=train.csv \\
        run_dir=runs/search trials=30 space.strategy=[full,linear-probe,llrd,lora]

Each trial is one ordinary run (:func:`pretune.run.train`) in ``RUN_DIR/trials/trial-N/`` with the
sampled learning rate, batch size, epochs, weight decay and strategy (with its parameter:
``freeze-bottom:N``, ``llrd:D``, ``lora:r=R``).  Its value is the best validation value of the
task's own metric (accuracy, micro-F1, MSE...: what early stopping monitors), never the test set.
After every evaluation the trainer calls back (``on_eval``); the callback reports the value to
Optuna (step = the evaluation's number) and a median pruner ends trials that fall behind the
median of earlier trials at the same evaluation.  The study lives in ``RUN_DIR/search.db``
(SQLite): running the same command again continues it, counting finished trials.  At the end:
``results.csv`` (one row per trial) and ``best-recipe.yaml`` (the recipe with the best values).
A trial that fails with a training error (e.g. a non-finite loss at a huge learning rate) is
recorded as failed and the search goes on.
"""

from __future__ import annotations

import csv
import json
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pretune.errors import PretuneError, RecipeError, TrainingError
from pretune.recipe import Recipe, Section, apply_overrides, read_yaml, validate

SEARCH_FIELDS = ("trials", "timeout", "prune", "space")
STRATEGY_NAMES = ("full", "linear-probe", "freeze-bottom", "gradual-unfreeze", "llrd", "lora")


class SpaceConfig(Section):
    """The search space.  Ranges are ``[low, high]``; one value fixes a parameter; null leaves the recipe's."""

    lr: list[float] | None = [1e-5, 1e-2]  # log-uniform range
    batch_size: list[int] | None = [16, 32, 64]  # choices
    epochs: list[int] | None = [1, 5]  # integer range
    weight_decay: list[float] | None = [0.0, 0.1]  # uniform range
    strategy: list[str] | None = None  # choices among full, linear-probe, freeze-bottom, gradual-unfreeze, llrd, lora
    freeze_bottom: list[int] = [1, 2]  # range of N in freeze-bottom:N
    llrd: list[float] = [0.5, 0.95]  # range of the layer-wise decay D in llrd:D
    lora_r: list[int] = [4, 8, 16]  # choices of the LoRA rank R in lora:r=R


class SearchConfig(Section):
    """The search keys (top level of the recipe, or ``key=value`` overrides)."""

    trials: int = 20  # finished (complete or pruned) trials wanted in all, counting earlier runs of the search
    timeout: float | None = None  # stop starting new trials after this many seconds
    prune: bool = True  # median pruning on the intermediate validation values
    space: SpaceConfig = SpaceConfig()


@dataclass
class SearchResult:
    search_dir: Path
    metric: str
    mode: str
    best_value: float | None
    best_params: dict[str, Any]
    best_recipe: Path | None
    rows: list[dict[str, Any]]


def load_search(path: str | Path, overrides: list[str] = ()) -> tuple[SearchConfig, dict[str, Any], Recipe]:
    """Split a recipe file (+ overrides) into its search keys and the fine-tuning recipe."""
    raw = apply_overrides(read_yaml(path), ["kind=finetune", *overrides])
    config = validate(SearchConfig, {k: raw.pop(k) for k in SEARCH_FIELDS if k in raw}, source=str(path))
    for name in config.space.strategy or []:
        if name.split(":")[0] not in STRATEGY_NAMES:
            raise RecipeError(f"{path}: recipe key 'space.strategy': {name!r} is not one of {', '.join(STRATEGY_NAMES)}")
    for key in ("lr", "epochs", "weight_decay"):
        values = getattr(config.space, key)
        if values is not None and not 1 <= len(values) <= 2:
            raise RecipeError(f"{path}: recipe key 'space.{key}': give [low, high] or one value (got {values})")
    return config, raw, validate(Recipe, raw, source=str(path))


def sample(trial: Any, space: SpaceConfig) -> dict[str, Any]:
    """The recipe overrides of one trial, drawn from ``space``."""

    def ranged(name: str, values: list | None, kind: str) -> Any:
        if values is None:
            return None
        if len(values) == 1 or values[0] == values[-1]:
            return values[0]
        low, high = min(values), max(values)
        if kind == "log":
            return trial.suggest_float(name, low, high, log=True)
        return trial.suggest_int(name, low, high) if kind == "int" else trial.suggest_float(name, low, high)

    params = {"trainer.lr": ranged("lr", space.lr, "log"), "trainer.epochs": ranged("epochs", space.epochs, "int"),
              "trainer.weight_decay": ranged("weight_decay", space.weight_decay, "float")}
    if space.batch_size:
        params["trainer.batch_size"] = trial.suggest_categorical("batch_size", space.batch_size)
    if space.strategy:
        name = trial.suggest_categorical("strategy", space.strategy)
        if name == "freeze-bottom":
            name = f"freeze-bottom:{ranged('freeze_bottom', space.freeze_bottom, 'int')}"
        elif name == "llrd":
            name = f"llrd:{ranged('llrd_decay', space.llrd, 'float'):.3f}"
        elif name == "lora":
            name = f"lora:r={trial.suggest_categorical('lora_r', space.lora_r)}"
        params["strategy"] = name
    return {k: v for k, v in params.items() if v is not None}


def pruning_callback(trial: Any, metric: str, prune: bool) -> Any:
    """``on_eval`` for :func:`pretune.run.train`: report each evaluation's metric (not the step-0 one) and prune."""
    import optuna  # lazy: an optional extra (pretune[search])

    evaluations = [0]

    def on_eval(step: int, metrics: dict[str, Any]) -> None:
        if step == 0 or metric not in metrics:
            return
        evaluations[0] += 1
        trial.report(float(metrics[metric]), evaluations[0])
        if prune and trial.should_prune():
            raise optuna.TrialPruned(f"{metric} {metrics[metric]:.4g} at evaluation {evaluations[0]} is below the median")

    return on_eval


def search(path: str | Path, overrides: list[str] = (), *, overwrite: bool = False) -> SearchResult:
    """Run (or continue) the search of ``path``; write results.csv and best-recipe.yaml in ``run_dir``."""
    try:
        import optuna
    except ImportError:
        raise PretuneError("pretune search needs Optuna: pip install 'pretune[search]'") from None
    from pretune.run import build_task, train  # lazy: pretune.run imports torch and transformers

    config, raw, recipe = load_search(path, overrides)
    metric, mode = build_task(recipe).monitor
    search_dir = Path(recipe.run_dir)
    if overwrite and search_dir.exists():
        shutil.rmtree(search_dir)
    search_dir.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with warnings.catch_warnings():  # heartbeats are marked experimental; they are how Optuna fails a killed search's trial
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = optuna.storages.RDBStorage(f"sqlite:///{search_dir.resolve() / 'search.db'}", heartbeat_interval=10, grace_period=30)
        study = optuna.create_study(study_name="pretune-search", storage=storage, load_if_exists=True,
                                    direction="maximize" if mode == "max" else "minimize",
                                    pruner=optuna.pruners.MedianPruner(n_startup_trials=2) if config.prune else optuna.pruners.NopPruner())
        optuna.storages.fail_stale_trials(study)  # trials of an interrupted search (after the grace period)
    # a continued search must not replay the first search's draws: seed the sampler with the trials so far
    study.sampler = optuna.samplers.TPESampler(seed=recipe.seed + len(study.get_trials(deepcopy=False)))
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    remaining = config.trials - len(study.get_trials(deepcopy=False, states=finished))
    print(f"pretune search: {metric} ({'higher' if mode == 'max' else 'lower'} is better), {max(remaining, 0)} of {config.trials} trials to run in {search_dir}")

    def objective(trial: Any) -> float:
        params = sample(trial, config.space)
        run_dir = search_dir / "trials" / f"trial-{trial.number}"
        cell = validate(Recipe, apply_overrides(raw, [f"{k}={v}" for k, v in params.items()] + [f"run_dir={run_dir}"]))
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("overrides", params)
        started = time.perf_counter()
        try:
            train(cell, overwrite=True, on_eval=pruning_callback(trial, metric, config.prune))
        finally:
            trial.set_user_attr("wall_s", round(time.perf_counter() - started, 3))
        values = [r[metric] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
                  if r.get("split") == "validation" and r.get("step") and metric in r]
        if not values:
            raise TrainingError(f"{run_dir}: no validation {metric}; the search needs validation data (data.validation)")
        value = max(values) if mode == "max" else min(values)
        print(f"trial {trial.number}: {metric} {value:.4f} with " + " ".join(f"{k}={v}" for k, v in params.items()))
        return value

    if remaining > 0:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.optimize(objective, n_trials=remaining, timeout=config.timeout, catch=(TrainingError,))
    return write_results(study, raw, search_dir, metric, mode)


def write_results(study: Any, raw: dict[str, Any], search_dir: Path, metric: str, mode: str) -> SearchResult:
    """``results.csv`` (one row per trial, best first) and ``best-recipe.yaml``."""
    trials = study.get_trials(deepcopy=False)
    keys = sorted({k for t in trials for k in t.user_attrs.get("overrides", {})})
    rows = []
    for t in trials:
        rows.append({"trial": t.number, "state": t.state.name.lower(), metric: t.value,
                     "evaluations": len(t.intermediate_values), "wall_s": t.user_attrs.get("wall_s"),
                     **{k: t.user_attrs.get("overrides", {}).get(k) for k in keys}, "run_dir": t.user_attrs.get("run_dir")})
    done = [r for r in rows if r["state"] == "complete"]
    done.sort(key=lambda r: r[metric], reverse=mode == "max")
    rows = done + [r for r in rows if r["state"] != "complete"]
    with open(search_dir / "results.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["trial", "state", metric, "evaluations", "wall_s", *keys, "run_dir"])
        writer.writeheader()
        writer.writerows(rows)
    best_recipe, best_value, best_params = None, None, {}
    if done:
        best = study.best_trial  # `done` holds the complete trials: there is a best one
        best_params = best.user_attrs.get("overrides", {})
        best_value = best.value
        recipe = validate(Recipe, apply_overrides(raw, [f"{k}={v}" for k, v in best_params.items()] + [f"run_dir={search_dir / 'best'}"]))
        best_recipe = search_dir / "best-recipe.yaml"
        best_recipe.write_text(f"# best of {len(done)} complete trials: validation {metric} {best_value:.4f} "
                               f"(trial {best.number}, {best.user_attrs.get('run_dir')})\n" + recipe.dump())
        print(f"best: trial {best.number}, validation {metric} {best_value:.4f} with "
              + " ".join(f"{k}={v}" for k, v in best_params.items()))
    print(f"{len(done)} complete, {sum(r['state'] == 'pruned' for r in rows)} pruned, {sum(r['state'] == 'fail' for r in rows)} failed; "
          f"table: {search_dir / 'results.csv'}")
    return SearchResult(search_dir, metric, mode, best_value, best_params, best_recipe, rows)
