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
checkpoint as the latest (a leftover ``.tmp-*`` folder is never a checkpoint).  Trainer state is
read with :func:`pretune.safeload.load_torch_state` (``torch.load(weights_only=True)``, passed
explicitly, so ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` cannot turn it off); weights come only from
safetensors files.  Weights from *outside* a run (pickles refused unless trusted) are checked by
:mod:`pretune.safeload`.  A failed save (disk full, a kill) never removes the previous checkpoint.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
from pathlib import Path
from typing import Any, Callable

import safetensors.torch
import torch

from pretune.errors import CheckpointError, ResourceError
from pretune.safeload import load_torch_state

STEP_DIR = re.compile(r"^step-(\d+)$")
_CRASH_AT = os.environ.get("PRETUNE_CRASH_AT")  # fault injection for the reliability tests (see crash_point)
_HANG_AT = os.environ.get("PRETUNE_HANG_AT")


def crash_point(*where: object) -> None:
    """Testing aid: SIGKILL this process here if ``PRETUNE_CRASH_AT`` names this point, or hang here
    (wait forever, as a rank stuck in a deadlock or on a dead filesystem) if ``PRETUNE_HANG_AT`` does.

    ``PRETUNE_CRASH_AT=save:step-00000006`` kills in the middle of writing that checkpoint,
    ``eval:8`` during the evaluation at step 8, ``micro:5:0`` after the first micro-batch of step 5
    (mid gradient accumulation); a suffix ``@R`` kills only the process of rank R (``torchrun``).
    Only a job's first attempt is hit: the workers ``torchrun --max-restarts`` restarts
    (``TORCHELASTIC_RESTART_COUNT`` > 0) pass the point.  Costs two comparisons when both variables are unset.
    """
    if _CRASH_AT is None and _HANG_AT is None or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    here, rank = ":".join(str(part) for part in where), os.environ.get("RANK", "0")
    for spec, hang in ((_CRASH_AT, False), (_HANG_AT, True)):
        point, _, only = (spec or "").partition("@")
        if spec is None or point != here or only not in ("", rank):
            continue
        if not hang:
            os.kill(os.getpid(), signal.SIGKILL)
        os.write(2, f"pretune: PRETUNE_HANG_AT={spec}: rank {rank} hangs here\n".encode())
        while True:
            signal.pause()  # until a signal ends the process (torchrun's SIGTERM)


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


def write_atomically(target: Path, write: Callable[[Path], None], tmp: Path | None = None) -> None:
    """Call ``write(tmp_dir)`` then rename ``tmp_dir`` to ``target`` (replacing an older one).

    ``tmp``: a temporary folder (:func:`temporary`) other processes have already written into (shards)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if tmp is None:
        tmp = temporary(target)
        shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(exist_ok=True)
        write(tmp)
        crash_point("save", target.name)
        _fsync_tree(tmp)
        if target.exists():
            old = target.parent / f".old-{target.name}-{os.getpid()}"
            os.rename(target, old)
            crash_point("swap", target.name)  # the one moment `target` is missing: recover() puts `old` back
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
        _fsync_dir(target.parent)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) or (isinstance(exc, RuntimeError) and "write" in str(exc)):  # torch.save wraps ENOSPC
            raise _save_error(target, exc) from None
        raise


def temporary(target: Path, pid: int | None = None) -> Path:
    """Where ``target`` is written before its rename (``pid``: of the process that renames it)."""
    return target.parent / f".tmp-{target.name}-{pid or os.getpid()}"


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_error(target: Path, exc: BaseException) -> Exception:
    """A failed save as one line: what failed, and that the previous checkpoint is still there."""
    previous = latest_checkpoint(target.parent.parent) if target.parent.name == "checkpoints" else None
    kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint was touched"
    disk_full = getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "write failed" in str(exc)
    if disk_full:
        free = shutil.disk_usage(target.parent).free if target.parent.exists() else 0
        return ResourceError(f"disk full while saving {target} ({free / 2**20:.0f} MiB free); {kept}; "
                             f"free some space (or lower trainer.keep_last) and resume with --resume")
    return CheckpointError(f"cannot save {target} ({type(exc).__name__}: {exc}); {kept}")


def recover(run_dir: Path) -> None:
    """Tidy a run directory after a crash: put back a folder killed mid-replacement, drop half-written ones.

    A kill between the two renames of :func:`write_atomically` leaves ``.old-NAME-PID`` (complete)
    and no ``NAME``; the old folder is put back.  Every ``.tmp-*`` folder is incomplete and removed.
    """
    for parent in (Path(run_dir), Path(run_dir) / "checkpoints"):
        if not parent.is_dir():
            continue
        for leftover in sorted(parent.iterdir()):
            match = re.match(r"^\.(old|tmp)-(.+)-\d+$", leftover.name)
            if not match or not leftover.is_dir():
                continue
            if match.group(1) == "old" and not (parent / match.group(2)).exists():
                os.rename(leftover, parent / match.group(2))
            else:
                shutil.rmtree(leftover, ignore_errors=True)


def save_checkpoint(run_dir: Path, step: int, module: torch.nn.Module | None, save_model: Callable[[Path], None],
                    state: dict[str, Any], keep_last: int, world: Any = None,
                    shards: Callable[[Path], None] | None = None) -> Path:
    """``model/`` for users (a Hugging Face folder), ``module.safetensors`` + ``state.pt`` for resuming.

    Every rank calls it.  ``shards(folder)``: a sharded run's weights and optimizer state, which every
    rank writes into ``dcp/`` of the same temporary folder (instead of ``module.safetensors``) before
    rank 0 adds the rest and renames it into place."""
    target = run_dir / "checkpoints" / f"step-{step:08d}"
    main = world is None or world.main
    tmp = None
    if shards is not None:
        from pretune.trainer import distributed  # the ranks agree on rank 0's temporary folder

        tmp = temporary(target, distributed.broadcast_int(os.getpid(), world))
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        distributed.barrier(world, f"the checkpoint folder of step {step}")
        shards(tmp / "dcp")
    if not main:
        return target

    def write(tmp: Path) -> None:
        (tmp / "model").mkdir()
        save_model(tmp / "model")
        if shards is None:
            safetensors.torch.save_model(module, str(tmp / "module.safetensors"))  # everything, adapters included
        torch.save(state, tmp / "state.pt")

    write_atomically(target, write, tmp)
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
    """Copy ``source/model`` (sub-folders too: sentence-transformers' ``1_Pooling/``) to ``target`` through a temporary folder."""
    write_atomically(target, lambda tmp: shutil.copytree(source / "model", tmp, dirs_exist_ok=True))


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
    """The trainer state of a checkpoint, through the restricted unpickler (tensors, numbers, containers only)."""
    path = checkpoint / "state.pt"
    try:
        return load_torch_state(path)  # weights_only=True, explicit: beats TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD
    except Exception as exc:  # any failure to unpickle safely is the same problem for the user
        raise CheckpointError(f"{path}: cannot be loaded as trainer state ({type(exc).__name__}: {exc})") from None
