"""``train(recipe)``: the whole journey of one run, composed in one place, in reading order.

    recipe  -> task (registry)  -> backbone family (registry)  -> data (the family's modality)
            -> module = task.build(backbone, data)  -> fit (the one loop)  -> model/

Everything a recipe names is validated by :func:`compose` before the run directory is touched.
Tasks receive their data and backbone; they do not build them.
"""

from __future__ import annotations

import json
import pickle
import shutil
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import datasets
import torch

import pretune.backbones  # noqa: F401  (registers the backbone families)
import pretune.tasks  # noqa: F401  (registers the built-in tasks)
from pretune.backbones.base import Backbone, resolve
from pretune.card import write_card
from pretune.data import readers
from pretune.data.readers import RunData
from pretune.errors import CheckpointError, DistributedError, RecipeError, ResourceError, UnsafeFileError
from pretune.evaluate.metrics import summary_table
from pretune.recipe import Recipe, load_recipe
from pretune.registry import TASKS
from pretune.select import task_selection
from pretune.tasks.base import Task
from pretune.trainer import checkpoint, distributed, sharding
from pretune.trainer.logging import before_after
from pretune.trainer.loop import StepFailed, fit
from pretune.trainer.precision import resolve as resolve_precision

DATA_TIMEOUT_S = 3600.0  # how long the other ranks wait for rank 0 to read the data (and train a tokenizer)
LABEL_MAP = "pretune.json"  # in RUN/tokenizer/: the label map every rank (and a resume) reads the data with


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict[str, float]

    @property
    def model_dir(self) -> Path:
        return self.run_dir / "model"


@dataclass
class Plan:
    """A recipe composed and validated: what trains, on which backbone, reading which data."""

    task: Task
    backbone: Backbone
    data: Any  # the validated data section (its class depends on the modality and the task's kind of data)


def build_task(recipe: Recipe) -> Task:
    """The task named by the recipe, its ``task`` section (and ``strategy``) validated."""
    task_class = TASKS.get(str(recipe.task.get("name", "")))
    cfg = recipe.section("task", task_class.Config)
    if task_class.data_kind == "labelled":
        head_scale = recipe.trainer.head_lr / recipe.trainer.lr if recipe.trainer.head_lr else 1.0
        return task_class(cfg, recipe.seed, strategy=recipe.strategy, head_lr_scale=head_scale, epochs=recipe.trainer.epochs)
    if recipe.strategy.name != "full":
        raise RecipeError(f"recipe key 'strategy': {recipe.strategy} applies to fine-tuning; pretraining task {cfg.name!r} trains everything")
    task = task_class(cfg, recipe.seed)
    task.head_lr_scale = recipe.trainer.head_lr / recipe.trainer.lr if recipe.trainer.head_lr else 1.0  # a continued model's new head
    return task


def compose(recipe: Recipe) -> Plan:
    """Task, backbone family and data section of ``recipe``, each validated by the class that owns it."""
    task = build_task(recipe)
    backbone = resolve(recipe.backbone)
    if backbone.modality not in task.modalities:
        what = {"text": "text", "array": "images or vectors", "interactions": "interaction logs"}
        raise RecipeError(f"recipe key 'backbone': {backbone.name} models read {what[backbone.modality]}, but task "
                          f"{task.cfg.name!r} needs {' or '.join(what[m] for m in task.modalities)}")
    data_cfg = recipe.section("data", readers.config_class(backbone.modality, task.data_kind))
    return Plan(task, backbone, data_cfg)


def train(recipe: Recipe | str | Path, overrides: list[str] = (), *, resume: bool = False, overwrite: bool = False,
          on_eval: Any = None, quiet: bool = False) -> RunResult:
    """Run (or resume) the training described by ``recipe``; returns the run directory and final metrics.

    ``recipe`` is a :class:`Recipe`, a YAML file, or, with ``resume=True``, a run directory.
    ``on_eval(step, metrics)`` is called after each validation (see :func:`pretune.trainer.loop.fit`).
    ``quiet``: one line for the test set instead of its full table (studies run many cells).
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, list(overrides))
    plan = compose(recipe)
    bars = datasets.is_progress_bar_enabled()
    if not recipe.trainer.progress:  # trainer.progress=false: no "Tokenizing" / "Generating split" bars either
        datasets.disable_progress_bars()
    try:
        return _train(plan, recipe, resume, overwrite, on_eval, quiet)
    finally:
        if bars:
            datasets.enable_progress_bars()


def _train(plan: Plan, recipe: Recipe, resume: bool, overwrite: bool, on_eval: Any, quiet: bool) -> RunResult:
    world = distributed.init(recipe.trainer.dist_timeout, group=recipe.trainer.distributed == "fsdp")
    run_dir = Path(recipe.run_dir)
    restart = distributed.restart_count(world)  # torchrun --max-restarts restarted the job after a process died
    if restart and not resume:
        resume_from = _resume_after_restart(run_dir, recipe, restart, overwrite, world)
    else:
        resume_from = _prepare_run_dir(run_dir, recipe, resume, overwrite, world)
    if recipe.trainer.threads:
        torch.set_num_threads(recipe.trainer.threads)

    data = read_data(plan, recipe, run_dir, resume_from, world)
    task, backbone = plan.task, plan.backbone
    torch.manual_seed(recipe.seed)
    try:
        module = task.build(backbone, data)
    except pickle.UnpicklingError as exc:  # --trust-pickle, but the file holds more than tensors
        where = backbone.weights or backbone.path
        raise UnsafeFileError(f"{where}: refused by torch's restricted unpickler even with --trust-pickle: "
                              f"{next((l for l in str(exc).splitlines() if 'Unpickler error' in l), str(exc))[:300]}") from None
    if resume_from is not None and sharding.has_shards(resume_from):  # written by trainer.distributed=fsdp, any world size
        sharding.load_model(resume_from, module)
    elif resume_from is not None:
        checkpoint.load_module(resume_from, module)
    data = task.prepare(module, data, world.device, resolve_precision(recipe.trainer.precision, world.device))
    try:
        metrics = fit(task, module, data, recipe, run_dir, world, resume_from=resume_from, on_eval=on_eval)
    except RuntimeError as exc:  # out of memory, a lost peer process: one line, the last checkpoint intact
        raise _runtime_failure(exc, recipe, run_dir, world) or exc
    finally:
        distributed.shutdown(world)
    if data.held_out and world.main:  # pretune adapt: what the domain gained and the general text lost
        sets = {"": "domain (validation)", **{f"{name}_": f"{name} (data.{name}, held out)" for name in data.held_out}}
        report = before_after(run_dir, sets, baseline=task.warmup_steps)
        (run_dir / "forgetting.json").write_text(json.dumps({"baseline_step": task.warmup_steps, **report}, indent=2))
    test_file = getattr(plan.data, "test", None) or (plan.data.file if plan.backbone.modality == "interactions" else None)
    if test_file and world.main:  # the held-out test set, scored once with the final (best) model
        metrics = {**metrics, **{f"test_{k}": v for k, v in score_test(run_dir, test_file, plan, quiet=quiet).items()}}
    if world.main and (run_dir / "model").is_dir():
        write_card(run_dir / "model", recipe, metrics)
    return RunResult(run_dir, metrics)


def read_data(plan: Plan, recipe: Recipe, run_dir: Path, resume_from: Path | None, world: distributed.World) -> RunData:
    """Rank 0 reads the data first (and trains a tokenizer if there is none) and saves the tokenizer and
    label map in ``RUN/tokenizer``; the other ranks, and a resumed run, read with those."""
    saved = run_dir / "tokenizer"
    task, backbone = plan.task, plan.backbone
    if getattr(plan.data, "select", None) is not None:  # kNN-TAPT: the pool documents nearest the task, saved in the run
        plan = replace(plan, data=task_selection(plan.data, backbone.path, run_dir, world.main))
    read = data_reader(plan, recipe)

    if world.main:
        source = (str(saved) if saved.is_dir() else str(resume_from / "model")) if resume_from is not None else backbone.path
        data = read(source if backbone.modality in readers.TOKENIZED else None, _label_map(saved) if resume_from is not None else None,
                    fresh=resume_from is None)
        if data.extra.get("vocabulary"):
            (run_dir / "vocabulary.json").write_text(json.dumps(data.extra["vocabulary"], indent=2, ensure_ascii=False))
        if resume_from is None and task.data_kind == "labelled":
            model_labels = _label_map(Path(backbone.path)) if backbone.path else None
            if model_labels and model_labels != data.label_names and set(data.label_names) <= set(model_labels):
                data = read(source if backbone.modality in readers.TOKENIZED else None, model_labels)  # keep the model's label order
        if data.tokenizer is not None:
            data.tokenizer.save_pretrained(saved)
        if data.label_names is not None:
            saved.mkdir(parents=True, exist_ok=True)
            (saved / LABEL_MAP).write_text(json.dumps({"kind": task.head.name if task.head else None,
                                                       "label_names": data.label_names}))
    distributed.barrier(world, "rank 0's data and tokenizer", timeout_s=DATA_TIMEOUT_S)  # reading may train a tokenizer
    if not world.main:
        data = read(str(saved) if backbone.modality in readers.TOKENIZED else None, _label_map(saved), fresh=False)
    return data


def assemble(recipe: Recipe) -> tuple[Task, RunData, torch.nn.Module]:
    """The recipe's task, data and module, composed as :func:`train` does but without a run directory
    or training: for notebooks, tests and benchmarks."""
    plan = compose(recipe)
    if getattr(plan.data, "select", None) is not None:  # kNN-TAPT writes its selection into a run directory
        raise RecipeError("recipe key 'data.select': task-adaptive selection needs a run directory; use pretune.train "
                          "(or pretune adapt), or give the selected documents as data.files")
    data = data_reader(plan, recipe)(plan.backbone.path if plan.backbone.modality in readers.TOKENIZED else None, None)
    torch.manual_seed(recipe.seed)
    return plan.task, data, plan.task.build(plan.backbone, data)


def data_reader(plan: Plan, recipe: Recipe) -> Any:
    """``read(tokenizer_path, label_names) -> RunData`` for this plan's modality, task and data section."""
    options = {"seed": recipe.seed, "head": plan.task.head, "text_family": plan.task.family, "pairs": plan.task.pairs}

    def read(tokenizer_path: str | None, label_names: list[str] | None, fresh: bool = True) -> RunData:
        return readers.read(plan.backbone.modality, plan.task.data_kind, plan.data, tokenizer_path=tokenizer_path,
                            label_names=label_names, fresh=fresh, **options)

    return read


def _label_map(folder: Path) -> list[str] | None:
    """Class names by id saved in ``folder/pretune.json`` (a model folder or ``RUN/tokenizer``), if any."""
    meta = folder / LABEL_MAP
    return json.loads(meta.read_text()).get("label_names") if meta.is_file() else None


def _runtime_failure(exc: RuntimeError, recipe: Recipe, run_dir: Path, world: distributed.World) -> Exception | None:
    """Out-of-memory or a lost peer during :func:`fit` as a one-line :class:`PretuneError` (None: a bug, re-raised)."""
    cause = exc.__cause__ if isinstance(exc, StepFailed) and exc.__cause__ is not None else exc
    text = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
    latest = checkpoint.latest_checkpoint(run_dir)
    kept = f"the last checkpoint {latest} is intact (resume with --resume)" if latest else "no checkpoint was written yet"
    step = f"step {exc.step}" if isinstance(exc, StepFailed) else "training"  # where fit() was when it failed
    cfg = recipe.trainer
    if isinstance(cause, torch.OutOfMemoryError) or "out of memory" in text.lower():
        return ResourceError(
            f"out of memory at {step} with trainer.batch_size={cfg.batch_size} (x accumulate {cfg.accumulate}); {kept}; "
            f"try trainer.batch_size={max(1, cfg.batch_size // 2)} trainer.accumulate={cfg.accumulate * 2} "
            f"(the same global batch), a shorter data.block_size, or trainer.precision=bf16 ({text[:200]})")
    if world.distributed and (isinstance(cause, getattr(torch.distributed, "DistBackendError", ())) or any(
            word in text for word in ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Timed out", "timed out"))):
        who = distributed.who_is_missing(world)  # a monitored barrier on a side group: rank 0 learns which rank is gone
        when = f"at {step}" if isinstance(exc, StepFailed) else "during training"
        if who and "timed out" in text.lower():
            what = f"{who} stopped answering (hung or too slow) {when}: no collective within {distributed.timeout_setting()} s"
        else:
            what = f"{who or 'another process of the run'} failed or stopped answering {when}"
        return DistributedError(f"rank {world.rank}: {what}; {kept} ({text[:200]})")
    return None


def score_test(run_dir: Path, test_file: str, plan: Plan | None = None, quiet: bool = False) -> dict[str, float]:
    """Score ``data.test`` with the run's saved model through the predictor, reading it as the recipe's data
    section does (image / vector options: ``classes``, ``label``, ``bad_files``); {} for a model without a task head."""
    from pretune.predict import evaluate_file  # the predictor sits above the run: imported when a test set is given

    meta_file = run_dir / "model" / LABEL_MAP
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    if "kind" not in meta and meta.get("modality") != "interactions":  # an item model ranks the log's test targets
        print(f"pretune: note: data.test is not scored: a {meta.get('task', 'pretraining')} model has no task head", file=sys.stderr)
        return {}
    options = {}
    if plan is not None and plan.backbone.modality == "array":
        options = {k: getattr(plan.data, k) for k in ("classes", "label", "bad_files")}
    scores = evaluate_file(str(run_dir / "model"), test_file, out=str(run_dir / "test_metrics.json"),
                           predictions_out=str(run_dir / "test_predictions.json"), **options)
    scalars = {k: v for k, v in scores.items() if isinstance(v, (int, float))}
    with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"step": None, "split": "test", **scalars}) + "\n")
    if quiet:  # the full table is in test_metrics.json and the report
        print(f"test set {test_file}: " + ", ".join(f"{k} {v:.4g}" for k, v in list(scalars.items())[:4]))
    else:
        print(summary_table(scores, title=f"test set {test_file}"))
    return scalars


def _resume_after_restart(run_dir: Path, recipe: Recipe, restart: int, overwrite: bool, world: distributed.World) -> Path | None:
    """``torchrun --max-restarts`` restarted every process after one died: resume as ``--resume`` does from the
    latest complete checkpoint, or start over if none was written yet.  Only a run directory this job wrote
    (its ``recipe.yaml`` is this recipe) is resumed or replaced; any other is treated as on the first attempt."""
    saved = run_dir / "recipe.yaml"
    ours = not distributed.any_rank(not (saved.is_file() and saved.read_text() == recipe.dump()), world)  # all read before rank 0 writes
    if not ours:
        return _prepare_run_dir(run_dir, recipe, False, overwrite, world)
    if world.main:  # the kill may have come mid-save: a .tmp-* folder (dropped) or a folder mid-replacement (put back)
        checkpoint.recover(run_dir)
    distributed.barrier(world, "the recovery of the run directory")
    latest = checkpoint.latest_checkpoint(run_dir)
    if world.main:
        where = (f"resuming from {latest} (step {int(checkpoint.STEP_DIR.match(latest.name).group(1))})" if latest is not None
                 else f"no checkpoint in {run_dir} yet: starting over")
        print(f"pretune: torchrun restarted the job (restart {restart}) after a process stopped; {where}", file=sys.stderr)
    return latest if latest is not None else _prepare_run_dir(run_dir, recipe, False, True, world)


def _prepare_run_dir(run_dir: Path, recipe: Recipe, resume: bool, overwrite: bool, world: distributed.World) -> Path | None:
    """Create (or check) the run directory; return the checkpoint to resume from, if any."""
    if resume:
        if world.main:  # a kill mid-save leaves .tmp-* (dropped) or a folder mid-replacement (put back)
            checkpoint.recover(run_dir)
        distributed.barrier(world)
        latest = checkpoint.latest_checkpoint(run_dir)
        if latest is None:
            raise CheckpointError(f"{run_dir}: no complete checkpoint to resume from")
        if world.main:  # record any override given on resume (e.g. a later trainer.max_steps)
            (run_dir / "recipe.yaml").write_text(recipe.dump())
        return latest
    holds_work = (run_dir / "model").exists() or checkpoint.latest_checkpoint(run_dir) is not None
    if holds_work and not overwrite:
        raise CheckpointError(f"{run_dir} already holds a run; pass --resume to continue it or --overwrite to replace it")
    if world.main:
        if overwrite and run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "recipe.yaml").write_text(recipe.dump())
    distributed.barrier(world)
    return None
