"""Pretraining speed: pretune against the Hugging Face Trainer, same model, same packed data, same run.

    python benchmarks/bench_pretrain.py            # full size: the table in BENCHMARKS.md
    python benchmarks/bench_pretrain.py --quick    # smoke size, a minute or two
    python benchmarks/bench_pretrain.py --device cuda --contenders hf-bf16,pretune   # on a GPU (gpu_check.sh)

Workloads: MLM on BERT L4/H256/A4 at seq 128 (batch 32) and seq 512 (batch 8); CLM on GPT-2
L4/H256/A4 at seq 128 (batch 32), 256 (batch 16) and 512 (batch 8); ``--size small|base`` and
``--batch`` scale the model and the step (``bench_scaling.py`` does).  Every one against the Trainer with
``DataCollatorForLanguageModeling`` in fp32 (its default) and with ``bf16=True``, and against ``hand``:
the plain PyTorch loop a careful user would write (``run_hand``: the same model and collator, the
vocabulary projection only at masked positions, fused AdamW, autocast in pretune's precision).  The headline
ratio is against the *faster* Trainer configuration of the two, measured in this run (bf16 wins on
CPUs with AVX512-BF16 or AMX; on an AVX2-only CPU bf16 is emulated and fp32 wins).  Each contender
runs in its own subprocess after the machine is quiet (``common.run_alternating``: a run that
other processes disturbed is repeated); contenders alternate, several repetitions, and the report
gives medians, min-max, the foreign CPU load during each run and each run's peak RSS.  Throughput
is measured between the end of warm-up step W and the last step (steady state, no start-up).
Quality at equal steps: the mean training loss over the last quarter of the steps of each contender.
MFU = model FLOPs (same formula for both contenders: 6N per token + attention + output projection
at the positions that carry a loss) / time / GEMM peak measured in this run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from common import gemm_peaks, load_summary, peaks_text, report_result, run_alternating, trainer_clock

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

WORKLOADS = {
    "mlm": {"task": "mlm", "backbone": "bert", "block": 128, "batch": 32},
    "mlm512": {"task": "mlm", "backbone": "bert", "block": 512, "batch": 8},
    "clm128": {"task": "clm", "backbone": "gpt2", "block": 128, "batch": 32},
    "clm": {"task": "clm", "backbone": "gpt2", "block": 256, "batch": 16},
    "clm512": {"task": "clm", "backbone": "gpt2", "block": 512, "batch": 8},
    "clm1024": {"task": "clm", "backbone": "gpt2", "block": 1024, "batch": 4},
}
# contender name -> (tool, precision)
CONTENDERS = [("hf-fp32", "hf", "fp32"), ("hf-bf16", "hf", "bf16"), ("hand", "hand", "auto"), ("pretune", "pretune", "auto")]
EXTRA_CONTENDERS = [("hf-fp16", "hf", "fp16")]  # only when named: GPUs without bf16 tensor cores (T4, V100)


def model_overrides(w: dict, size: str = "mini") -> list[str]:
    return [f"task={w['task']}", f"backbone.name={w['backbone']}", f"backbone.size={size}",
            f"data.block_size={w['block']}", "data.validation=0", "data.tokenizer.vocab_size=8000"]


def build_data(workload: str, cache: Path) -> Path:
    """Pack the embedded corpus once; both contenders read the same blocks and tokenizer."""
    from pretune.recipe import load_recipe
    from pretune.run import compose, data_reader

    out = cache / workload
    if (out / "blocks").exists():
        return out
    recipe = load_recipe(None, model_overrides(WORKLOADS[workload]))
    data = data_reader(compose(recipe), recipe)(None, None)  # the run's own reader: same tokenizer and blocks
    data.train.save_to_disk(str(out / "blocks"))
    data.tokenizer.save_pretrained(str(out / "tokenizer"))
    return out


def run_pretune(workload: str, data_dir: Path, steps: int, warmup: int, precision: str, size: str = "mini",
                batch: int | None = None) -> dict:
    import pretune

    w = {**WORKLOADS[workload], "batch": batch or WORKLOADS[workload]["batch"]}
    with tempfile.TemporaryDirectory() as tmp:
        result = pretune.train(None, [
            *model_overrides(w, size), f"run_dir={tmp}/run", f"data.tokenizer.path={data_dir / 'tokenizer'}",
            f"trainer.batch_size={w['batch']}", f"trainer.max_steps={steps}", "trainer.log_every=1",
            f"trainer.precision={precision}", "trainer.progress=false", "trainer.tensorboard=false",
            f"trainer.save_every={steps + 1}", "trainer.warmup=0.1", "trainer.lr=5e-4",
        ])
        rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    seconds = train[-1]["time"] - train[warmup - 1]["time"]
    tokens = (steps - warmup) * w["batch"] * w["block"]
    return {"seconds": seconds, "tokens_per_s": tokens / seconds, "final_loss": tail_mean([r["loss"] for r in train]),
            "mfu_logged": statistics.median(r["mfu"] for r in train[warmup:])}


def hf_contender(w: dict, data_dir: Path, size: str):
    """(model, collator, packed blocks) of the Trainer and hand-loop contenders: Transformers' own BERT or
    GPT-2 of pretune's ``size`` preset, its language-modelling collator (15% masking, 80/10/10 for MLM)."""
    import datasets
    import torch
    import transformers
    from pretune.backbones.transformers import SIZES

    layers, hidden, heads = SIZES[size]
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(data_dir / "tokenizer"))
    blocks = datasets.load_from_disk(str(data_dir / "blocks"))
    torch.manual_seed(0)
    if w["task"] == "mlm":
        config = transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                                         num_attention_heads=heads, intermediate_size=4 * hidden, pad_token_id=tokenizer.pad_token_id,
                                         max_position_embeddings=max(512, w["block"]))
        return (transformers.BertForMaskedLM(config),
                transformers.DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=0.15), blocks)
    config = transformers.GPT2Config(vocab_size=len(tokenizer), n_embd=hidden, n_layer=layers, n_head=heads, n_positions=1024)
    return transformers.GPT2LMHeadModel(config), transformers.DataCollatorForLanguageModeling(tokenizer, mlm=False), blocks


def run_hf(workload: str, data_dir: Path, steps: int, warmup: int, precision: str, device: str = "cpu", size: str = "mini",
           batch: int | None = None) -> dict:
    import transformers

    w = {**WORKLOADS[workload], "batch": batch or WORKLOADS[workload]["batch"]}
    model, collator, blocks = hf_contender(w, data_dir, size)
    times: list[float] = []
    losses: list[float] = []

    clock = trainer_clock(times, losses, cuda=device == "cuda")

    with tempfile.TemporaryDirectory() as tmp:
        args = transformers.TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=w["batch"], max_steps=steps, learning_rate=5e-4,
            warmup_steps=max(1, steps // 10), lr_scheduler_type="cosine", weight_decay=0.01, save_strategy="no",
            logging_steps=1, report_to="none", disable_tqdm=True, use_cpu=device == "cpu", bf16=precision == "bf16",
            fp16=precision == "fp16",
            dataloader_num_workers=0, seed=0,
        )
        trainer = transformers.Trainer(model=model, args=args, train_dataset=blocks, data_collator=collator, callbacks=[clock])
        trainer.train()
    seconds = times[-1] - times[warmup - 1]
    tokens = (steps - warmup) * w["batch"] * w["block"]
    return {"seconds": seconds, "tokens_per_s": tokens / seconds, "final_loss": tail_mean(losses)}


def run_hand(workload: str, data_dir: Path, steps: int, warmup: int, precision: str, size: str = "mini",
             batch: int | None = None) -> dict:
    """The strongest plain PyTorch loop a careful user would write: the same model class and collator as the
    Trainer, the vocabulary projection only at the masked positions (MLM), fused AdamW (decay on matrices),
    the same cosine schedule, clipping at 1.0, autocast in the precision pretune picks on this machine."""
    import torch
    import transformers
    from pretune.trainer.precision import DTYPES, resolve

    w = {**WORKLOADS[workload], "batch": batch or WORKLOADS[workload]["batch"]}
    precision = resolve(precision, torch.device("cpu"))
    model, collator, blocks = hf_contender(w, data_dir, size)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
                                  lr=5e-4, fused=True)
    schedule = transformers.get_cosine_schedule_with_warmup(optimizer, max(1, steps // 10), steps)
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(0)).tolist()
    model.train()
    times: list[float] = []
    losses: list[float] = []
    for step in range(steps):
        rows = [blocks[i] for i in order[step * w["batch"] % len(order):][:w["batch"]]]
        inputs = collator([{"input_ids": r["input_ids"]} for r in rows])
        with torch.autocast("cpu", DTYPES[precision], enabled=precision != "fp32"):
            if w["task"] == "mlm":
                labels = inputs["labels"]
                states = model.bert(input_ids=inputs["input_ids"]).last_hidden_state
                selected = labels != -100
                logits = model.cls(states[selected])
                loss = torch.nn.functional.cross_entropy(logits.float(), labels[selected])
            else:
                loss = model(input_ids=inputs["input_ids"], labels=inputs["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
        times.append(time.perf_counter())
    seconds = times[-1] - times[warmup - 1]
    tokens = (steps - warmup) * w["batch"] * w["block"]
    return {"seconds": seconds, "tokens_per_s": tokens / seconds, "final_loss": tail_mean(losses)}


def tail_mean(losses: list[float]) -> float:
    """Mean training loss over the last quarter of the steps: the quality check at equal steps."""
    tail = losses[-max(1, len(losses) // 4):]
    return sum(tail) / len(tail)


def model_flops_per_step(workload: str, vocab: int, size: str = "mini", batch: int | None = None) -> float:
    from types import SimpleNamespace

    from pretune.backbones.transformers import SIZES
    from pretune.trainer.flops import transformer_training_flops

    w = {**WORKLOADS[workload], "batch": batch or WORKLOADS[workload]["batch"]}
    layers, hidden, _ = SIZES[size]
    config = SimpleNamespace(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=4 * hidden, vocab_size=vocab,
                             model_type=w["backbone"])
    tokens = w["batch"] * w["block"]
    predicted = int(0.15 * tokens * (w["block"] - 1) / w["block"]) if w["task"] == "mlm" else tokens
    return transformer_training_flops(config, tokens, w["block"], predicted)


def child(args: argparse.Namespace) -> None:
    """One contender, one repetition, in its own process; prints a JSON line."""
    data_dir = Path(args.data_dir)
    if args.tool == "hf":
        result = run_hf(args.workload, data_dir, args.steps, args.warmup, args.precision, args.device, args.size, args.batch)
    elif args.tool == "hand":
        result = run_hand(args.workload, data_dir, args.steps, args.warmup, args.precision, args.size, args.batch)
    else:  # pretune trains on the GPU whenever one is visible (the parent hides it for --device cpu)
        result = run_pretune(args.workload, data_dir, args.steps, args.warmup, args.precision, args.size, args.batch)
    report_result(result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke size for CI")
    parser.add_argument("--workloads", default="mlm,mlm512,clm,clm512", help=f"of {', '.join(WORKLOADS)}")
    parser.add_argument("--contenders", default=",".join(name for name, _, _ in CONTENDERS))
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workload", help=argparse.SUPPRESS)
    parser.add_argument("--tool", help=argparse.SUPPRESS)
    parser.add_argument("--precision", help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--size", default="mini", help="backbone.size of every contender's model: mini (L4/H256), "
                        "small (L4/H512) or base (L12/H768)")
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (default: the workload's)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where every contender trains")
    parser.add_argument("--out", default=None, help="results JSON (default: results/pretrain[-cuda][-quick].json)")
    parser.add_argument("--peak-size", type=int, default=None, help="GEMM size of the peak measurement (default: 2048 CPU, 8192 GPU)")
    args = parser.parse_args()
    steps = args.steps or (12 if args.quick else 60)
    warmup = args.warmup or (4 if args.quick else 10)
    if args.child:
        args.steps, args.warmup = steps, warmup
        return child(args)

    import torch
    import transformers

    repeats = args.repeats or (1 if args.quick else 3)
    RESULTS.mkdir(exist_ok=True)
    cache = Path(tempfile.mkdtemp(prefix="pretune-bench-"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           **({"CUDA_VISIBLE_DEVICES": ""} if args.device == "cpu" else {})}  # --device cpu: no contender finds a GPU
    contenders = [c for c in CONTENDERS + EXTRA_CONTENDERS if c[0] in args.contenders.split(",")]
    peak = gemm_peaks([precision for _, _, precision in contenders], args.device, args.peak_size)
    from pretune.trainer.precision import resolve

    ours_precision = resolve("auto", torch.device(args.device))  # what pretune's default picks on this CPU / GPU
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "device": args.device,
              "machine": machine + (f", {torch.cuda.get_device_name()}" if args.device == "cuda" else ""),
              "torch": torch.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads(),
              "steps": steps, "warmup": warmup, "repeats": repeats, "size": args.size, "peak_gflops": {k: v / 1e9 for k, v in peak.items()}, "rows": []}
    for workload in args.workloads.split(","):
        data_dir = build_data(workload, cache)
        from transformers import AutoTokenizer

        vocab = len(AutoTokenizer.from_pretrained(str(data_dir / "tokenizer")))
        flops = model_flops_per_step(workload, vocab, args.size, args.batch)
        batch = args.batch or WORKLOADS[workload]["batch"]
        runs = run_alternating(
            contenders, repeats,
            lambda tool, precision: [__file__, "--child", "--workload", workload, "--tool", tool, "--precision", precision,
                                     "--data-dir", str(data_dir), "--steps", str(steps), "--warmup", str(warmup),
                                     "--device", args.device, "--size", args.size,
                                     *(["--batch", str(args.batch)] if args.batch else [])],
            env, lambda name, rep, r: f"{workload} {name} rep {rep}: {r['tokens_per_s']:.0f} tokens/s, loss {r['final_loss']:.3f}")
        ours = statistics.median(r["tokens_per_s"] for r in runs["pretune"])
        loads = load_summary(runs)
        medians = {name: statistics.median(r["tokens_per_s"] for r in runs[name]) for name, _, _ in contenders}
        strongest = max((name for name, tool, _ in contenders if tool == "hf"), key=medians.get, default=None)
        for name, _, precision in contenders:
            speeds = [r["tokens_per_s"] for r in runs[name]]
            used = ours_precision if precision == "auto" else precision
            report["rows"].append({
                "workload": workload, "seq": WORKLOADS[workload]["block"], "batch": batch, "size": args.size,
                "contender": name, "precision": used,
                "tokens_per_s": medians[name], "min": min(speeds), "max": max(speeds),
                "final_loss": statistics.median(r["final_loss"] for r in runs[name]),
                "mfu": medians[name] * flops / (batch * WORKLOADS[workload]["block"]) / peak[used],
                "pretune_speedup": ours / medians[name], "strongest": name == strongest,
                "foreign_load": loads[name]["max_foreign_load"], "peak_rss_mb": loads[name]["median_peak_rss_mb"],
            })
    name = f"pretrain{'-cuda' if args.device == 'cuda' else ''}{'-quick' if args.quick else ''}.json"
    Path(args.out or RESULTS / name).write_text(json.dumps(report, indent=2))
    print(table(report))


def table(report: dict) -> str:
    lines = [f"{report['date']} · {report['machine']} · torch {report['torch']} · transformers {report['transformers']} · "
             f"{report['steps']} steps ({report['warmup']} warm-up) × {report['repeats']} repeats · {peaks_text(report)}", "",
             "| workload | contender | tokens/s (median) | min–max | MFU | final loss | pretune ÷ this | peak RSS MB | "
             "foreign load (max) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        ratio = (f"**{r['pretune_speedup']:.2f}×** (the faster Trainer run)" if r.get("strongest") else f"{r['pretune_speedup']:.2f}×")
        lines.append(f"| {r['workload']} | {r['contender']} ({r.get('precision', '')}) | {r['tokens_per_s']:.0f} | "
                     f"{r['min']:.0f}–{r['max']:.0f} | {r['mfu']:.1%} | {r['final_loss']:.3f} | {ratio} | "
                     f"{r.get('peak_rss_mb', float('nan')):.0f} | {r.get('foreign_load', float('nan')):.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
