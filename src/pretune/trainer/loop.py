"""The one training loop, for every task and backbone.  Read it top to bottom.

:func:`fit` is the loop: for each accumulation window, one optimizer step (:meth:`Trainer.step`:
forward, loss, backward, clip, step), then log, evaluate, checkpoint.  It knows a task only
through the :class:`pretune.tasks.base.Task` interface.

Each optimizer step takes one *window* of ``accumulate`` micro-batches.  Every loss term is a
sum over units (masked tokens, examples...) divided by the number of units in the whole window
on all ranks, so accumulation and DDP give exactly the gradient of one large batch.  Randomness
inside the step (dropout) is reseeded from (seed, step, micro-batch, rank), and data is a pure
function of (seed, epoch, position): resuming from a checkpoint replays the same run.

Under DDP every rank runs the same collectives in the same order: decisions one rank could take
alone (early stopping, the time limit, re-wrapping the model) are taken together
(:func:`pretune.trainer.distributed.any_rank`).
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pretune.errors import RecipeError, TrainingError
from pretune.recipe import Recipe
from pretune.trainer import checkpoint, data as batching, distributed, sharding
from pretune.trainer.fast import speed_up
from pretune.trainer.flops import measure_peak
from pretune.trainer.logging import RunLogger, name_metrics
from pretune.trainer.optim import build_optimizer, build_schedule, lr_log_keys, param_groups
from pretune.trainer.precision import DTYPES, autocast, resolve

if TYPE_CHECKING:
    from pretune.tasks.base import Task


class StepFailed(RuntimeError):
    """A ``RuntimeError`` (out of memory, a lost peer process...) escaped optimizer step ``step``
    (1-based: the step being computed).  The original exception is ``__cause__``."""

    def __init__(self, step: int, cause: BaseException):
        super().__init__(f"step {step}: {cause}")
        self.step = step


@dataclass
class Progress:
    """Everything besides weights and optimizer that a resumed run needs (saved in ``state.pt``)."""

    step: int = 0
    epoch: int = 0
    position: int = 0  # micro-batches of this epoch already consumed (this rank)
    tokens: int = 0  # tokens seen, all ranks
    elapsed: float = 0.0  # training seconds before this process started
    last_eval: dict[str, float] = field(default_factory=dict)
    baseline: float | None = None  # the monitored validation metric at step 0, before any training
    best: float | None = None  # best value of the monitored validation metric
    best_loss: float | None = None  # the validation loss of that evaluation: of two equal values, the lower loss wins
    best_step: int = 0
    bad_evals: int = 0  # evaluations without a better monitored value (early-stopping patience)
    nan_skips: int = 0  # optimizer steps skipped for a non-finite loss / gradient (trainer.on_nan=skip)
    nan_streak: int = 0  # ... of them in a row, up to now
    global_batch: int | None = None  # examples per optimizer step, all ranks (a resume must keep it: same batches)
    accumulate: int | None = None  # micro-batches per step of the run that saved (converts `position` on resume)


def fit(task: Task, module: nn.Module, data: Any, recipe: Recipe, run_dir: Path, world: distributed.World,
        resume_from: Path | None = None, on_eval: Any = None) -> dict[str, Any]:
    """Train ``module`` on ``task`` as ``recipe.trainer`` says; returns the last validation metrics.

    ``on_eval(step, metrics)``, if given, is called after each validation (e.g. a hyperparameter
    search reports the metric and may raise to prune the trial; the last checkpoint stays intact).
    If the best monitored value never beat the untrained model's (step 0), the returned metrics
    hold a one-line ``"warning"`` (also printed, and logged in ``metrics.jsonl``).  A
    ``RuntimeError`` in a step (out of memory, a lost peer) is raised as :class:`StepFailed`.
    """
    cfg = recipe.trainer
    # every rank must run the same steps, or each waits forever in a collective the others never reach
    distributed.check_same({"training examples": len(data.train),
                            "validation examples": -1 if data.validation is None else len(data.validation)}, world)
    fits = len(data.train) // (cfg.accumulate * world.size)  # the largest batch that fills one step
    if 0 < fits < cfg.batch_size:  # a few labels (8 per class): one step per epoch on all of them, not an error
        print(f"pretune: note: trainer.batch_size {cfg.batch_size} is more than the {len(data.train)} training examples fill "
              f"(x accumulate {cfg.accumulate} x {world.size} process(es)); batches of {fits}", file=sys.stderr, flush=True)
        recipe = recipe.model_copy(update={"trainer": cfg.model_copy(update={"batch_size": fits})})
        cfg = recipe.trainer
    replay = getattr(data, "replay", None)  # general text mixed into every batch (pretune adapt's forgetting guard)
    if replay is not None and cfg.batch_size < 2:
        raise TrainingError("recipe key 'data.general.replay': a batch needs at least 2 rows to mix domain and general text; "
                            "raise trainer.batch_size")
    lengths = task.lengths(data.train) if cfg.group_by_length else None  # padded batches: group rows of similar length
    steps_per_epoch = len(batching.batch_order(len(data.train), cfg.batch_size, recipe.seed, 0, world.rank, world.size,
                                               replay=replay, lengths=lengths)) // cfg.accumulate
    if steps_per_epoch == 0:
        raise TrainingError(
            f"{len(data.train)} training examples do not fill one step of batch_size {cfg.batch_size} x accumulate "
            f"{cfg.accumulate} x {world.size} process(es); lower trainer.batch_size or add data"
        )
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch), (cfg.min_steps or 0) if task.stretch else 0)
    max_time = cfg.max_time  # seconds of training, resumed runs included (TrainerConfig.max_time)

    trainer = Trainer(task, module, recipe, world, total_steps, run_dir)
    progress = Progress()
    if resume_from is not None:
        state = checkpoint.load_state(resume_from)
        trainer.load_state_dict(state, resume_from)
        progress = _resumed(Progress(**state["progress"]), cfg, world)
    progress.global_batch, progress.accumulate = cfg.batch_size * cfg.accumulate * world.size, cfg.accumulate
    monitor, mode = _monitor(task, cfg)
    # trainer.min_steps stretches a small budget; it still evaluates as often as its `epochs` say
    epoch_steps = max(steps_per_epoch, total_steps // math.ceil(cfg.epochs)) if not cfg.max_steps else steps_per_epoch
    eval_every = epoch_steps if cfg.eval_every == "epoch" else cfg.eval_every

    log = RunLogger(run_dir, world.main, total_steps, progress.step, cfg.progress, cfg.report_to, recipe.model_dump(mode="json"))
    peak = measure_peak(DTYPES[trainer.precision], world.device) if world.main else 0.0  # the peak of the precision trained in
    total, trainable = sum(p.numel() for p in module.parameters()), sum(p.numel() for p in module.parameters() if p.requires_grad)
    log.note(  # also in metrics.jsonl: what a study's cost accounting reads (examples, steps, parameters)
        progress.step, "start",
        f"training {type(module).__name__}: {total / 1e6:.2f}M parameters ({trainable / 1e6:.2f}M trainable), "
        f"{len(data.train)} examples, {steps_per_epoch} steps/epoch, {total_steps} steps, precision {trainer.precision}, "
        f"{world.size} process(es), GEMM peak {peak / 1e9:.0f} GFLOP/s"
        + (f", at most {max_time:g}s of training" if max_time else "")
        + (f", resuming at step {progress.step}" if progress.step else ""),
        examples=len(data.train), total_steps=total_steps, parameters=total, trainable=trainable)

    def elapsed() -> float:  # seconds of training, before this process too
        return progress.elapsed + time.perf_counter() - started

    def save(final: bool = False) -> None:
        state = trainer.state_dict() | {"progress": vars(progress) | {"elapsed": elapsed()}}
        with trainer.full_module() as full:  # sharded: the weights gathered on rank 0 (every rank takes part)
            shards = (lambda folder: sharding.save(folder, module, trainer.optimizers)) if trainer.sharded else None
            checkpoint.save_checkpoint(run_dir, progress.step, full, lambda path: task.save(full, path, data), state, cfg.keep_last,
                                       world, shards)
            if world.main and final and (monitor is None or not (run_dir / "best").is_dir()):
                checkpoint.write_atomically(run_dir / "model", lambda path: task.save(full, path, data))
            elif world.main and final:  # the best model by the monitored metric, not the last one
                checkpoint.copy_atomically(run_dir / "best", run_dir / "model")
        distributed.barrier(world, f"the checkpoint of step {progress.step}")

    def refit() -> None:  # what is fitted rather than trained (SetFit's head), from the model as it is now
        note = task.refit(module, world.device, trainer.precision)
        if note:
            log.note(progress.step, "refit", note)

    def keep_best() -> None:  # every rank: a sharded model is gathered
        def write(path: Path) -> None:
            (path / "model").mkdir()
            task.save(full, path / "model", data)
            scalars = {k: v for k, v in progress.last_eval.items() if isinstance(v, (int, float))}
            (path / "metrics.json").write_text(json.dumps({"step": progress.step, **scalars}, indent=2))

        with trainer.full_module() as full:
            if world.main:
                checkpoint.write_atomically(run_dir / "best", write)

    def validate() -> bool:
        """Evaluate, keep the best model, and say whether early stopping ends the run (on every rank alike)."""
        refit()
        progress.last_eval = evaluate(task, module, data.validation, recipe, world, trainer.precision)
        for name, dataset in getattr(data, "held_out", {}).items():  # e.g. general text: what continued pretraining forgets
            progress.last_eval.update({f"{name}_{k}": v for k, v in evaluate(task, module, dataset, recipe, world, trainer.precision).items()})
        checkpoint.crash_point("eval", progress.step)  # fault injection for tests/reliability (no-op otherwise)
        with trainer.unsharded():  # a probe may call a part of the model (its backbone) directly
            progress.last_eval.update(task.probe(module, data, device=world.device, precision=trainer.precision,  # k-NN accuracy...
                                                 step=progress.step, out_dir=run_dir if world.main else None))
        log.log(progress.step, "validation", {k: v for k, v in progress.last_eval.items() if isinstance(v, (int, float))})
        if on_eval is not None:
            on_eval(progress.step, progress.last_eval)
        if monitor is None:
            return False
        if monitor not in progress.last_eval:
            raise TrainingError(f"recipe key 'trainer.monitor': {monitor!r} is not a validation metric; choose one of "
                                f"{', '.join(k for k, v in progress.last_eval.items() if isinstance(v, (int, float)))}")
        value, loss = progress.last_eval[monitor], progress.last_eval.get("loss")
        if progress.step == 0:  # the untrained starting point is a baseline, never the model a run returns
            progress.baseline = value
            return False
        if _better(value, progress.best, mode):
            progress.best, progress.best_loss, progress.best_step, progress.bad_evals = value, loss, progress.step, 0
            keep_best()
        else:  # a tie of the monitored value (accuracy saturated at 1.0) goes to the lower validation loss; patience still counts it
            progress.bad_evals += 1
            if value == progress.best and loss is not None and _better(loss, progress.best_loss, "min"):
                progress.best_loss, progress.best_step = loss, progress.step
                keep_best()
        return distributed.any_rank(cfg.patience is not None and progress.bad_evals >= cfg.patience, world)

    if progress.step == 0 and data.validation is not None:  # the "before" point of every curve
        validate()
    started = time.perf_counter()
    window_start, window_tokens, window_examples, window_flops = time.perf_counter(), 0.0, 0.0, 0.0
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, torch.Tensor] = {}
    stop = ((cfg.patience is not None and progress.bad_evals >= cfg.patience)  # early-stopped, then killed before the end
            or (max_time is not None and progress.elapsed >= max_time))  # out of time, then resumed with the same limit
    while progress.step < total_steps and not stop:
        note = trainer.start_epoch(progress.epoch)  # task.on_epoch: e.g. gradual unfreezing, one more layer trains
        if note:
            log.note(progress.step, "epoch", f"epoch {progress.epoch}: {note}", epoch=progress.epoch)
        order = batching.batch_order(len(data.train), cfg.batch_size, recipe.seed, progress.epoch, world.rank, world.size,
                                     replay=replay, lengths=lengths)
        order = order[: steps_per_epoch * cfg.accumulate]
        batches = batching.loader(data.train, task, order[progress.position:], recipe.seed, progress.epoch,
                                  cfg.workers, pin=world.device.type == "cuda")
        for window in batching.windows(iter(batches), cfg.accumulate):
            note = trainer.before_step(progress.step)  # task.on_step: e.g. a continued model's new head trains alone first
            if note:
                log.note(progress.step, "step", note)
            # 1-3. forward, loss, backward, clip, optimizer step (one per phase): Trainer.step below
            try:
                out = trainer.step(window, progress.step)
            except RuntimeError as exc:  # out of memory, a lost peer: run.py reports it in one line naming the step
                raise StepFailed(progress.step + 1, exc) from exc
            progress.step += 1
            progress.position += len(window)
            if out.skipped or progress.nan_streak:
                _count_skips(progress, out.skipped, cfg, log)
            out_of_time = max_time is not None and distributed.any_rank(elapsed() >= max_time, world)
            last = progress.step >= total_steps or out_of_time

            # 4. log
            window_tokens, window_examples, window_flops = window_tokens + out.tokens, window_examples + out.examples, window_flops + out.flops
            for k, v in out.sums.items():
                sums[k] = sums.get(k, 0) + v
            for k, v in out.units.items():
                counts[k] = counts.get(k, 0) + v
            evaluating = data.validation is not None and (progress.step % eval_every == 0 or last or progress.step == task.warmup_steps)
            # a train line before every evaluation too: an early stop there must not leave the last steps' FLOPs unlogged
            if progress.step % cfg.log_every == 0 or last or evaluating:
                seconds = time.perf_counter() - window_start
                values = name_metrics(distributed.means(sums, counts, world), task)
                values.update({"grad_norm" if not trainer.multi else f"grad_norm_{n}": float(g) for n, g in out.grad_norms.items()})
                values.update(trainer.learning_rates())  # lr (the base rate), lr_<group> for groups at other rates
                values.update(tokens_per_s=window_tokens / seconds, examples_per_s=window_examples / seconds,
                              mfu=window_flops / seconds / peak if peak else 0.0,
                              flops=window_flops,  # model FLOPs of the steps since the last train line (compute used)
                              state_mb=trainer.state_bytes() / 2**20)  # weights, gradients, optimizer state held by rank 0
                progress.tokens += int(window_tokens)
                log.log(progress.step, "train", values)
                log.progress(progress.step, {"loss": values.get("loss", float("nan")), f"{task.unit}/s": round(values["tokens_per_s"]),
                                             "mfu": f"{values['mfu']:.1%}"})
                sums, counts = {}, {}
                window_start, window_tokens, window_examples, window_flops = time.perf_counter(), 0.0, 0.0, 0.0

            # 5. evaluate (and keep the best model)
            if evaluating:
                stop = validate()
                if stop:
                    log.print(f"early stop at step {progress.step}: no better {monitor} in {cfg.patience} evaluations "
                              f"(best {progress.best:.4g} at step {progress.best_step})")
            if out_of_time:
                log.print(f"time limit: trainer.max_time={max_time:g}s of training spent at step {progress.step}; stopping")
                stop = True

            # 6. checkpoint
            if progress.step % cfg.save_every == 0 and not last and not stop:
                save()
            if last or stop:
                break
        else:  # the epoch ran out before the last step
            progress.epoch += 1
            progress.position = 0

    if data.validation is None:  # the saved model is the last one: its fitted parts must match it
        refit()
    save(final=True)
    metrics: dict[str, Any] = dict(progress.last_eval)
    if monitor is not None and progress.baseline is not None and progress.best is not None and not _better(progress.best, progress.baseline, mode):
        metrics["warning"] = (f"warning: the best validation {monitor} ({progress.best:.4g} at step {progress.best_step}) never beat "
                              f"the untrained model's ({progress.baseline:.4g} at step 0); the run learned nothing measurable: "
                              f"try a higher trainer.lr, more trainer.epochs, or a bigger model")
        log.note(progress.step, "warning", metrics["warning"])
    best = f"; best {monitor} {progress.best:.4g} at step {progress.best_step}" if monitor is not None and progress.best is not None else ""
    log.print(f"done: {progress.step} steps in {elapsed():.1f}s of training{best}")
    log.close()
    return metrics


@dataclass
class StepOutput:
    """What one optimizer step leaves for the log line."""

    sums: dict[str, torch.Tensor]  # summed values of this rank's micro-batches, by unit key
    units: dict[str, torch.Tensor]  # their unit counts, all ranks
    grad_norms: dict[str, torch.Tensor]  # by phase, before clipping
    skipped: list[str]  # phases whose optimizer step was skipped (non-finite; trainer.on_nan=skip)
    tokens: float  # throughput units (tokens or examples), all ranks
    examples: float
    flops: float  # model FLOPs, all ranks


class Trainer:
    """The optimizers, schedules and (DDP-)wrapped model of one task's module, and :meth:`step`:
    one optimizer step on one window of micro-batches (the step :func:`fit` runs, and
    ``benchmarks/profile_step.py`` profiles)."""

    def __init__(self, task: Task, module: nn.Module, recipe: Recipe, world: distributed.World, total_steps: int,
                 run_dir: Path | None = None):
        cfg = self.cfg = recipe.trainer
        self.task, self.module, self.world, self.seed, self.run_dir = task, module, world, recipe.seed, run_dir
        self.device = world.device
        self.precision = resolve(cfg.precision, self.device)
        module.to(self.device)
        if cfg.fast_dropout:  # the same dropout with a cheaper random mask on CPUs (trainer/fast.py)
            speed_up(module, self.device)
        # trainer.distributed=fsdp: sharded checkpoints always (a later run may resume on more processes),
        # sharded weights when there is a process group (torchrun, even with one process)
        self.sharded = cfg.distributed == "fsdp"
        self.fsdp, self.gathered = self.sharded and sharding.process_group(), None
        if self.fsdp:
            why = sharding.check(task, getattr(task, "strategy", None))
            if why:
                raise RecipeError(f"recipe key 'trainer.distributed': {why}")
            self.gathered = sharding.Gathered(module, world.main)  # before sharding: the plain copy that writes model/
            sharding.shard(module, self.precision, cfg.activation_checkpointing)
        elif cfg.activation_checkpointing:
            sharding.checkpoint_blocks(sharding.blocks(module))

        # One optimizer per phase.  Most tasks have one phase that trains everything on all of
        # task.losses; a GAN has two (discriminator, generator), each with its own parameters and losses.
        self.phases = task.optimizer_phases()
        self.multi = len(self.phases) > 1
        scales = task.lr_scales(module)  # LLRD, the head's own learning rate
        self.optimizers, self.schedulers, self.lr_keys = {}, {}, {}
        for phase in self.phases:
            named = list(task.phase_parameters(module, phase))
            self.optimizers[phase] = build_optimizer(param_groups(named, cfg.weight_decay, cfg.lr, scales), cfg, self.device)
            self.schedulers[phase] = build_schedule(self.optimizers[phase], cfg, total_steps)
            self.lr_keys[phase] = [key if not self.multi or key == "lr" else f"lr_{phase}_{key[3:]}" for key in lr_log_keys(named, scales)]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")  # fp16 only; bf16 needs no scaling
        self.model: nn.Module | None = None  # the module as it trains (DDP, torch.compile): set by start_epoch

    def start_epoch(self, epoch: int) -> str | None:
        """``task.on_epoch`` (e.g. gradual unfreezing); returns its note.  DDP registers the parameters
        that train, so a note (what trains changed) means wrapping the module again, on every rank."""
        return self._wrap(self.task.on_epoch(self.module, epoch))

    def before_step(self, step: int) -> str | None:
        """``task.on_step`` (a continued model's head warm-up); returns its note, wrapping again as :meth:`start_epoch`."""
        note = self.task.on_step(self.module, step)
        return self._wrap(note) if note is not None or self.model is None else None

    def _wrap(self, note: str | None) -> str | None:
        changed = distributed.any_rank(note is not None, self.world)
        if self.model is None or (changed and self.world.distributed and not self.fsdp):  # FSDP follows requires_grad itself
            ddp = self.world.distributed and not self.fsdp
            wrapped = DistributedDataParallel(self.module, find_unused_parameters=self.multi) if ddp else self.module
            self.model = torch.compile(wrapped) if self.cfg.compile else wrapped
        return note

    def step(self, window: list[dict[str, torch.Tensor]], step: int) -> StepOutput:
        """One optimizer step (per phase) on one accumulation window; ``step`` steps came before it."""
        task, world, device, cfg = self.task, self.world, self.device, self.cfg
        # 1. how many units each loss term has in this window, over all ranks (one all-reduce)
        units = _sum_dicts(task.units(batch) for batch in window)
        keys = sorted(units)
        totals = distributed.all_reduce_sum(torch.stack([torch.as_tensor(units[k]).to(device, torch.float32) for k in keys]), world)
        units = dict(zip(keys, totals.clamp_(min=1)))
        tokens = sum(task.tokens(batch) for batch in window) * world.size
        examples = sum(len(next(iter(batch.values()))) for batch in window) * world.size
        flops = sum(task.flops(self.module, batch) for batch in window) * world.size
        window = [{k: v.to(device, non_blocking=True) for k, v in batch.items()} for batch in window]

        self.module.train()
        sums: dict[str, torch.Tensor] = {}
        grad_norms, skipped = {}, []
        buffers = _buffers(self.module, copy=True) if cfg.on_nan == "skip" else None  # BN statistics of a skipped step are undone
        for p, (phase, loss_keys) in enumerate(self.phases.items()):
            # 2. forward, loss and backward on each micro-batch; DDP syncs gradients on the last one only
            optimizer = self.optimizers[phase]
            optimizer.zero_grad(set_to_none=True)
            for i, batch in enumerate(window):
                torch.manual_seed(batching.mix(self.seed, step, i, world.rank, *([p] if self.multi else [])))
                sync = i == len(window) - 1 or not world.distributed
                if self.fsdp:  # gradients reduce-scattered after the last micro-batch only
                    self.module.set_requires_gradient_sync(i == len(window) - 1)
                with (contextlib.nullcontext() if sync or self.fsdp else self.model.no_sync()), autocast(self.precision, device):
                    out = self.model(batch, phase) if self.multi else self.model(batch)
                    loss = sum(out[k] / units[k] for k in loss_keys) * world.size
                self.scaler.scale(loss).backward()
                checkpoint.crash_point("micro", step + 1, i)  # fault injection (mid accumulation)
                for k in units:
                    if k in out:
                        sums[k] = sums.get(k, 0) + out[k].detach().float()

            # 3. clip, check, step
            self.scaler.unscale_(optimizer)
            params = [param for group in optimizer.param_groups for param in group["params"]]
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip if cfg.clip else float("inf"))
            grad_norms[phase] = grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # sharded
            # non-finite loss or gradients (fp16's scaler skips those steps itself): trainer.on_nan
            if not self.scaler.is_enabled() and not torch.isfinite(grad_norm if world.distributed else grad_norm + loss.detach()):
                skipped.append(_non_finite(step + 1, cfg, self.run_dir, phase, float(loss.detach()), float(grad_norm)))
            else:
                self.scaler.step(optimizer)
            self.schedulers[phase].step()
        self.scaler.update()
        for live, saved in zip(_buffers(self.module), buffers or []) if skipped else ():
            live.copy_(saved)
        return StepOutput(sums, units, grad_norms, skipped, tokens, examples, flops)

    def learning_rates(self) -> dict[str, float]:
        """``lr``: the base learning rate now (``trainer.lr`` on its schedule); ``lr_<group>``: groups at other rates."""
        rates: dict[str, float] = {}
        for phase, optimizer in self.optimizers.items():
            for key, group in zip(self.lr_keys[phase], optimizer.param_groups):
                rates.setdefault(key, group["lr"])
        if "lr" not in rates:  # every group at a scaled rate (LLRD...): the base rate from the schedule
            schedule = next(iter(self.schedulers.values()))
            rates["lr"] = self.cfg.lr * schedule.lr_lambdas[0](schedule.last_epoch)
        return {"lr": rates.pop("lr"), **rates}

    def state_dict(self) -> dict[str, Any]:
        """What ``state.pt`` holds; a sharded run's optimizer state goes to the checkpoint's ``dcp/`` instead."""
        optimizers = {} if self.sharded else {n: o.state_dict() for n, o in self.optimizers.items()}
        return {"optimizers": optimizers, "schedulers": {n: s.state_dict() for n, s in self.schedulers.items()},
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any], checkpoint_dir: Path | None = None) -> None:
        """Resume from ``state`` (``state.pt``) and, for a sharded checkpoint, the optimizer shards in ``checkpoint_dir``."""
        shards = checkpoint_dir is not None and sharding.has_shards(checkpoint_dir)
        if self.fsdp and not shards:
            raise RecipeError(f"recipe key 'trainer.distributed': {checkpoint_dir} was written by an unsharded (ddp) run; "
                              f"resume it with trainer.distributed=ddp, or start a sharded run from its model/ folder")
        if shards:
            sharding.load_optimizers(checkpoint_dir, self.module, self.optimizers)
        for name in self.phases:
            if not shards:
                self.optimizers[name].load_state_dict(state["optimizers"][name])
            self.schedulers[name].load_state_dict(state["schedulers"][name])
        self.scaler.load_state_dict(state.get("scaler", {}))

    @contextlib.contextmanager
    def full_module(self) -> Any:
        """The module with its full weights, for writing folders: itself, or (sharded) rank 0's gathered copy
        (``None`` on the other ranks).  Every rank enters it."""
        if not self.fsdp:
            yield self.module
            return
        with self.gathered.full(self.module) as full:
            yield full

    def unsharded(self) -> Any:
        """A context in which every part of the module holds its full weights (read-only use); every rank enters it."""
        return sharding.unsharded(self.module) if self.fsdp else contextlib.nullcontext(self.module)

    def state_bytes(self) -> int:
        """Bytes of weights, gradients and optimizer state this rank holds (its shards only, when sharded)."""
        params = list(self.module.parameters())
        grads = (p.grad for p in params if p.grad is not None)
        return sum(sharding.local_bytes(group) for group in (iter(params), grads,
                                                              *(sharding.optimizer_tensors(o) for o in self.optimizers.values())))


@torch.no_grad()
def evaluate(task: Task, module: nn.Module, dataset: Any, recipe: Recipe, world: distributed.World, precision: str) -> dict[str, Any]:
    """Mean of every summed value over the whole evaluation set (sharded over ranks, then reduced)."""
    module.eval()
    cfg = recipe.trainer
    order = batching.eval_order(len(dataset), cfg.batch_size, world.rank, world.size, cfg.eval_batches)
    sums: dict[str, torch.Tensor] = {}
    logits, labels = [], []
    for batch in batching.loader(dataset, task, order, recipe.seed, batching.EVAL_EPOCH, cfg.workers, False):
        units = task.units(batch)
        batch = {k: v.to(world.device) for k, v in batch.items()}
        with autocast(precision, world.device):
            out = module(batch)
        if task.wants_logits:  # metrics over the whole set (F1, confusion matrix...)
            logits.append(out["logits"].float().cpu())
            labels.append(batch["labels"].cpu())
        for k, v in out.items():
            if k in units:
                sums[k] = sums.get(k, 0) + v.float()
                sums["#" + k] = sums.get("#" + k, 0) + torch.as_tensor(units[k]).to(world.device, torch.float32)
    module.train()
    # a rank may have no batch at all (a validation set smaller than batch_size x processes): it still joins
    totals = distributed.sum_dicts({k: float(v) for k, v in sums.items()}, world)
    means = {k: totals[k] / max(totals["#" + k], 1.0) for k in sorted(totals) if not k.startswith("#")}
    named = name_metrics(means, task) if means else {}
    if task.wants_logits:
        named.update(task.score(*distributed.gather_lists(logits, labels, world)))
    return named


def _resumed(progress: Progress, cfg: Any, world: distributed.World) -> Progress:
    """A saved ``progress`` for this run, which may use another number of processes or micro-batches per step:
    the global batch must stay the same (the same examples in each step), and the epoch's position is
    converted from the saving run's micro-batches to this run's."""
    global_batch = cfg.batch_size * cfg.accumulate * world.size
    if progress.global_batch is not None and progress.global_batch != global_batch:
        raise TrainingError(f"the run resumed was trained with {progress.global_batch} examples per step; this one would take "
                            f"{global_batch} (trainer.batch_size {cfg.batch_size} x trainer.accumulate {cfg.accumulate} x "
                            f"{world.size} process(es)); set trainer.batch_size and trainer.accumulate so the product is "
                            f"{progress.global_batch}, then resume")
    if progress.accumulate is not None and progress.accumulate != cfg.accumulate:
        progress.position = progress.position // progress.accumulate * cfg.accumulate
    return progress


def _better(value: float, best: float | None, mode: str) -> bool:
    return best is None or (value > best if mode == "max" else value < best)


def _non_finite(step: int, cfg: Any, run_dir: Path | None, phase: str, loss: float, grad_norm: float) -> str:
    """Step ``step`` has a non-finite loss or gradient norm: raise (``on_nan: stop``) or let it be skipped."""
    if cfg.on_nan == "stop":
        latest = checkpoint.latest_checkpoint(run_dir) if run_dir is not None else None
        raise TrainingError(
            f"step {step}: non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} (loss {loss:.4g}, "
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


def _monitor(task: Task, cfg: Any) -> tuple[str | None, str]:
    """The validation metric that picks the best model: the task's own unless the recipe names one."""
    if cfg.monitor != "auto":
        lower_is_better = any(word in cfg.monitor for word in ("loss", "perplexity", "mse", "mae", "hamming"))
        return cfg.monitor, "min" if lower_is_better else "max"
    if task.monitor is not None:
        return task.monitor
    return ("loss", "min") if cfg.patience is not None else (None, "min")


def _sum_dicts(dicts: Any) -> dict[str, torch.Tensor]:
    total: dict[str, torch.Tensor] = {}
    for d in dicts:
        for k, v in d.items():
            total[k] = total.get(k, 0) + v
    return total
