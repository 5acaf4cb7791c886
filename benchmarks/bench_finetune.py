"""Full fine-tuning speed: pretune against the Hugging Face Trainer, same encoder, same data, same run.

    python benchmarks/bench_finetune.py            # full size: 60 steps (10 warm-up) x 3 repeats
    python benchmarks/bench_finetune.py --quick    # smoke size: 12 steps (4 warm-up) x 1 repeat

Workload (issue 5, "full fine-tuning, sequence classification, same encoder"): the MLM row's
encoder, BERT L4/H256/A4 (pretune ``backbone.size=mini``, the same tokenizer trained on the
embedded corpus), briefly pretrained with pretune's MLM task (``--pretrain-steps``) and saved once
as the *initial folder* both contenders start from.  The labelled task is the embedded
stdlib-topics set (``stdlib_topics()``: docstring -> standard-library package, 20 classes) split
80/20 (stratified, seed 0) into train/test CSVs that both contenders read.  Max length 128
(dynamic padding to the longest text of each batch, as both tools do), batch 32, AdamW lr 5e-4 on
every parameter (``trainer.head_lr=null``: the Trainer has no head learning rate), weight decay
0.01 on matrices, linear schedule with 10% warm-up, clipping at 1.0, dropout on.

- ``pretune``: ``pretune.train("recipes/text-classify.yaml", ...)`` with ``strategy=full``,
  default precision (``auto``: bf16 autocast on this CPU), one evaluation on the test CSV after the
  last step (and the untimed step-0 "before" point), no intermediate checkpoints.
- ``hf-fp32`` / ``hf-bf16``: ``AutoModelForSequenceClassification.from_pretrained`` of the same
  folder (new pooler and classifier, as in pretune), ``DataCollatorWithPadding``, ``Trainer`` in
  fp32 (its default) and with ``bf16=True``; ``trainer.predict`` on the test CSV after training.

Throughput is steady state and measured like ``bench_pretrain.py``: wall time between the end of
warm-up step W and the end of the last step (pretune: the ``time`` stamps of its per-step JSONL
rows; Trainer: ``time.perf_counter()`` in ``on_step_end``).  samples/s = (steps - W) x 32 / that
time.  The batches differ between tools (each shuffles its own way), so their padded lengths
differ; the report gives each contender's mean padded length, and MFU counts the FLOPs of the
padded batches each one actually ran: per step ``transformer_training_flops`` (6N per token +
attention at the padded length; the pooler and classifier, <0.1%, are not counted) / time / the
GEMM peak measured in this run, before and after the contenders, the higher of the two (bf16 peak
for bf16 contenders, fp32 peak for fp32).  Quality at
equal steps: accuracy on the whole test CSV after the last step, and the mean training loss of the
last quarter of the steps.  Each contender runs in its own subprocess; contenders alternate,
several repetitions, medians and min-max.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import tempfile
from pathlib import Path

from bench_pretrain import WORKLOADS, model_overrides
from common import (bench_env, check_source, gemm_peaks, load_summary, peaks_text, pretune_step_times, read_csv, report_header,
                    report_result, run_alternating, spread, steady_seconds, tail_mean, trainer_clock, write_results,
                    write_topic_split)

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "text-classify.yaml"

MAX_LENGTH, BATCH, LR, WEIGHT_DECAY, WARMUP, SEED = 128, 32, 5e-4, 0.01, 0.1, 0
# contender name -> (tool, precision)
CONTENDERS = [("hf-fp32", "hf", "fp32"), ("hf-bf16", "hf", "bf16"), ("pretune", "pretune", "auto"),
              ("pretune-ungrouped", "pretune-ungrouped", "auto")]  # trainer.group_by_length=false: random batches
TARGET_SPEEDUP = 2.5  # issue 17 part 3: full fine-tuning on natural lengths >= 2.5x the (bf16) Trainer


def build_initial(folder: Path, pretrain_steps: int, size: str = "mini") -> Path:
    """The starting folder of both contenders: the MLM row's BERT (``size``) after a short pretune MLM run."""
    import pretune

    result = pretune.train(None, [
        *model_overrides(WORKLOADS["mlm"], size), f"run_dir={folder / 'pretrain'}", f"trainer.max_steps={pretrain_steps}",
        f"trainer.batch_size={WORKLOADS['mlm']['batch']}", "trainer.lr=5e-4", "trainer.warmup=0.1", "trainer.log_every=10",
        "trainer.progress=false", "trainer.tensorboard=false", f"trainer.save_every={pretrain_steps + 1}", f"seed={SEED}",
    ])
    return result.model_dir


def build_data(folder: Path) -> dict:
    """train.csv / test.csv: stdlib topics (20 classes), stratified 80/20, seed 0; both contenders read them."""
    return write_topic_split(folder, SEED)


def step_flops(config, lengths: list[int]) -> list[float]:
    """Training FLOPs of each step's padded batch (BATCH x length), one formula for every contender."""
    from pretune.trainer.flops import transformer_training_flops

    return [transformer_training_flops(config, BATCH * n, n, 0) for n in lengths]


def timed(times: list[float], lengths: list[int], real: list[float], config, steps: int, warmup: int) -> dict:
    """Steady-state speed; ``lengths``: padded length of each step's batch, ``real``: its mean unpadded length."""
    seconds = steady_seconds(times, warmup)
    flops = sum(step_flops(config, lengths[warmup:steps]))
    return {"seconds": seconds, "samples_per_s": (steps - warmup) * BATCH / seconds, "flop_per_s": flops / seconds,
            "padded_length": statistics.mean(lengths[warmup:steps]), "real_length": statistics.mean(real[warmup:steps])}


def cross_entropy(logits, labels) -> float:
    import torch

    return float(torch.nn.functional.cross_entropy(torch.as_tensor(logits).float(), torch.as_tensor(labels)))


def run_pretune(init: Path, data_dir: Path, steps: int, warmup: int, precision: str, grouped: bool = True) -> dict:
    import pretune
    import torch
    import transformers
    from pretune.trainer.data import batch_order
    from pretune.trainer.precision import resolve

    with tempfile.TemporaryDirectory() as tmp:
        result = pretune.train(str(RECIPE), [
            f"run_dir={tmp}/run", f"model={init}", "strategy=full", f"data.train={data_dir / 'train.csv'}",
            f"data.validation={data_dir / 'test.csv'}", f"data.max_length={MAX_LENGTH}", f"seed={SEED}",
            f"trainer.max_steps={steps}", f"trainer.batch_size={BATCH}", f"trainer.lr={LR}", "trainer.head_lr=null",
            f"trainer.weight_decay={WEIGHT_DECAY}", "trainer.schedule=linear", f"trainer.warmup={WARMUP}", "trainer.clip=1.0",
            f"trainer.precision={precision}", f"trainer.eval_every={steps}", "trainer.patience=null", "trainer.log_every=1",
            "trainer.progress=false", "trainer.tensorboard=false", f"trainer.save_every={steps + 1}",
            f"trainer.group_by_length={str(grouped).lower()}",
        ])
        train = pretune_step_times(result.run_dir, steps)
        rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in rows if r["split"] == "validation" and r["step"] == steps][-1]
    # the padded length of each training batch: pretune's order for (seed, epoch) and the tokenised lengths
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(init))
    texts, _ = read_csv(data_dir / "train.csv")
    sizes = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=MAX_LENGTH)["input_ids"]]
    lengths: list[int] = []
    real: list[float] = []
    characters = [len(text) for text in texts] if grouped else None  # what Finetune.lengths() gives the loop
    for epoch in range(math.ceil(steps * BATCH / len(texts)) + 1):
        for batch in batch_order(len(texts), BATCH, SEED, epoch, lengths=characters):
            lengths.append(max(sizes[i] for i in batch))
            real.append(statistics.mean(sizes[i] for i in batch))
    config = transformers.AutoConfig.from_pretrained(str(init))
    return {**timed([r["time"] for r in train], lengths, real, config, steps, warmup), "accuracy": final["accuracy"],
            "test_loss": final["loss"],
            "final_loss": tail_mean([r["loss"] for r in train]), "precision": resolve(precision, torch.device("cpu")),
            "mfu_logged": statistics.median(r["mfu"] for r in train[warmup:])}


def run_hf(init: Path, data_dir: Path, steps: int, warmup: int, precision: str) -> dict:
    import datasets
    import numpy as np
    import transformers

    train_texts, train_labels = read_csv(data_dir / "train.csv")
    test_texts, test_labels = read_csv(data_dir / "test.csv")
    names = sorted(set(train_labels))  # the label map pretune builds (sorted class names)
    label2id = {name: i for i, name in enumerate(names)}
    transformers.set_seed(SEED)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(init))
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        str(init), num_labels=len(names), id2label=dict(enumerate(names)), label2id=label2id)

    def tokenized(texts: list[str], labels: list[str]) -> datasets.Dataset:
        table = datasets.Dataset.from_dict({"text": texts, "labels": [label2id[x] for x in labels]})
        return table.map(lambda rows: tokenizer(rows["text"], truncation=True, max_length=MAX_LENGTH), batched=True,
                         remove_columns=["text"])

    pad = transformers.DataCollatorWithPadding(tokenizer)
    lengths: list[int] = []
    real: list[float] = []
    recording = [True]

    def collate(features):  # DataCollatorWithPadding, noting each training batch's padded length
        batch = pad(features)
        if recording[0]:
            lengths.append(int(batch["input_ids"].shape[1]))
            real.append(float(batch["attention_mask"].sum()) / len(features))
        return batch

    times: list[float] = []
    losses: list[float] = []

    clock = trainer_clock(times, losses)

    with tempfile.TemporaryDirectory() as tmp:
        args = transformers.TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=BATCH, per_device_eval_batch_size=BATCH, max_steps=steps,
            learning_rate=LR, weight_decay=WEIGHT_DECAY, lr_scheduler_type="linear", warmup_steps=int(WARMUP * steps),
            max_grad_norm=1.0, save_strategy="no", eval_strategy="no", logging_steps=1, report_to="none", disable_tqdm=True,
            use_cpu=True, bf16=precision == "bf16", dataloader_num_workers=0, seed=SEED,
        )
        trainer = transformers.Trainer(model=model, args=args, train_dataset=tokenized(train_texts, train_labels),
                                       data_collator=collate, callbacks=[clock])
        trainer.train()
        recording[0] = False
        prediction = trainer.predict(tokenized(test_texts, test_labels))
    accuracy = float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())
    return {**timed(times, lengths, real, model.config, steps, warmup), "accuracy": accuracy, "final_loss": tail_mean(losses),
            "test_loss": cross_entropy(prediction.predictions, prediction.label_ids),
            "precision": precision}


def child(args: argparse.Namespace) -> None:
    """One contender, one repetition, in its own process; prints a JSON line."""
    global SEED, MAX_LENGTH, BATCH
    SEED, MAX_LENGTH, BATCH = args.seed, args.max_length, args.batch
    if args.tool == "hf":
        result = run_hf(Path(args.init), Path(args.data_dir), args.steps, args.warmup, args.precision)
    else:
        result = run_pretune(Path(args.init), Path(args.data_dir), args.steps, args.warmup, args.precision,
                             grouped=args.tool == "pretune")
    report_result({**result, "seed": SEED})


def main() -> None:
    global LR, MAX_LENGTH, BATCH
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke size for CI")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--pretrain-steps", type=int, default=None, help="MLM steps before saving the initial folder")
    parser.add_argument("--lr", type=float, default=None, help=f"learning rate of both tools (default {LR})")
    parser.add_argument("--contenders", default=",".join(name for name, _, _ in CONTENDERS))
    parser.add_argument("--seed", type=int, default=SEED, help="repetition r runs every contender with seed + r")
    parser.add_argument("--size", default="mini", help="backbone.size of the encoder: mini (L4/H256), small (L4/H512), "
                        "base (L12/H768)")
    parser.add_argument("--max-length", type=int, default=MAX_LENGTH, help="tokens kept per text (both tools)")
    parser.add_argument("--batch", type=int, default=BATCH, help="texts per step (both tools)")
    parser.add_argument("--test-rows", type=int, default=None, help="evaluate on the first N test rows only (speed runs)")
    parser.add_argument("--out", default=None, help="results JSON (default: results/finetune[-quick].json)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tool", help=argparse.SUPPRESS)
    parser.add_argument("--precision", help=argparse.SUPPRESS)
    parser.add_argument("--init", help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    LR = args.lr or LR
    MAX_LENGTH, BATCH = args.max_length, args.batch
    args.steps = args.steps or (12 if args.quick else 60)
    args.warmup = args.warmup or (4 if args.quick else 10)
    if args.child:
        return child(args)

    repeats = args.repeats or (1 if args.quick else 3)
    pretrain_steps = args.pretrain_steps or (4 if args.quick else 100)
    work = Path(tempfile.mkdtemp(prefix="pretune-bench-finetune-"))
    try:
        contenders = [c for c in CONTENDERS if c[0] in args.contenders.split(",")]
        precisions = [precision for _, _, precision in contenders]
        peak = gemm_peaks(precisions)
        sizes = build_data(work)
        if args.test_rows:  # a speed run: the final evaluation need not read all 720 rows
            import csv

            texts, labels = read_csv(work / "test.csv")
            with open(work / "test.csv", "w", newline="", encoding="utf-8") as handle:
                csv.writer(handle).writerows([["text", "label"], *zip(texts[:args.test_rows], labels[:args.test_rows])])
            sizes["test"] = min(sizes["test"], args.test_rows)
        test_labels = read_csv(work / "test.csv")[1]
        majority = max(test_labels.count(label) for label in set(test_labels)) / len(test_labels)
        init = build_initial(work, pretrain_steps, args.size)
        from pretune.backbones.transformers import SIZES

        layers, hidden, heads = SIZES[args.size]
        report = {**report_header(), "encoder": f"BERT L{layers}/H{hidden}/A{heads} (backbone.size={args.size})", "pretrain_steps": pretrain_steps,
                  **sizes, "max_length": MAX_LENGTH, "batch": BATCH, "lr": LR, "steps": args.steps, "warmup": args.warmup,
                  "repeats": repeats, "peak_gflops": {k: v / 1e9 for k, v in peak.items()}, "rows": []}
        runs = {name: [] for name, _, _ in contenders}
        for rep in range(repeats):  # repetition r: every contender with the same seed (paired), the order alternating
            seed = args.seed + rep
            done = run_alternating(
                contenders if rep % 2 == 0 else contenders[::-1], 1,
                lambda tool, precision: [__file__, "--child", "--tool", tool, "--precision", precision, "--init", str(init),
                                         "--data-dir", str(work), "--steps", str(args.steps), "--warmup", str(args.warmup),
                                         "--lr", str(LR), "--seed", str(seed), "--max-length", str(MAX_LENGTH),
                                         "--batch", str(BATCH)],
                bench_env(), lambda name, _, r: (f"{name} seed {r['seed']}: {r['samples_per_s']:.1f} samples/s (padded length "
                                                 f"{r['padded_length']:.0f}, real {r['real_length']:.0f}), test accuracy "
                                                 f"{r['accuracy']:.4f}, test loss {r['test_loss']:.3f}, train loss {r['final_loss']:.3f}"))
            for name, rows in done.items():
                runs[name] += rows
        peak = {k: max(v, w) for (k, v), w in zip(peak.items(), gemm_peaks(precisions).values())}  # before and after: the best of both
        report["peak_gflops"] = {k: v / 1e9 for k, v in peak.items()}
        check_source(report)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ours = statistics.median(r["samples_per_s"] for r in runs["pretune"])
    ours_accuracy = statistics.median(r["accuracy"] for r in runs["pretune"])
    loads = load_summary(runs)
    for name, _, precision in contenders:
        speed = spread([r["samples_per_s"] for r in runs[name]])
        accuracy = statistics.median(r["accuracy"] for r in runs[name])
        used = runs[name][0]["precision"]
        report["rows"].append({
            "contender": name, "precision": used, "samples_per_s": speed["median"], "min": speed["min"], "max": speed["max"],
            "padded_length": statistics.median(r["padded_length"] for r in runs[name]),
            "real_length": statistics.median(r["real_length"] for r in runs[name]),
            "test_loss": statistics.median(r["test_loss"] for r in runs[name]),
            "mfu": statistics.median(r["flop_per_s"] for r in runs[name]) / peak[used],
            "accuracy": accuracy, "final_loss": statistics.median(r["final_loss"] for r in runs[name]),
            "pretune_speedup": ours / speed["median"], "pretune_minus_this_points": 100 * (ours_accuracy - accuracy),
            "paired_points": [100 * (a["accuracy"] - b["accuracy"]) for a, b in zip(runs["pretune"], runs[name])],
            "foreign_load": loads[name]["max_foreign_load"], "peak_rss_mb": loads[name]["median_peak_rss_mb"],
            "runs": runs[name],
        })
    # accuracy "within noise": the difference of two accuracies on the same n test rows, 2 standard errors
    p = min(max(ours_accuracy, 1 / sizes["test"]), 1 - 1 / sizes["test"])
    report["accuracy_noise_points"] = 100 * 2 * math.sqrt(2 * p * (1 - p) / sizes["test"])
    pretune_row = next(r for r in report["rows"] if r["contender"] == "pretune")
    # equal accuracies prove nothing when every contender only predicts the majority class: then quality is not judged
    report["majority_class_accuracy"] = majority
    judged = any(r["accuracy"] > majority + report["accuracy_noise_points"] / 100 for r in report["rows"])

    def quality_ok(row: dict) -> bool | None:
        return abs(row["pretune_minus_this_points"]) <= report["accuracy_noise_points"] if judged else None

    report["summary"] = [
        {"row": f"full fine-tuning vs HF Trainer {r['contender'][3:]}", "ratio": r["pretune_speedup"], "target": TARGET_SPEEDUP,
         "quality_ok": quality_ok(r), "met": r["pretune_speedup"] >= TARGET_SPEEDUP and quality_ok(r) is True,
         "mfu": pretune_row["mfu"], "mfu_other": r["mfu"], "unit": "samples/s",
         "quality": (f"test accuracy {ours_accuracy:.2%} vs {r['accuracy']:.2%} ({r['pretune_minus_this_points']:+.1f} points, "
                     f"noise ± {report['accuracy_noise_points']:.1f})" if judged else
                     f"not judged: every contender is at the majority-class accuracy ({majority:.2%}); train longer")}
        for r in report["rows"] if r["contender"].startswith("hf-")]
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    else:
        write_results("finetune", args.quick, report)
    print(table(report))


def table(report: dict) -> str:
    lines = [f"{report['date']} · {report['machine']} · torch {report['torch']} · transformers {report['transformers']} · "
             f"{report['encoder']}, {report['pretrain_steps']} MLM steps · {report['classes']} classes, {report['train']} train / "
             f"{report['test']} test · max length {report['max_length']}, batch {report['batch']} · {report['steps']} steps "
             f"({report['warmup']} warm-up) × {report['repeats']} repeats · {peaks_text(report)}", "",
             "| contender | samples/s (median) | min–max | padded (real) length | MFU | test accuracy | test loss | final train loss | "
             "pretune ÷ this | pretune − this (points, per seed) | peak RSS MB | foreign load (max) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['contender']} ({r['precision']}) | {r['samples_per_s']:.1f} | {r['min']:.1f}–{r['max']:.1f} | "
                     f"{r['padded_length']:.0f} ({r['real_length']:.0f}) | {r['mfu']:.1%} | {r['accuracy']:.2%} | {r['test_loss']:.3f} | "
                     f"{r['final_loss']:.3f} | "
                     f"{r['pretune_speedup']:.2f}× | {r['pretune_minus_this_points']:+.1f} "
                     f"({', '.join(f'{x:+.1f}' for x in r.get('paired_points', []))}) | {r.get('peak_rss_mb', float('nan')):.0f} | "
                     f"{r.get('foreign_load', float('nan')):.2f} |")
    lines.append(f"target: ≥ {TARGET_SPEEDUP}× samples/s against each Trainer contender, accuracy within ± "
                 f"{report['accuracy_noise_points']:.1f} points (2 standard errors of a difference on {report['test']} rows): "
                 + ", ".join(f"{s['row'].split()[-1]} {'met' if s['met'] else 'NOT met'}" for s in report["summary"])
                 + ("" if all(s["quality_ok"] is not None for s in report["summary"]) else
                    f" (quality not judged: every contender is at the majority-class accuracy, "
                    f"{report.get('majority_class_accuracy', 0):.2%})"))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
