"""``pretune`` command line: pretrain, finetune, evaluate, predict, demo.

    pretune pretrain recipes/text-mlm.yaml data.files='corpus/*.txt' run_dir=runs/mlm
    pretune finetune recipes/text-classify.yaml model=runs/mlm/model data.train=train.csv strategy=linear-probe
    pretune evaluate runs/clf/model data=test.csv
    pretune predict runs/clf/model input.jsonl --out predictions.jsonl

Errors caused by input (recipe, data, checkpoints) print one line and exit with the error's code
(2-6, see :mod:`pretune.errors`); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from pretune.errors import PretuneError


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

    evaluate = sub.add_parser("evaluate", help="metrics of a fine-tuned model on a labelled file")
    evaluate.add_argument("model", help="a fine-tuned model folder (RUN_DIR/model)")
    evaluate.add_argument("data", help="data=FILE: a labelled CSV / JSONL / Parquet file with the training columns")
    evaluate.add_argument("--out", help="write the metrics as JSON here (default: print only)")

    predict = sub.add_parser("predict", help="predict labels for a .txt / .jsonl / .csv file")
    predict.add_argument("model")
    predict.add_argument("inputs")
    predict.add_argument("--out", default="predictions.jsonl")
    predict.add_argument("--column", help="the text column (default: the one the model was trained on)")
    predict.add_argument("--batch-size", type=int, default=32)

    demo = sub.add_parser("demo", help="pretrain on embedded text and digits, fine-tune on a few labels, compare with training from scratch")
    demo.add_argument("--run-dir", default="runs/demo")
    demo.add_argument("--steps", type=int, default=None, help="pretraining steps of each act (default: about 4 minutes in all on 2 CPU cores)")
    demo.add_argument("--images", action="store_true", help="only act 3: SimCLR on the embedded digits, then 5%% of the labels")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)  # overrides may come after --flags too
    if extra and (args.command not in ("pretrain", "finetune") or any("=" not in item or item.startswith("-") for item in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
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
