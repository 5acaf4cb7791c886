"""Where one training step's time goes: a per-operator breakdown of pretune's step (torch.profiler).

    python benchmarks/profile_step.py mlm            # BERT L4/H256/A4, seq 128, batch 32 (the MLM row)
    python benchmarks/profile_step.py clm            # GPT-2 L4/H256/A4, seq 256, batch 16 (the CLM row)
    python benchmarks/profile_step.py mlm --precision fp32 --compile

The step profiled is the loop's own: :meth:`pretune.trainer.loop.Trainer.step`, the method ``fit``
calls for every optimizer step (unit counts, forward under autocast, loss, backward, gradient
clipping, the non-finite check, fused AdamW, schedule), on a ``Trainer`` built exactly as ``fit``
builds it (``speed_up`` included; pass ``trainer.fast_dropout=false`` to see PyTorch's dropout).
The module and data are composed by pretune itself (``pretune.run``) from the same overrides as
``benchmarks/bench_pretrain.py``.  After ``--warmup`` steps, ``--steps`` steps are profiled; the
table groups operators by name, sorted by self CPU time, with each one's share of the step.
``docs/performance.md`` quotes the output (saved in ``benchmarks/results/profile-<workload>.txt``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_pretrain import WORKLOADS, model_overrides  # noqa: E402


def build_trainer(w: dict, overrides: list[str]):
    """(trainer, task, data) for workload ``w``, composed by pretune itself as ``run.train`` does (3,000
    documents of the embedded corpus), the ``Trainer`` built but its epoch not started."""
    import tempfile

    import torch

    from pretune.recipe import load_recipe
    from pretune.run import compose, read_data
    from pretune.trainer import distributed
    from pretune.trainer.loop import Trainer
    from pretune.trainer.precision import resolve

    recipe = load_recipe(None, [*model_overrides(w), f"trainer.batch_size={w['batch']}", "data.max_documents=3000", *overrides])
    plan = compose(recipe)
    world = distributed.World()  # one CPU process
    with tempfile.TemporaryDirectory() as run_dir:  # read_data saves the trained tokenizer there
        data = read_data(plan, recipe, Path(run_dir), None, world)
    torch.manual_seed(recipe.seed)
    module = plan.task.build(plan.backbone, data)
    data = plan.task.prepare(module, data, world.device, resolve(recipe.trainer.precision, world.device))  # as run.train does
    return Trainer(plan.task, module, recipe, world, total_steps=1000), plan.task, data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workload", choices=sorted(WORKLOADS))
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("overrides", nargs="*", help="recipe overrides, e.g. backbone.config={attn_pdrop: 0.1}")
    args = parser.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    w = WORKLOADS[args.workload]
    compile_flag = ["trainer.compile=true"] if args.compile else []
    trainer, task, data = build_trainer(w, [f"trainer.precision={args.precision}", *compile_flag, *args.overrides])
    precision = trainer.precision
    trainer.start_epoch(0)  # wraps the module (torch.compile) as fit does
    window = [task.collate(data.train[: w["batch"]], list(range(w["batch"])))]  # one micro-batch per step
    done = 0

    def step() -> None:
        nonlocal done
        trainer.step(window, done)
        done += 1

    for _ in range(args.warmup):
        step()
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    plain = (time.perf_counter() - started) / args.steps
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    lines = [f"{args.workload} {' '.join(args.overrides)}: {precision}{' + torch.compile' if args.compile else ''}, batch {w['batch']} x seq {w['block']}, "
             f"{plain * 1000:.0f} ms/step without the profiler, torch {torch.__version__}, {torch.get_num_threads()} threads", "",
             "| operator | calls/step | self ms/step | share |", "|---|---|---|---|"]
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.rows]:
        lines.append(f"| `{e.key}` | {e.count / args.steps:.0f} | {e.self_cpu_time_total / 1000 / args.steps:.1f} | "
                     f"{e.self_cpu_time_total / total:.1%} |")
    text = "\n".join(lines)
    print(text)
    suffix = f"-{precision}" + ("-compile" if args.compile else "") + ("-custom" if args.overrides else "")
    (HERE / "results" / f"profile-{args.workload}{suffix}.txt").write_text(text + "\n")


if __name__ == "__main__":
    main()
