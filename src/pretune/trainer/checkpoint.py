"""Run directories and checkpoints that survive a kill at any moment.

    run_dir/
      recipe.yaml            the fully resolved recipe: enough to reproduce the run
      metrics.jsonl          one JSON object per log / eval line
      tb/                    TensorBoard event files
      checkpoints/step-00000100/
        model/               Hugging Face folder (safetensors weights, config, tokenizer)
        state.pt             optimizer, scheduler, step, epoch, data position (weights_only-safe)
      model/                 the final model

Every checkpoint is written into a temporary folder, flushed to disk and renamed into place,
so a folder named ``step-*`` is always complete; a kill during a save leaves the previous
checkpoint as the latest.  Trainer state is read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import safetensors.torch
import torch

from pretune.errors import CheckpointError

STEP_DIR = re.compile(r"^step-(\d+)$")


def _fsync_tree(path: Path) -> None:
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
    for folder in [path, *sorted(p for p in path.rglob("*") if p.is_dir())]:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_dir)`` then rename ``tmp_dir`` to ``target`` (replacing an older one)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        _fsync_tree(tmp)
        if target.exists():
            old = target.parent / f".old-{target.name}-{os.getpid()}"
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_checkpoint(run_dir: Path, step: int, module: torch.nn.Module, save_model: Callable[[Path], None],
                    state: dict[str, Any], keep_last: int) -> Path:
    """``model/`` for users (a Hugging Face folder), ``module.safetensors`` + ``state.pt`` for resuming."""
    target = run_dir / "checkpoints" / f"step-{step:08d}"

    def write(tmp: Path) -> None:
        (tmp / "model").mkdir()
        save_model(tmp / "model")
        safetensors.torch.save_model(module, str(tmp / "module.safetensors"))  # everything, adapters included
        torch.save(state, tmp / "state.pt")

    write_atomically(target, write)
    for old in checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if STEP_DIR.match(p.name) and (p / "state.pt").is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = checkpoints(run_dir)
    return found[-1] if found else None


def copy_atomically(source: Path, target: Path) -> None:
    """Copy ``source/model`` to ``target`` through a temporary folder."""
    write_atomically(target, lambda tmp: [shutil.copy2(f, tmp / f.name) for f in sorted((source / "model").iterdir()) if f.is_file()])


def load_module(checkpoint: Path, module: torch.nn.Module) -> None:
    """Load the exact trained weights of ``module`` (built the same way as in the original run)."""
    path = checkpoint / "module.safetensors"
    try:
        missing, unexpected = safetensors.torch.load_model(module, str(path), strict=False)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot be loaded into the model ({type(exc).__name__}: {exc})") from None
    if missing or unexpected:
        raise CheckpointError(f"{path}: does not match the model built from the recipe "
                              f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")


def load_state(checkpoint: Path) -> dict[str, Any]:
    path = checkpoint / "state.pt"
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any failure to unpickle safely is the same problem for the user
        raise CheckpointError(f"{path}: cannot be loaded as trainer state ({type(exc).__name__}: {exc})") from None
