"""``pretune`` command line: pretrain, finetune, evaluate, predict, compare, search, report, demo.

    pretune pretrain recipes/text-mlm.yaml data.files='corpus/*.txt' run_dir=runs/mlm
    pretune finetune recipes/text-classify.yaml model=runs/mlm/model data.train=train.csv strategy=linear-probe
    pretune evaluate runs/clf/model data=test.csv
    pretune predict runs/clf/model input.jsonl --out predictions.jsonl
    pretune compare recipes/study-text.yaml model=runs/mlm/model data.train=train.csv data.test=test.csv budgets=[0.1,1.0]
    pretune search recipes/text-classify.yaml model=runs/mlm/model data.train=train.csv trials=30
    pretune report runs/mlm

Errors caused by input (recipe, data, checkpoints) print one line and exit with the error's code
(2-9, see :mod:`pretune.errors`); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from pretune.errors import PretuneError


TRUST_HELP = "allow weights stored as pickles (pytorch_model.bin, .pth), which can run code when loaded"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pretune", description="Pretrain, fine-tune, and know whether it paid off.")
    sub = parser.add_subparsers(dest="command", required=True)

    for name, text in (("pretrain", "pretrain a model with a self-supervised objective"),
                       ("finetune", "fine-tune a pretrained model on labelled data (model=PATH strategy=...)")):
        run = sub.add_parser(name, help=text)
        run.add_argument("recipe", help="a recipe YAML file, or a run directory with --resume")
        run.add_argument("overrides", nargs="*", help="recipe overrides, e.g. trainer.lr=3e-4 data.files='corpus/*.txt'")
        run.add_argument("--resume", action="store_true", help="continue the run in this run directory exactly")
        run.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
        run.add_argument("--trust-pickle", action="store_true", help=TRUST_HELP)

    evaluate = sub.add_parser("evaluate", help="metrics of a fine-tuned model on a labelled file")
    evaluate.add_argument("model", help="a fine-tuned model folder (RUN_DIR/model)")
    evaluate.add_argument("data", help="data=FILE: a labelled CSV / JSONL / Parquet file with the training columns")
    evaluate.add_argument("--out", help="write the metrics as JSON here (default: print only)")
    evaluate.add_argument("--trust-pickle", action="store_true", help=TRUST_HELP)

    predict = sub.add_parser("predict", help="predict labels for a .txt / .jsonl / .csv file")
    predict.add_argument("model")
    predict.add_argument("inputs")
    predict.add_argument("--out", default="predictions.jsonl")
    predict.add_argument("--column", help="the text column (default: the one the model was trained on)")
    predict.add_argument("--batch-size", type=int, default=32)
    predict.add_argument("--trust-pickle", action="store_true", help=TRUST_HELP)

    for name, text in (("compare", "label-efficiency study: pretrained vs scratch over label budgets and seeds (docs/study.md)"),
                       ("search", "hyperparameter search with Optuna over a fine-tuning recipe (trials=N, space.*=...)")):
        study = sub.add_parser(name, help=text)
        study.add_argument("recipe", help="a study file (compare) or a fine-tuning recipe (search)")
        study.add_argument("overrides", nargs="*", help="recipe and study overrides, e.g. budgets=[0.1,1.0] seeds=3 trials=20")
        study.add_argument("--overwrite", action="store_true", help="start again instead of continuing the study in run_dir")

    report = sub.add_parser("report", help="write report.html / report.md with plots for a run or study directory")
    report.add_argument("run_dir")

    demo = sub.add_parser("demo", help="pretrain on embedded text and digits, fine-tune on a few labels, compare with training from scratch")
    demo.add_argument("--run-dir", default="runs/demo")
    demo.add_argument("--steps", type=int, default=None, help="pretraining steps of each act (default: about 6 minutes in all on 2 CPU cores)")
    demo.add_argument("--images", action="store_true", help="only act 3: SimCLR on the embedded digits, then 5%% of the labels")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)  # overrides may come after --flags too
    if extra and (args.command not in ("pretrain", "finetune", "compare", "search") or any("=" not in item or item.startswith("-") for item in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if getattr(args, "trust_pickle", False):  # read by pretune.trainer.checkpoint.pickle_trusted
        os.environ["PRETUNE_TRUST_PICKLE"] = "1"
    try:
        if args.command in ("pretrain", "finetune"):
            from pretune.run import train

            overrides = [f"kind={args.command}", *args.overrides]
            if args.resume and os.path.isdir(args.recipe):
                overrides = [f"run_dir={args.recipe}", *overrides]
            result = train(args.recipe, overrides, resume=args.resume, overwrite=args.overwrite)
            print(f"model saved to {result.model_dir}")
        elif args.command == "evaluate":
            from pretune.evaluate.metrics import summary_table
            from pretune.predict import evaluate_file

            data = args.data.split("=", 1)[1] if args.data.startswith("data=") else args.data
            scores = evaluate_file(args.model, data, args.out)
            print(summary_table(scores, title=f"{args.model} on {data}"))
        elif args.command == "predict":
            from pretune.predict import predict_file

            count = predict_file(args.model, args.inputs, args.out, args.column, args.batch_size)
            print(f"{count} predictions written to {args.out}")
        elif args.command == "compare":
            from pretune.studies.compare import compare

            result = compare(args.recipe, args.overrides, overwrite=args.overwrite)
            print(f"report: {result.report}")
        elif args.command == "search":
            from pretune.studies.search import search

            found = search(args.recipe, args.overrides, overwrite=args.overwrite)
            print(f"best recipe: {found.best_recipe}")
        elif args.command == "report":
            from pretune.evaluate.report import run_report

            print(f"report: {run_report(args.run_dir)}")
        elif args.command == "demo":
            from pretune.demo import run_demo, run_image_demo

            if args.images:
                run_image_demo(args.run_dir, steps=args.steps)
            else:
                run_demo(args.run_dir, steps=args.steps)
    except PretuneError as exc:
        print(f"pretune: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("pretune: interrupted; the last checkpoint is intact (resume with --resume)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
