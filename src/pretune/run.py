"""``train(recipe)``: the whole journey of one run, from recipe to saved model.

    recipe -> task -> data (rank 0 first) -> module (fresh or from a checkpoint) -> fit -> model/
"""

from __future__ import annotations

import json
import pickle
import shutil
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pretune.backbones import backbone_config
from pretune.data.arrays import modality
from pretune.errors import CheckpointError, DistributedError, RecipeError, ResourceError, UnsafeFileError
from pretune.recipe import Recipe, load_recipe
from pretune.registry import TASKS
from pretune.trainer import checkpoint, distributed
from pretune.trainer.loop import fit
from pretune.trainer.precision import resolve

import pretune.tasks  # noqa: F401  (registers the built-in tasks)


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict[str, float]

    @property
    def model_dir(self) -> Path:
        return self.run_dir / "model"


def build_task(recipe: Recipe) -> Any:
    """The task named by the recipe, with its own ``task`` and ``data`` sections validated."""
    task_class = TASKS.get(str(recipe.task.get("name", "")))
    if modality(recipe.data) != "text" and hasattr(task_class, "for_arrays"):  # e.g. classify images, not text
        task_class = task_class.for_arrays
    task_cfg, data_cfg = recipe.section("task", task_class.Config), recipe.section("data", task_class.DataConfig)
    if getattr(task_class, "uses_strategy", False):
        head_scale = recipe.trainer.head_lr / recipe.trainer.lr if recipe.trainer.head_lr else 1.0
        return task_class(task_cfg, data_cfg, seed=recipe.seed, strategy=recipe.strategy, head_lr_scale=head_scale)
    if recipe.strategy != "full":
        raise RecipeError(f"recipe key 'strategy': {recipe.strategy!r} applies to fine-tuning; pretraining task {task_cfg.name!r} trains everything")
    return task_class(task_cfg, data_cfg, seed=recipe.seed)


def train(recipe: Recipe | str | Path, overrides: list[str] = (), *, resume: bool = False, overwrite: bool = False,
          on_eval: Any = None) -> RunResult:
    """Run (or resume) the training described by ``recipe``; returns the run directory and final metrics.

    ``recipe`` is a :class:`Recipe`, a YAML file, or, with ``resume=True``, a run directory.
    ``on_eval(step, metrics)`` is called after each validation (see :func:`pretune.trainer.loop.fit`).
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, list(overrides))
    world = distributed.init()
    run_dir = Path(recipe.run_dir)
    resume_from = _prepare_run_dir(run_dir, recipe, resume, overwrite, world)

    if recipe.trainer.threads:
        torch.set_num_threads(recipe.trainer.threads)
    task = build_task(recipe)
    backbone = backbone_config(recipe)
    saved_tokenizer = run_dir / "tokenizer"
    if world.main:  # rank 0 reads the data first (and trains a tokenizer if there is none); the others reuse it
        data = task.data(tokenizer_path=_tokenizer_source(resume_from, backbone.path, saved_tokenizer))
        if hasattr(data, "tokenizer"):
            data.tokenizer.save_pretrained(saved_tokenizer)
        if getattr(task, "label_names", None) is not None:  # the same label map on every rank and on resume
            saved_tokenizer.mkdir(parents=True, exist_ok=True)
            (saved_tokenizer / "pretune.json").write_text(json.dumps({"kind": task.kind, "label_names": task.label_names}))
    distributed.barrier(world)
    if not world.main:
        data = task.data(tokenizer_path=str(saved_tokenizer))
    torch.manual_seed(recipe.seed)
    try:
        module = task.build(backbone, data)
    except pickle.UnpicklingError as exc:  # --trust-pickle, but the file holds more than tensors
        where = getattr(backbone, "weights", None) or getattr(backbone, "path", None)
        raise UnsafeFileError(f"{where}: refused by torch's restricted unpickler even with --trust-pickle: "
                              f"{next((l for l in str(exc).splitlines() if 'Unpickler error' in l), str(exc))[:300]}") from None
    if resume_from is not None:
        checkpoint.load_module(resume_from, module)
    if hasattr(task, "prepare"):  # e.g. a linear probe encodes the data once with the frozen backbone
        data = task.prepare(module, data, world.device, resolve(recipe.trainer.precision, world.device))
    try:
        metrics = fit(task, module, data, recipe, run_dir, world, resume_from=resume_from, on_eval=on_eval)
    except RuntimeError as exc:  # out of memory, a lost peer process: one line, the last checkpoint intact
        raise _runtime_failure(exc, recipe, run_dir, world) or exc
    finally:
        distributed.shutdown(world)
    test_file = getattr(getattr(task, "data_cfg", None), "test", None)
    if test_file and world.main:  # the held-out test set, scored once with the final (best) model
        metrics = {**metrics, **{f"test_{k}": v for k, v in _score_test(run_dir, test_file).items()}}
    return RunResult(run_dir, metrics)


def _runtime_failure(exc: RuntimeError, recipe: Recipe, run_dir: Path, world: distributed.World) -> Exception | None:
    """Out-of-memory or a lost peer during :func:`fit` as a one-line :class:`PretuneError` (None: a bug, re-raised)."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    latest = checkpoint.latest_checkpoint(run_dir)
    kept = f"the last checkpoint {latest} is intact (resume with --resume)" if latest else "no checkpoint was written yet"
    progress = next((frame.f_locals.get("progress") for frame, _ in traceback.walk_tb(exc.__traceback__)
                     if frame.f_code.co_name == "fit"), None)  # where fit() was when it failed
    step = f"step {progress.step + 1}" if progress is not None else "training"
    cfg = recipe.trainer
    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in text.lower():
        return ResourceError(
            f"out of memory at {step} with trainer.batch_size={cfg.batch_size} (x accumulate {cfg.accumulate}); {kept}; "
            f"try trainer.batch_size={max(1, cfg.batch_size // 2)} trainer.accumulate={cfg.accumulate * 2} "
            f"(the same global batch), a shorter data.block_size, or trainer.precision=bf16 ({text[:200]})")
    if world.distributed and (isinstance(exc, getattr(torch.distributed, "DistBackendError", ())) or any(
            word in text for word in ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Timed out", "timed out"))):
        return DistributedError(f"rank {world.rank}: another process of the run failed or stopped answering at {step} "
                                f"({text[:200]}); {kept}")
    return None


def _score_test(run_dir: Path, test_file: str) -> dict[str, float]:
    from pretune.backbones.vision import is_vision_folder
    from pretune.evaluate.metrics import summary_table
    from pretune.predict import evaluate_file

    options: dict[str, Any] = {}
    if is_vision_folder(run_dir / "model"):  # images / vectors: read the test set as the recipe's data section does
        import sys

        import yaml

        from pretune.data.arrays import ArrayDataConfig

        meta = json.loads((run_dir / "model" / "pretune.json").read_text())
        if meta.get("kind") != "single":
            print(f"pretune: note: data.test is not scored: a {meta.get('task')} model has no classification head", file=sys.stderr)
            return {}
        data = ArrayDataConfig.model_validate(yaml.safe_load((run_dir / "recipe.yaml").read_text()).get("data") or {})
        options = {"classes": data.classes, "label": data.label, "bad_files": data.bad_files}
    scores = evaluate_file(str(run_dir / "model"), test_file, out=str(run_dir / "test_metrics.json"), **options)
    scalars = {k: v for k, v in scores.items() if isinstance(v, (int, float))}
    with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"step": None, "split": "test", **scalars}) + "\n")
    print(summary_table(scores, title=f"test set {test_file}"))
    return scalars


def _tokenizer_source(resume_from: Path | None, backbone_path: str | None, saved: Path) -> str | None:
    if resume_from is not None:
        return str(saved) if saved.is_dir() else str(resume_from / "model")
    return backbone_path  # None: train one on the corpus


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
