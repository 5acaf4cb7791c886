"""``pretune`` command line: ``pretune pretrain RECIPE [key=value ...]``, ``pretune demo``.

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

    pretrain = sub.add_parser("pretrain", help="pretrain a model with a self-supervised objective")
    pretrain.add_argument("recipe", help="a recipe YAML file, or a run directory with --resume")
    pretrain.add_argument("overrides", nargs="*", help="recipe overrides, e.g. trainer.lr=3e-4 data.files='corpus/*.txt'")
    pretrain.add_argument("--resume", action="store_true", help="continue the run in this run directory exactly")
    pretrain.add_argument("--overwrite", action="store_true", help="replace an existing run directory")

    demo = sub.add_parser("demo", help="pretrain a tiny model on the embedded corpus and show what it learned")
    demo.add_argument("--run-dir", default="runs/demo")
    demo.add_argument("--steps", type=int, default=None, help="optimizer steps (default: about 3 minutes of training on 2 CPU cores)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)  # overrides may come after --flags too
    if extra and (args.command != "pretrain" or any("=" not in item or item.startswith("-") for item in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        if args.command == "pretrain":
            from pretune.run import train

            overrides = list(args.overrides)
            if args.resume and os.path.isdir(args.recipe):
                overrides = [f"run_dir={args.recipe}", *overrides]
            result = train(args.recipe, overrides, resume=args.resume, overwrite=args.overwrite)
            print(f"model saved to {result.model_dir}")
        elif args.command == "demo":
            from pretune.demo import run_demo

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
