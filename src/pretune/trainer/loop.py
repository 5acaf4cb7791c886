"""The one training loop, for every task and backbone.  Read it top to bottom.

Each optimizer step takes one *window* of ``accumulate`` micro-batches.  Every loss term is a
sum over units (masked tokens, examples...) divided by the number of units in the whole window
on all ranks, so accumulation and DDP give exactly the gradient of one large batch.  Randomness
inside the step (dropout) is reseeded from (seed, step, micro-batch, rank), and data is a pure
function of (seed, epoch, position): resuming from a checkpoint replays the same run.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pretune.errors import TrainingError
from pretune.recipe import Recipe
from pretune.trainer import checkpoint, data as batching, distributed
from pretune.trainer.fast import speed_up
from pretune.trainer.flops import measure_peak
from pretune.trainer.logging import RunLogger
from pretune.trainer.optim import build_optimizer, build_schedule, param_groups
from pretune.trainer.precision import autocast, resolve


@dataclass
class Progress:
    """Everything besides weights and optimizer that a resumed run needs (saved in ``state.pt``)."""

    step: int = 0
    epoch: int = 0
    position: int = 0  # micro-batches of this epoch already consumed (this rank)
    tokens: int = 0  # tokens seen, all ranks
    elapsed: float = 0.0  # training seconds before this process started
    last_eval: dict[str, float] = field(default_factory=dict)
    best: float | None = None  # best value of the monitored validation metric
    best_step: int = 0
    bad_evals: int = 0  # evaluations since the best one (early-stopping patience)
    nan_skips: int = 0  # optimizer steps skipped for a non-finite loss / gradient (trainer.on_nan=skip)
    nan_streak: int = 0  # ... of them in a row, up to now


def fit(task: Any, module: nn.Module, data: Any, recipe: Recipe, run_dir: Path, world: distributed.World,
        resume_from: Path | None = None, on_eval: Any = None) -> dict[str, float]:
    """Train ``module`` on ``task`` as ``recipe.trainer`` says; returns the last validation metrics.

    ``on_eval(step, metrics)``, if given, is called after each validation (e.g. a hyperparameter
    search reports the metric and may raise to prune the trial; the last checkpoint stays intact).
    """
    cfg = recipe.trainer
    device = world.device
    precision = resolve(cfg.precision, device)
    module.to(device)
    if cfg.fast_dropout:  # the same dropout with a cheaper random mask on CPUs (trainer/fast.py)
        speed_up(module, device)

    steps_per_epoch = len(batching.batch_order(len(data.train), cfg.batch_size, recipe.seed, 0, world.rank, world.size)) // cfg.accumulate
    if steps_per_epoch == 0:
        raise TrainingError(
            f"{len(data.train)} training examples do not fill one step of batch_size {cfg.batch_size} x accumulate "
            f"{cfg.accumulate} x {world.size} process(es); lower trainer.batch_size or add data"
        )
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))

    # One optimizer per phase.  Most tasks have one phase that trains everything on all of
    # task.losses; a GAN has two (discriminator, generator), each with its own parameters and losses.
    phases: dict[str, tuple[str, ...]] = getattr(task, "phases", None) or {"main": tuple(task.losses)}
    multi = len(phases) > 1
    optimizers, schedulers = {}, {}
    for name in phases:
        named = module.phase_parameters(name) if multi else module.named_parameters()
        optimizers[name] = build_optimizer(param_groups(named, cfg.weight_decay, cfg.lr, getattr(module, "lr_scales", None)), cfg, device)
        schedulers[name] = build_schedule(optimizers[name], cfg, total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")  # fp16 only; bf16 needs no scaling
    progress = Progress()
    if resume_from is not None:
        state = checkpoint.load_state(resume_from)
        for name in phases:
            optimizers[name].load_state_dict(state["optimizers"][name])
            schedulers[name].load_state_dict(state["schedulers"][name])
        scaler.load_state_dict(state.get("scaler", {}))
        progress = Progress(**state["progress"])
    monitor, mode = _monitor(task, cfg)
    eval_every = steps_per_epoch if cfg.eval_every == "epoch" else cfg.eval_every

    def wrap() -> nn.Module:  # DDP registers the parameters that train: wrap again when that changes
        wrapped = DistributedDataParallel(module, find_unused_parameters=multi) if world.distributed else module
        return torch.compile(wrapped) if cfg.compile else wrapped

    model = wrap()

    log = RunLogger(run_dir, world.main, total_steps, progress.step, cfg.progress, cfg.tensorboard)
    peak = measure_peak(torch.bfloat16 if precision == "bf16" else torch.float32, device) if world.main else 0.0
    total, trainable = sum(p.numel() for p in module.parameters()), sum(p.numel() for p in module.parameters() if p.requires_grad)
    log.print(
        f"training {type(module).__name__}: {total / 1e6:.2f}M parameters ({trainable / 1e6:.2f}M trainable), "
        f"{len(data.train)} examples, {steps_per_epoch} steps/epoch, {total_steps} steps, precision {precision}, "
        f"{world.size} process(es), GEMM peak {peak / 1e9:.0f} GFLOP/s"
        + (f", resuming at step {progress.step}" if progress.step else "")
    )

    def save(final: bool = False) -> None:
        state = {"optimizers": {n: o.state_dict() for n, o in optimizers.items()},
                 "schedulers": {n: s.state_dict() for n, s in schedulers.items()}, "scaler": scaler.state_dict(),
                 "progress": vars(progress) | {"elapsed": progress.elapsed + time.perf_counter() - started}}
        if world.main:
            checkpoint.save_checkpoint(run_dir, progress.step, module, lambda path: task.save(module, path, data), state, cfg.keep_last)
            if final and (monitor is None or not (run_dir / "best").is_dir()):
                checkpoint.write_atomically(run_dir / "model", lambda path: task.save(module, path, data))
            elif final:  # the best model by the monitored metric, not the last one
                checkpoint.copy_atomically(run_dir / "best", run_dir / "model")
        distributed.barrier(world)

    def write_best(path: Path) -> None:
        (path / "model").mkdir()
        task.save(module, path / "model", data)
        scalars = {k: v for k, v in progress.last_eval.items() if isinstance(v, (int, float))}
        (path / "metrics.json").write_text(json.dumps({"step": progress.step, **scalars}, indent=2))

    def validate() -> bool:
        """Evaluate, keep the best model, and say whether early stopping ends the run."""
        progress.last_eval = evaluate(task, module, data.validation, recipe, world, precision)
        checkpoint.crash_point("eval", progress.step)  # fault injection for tests/reliability (no-op otherwise)
        if hasattr(task, "probe"):  # representation quality (k-NN accuracy), sample images...
            progress.last_eval.update(task.probe(module, data, device=device, precision=precision, step=progress.step,
                                                 out_dir=run_dir if world.main else None))
        log.log(progress.step, "validation", {k: v for k, v in progress.last_eval.items() if isinstance(v, (int, float))})
        if on_eval is not None:
            on_eval(progress.step, progress.last_eval)
        if monitor is None:
            return False
        if monitor not in progress.last_eval:
            raise TrainingError(f"recipe key 'trainer.monitor': {monitor!r} is not a validation metric; choose one of "
                                f"{', '.join(k for k, v in progress.last_eval.items() if isinstance(v, (int, float)))}")
        value = progress.last_eval[monitor]
        if progress.step == 0:  # the untrained starting point is a baseline, never the model a run returns
            return False
        if progress.best is None or (value > progress.best if mode == "max" else value < progress.best):
            progress.best, progress.best_step, progress.bad_evals = value, progress.step, 0
            if world.main:
                checkpoint.write_atomically(run_dir / "best", write_best)
        else:
            progress.bad_evals += 1
        return cfg.patience is not None and progress.bad_evals >= cfg.patience

    if progress.step == 0 and data.validation is not None:  # the "before" point of every curve
        validate()
    started = time.perf_counter()
    window_start, window_tokens, window_examples, window_flops = time.perf_counter(), 0, 0, 0.0
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, torch.Tensor] = {}
    stop = cfg.patience is not None and progress.bad_evals >= cfg.patience  # early-stopped, then killed before the end
    while progress.step < total_steps and not stop:
        if hasattr(module, "on_epoch"):  # e.g. gradual unfreezing: one more layer trains each epoch
            module.on_epoch(progress.epoch)
            model = wrap() if world.distributed else model
        order = batching.batch_order(len(data.train), cfg.batch_size, recipe.seed, progress.epoch, world.rank, world.size)
        order = order[: steps_per_epoch * cfg.accumulate]
        batches = batching.loader(data.train, task, order[progress.position:], recipe.seed, progress.epoch,
                                  cfg.workers, pin=device.type == "cuda")
        for window in batching.windows(iter(batches), cfg.accumulate):
            # 1. how many units each loss term has in this window, over all ranks
            units = _sum_dicts(task.units(batch) for batch in window)
            units = {k: distributed.all_reduce_sum(v.to(device, torch.float32), world).clamp_(min=1) for k, v in units.items()}

            for batch in window:
                window_tokens += task.tokens(batch) * world.size
                window_examples += len(next(iter(batch.values()))) * world.size
                window_flops += task.flops(module, batch) * world.size
            window = [{k: v.to(device, non_blocking=True) for k, v in batch.items()} for batch in window]
            for k, v in units.items():
                counts[k] = counts.get(k, 0) + v

            module.train()
            grad_norms, skipped = {}, []
            buffers = _buffers(module, copy=True) if cfg.on_nan == "skip" else None  # BN statistics of a skipped step are undone
            for p, (phase, loss_keys) in enumerate(phases.items()):
                # 2. forward and backward on each micro-batch; sync gradients on the last one only
                optimizer = optimizers[phase]
                optimizer.zero_grad(set_to_none=True)
                for i, batch in enumerate(window):
                    torch.manual_seed(batching.mix(recipe.seed, progress.step, i, world.rank, *([p] if multi else [])))
                    sync = i == len(window) - 1 or not world.distributed
                    with (contextlib.nullcontext() if sync else model.no_sync()), autocast(precision, device):
                        out = model(batch, phase) if multi else model(batch)
                        loss = sum(out[k] / units[k] for k in loss_keys) * world.size
                    scaler.scale(loss).backward()
                    checkpoint.crash_point("micro", progress.step + 1, i)  # fault injection (mid accumulation)
                    for k in units:
                        if k in out:
                            sums[k] = sums.get(k, 0) + out[k].detach().float()

                # 3. clip, check, step
                scaler.unscale_(optimizer)
                params = [param for group in optimizer.param_groups for param in group["params"]]
                grad_norms[phase] = grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip if cfg.clip else float("inf"))
                # non-finite loss or gradients (fp16's scaler skips those steps itself): trainer.on_nan
                if not scaler.is_enabled() and not torch.isfinite(grad_norm if world.distributed else grad_norm + loss.detach()):
                    skipped.append(_non_finite(progress, cfg, run_dir, phase, float(loss.detach()), float(grad_norm)))
                else:
                    scaler.step(optimizer)
                schedulers[phase].step()
            scaler.update()
            progress.step += 1
            progress.position += len(window)
            if skipped or progress.nan_streak:
                _count_skips(progress, skipped, cfg, log)
                for live, saved in zip(_buffers(module), buffers or []) if skipped else ():
                    live.copy_(saved)

            # 4. log, evaluate, save
            if progress.step % cfg.log_every == 0 or progress.step == total_steps:
                elapsed = time.perf_counter() - window_start
                values = {k: float(distributed.all_reduce_sum(sums[k].clone(), world) / counts[k]) for k in sums}
                values = _name_metrics(values, task)
                values.update({"grad_norm" if not multi else f"grad_norm_{n}": float(g) for n, g in grad_norms.items()})
                values.update(lr=next(iter(schedulers.values())).get_last_lr()[0],
                              tokens_per_s=window_tokens / elapsed, examples_per_s=window_examples / elapsed, mfu=window_flops / elapsed / peak if peak else 0.0,
                              flops=window_flops)  # model FLOPs of the steps since the last train line (compute used)
                progress.tokens += window_tokens
                log.log(progress.step, "train", values)
                log.progress(progress.step, {"loss": values.get("loss", float("nan")), f"{getattr(task, 'unit', 'tok')}/s": round(values["tokens_per_s"]),
                                             "mfu": f"{values['mfu']:.1%}"})
                sums, counts = {}, {}
                window_start, window_tokens, window_examples, window_flops = time.perf_counter(), 0, 0, 0.0
            if data.validation is not None and (progress.step % eval_every == 0 or progress.step == total_steps):
                stop = validate()
                if stop:
                    log.print(f"early stop at step {progress.step}: no better {monitor} in {cfg.patience} evaluations "
                              f"(best {progress.best:.4g} at step {progress.best_step})")
            if progress.step % cfg.save_every == 0 and progress.step < total_steps and not stop:
                save()
            if progress.step >= total_steps or stop:
                break
        else:  # the epoch ran out before the last step
            progress.epoch += 1
            progress.position = 0

    save(final=True)
    log.print(f"done: {progress.step} steps in {progress.elapsed + time.perf_counter() - started:.1f}s; model saved to {run_dir / 'model'}")
    log.close()
    return progress.last_eval


@torch.no_grad()
def evaluate(task: Any, module: nn.Module, dataset: Any, recipe: Recipe, world: distributed.World, precision: str) -> dict[str, float]:
    """Mean of every summed value over the whole evaluation set (sharded over ranks, then reduced)."""
    module.eval()
    cfg = recipe.trainer
    order = batching.eval_order(len(dataset), cfg.batch_size, world.rank, world.size, cfg.eval_batches)
    sums: dict[str, torch.Tensor] = {}
    logits, labels = [], []
    for batch in batching.loader(dataset, task, order, recipe.seed, batching.EVAL_EPOCH, recipe.trainer.workers, False):
        units = task.units(batch)
        batch = {k: v.to(world.device) for k, v in batch.items()}
        with autocast(precision, world.device):
            out = module(batch)
        if hasattr(task, "score"):  # metrics over the whole set (F1, confusion matrix...)
            logits.append(out["logits"].float().cpu())
            labels.append(batch["labels"].cpu())
        for k, v in out.items():
            if k in units:
                sums[k] = sums.get(k, 0) + v.float()
                sums["#" + k] = sums.get("#" + k, 0) + units[k].to(world.device, torch.float32)
    keys = sorted(sums)
    if not keys:
        return {}
    reduced = distributed.all_reduce_sum(torch.stack([torch.as_tensor(sums[k], device=world.device) for k in keys]), world)
    totals = dict(zip(keys, reduced.tolist()))
    means = {k: totals[k] / max(totals["#" + k], 1.0) for k in keys if not k.startswith("#")}
    module.train()
    named = _name_metrics(means, task)
    if hasattr(task, "score"):
        named.update(task.score(*distributed.gather_lists(logits, labels, world)))
    return named


def _non_finite(progress: Progress, cfg: Any, run_dir: Path, phase: str, loss: float, grad_norm: float) -> str:
    """A step with a non-finite loss or gradient norm: raise (``on_nan: stop``) or let it be skipped."""
    if cfg.on_nan == "stop":
        latest = checkpoint.latest_checkpoint(run_dir)
        raise TrainingError(
            f"step {progress.step + 1}: non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} (loss {loss:.4g}, "
            f"grad norm {grad_norm:.4g}); stopped before the optimizer step (trainer.on_nan=stop); "
            f"{f'the last checkpoint {latest} is intact' if latest else 'no checkpoint was written yet'}; "
            f"try a lower trainer.lr, trainer.clip, trainer.precision=fp32, or trainer.on_nan=skip")
    return f"{phase}: loss {loss:.4g}, grad norm {grad_norm:.4g}"


def _buffers(module: nn.Module, copy: bool = False) -> list[torch.Tensor]:
    """The module's buffers (batch-norm running statistics and counts...), which a training forward pass updates."""
    found = list(module.buffers())
    return [b.detach().clone() for b in found] if copy else found


def _count_skips(progress: Progress, skipped: list[str], cfg: Any, log: RunLogger) -> None:
    """Count skipped optimizer steps, log each one, and stop after ``trainer.max_nan_skips`` in a row."""
    if not skipped:
        progress.nan_streak = 0
        return
    progress.nan_skips += 1
    progress.nan_streak += 1
    log.log(progress.step, "skipped", {"skipped_steps": progress.nan_skips, "in_a_row": progress.nan_streak, "reason": "; ".join(skipped)})
    if progress.nan_streak >= cfg.max_nan_skips:
        raise TrainingError(f"step {progress.step}: {progress.nan_streak} optimizer steps in a row skipped for a non-finite loss "
                            f"or gradient (trainer.max_nan_skips={cfg.max_nan_skips}; {progress.nan_skips} skipped in all); "
                            f"the last checkpoint is intact; try a lower trainer.lr or check the data")


def _monitor(task: Any, cfg: Any) -> tuple[str | None, str]:
    """The validation metric that picks the best model: the task's own unless the recipe names one."""
    if cfg.monitor != "auto":
        lower_is_better = any(word in cfg.monitor for word in ("loss", "perplexity", "mse", "mae", "hamming"))
        return cfg.monitor, "min" if lower_is_better else "max"
    if hasattr(task, "monitor"):
        return task.monitor
    return ("loss", "min") if cfg.patience is not None else (None, "min")


def _sum_dicts(dicts: Any) -> dict[str, torch.Tensor]:
    total: dict[str, torch.Tensor] = {}
    for d in dicts:
        for k, v in d.items():
            total[k] = total.get(k, 0) + v
    return total


def _name_metrics(means: dict[str, float], task: Any) -> dict[str, float]:
    """``{"mlm": 2.1, "mlm_correct": 0.4}`` -> ``{"loss": ..., "mlm_loss": 2.1, "mlm_accuracy": 0.4, ...}``."""
    named: dict[str, float] = {}
    if all(k in means for k in task.losses):
        named["loss"] = sum(means[k] for k in task.losses)
    for key, value in means.items():
        if key.endswith("_correct"):
            named[key[: -len("_correct")] + "_accuracy"] = value
        elif key in task.losses:
            named[f"{key}_loss"] = value
            if key in getattr(task, "perplexity", ()):
                named[f"{key}_perplexity"] = math.exp(min(value, 50.0))
        else:
            named[key] = value
    return named
