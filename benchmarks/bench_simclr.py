"""SimCLR pretraining speed: pretune against a plain hand-written PyTorch loop, same model, batch, views, precision.

    python benchmarks/bench_simclr.py            # full size: the table in BENCHMARKS.md (~6 min)
    python benchmarks/bench_simclr.py --quick    # smoke size, about a minute

Workload: ``recipes/image-simclr.yaml`` as shipped (SimCLRModel = the built-in CNN ``cnn/small``
on the embedded digits resized to 32x32 (``--image-size``; the recipe's own 16 is cheaper), projection head Linear-BN-ReLU-Linear to 64, NT-Xent at
temperature 0.5, two augmented views per image, AdamW lr 2e-3 / weight decay 1e-4, clipping 1.0,
cosine schedule with 5% warm-up, bf16 autocast), at batch 256 (the recipe's) and batch 64.

The plain loop is what a competent user writes by hand with the same pieces: the same
``SimCLRModel`` composed by ``pretune.run.assemble`` (same seed, so the same
initial weights), the same images (``pretune.data.arrays.build_array_data``), a shuffled index
order per epoch (tail dropped), two ``augment_images`` views per example from per-example seeds,
``torch.autocast("cpu", dtype=torch.bfloat16)``, ``torch.optim.AdamW(model.parameters(), ...)``
with its defaults otherwise, ``clip_grad_norm_(1.0)`` and a cosine ``LambdaLR``; no logging,
checkpoints or evaluation.

pretune runs ``pretune.train("recipes/image-simclr.yaml", ...)`` with the same batch size and
step count, ``trainer.log_every=1`` (one JSONL row per step), evaluation and intermediate
checkpoints pushed past the last step (``eval_every`` / ``save_every`` = steps + 1), no progress
bar and no TensorBoard.  The trainer still evaluates (k-NN probe) at step 0, and evaluates and
saves once after the last step; both happen outside the timed window.

Timing, identical for both arms: wall time between the end of warm-up step W and the end of the
last step N, i.e. steps W+1..N each including its collation (augmentation), forward, backward,
clipping, optimizer and schedule step.  For pretune the step ends are the ``time`` stamps of the
per-step train rows of ``metrics.jsonl`` (written right after each optimizer step, before any
evaluation), so the step-0 evaluation, start-up, the first step's FLOP count and the final
evaluation and save are excluded while pretune's own per-step bookkeeping (units, seeding,
metric sums, the JSONL row) is included, as it is part of its loop.  The plain loop takes
``time.perf_counter()`` after each scheduler step.  We difference wall-clock stamps instead of
averaging the logged ``examples_per_s`` because both arms are then measured the same way.

images/s counts source images (each yields two views at the image size).  MFU = images/s x training FLOPs
per image (``pretune.tasks.vision.forward_flops`` of the model on one collated batch, x3 for
forward + backward, divided by the batch size) / the bf16 GEMM peak
(``pretune.trainer.flops.measure_peak``) measured in the parent process of this run, before and
after the contenders (the higher of the two).  Each
contender runs in its own subprocess; contenders alternate, several repetitions, medians and
min-max are reported.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from common import report_result, run_alternating

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
RECIPE = ROOT / "recipes" / "image-simclr.yaml"

CONTENDERS = [("plain", "plain", "bf16"), ("pretune", "pretune", "auto")]
# batch -> (steps, warm-up steps): full run, then --quick
SIZES = {256: (16, 4), 64: (40, 8)}
IMAGE_SIZE = [32]  # set by --image-size; a list so the children see the parent's choice through argv
QUICK_SIZES = {256: (8, 3), 64: (12, 4)}


def recipe_parts():
    """The recipe and its task section, validated by pretune's own config classes."""
    from pretune.recipe import load_recipe
    from pretune.tasks.contrastive import ContrastiveConfig

    recipe = load_recipe(str(RECIPE), [f"data.size={IMAGE_SIZE[0]}"])
    return recipe, ContrastiveConfig(**recipe.task)


def build_plain(seed: int = 0):
    """The model and training images, built exactly as pretune builds them for this recipe."""
    from pretune.run import assemble

    recipe, task_cfg = recipe_parts()
    _, data, model = assemble(recipe.model_copy(update={"seed": seed}))  # the run's own composition
    return recipe, task_cfg, model, data.train.x  # the train split (validation held out)


def run_plain(batch: int, steps: int, warmup: int) -> dict:
    """The hand-written loop.  Nothing but training happens between the timestamps."""
    import torch

    from pretune.data.augment import augment_images

    recipe, task_cfg, model, images = build_plain()
    tcfg = recipe.trainer
    n = len(images)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    lr_warmup = int(tcfg.warmup * steps)

    def cosine(step: int) -> float:
        if step < lr_warmup:
            return (step + 1) / lr_warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - lr_warmup) / max(1, steps - lr_warmup))))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine)
    model.train()
    times: list[float] = []
    losses: list[torch.Tensor] = []
    step, epoch = 0, 0
    while step < steps:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch))
        for start in range(0, n - batch + 1, batch):  # drop the tail
            idx = order[start:start + batch]
            x = images[idx]
            seeds = [epoch * n + i for i in idx.tolist()]  # one seed per example and epoch
            views = torch.stack([augment_images(x, [2 * s + v for s in seeds], task_cfg.augment, task_cfg.view_size)
                                 for v in (0, 1)], dim=1)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model({"x": views})["contrastive"] / (2 * batch)  # mean over the 2B anchors
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(loss.detach())
            times.append(time.perf_counter())
            step += 1
            if step == steps:
                break
        epoch += 1
    seconds = times[-1] - times[warmup - 1]
    return {"seconds": seconds, "images_per_s": (steps - warmup) * batch / seconds,
            "step_s": [b - a for a, b in zip(times, times[1:])], "final_loss": tail_mean([float(v) for v in losses])}


def run_pretune(batch: int, steps: int, warmup: int) -> dict:
    import pretune

    with tempfile.TemporaryDirectory() as tmp:
        result = pretune.train(str(RECIPE), [
            f"run_dir={tmp}/run", f"trainer.batch_size={batch}", f"trainer.max_steps={steps}", "trainer.log_every=1",
            f"trainer.eval_every={steps + 1}", f"trainer.save_every={steps + 1}", "trainer.progress=false",
            "trainer.tensorboard=false", f"data.size={IMAGE_SIZE[0]}",
        ])
        rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train] == list(range(1, steps + 1)), "expected one train row per step"
    times = [r["time"] for r in train]
    seconds = times[-1] - times[warmup - 1]
    return {"seconds": seconds, "images_per_s": (steps - warmup) * batch / seconds,
            "step_s": [b - a for a, b in zip(times, times[1:])], "final_loss": tail_mean([r["loss"] for r in train]),
            "mfu_logged": statistics.median(r["mfu"] for r in train[warmup:])}


def tail_mean(losses: list[float]) -> float:
    """Mean training loss over the last quarter of the steps: a sanity check that both arms train alike."""
    tail = losses[-max(1, len(losses) // 4):]
    return sum(tail) / len(tail)


def flops_per_image(batch: int) -> float:
    """Training FLOPs per source image: 3x pretune's counted forward FLOPs of the model on one collated batch."""
    from pretune.data.augment import augment_images
    from pretune.tasks.vision import forward_flops

    _, task_cfg, model, images = build_plain()
    x = images[:batch]
    views = [augment_images(x, [2 * i + v for i in range(batch)], task_cfg.augment, task_cfg.view_size) for v in (0, 1)]
    import torch

    return 3.0 * forward_flops(model, {"x": torch.stack(views, dim=1)}) / batch


def child(args: argparse.Namespace) -> None:
    runner = run_plain if args.tool == "plain" else run_pretune
    report_result(runner(args.batch, args.steps, args.warmup))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke size, about a minute")
    parser.add_argument("--batches", default=None, help="comma-separated batch sizes (default 256,64)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--image-size", type=int, default=32, help="side of the images (default 32: the issue-5 row)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tool", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    IMAGE_SIZE[0] = args.image_size
    if args.child:
        return child(args)

    import torch

    from pretune.trainer.flops import measure_peak

    sizes = QUICK_SIZES if args.quick else SIZES
    batches = [int(b) for b in args.batches.split(",")] if args.batches else list(sizes)
    repeats = args.repeats or (1 if args.quick else 3)
    RESULTS.mkdir(exist_ok=True)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    peak = measure_peak(torch.bfloat16, torch.device("cpu"), seconds=1.0)
    _, task_cfg, model, images = build_plain()
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "torch": torch.__version__, "threads": torch.get_num_threads(), "repeats": repeats,
              "model_params": sum(p.numel() for p in model.parameters()), "train_images": len(images),
              "image_shape": list(images.shape[1:]), "precision": "bf16 autocast", "peak_gflops_bf16": peak / 1e9, "rows": []}
    started = time.perf_counter()
    for batch in batches:
        steps, warmup = sizes.get(batch, SIZES.get(batch, (16, 4)))
        flops = flops_per_image(batch)
        runs = run_alternating(
            CONTENDERS, repeats,
            lambda tool, precision: [__file__, "--child", "--image-size", str(args.image_size), "--tool", tool, "--batch", str(batch), "--steps", str(steps),
                                     "--warmup", str(warmup)],
            env, lambda name, rep, r: f"batch {batch} {name} rep {rep}: {r['images_per_s']:.1f} images/s, "
                                      f"loss {r['final_loss']:.3f}")
        plain = statistics.median(r["images_per_s"] for r in runs["plain"])
        for name, _, _ in CONTENDERS:
            speeds = [r["images_per_s"] for r in runs[name]]
            median = statistics.median(speeds)
            report["rows"].append({
                "batch": batch, "contender": name, "steps": steps, "warmup": warmup, "images_per_s": median,
                "min": min(speeds), "max": max(speeds), "ratio_vs_plain": median / plain,
                "gflop_per_image": flops / 1e9,
                "final_loss": statistics.median(r["final_loss"] for r in runs[name]),
                "runs": runs[name],
            })
    # the GEMM peak before and after the contenders, the higher of the two: one disturbed measurement
    # (another process on the machine) would otherwise inflate every MFU of the run
    peak = max(peak, measure_peak(torch.bfloat16, torch.device("cpu"), seconds=1.0))
    report["peak_gflops_bf16"] = peak / 1e9
    for row in report["rows"]:
        row["mfu"] = row["images_per_s"] * row["gflop_per_image"] * 1e9 / peak
    report["wall_s"] = time.perf_counter() - started
    (RESULTS / ("simclr-quick.json" if args.quick else "simclr.json")).write_text(json.dumps(report, indent=2))
    print(table(report))


def table(report: dict) -> str:
    lines = [f"{report['date']} · {report['machine']} · torch {report['torch']} · {report['threads']} threads · "
             f"{report['model_params'] / 1e6:.2f}M params · {report['train_images']} images "
             f"{'x'.join(map(str, report['image_shape']))} · {report['precision']} · × {report['repeats']} repeats · "
             f"GEMM peak bf16 {report['peak_gflops_bf16']:.0f} GFLOP/s", "",
             "| batch | contender | steps (warm-up) | images/s (median) | min–max | MFU | final loss | pretune ÷ plain |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['batch']} | {r['contender']} | {r['steps']} ({r['warmup']}) | {r['images_per_s']:.1f} | "
                     f"{r['min']:.1f}–{r['max']:.1f} | {r['mfu']:.1%} | {r['final_loss']:.3f} | "
                     f"{'**%.2f×**' % r['ratio_vs_plain'] if r['contender'] == 'pretune' else '1.00×'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
