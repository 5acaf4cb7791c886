"""Which examples to label first: TypiClust picks against random picks, on embedded data.

For each set, a pretrained model embeds the unlabelled pool and the test set once; then, for each
label budget and seed, three ways of choosing which pool rows get labelled are compared by the test
accuracy of a linear probe fitted on the chosen rows' embeddings (:func:`pretune.strategies.fit_probe`,
scikit-learn's ``LogisticRegression`` default objective):

* ``typiclust``: :func:`pretune.select.typiclust` on the pool embeddings (k-means seeded by the seed);
* ``random``: uniformly random rows of the pool (what a user without labels can do);
* ``random per class``: a random share of every class (the studies' random arm; it needs the labels).

Sets (both embedded in pretune, nothing downloaded):

* ``digits``: the embedded handwritten digits (16x16), the demo's small CNN pretrained with SimCLR for
  200 steps on the train split without labels (the analogue of the paper's CIFAR-10 + SimCLR setting);
* ``topics``: standard-library docstrings labelled by package (5 classes), embedded by the packaged
  all-MiniLM-L6-v2 (mean pooling).

    python benchmarks/bench_selection.py [--seeds 10] [--out benchmarks/results/selection.json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_setfit import load_topics  # noqa: E402
from bench_strategies import CACHE, minilm  # noqa: E402

PER_CLASS = [1, 2, 5]


def digits_features(work: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    from pretune.backbones.arrays import load_backbone
    from pretune.data.arrays import ArrayDataConfig, build_array_data
    from pretune.demo import simclr_recipe
    from pretune.run import train

    model = work / "simclr" / "model"
    if not (model / "config.json").is_file():
        train(simclr_recipe(work / "simclr", 200), overwrite=True)
    data = build_array_data(ArrayDataConfig(images="builtin:digits", size=16, validation_fraction=0.2))
    backbone = load_backbone(model).eval()
    with torch.no_grad():
        encode = lambda x: torch.cat([backbone(x[i:i + 256]) for i in range(0, len(x), 256)]).float()  # noqa: E731
        return encode(data.train.x), data.train.labels, encode(data.validation.x), data.validation.labels, len(data.label_names)


def topics_features(work: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    import transformers

    from pretune.data.readers import load_tokenizer
    from pretune.tasks.common import mean_pooled

    cache = work / "topics-features.pt"
    if cache.is_file():
        return torch.load(cache)
    texts, labels = load_topics()
    rows = list(zip(texts, labels))
    random.Random(1234).shuffle(rows)
    names = sorted(set(labels))
    encoder = transformers.AutoModel.from_pretrained(minilm(), use_safetensors=True).eval()
    x = mean_pooled(encoder, load_tokenizer(minilm()), [t for t, _ in rows], torch.device("cpu"), 64, 64)
    y = torch.tensor([names.index(label) for _, label in rows])
    cut = int(0.7 * len(rows))
    out = (x[:cut], y[:cut], x[cut:], y[cut:], len(names))
    torch.save(out, cache)
    return out


def picks(how: str, pool: torch.Tensor, labels: torch.Tensor, classes: int, per_class: int, seed: int) -> list[int]:
    from pretune.select import typiclust

    budget = per_class * classes
    if how == "typiclust":
        return [row for row, _ in typiclust(pool, budget, seed)]
    rng = random.Random(seed)
    if how == "random":
        return rng.sample(range(len(pool)), budget)
    by_class = [[i for i in range(len(labels)) if labels[i] == c] for c in range(classes)]
    return [i for members in by_class for i in rng.sample(members, min(per_class, len(members)))]


def probe_accuracy(x: torch.Tensor, y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, classes: int) -> float:
    from pretune import heads
    from pretune.strategies import fit_probe

    if len(set(y.tolist())) == 1:  # one class picked: every prediction is that class
        return float((test_y == y[0]).float().mean())
    present = sorted(set(y.tolist()))  # the probe's classes: those with a label (absent ones are never predicted)
    fit = fit_probe(heads.get("single"), x, torch.tensor([present.index(v) for v in y.tolist()]), names=[str(c) for c in present])
    predicted = torch.tensor(present)[(test_x @ fit.weight.T + fit.bias).argmax(1)]
    return float((predicted == test_y).float().mean())


def welch(a: list[float], b: list[float]) -> tuple[float, float]:
    from pretune.studies.stats import welch as interval

    return interval(a, b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", default=["digits", "topics"])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--work", default=str(CACHE / "selection"))
    parser.add_argument("--out", default=str(HERE / "results" / "selection.json"))
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in args.sets:
        pool, labels, test_x, test_y, classes = (digits_features if name == "digits" else topics_features)(work)
        results[name] = {"pool": len(pool), "test": len(test_x), "classes": classes, "rows": []}
        for per_class in PER_CLASS:
            for how in ("typiclust", "random", "random per class"):
                scores = []
                for seed in range(args.seeds):
                    chosen = picks(how, pool, labels, classes, per_class, seed)
                    scores.append(probe_accuracy(pool[chosen], labels[chosen], test_x, test_y, classes))
                covered = statistics.fmean(len(set(labels[picks(how, pool, labels, classes, per_class, s)].tolist())) / classes
                                           for s in range(args.seeds))
                row = {"labels_per_class": per_class, "labels": per_class * classes, "how": how, "mean": statistics.fmean(scores),
                       "std": statistics.stdev(scores), "scores": scores, "classes_covered": covered}
                results[name]["rows"].append(row)
                print(f"{name}: {per_class * classes} labels, {how}: {row['mean']:.3f} ± {row['std']:.3f} "
                      f"(classes covered {covered:.0%})", flush=True)
        for per_class in PER_CLASS:
            by = {r["how"]: r for r in results[name]["rows"] if r["labels_per_class"] == per_class}
            for other in ("random", "random per class"):
                low, high = welch(by["typiclust"]["scores"], by[other]["scores"])
                diff = by["typiclust"]["mean"] - by[other]["mean"]
                results[name].setdefault("differences", []).append(
                    {"labels_per_class": per_class, "against": other, "difference": diff, "low": low, "high": high})
                print(f"{name}: {per_class} per class, typiclust - {other}: {diff:+.3f} (95% interval {low:+.3f} to {high:+.3f}, "
                      f"Welch over {args.seeds} seeds)", flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
