"""Where one training step's time goes: a per-operator breakdown of pretune's step (torch.profiler).

    python benchmarks/profile_step.py mlm            # BERT L4/H256/A4, seq 128, batch 32 (the MLM row)
    python benchmarks/profile_step.py clm            # GPT-2 L4/H256/A4, seq 256, batch 16 (the CLM row)
    python benchmarks/profile_step.py mlm --precision fp32 --compile

The step is the one ``pretune.trainer.loop.fit`` runs (after its ``speed_up``; pass
``trainer.fast_dropout=false`` to see PyTorch's dropout): forward under autocast, backward, gradient
clipping, fused AdamW, schedule.  The module, batch and optimizer are built by pretune itself from
the same overrides as ``benchmarks/bench_pretrain.py``.  After ``--warmup`` steps, ``--steps`` steps
are profiled; the table groups operators by name, sorted by self CPU time, with each one's share
of the step.  ``docs/performance.md`` quotes the output (saved in
``benchmarks/results/profile-<workload>.txt``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_pretrain import WORKLOADS, model_overrides  # noqa: E402


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

    import pretune.tasks  # noqa: F401  (registers the tasks)
    from pretune.backbones import backbone_config
    from pretune.recipe import load_recipe
    from pretune.run import build_task
    from pretune.trainer.fast import speed_up
    from pretune.trainer.optim import build_optimizer, build_schedule, param_groups
    from pretune.trainer.precision import autocast, resolve

    w = WORKLOADS[args.workload]
    recipe = load_recipe(None, [*model_overrides(w), f"trainer.batch_size={w['batch']}", "data.max_documents=3000", *args.overrides])
    task = build_task(recipe)
    data = task.data()
    torch.manual_seed(0)
    module = task.build(backbone_config(recipe), data)
    device = torch.device("cpu")
    if recipe.trainer.fast_dropout:  # as fit() does
        speed_up(module, device)
    precision = resolve(args.precision, device)
    cfg = recipe.trainer
    optimizer = build_optimizer(param_groups(module.named_parameters(), cfg.weight_decay, cfg.lr), cfg, device)
    schedule = build_schedule(optimizer, cfg, 1000)
    model = torch.compile(module) if args.compile else module
    rows = data.train[: w["batch"]]
    batch = task.collate(rows, list(range(w["batch"])))
    units = task.units(batch)
    module.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(precision, device):
            out = model(batch)
            loss = sum(out[k] / units[k].clamp(min=1) for k in task.losses)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.clip)
        optimizer.step()
        schedule.step()

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
