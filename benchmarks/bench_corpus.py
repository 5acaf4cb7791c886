"""Corpus pipeline for large runs (issue 17 part 7): prepare a large corpus, start again, resume at 90%.

    python benchmarks/bench_corpus.py                  # 256 MB corpus: the table in BENCHMARKS.md
    python benchmarks/bench_corpus.py --size-mb 1024   # the issue's 1 GB (about 3x longer)
    python benchmarks/bench_corpus.py --quick          # 50 MB, a few minutes

The corpus: the embedded Python docstrings (``load_stdlib_docstrings``, 1.6 MB of English and code)
repeated, each copy in its own seeded order of documents, blank-line separated, in 64 MB shards
(four shards at least), written once into ``--work`` and reused by every phase.  Real text with
real lengths, deterministic and offline; its vocabulary is that of 1.6 MB, so it measures bytes
per second, not what a tokenizer learns.

Every phase runs in its own child process on a quiet machine (``common.run_measured``), reporting
its own peak RSS (``VmHWM``) and the foreign CPU load while it ran:

- ``cold``: ``pretune pretrain`` (``recipes/text-mlm.yaml``, BERT tiny, one step) on the corpus with
  an empty cache: read, tokenizer training (``data.tokenizer.train_documents``: the corpus repeats
  its first 1.6 MB), tokenise and pack, then the first step.  Each function of the data path is timed
  where ``build_text_data`` calls it.  ``cold-streaming``: the same with ``data.streaming=true``.
- ``second``: the same recipe in a new run directory, same cache: start-up until the first step.
  A hit is confirmed by the cache: no Arrow file was written.
- ``resume``: the second run's checkpoint with its progress set to 90% of the epoch (the weights and
  optimizer are step 1's: what resuming costs does not depend on their values), resumed to its first step.
- ``hf-map``: what ``run_mlm.py`` does: ``load_dataset("text")`` by lines, ``map(tokenize, batched,
  num_proc=2)`` with special tokens and masks, ``map(group_texts, num_proc=2)`` into the same block size,
  with pretune's tokenizer.  ``hf-skip``: the Trainer's resume (``ignore_data_skip=False``) calls
  accelerate's ``skip_first_batches``: on the map-style blocks it skips indices (measured to the first
  batch); on a streamed ``IterableDataset`` it fetches and collates every skipped batch, timed over
  ``--skip-sample`` batches and extrapolated to 90% of the epoch (an estimate, labelled as such).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

from common import MARK, bench_env, check_source, report_header, report_result, run_measured, wait_for_quiet, write_results

HERE = Path(__file__).resolve().parent
RECIPE = HERE.parent / "recipes" / "text-mlm.yaml"
BLOCK, BATCH = 128, 32
SHARD_MB = 64
TOKENIZER_DOCUMENTS = 20_000  # documents the tokenizer is trained on: more than one copy of the docstrings


# ---------------------------------------------------------------------------- the corpus


def write_corpus(folder: Path, size_mb: int, seed: int = 0) -> dict:
    """``size_mb`` MiB of docstrings in seeded document orders, in shards; reused when already written."""
    manifest = folder / ".manifest.json"  # hidden: data.files=folder reads every other file
    wanted = {"size_mb": size_mb, "seed": seed}
    if manifest.exists() and json.loads(manifest.read_text())["wanted"] == wanted:
        return json.loads(manifest.read_text())
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    from pretune.data.builtin import load_stdlib_docstrings

    docs = list(load_stdlib_docstrings()["text"])
    shard_bytes = min(SHARD_MB, size_mb // 4) * 2**20
    rng, written, shards, out = random.Random(seed), 0, 0, None
    began = time.perf_counter()
    while written < size_mb * 2**20:
        if out is None or out.tell() >= shard_bytes:
            out = open(folder / f"part-{shards:03d}.txt", "wb")
            shards += 1
        data = ("\n\n".join(docs[i] for i in rng.sample(range(len(docs)), len(docs))) + "\n\n").encode()
        out.write(data)
        written += len(data)
    out.close()
    info = {"wanted": wanted, "bytes": written, "mb": round(written / 2**20, 1), "shards": shards,
            "write_s": round(time.perf_counter() - began, 1), "files": sorted(str(p) for p in folder.glob("*.txt"))}
    manifest.write_text(json.dumps(info))
    return info


# ---------------------------------------------------------------------------- children


def pretune_overrides(work: Path, run: str, cache: str, streaming: bool) -> list[str]:
    return [f"run_dir={work / run}", f"data.files={work / 'corpus'}", f"data.cache_dir={work / cache}",
            f"data.streaming={str(streaming).lower()}", f"data.tokenizer.train_documents={TOKENIZER_DOCUMENTS}",
            f"data.block_size={BLOCK}", "backbone.size=tiny", f"trainer.batch_size={BATCH}", "trainer.max_steps=1",
            "trainer.eval_batches=2", "trainer.progress=false", "trainer.tensorboard=false", "trainer.save_every=1000000"]


def child_pretune(args: argparse.Namespace) -> None:
    """One ``pretune pretrain`` run; times each data function where ``build_text_data`` calls it, and the first step."""
    import pretune
    import pretune.data.text as text
    from pretune.trainer import loop

    spent: dict[str, float] = {}

    def timed(name, fn):
        def wrapper(*a, **k):
            began = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - began
        return wrapper

    for name in ("load_documents", "get_tokenizer", "pack_blocks", "signature"):
        setattr(text, name, timed(name, getattr(text, name)))
    first_step: list[float] = []
    step = loop.Trainer.step

    def first(self, window, at):
        first_step.append(first_step[0] if first_step else time.time())
        return step(self, window, at)

    loop.Trainer.step = first
    work = Path(args.work)
    cache = work / args.cache
    before = set(cache.rglob("*.arrow")) if cache.exists() else set()
    if args.resume:
        result = pretune.train(work / args.run, [f"trainer.max_steps={args.resume + 1}"], resume=True)
    else:
        result = pretune.train(str(RECIPE), pretune_overrides(work, args.run, args.cache, args.streaming))
    start = next(json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines() if '"start"' in line)
    report_result({"first_step_at": first_step[0], "data_s": {k: round(v, 2) for k, v in spent.items()},
                   "new_arrow_files": len(set(cache.rglob("*.arrow")) - before), "examples": start.get("examples")})


def tokenize(batch: dict, tokenizer) -> dict:
    """``run_mlm.py``'s ``tokenize_function`` (``line_by_line=False``): special tokens and their mask."""
    return tokenizer(batch["text"], return_special_tokens_mask=True)


def group_texts(examples: dict) -> dict:
    """``run_mlm.py``'s ``group_texts``: concatenate a map batch, cut it into blocks, drop the remainder."""
    concatenated = {k: [t for ex in examples[k] for t in ex] for k in examples}
    total = len(concatenated[next(iter(examples))]) // BLOCK * BLOCK
    return {k: [t[i : i + BLOCK] for i in range(0, total, BLOCK)] for k, t in concatenated.items()}


def hf_blocks(args: argparse.Namespace):
    """``run_mlm.py``'s data path with ``preprocessing_num_workers=2``: (tokenizer, files, blocks, seconds per stage)."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.tokenizer)
    files = sorted(glob.glob(str(Path(args.work) / "corpus" / "*.txt")))
    began = time.perf_counter()
    raw = datasets.load_dataset("text", data_files=files, split="train", cache_dir=str(Path(args.work) / "cache-hf"))
    read = time.perf_counter()
    tokens = raw.map(tokenize, batched=True, num_proc=2, remove_columns=["text"], fn_kwargs={"tokenizer": tokenizer})
    tokenized = time.perf_counter()
    blocks = tokens.map(group_texts, batched=True, num_proc=2)
    seconds = {"read_s": round(read - began, 2), "tokenize_s": round(tokenized - read, 2),
               "group_s": round(time.perf_counter() - tokenized, 2)}
    return tokenizer, files, blocks, seconds


def child_hf_map(args: argparse.Namespace) -> None:
    _, _, blocks, seconds = hf_blocks(args)
    report_result({**seconds, "blocks": len(blocks)})


def child_hf_skip(args: argparse.Namespace) -> None:
    """accelerate's ``skip_first_batches``, as the Trainer calls it on resume, on the map-style blocks and on a stream."""
    import datasets
    import torch
    import transformers
    from accelerate import skip_first_batches
    from torch.utils.data import DataLoader, RandomSampler

    tokenizer, files, blocks, _ = hf_blocks(args)  # hf-map's cache
    collator = transformers.DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15)
    skip = int(0.9 * (len(blocks) // BATCH))
    loader = DataLoader(blocks, batch_size=BATCH, sampler=RandomSampler(blocks, generator=torch.Generator().manual_seed(0)),
                        collate_fn=collator)
    began = time.perf_counter()
    next(iter(skip_first_batches(loader, skip)))
    indices_s = time.perf_counter() - began

    stream = datasets.load_dataset("text", data_files=files, split="train", streaming=True)
    stream = stream.map(tokenize, batched=True, remove_columns=["text"], fn_kwargs={"tokenizer": tokenizer}).map(group_texts, batched=True)
    sample = min(skip, args.skip_sample)
    began = time.perf_counter()
    next(iter(skip_first_batches(DataLoader(stream, batch_size=BATCH, collate_fn=collator), sample)))
    sample_s = time.perf_counter() - began
    report_result({"skip_batches": skip, "map_style_skip_s": round(indices_s, 2), "stream_sample_batches": sample,
                   "stream_sample_s": round(sample_s, 2), "stream_skip_s": round(sample_s * skip / sample, 1),
                   "stream_skip_is_estimate": sample < skip})


# ---------------------------------------------------------------------------- the parent


def run_child(args: argparse.Namespace, phase: str, *extra: str) -> dict:
    """One phase in a fresh process on a quiet machine; its RESULT line plus wall time, CPU and load."""
    wait_for_quiet()
    launched = time.time()
    done = run_measured([sys.executable, __file__, "--child", phase, "--work", str(args.work), *extra], bench_env())
    lines = [line for line in done.stdout.splitlines() if line.startswith(MARK)]
    if done.returncode != 0 or not lines:
        sys.exit(f"{phase} failed:\n{done.stderr[-3000:]}")
    result = json.loads(lines[0][len(MARK):])
    result.update({"wall_s": round(done.wall_s, 1), "cpu_s": round(done.cpu_s, 1), "foreign_load": round(done.foreign_load, 3),
                   "peak_rss_mb": result.pop("own_peak_rss_mb"), "peak_rss_any_process_mb": round(done.peak_rss_mb, 1)})
    if "first_step_at" in result:
        result["to_first_step_s"] = round(result.pop("first_step_at") - launched, 1)
    print(f"{phase}: {json.dumps(result)}", flush=True)
    return result


def set_progress(run_dir: Path, step: int) -> None:
    """Move the run's only checkpoint to ``step`` of epoch 0 (progress, schedule, folder name)."""
    import torch

    (source,) = sorted((run_dir / "checkpoints").glob("step-*"))
    state = torch.load(source / "state.pt", weights_only=True)
    state["progress"].update(step=step, position=step, epoch=0)
    for schedule in state["schedulers"].values():
        schedule.update(last_epoch=step, _step_count=step + 1)
    torch.save(state, source / "state.pt")
    source.rename(source.with_name(f"step-{step:08d}"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 50 MB corpus")
    parser.add_argument("--size-mb", type=int, default=256)
    parser.add_argument("--work", type=Path, default=Path("/tmp/pretune-bench-corpus"))
    parser.add_argument("--keep", action="store_true", help="keep the corpus and caches in --work")
    parser.add_argument("--skip-sample", type=int, default=2000, help="streamed batches the Trainer's skip is timed on")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--run", default="cold", help=argparse.SUPPRESS)
    parser.add_argument("--cache", default="cache", help=argparse.SUPPRESS)
    parser.add_argument("--streaming", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--resume", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        {"pretune": child_pretune, "hf-map": child_hf_map, "hf-skip": child_hf_skip}[args.child](args)
        return
    size = 50 if args.quick else args.size_mb
    report = report_header() | {"workload": {"recipe": "recipes/text-mlm.yaml", "backbone": "bert tiny", "block_size": BLOCK,
                                             "batch_size": BATCH, "tokenizer_documents": TOKENIZER_DOCUMENTS}}
    for stale in ("cold", "cold-streaming", "second", "cache", "cache-streaming", "cache-hf"):
        shutil.rmtree(args.work / stale, ignore_errors=True)
    corpus = write_corpus(args.work / "corpus", size)
    report["corpus"] = {k: v for k, v in corpus.items() if k != "files"}
    mb = corpus["bytes"] / 2**20
    phases = report["phases"] = {}
    phases["cold"] = run_child(args, "pretune", "--run", "cold")
    phases["cold-streaming"] = run_child(args, "pretune", "--run", "cold-streaming", "--cache", "cache-streaming", "--streaming")
    phases["second"] = run_child(args, "pretune", "--run", "second")
    steps = phases["second"]["examples"] // BATCH
    at = int(0.9 * steps)
    set_progress(args.work / "second", at)
    phases["resume"] = run_child(args, "pretune", "--run", "second", "--resume", str(at))
    tokenizer = str(args.work / "cold" / "tokenizer")
    phases["hf-map"] = run_child(args, "hf-map", "--tokenizer", tokenizer)
    phases["hf-skip"] = run_child(args, "hf-skip", "--tokenizer", tokenizer, "--skip-sample", str(args.skip_sample))

    def rate(seconds: float) -> float:
        return round(mb / seconds, 2)

    cold, hf = phases["cold"], phases["hf-map"]
    report["summary"] = {
        "corpus_mb": round(mb, 1),
        "pretune_tokenize_pack_mb_s": rate(cold["data_s"]["pack_blocks"]),
        "pretune_prepare_mb_s": rate(sum(v for k, v in cold["data_s"].items() if k != "signature")),
        "pretune_content_hash_s": cold["data_s"].get("signature"),
        "pretune_cold_to_first_step_s": cold["to_first_step_s"],
        "pretune_peak_rss_mb": cold["peak_rss_mb"],
        "pretune_streaming_peak_rss_mb": phases["cold-streaming"]["peak_rss_mb"],
        "pretune_streaming_tokenize_pack_mb_s": rate(phases["cold-streaming"]["data_s"]["pack_blocks"]),
        "second_run_to_first_step_s": phases["second"]["to_first_step_s"],
        "second_run_cache_hit": phases["second"]["new_arrow_files"] == 0,
        "resume_at_90pct_step": at, "steps_per_epoch": steps,
        "resume_to_first_step_s": phases["resume"]["to_first_step_s"],
        "resume_cache_hit": phases["resume"]["new_arrow_files"] == 0,
        "hf_map_tokenize_group_mb_s": rate(hf["tokenize_s"] + hf["group_s"]),
        "hf_map_prepare_mb_s": rate(hf["read_s"] + hf["tokenize_s"] + hf["group_s"]),
        "hf_map_peak_rss_mb_main": hf["peak_rss_mb"], "hf_map_peak_rss_mb_any_process": hf["peak_rss_any_process_mb"],
        "hf_trainer_skip_map_style_s": phases["hf-skip"]["map_style_skip_s"],
        "hf_trainer_skip_streaming_s": phases["hf-skip"]["stream_skip_s"],
        "hf_trainer_skip_streaming_is_estimate": phases["hf-skip"]["stream_skip_is_estimate"],
    }
    check_source(report)
    print(json.dumps(report["summary"], indent=2))
    print(f"wrote {write_results('corpus', args.quick, report)}")
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
