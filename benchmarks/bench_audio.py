"""Audio fine-tuning speed: pretune against the Hugging Face Trainer, Whisper tiny.en's encoder, same clips, same run.

    python benchmarks/bench_audio.py            # full size: 40 steps (8 warm-up), hf-30s 12 (4) x 3 repeats
    python benchmarks/bench_audio.py --quick    # smoke size: 10 steps (3 warm-up), hf-30s 4 (1) x 1 repeat

Workload: spoken-language identification, 5 classes (en, es, fr, it, ru), on the Asterisk voice
prompts in ``--data`` (default /tmp/lid/train, one sub-folder per language, 8 kHz WAV): a fixed
subset of 1,024 non-silent clips, stratified by language (``stratified_split``, seed 0), listed in a
``path,label`` CSV manifest that every contender reads.  Each clip is decoded with soundfile, mixed
to mono, resampled to 16 kHz with soxr ("HQ"), centre-cropped (or padded with silence at the end)
to 1.0 s and turned into Whisper's 80-bin log-mel features; features are computed once before
training in every contender (not timed).  Model: Whisper tiny.en's encoder (``--whisper``, a
Hugging Face folder written by ``pretune convert --packaged-whisper``; d 384, 4 layers, 6 heads,
feed-forward 1536) plus a new classifier, full fine-tuning: batch 32, AdamW lr 1e-4 on every
parameter (``trainer.head_lr=null``), weight decay 0.01 on matrices, linear schedule with 10%
warm-up, clipping at 1.0, no dropout, no augmentation, fp32 (plus bf16 contenders for pretune and
hf-sliced on a CPU with ``avx512_bf16``).

- ``pretune``: ``pretune.train("recipes/audio-classify.yaml", ...)``, ``model=`` the Whisper folder:
  a 1 s clip is 100 frames, 50 positions (the first 50 rows of Whisper's position table).
- ``hf-30s``: what a Trainer user gets by default: ``WhisperForAudioClassification.from_pretrained``
  (encoder + projector 384->256 + classifier, mean over time) and ``WhisperFeatureExtractor``,
  which pads every clip to 30 s (3,000 frames, 1,500 positions): 47x the FLOPs per clip.
- ``hf-sliced``: the same Trainer and model cut to 1 s as pretune cuts it
  (``max_source_positions=50``, position table sliced to its first 50 rows, features
  ``[B, 80, 100]``): the same FLOPs as pretune, so the difference is trainer overhead.

Throughput is steady state: wall time from the end of warm-up step W to the end of the last step
(pretune: the ``time`` stamps of its per-step metrics rows; Trainer: ``time.perf_counter()`` in
``on_step_end``); clips/s = (steps - W) x 32 / that time.  MFU uses one formula for every
contender: training FLOPs = 3 x forward, forward per clip = the two convolutions
(2 x in x out x 3 x output frames each) + per layer 2 x (4d^2 + 2 d ffn) x positions + attention
4 x positions^2 x d (the classifiers, < 0.5%, are not counted), divided by the GEMM peak measured
in this run before and after the contenders (the higher; bf16 peak for bf16 contenders).  Quality
at equal steps: the mean training loss of the last quarter of the steps (a check that every
contender trains; hf-30s runs fewer steps, so its schedule differs).  Each contender runs in its
own subprocess; contenders alternate, several repetitions, medians and min-max.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import statistics
import tempfile
from pathlib import Path

from common import (trainer_clock, bench_env, check_source, load_summary, pretune_step_times, report_header, report_result, run_alternating,
                    spread, steady_seconds, tail_mean, write_results)

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "audio-classify.yaml"
CLIPS, SECONDS, RATE, BATCH, LR, WEIGHT_DECAY, WARMUP, SEED = 1024, 1.0, 16000, 32, 1e-4, 0.01, 0.1, 0
FRAMES = {"pretune": 100, "hf-sliced": 100, "hf-30s": 3000}  # mel frames per clip each contender runs
HAS_BF16 = "avx512_bf16" in Path("/proc/cpuinfo").read_text()
# contender name -> (tool, precision)
CONTENDERS = [("pretune", "pretune", "fp32"), ("hf-sliced", "hf-sliced", "fp32"), ("hf-30s", "hf-30s", "fp32")]
if HAS_BF16:
    CONTENDERS += [("pretune-bf16", "pretune", "bf16"), ("hf-sliced-bf16", "hf-sliced", "bf16")]


def write_manifest(data: Path, path: Path) -> dict:
    """``path,label`` CSV of CLIPS clips of ``data`` (one sub-folder per class), stratified by class, seed 0.
    Silent clips (Asterisk's ``silence/*`` prompts) are left out first: pretune would skip them, the Trainer not."""
    import numpy as np

    from pretune.data.audio import SILENCE_PEAK
    from pretune.data.labelled import stratified_split

    found = sorted(data.glob("*/*.wav"))
    clips = [p for p in found if np.abs(load_wave(str(p))).max() >= SILENCE_PEAK]
    labels = [p.parent.name for p in clips]
    chosen = stratified_split(labels, CLIPS / len(clips), SEED)[1]
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        writer.writerows([str(clips[i]), labels[i]] for i in chosen)
    return {"clips": len(chosen), "of": len(clips), "silent_left_out": len(found) - len(clips),
            "per_class": {k: sum(labels[i] == k for i in chosen) for k in sorted(set(labels))}}


def clip_training_flops(config, frames: int) -> float:
    """Training FLOPs of one clip of ``frames`` mel frames through Whisper's encoder: 3 x forward."""
    d, positions = config.d_model, frames // 2
    convs = 2 * config.num_mel_bins * d * 3 * frames + 2 * d * d * 3 * positions  # conv2 has stride 2
    per_layer = 2 * (4 * d * d + 2 * d * config.encoder_ffn_dim) * positions + 4 * positions**2 * d
    return 3.0 * (convs + config.encoder_layers * per_layer)


def timed(times: list[float], losses: list[float], frames: int, steps: int, warmup: int, whisper: Path) -> dict:
    import transformers

    seconds = steady_seconds(times, warmup)
    clips_per_s = (steps - warmup) * BATCH / seconds
    config = transformers.WhisperConfig.from_pretrained(str(whisper))
    return {"seconds": seconds, "clips_per_s": clips_per_s, "flop_per_s": clips_per_s * clip_training_flops(config, frames),
            "final_loss": tail_mean(losses), "steps": steps, "warmup": warmup, "frames": frames}


def run_pretune(whisper: Path, manifest: Path, steps: int, warmup: int, precision: str) -> dict:
    import pretune

    with tempfile.TemporaryDirectory() as tmp:
        result = pretune.train(str(RECIPE), [
            f"run_dir={tmp}/run", f"model={whisper}", "strategy=full", f"data.audio={manifest}", f"data.duration={SECONDS}",
            "data.validation_fraction=0", "task.augment=null", f"seed={SEED}", f"trainer.max_steps={steps}",
            f"trainer.batch_size={BATCH}", f"trainer.lr={LR}", "trainer.head_lr=null", f"trainer.weight_decay={WEIGHT_DECAY}",
            "trainer.schedule=linear", f"trainer.warmup={WARMUP}", "trainer.clip=1.0", f"trainer.precision={precision}",
            f"trainer.eval_every={steps + 1}", f"trainer.save_every={steps + 1}", "trainer.log_every=1",
            "trainer.progress=false", "trainer.tensorboard=false",
        ])
        train = pretune_step_times(result.run_dir, steps)
    return {**timed([r["time"] for r in train], [r["loss"] for r in train], FRAMES["pretune"], steps, warmup, whisper),
            "mfu_logged": statistics.median(r.get("mfu", float("nan")) for r in train[warmup:])}


def load_wave(path: str):
    """One clip as pretune reads it: mono float32, soxr HQ to 16 kHz, centre-cropped or padded at the end to 1 s."""
    import numpy as np
    import soundfile
    import soxr

    frames, rate = soundfile.read(path, dtype="float32", always_2d=True)
    wave = soxr.resample(frames.mean(axis=1), rate, RATE, quality="HQ").astype(np.float32)
    samples = round(SECONDS * RATE)
    start = max(0, (len(wave) - samples) // 2)
    return np.pad(wave[start:start + samples], (0, max(0, samples - len(wave))))


def run_hf(whisper: Path, manifest: Path, steps: int, warmup: int, precision: str, sliced: bool) -> dict:
    import numpy as np
    import torch
    import transformers

    with open(manifest, newline="") as handle:
        rows = list(csv.DictReader(handle))
    names = sorted({row["label"] for row in rows})  # the label map pretune builds (sorted class names)
    label2id = {name: i for i, name in enumerate(names)}
    transformers.set_seed(SEED)
    model = transformers.WhisperForAudioClassification.from_pretrained(
        str(whisper), num_labels=len(names), id2label=dict(enumerate(names)), label2id=label2id)
    frames = FRAMES["hf-sliced" if sliced else "hf-30s"]
    if sliced:  # cut the encoder to 1 s as pretune does: 50 positions, the first 50 rows of the sinusoid table
        encoder = model.encoder
        table = encoder.embed_positions.weight[: frames // 2].detach().clone()
        encoder.embed_positions = torch.nn.Embedding.from_pretrained(table, freeze=True)
        encoder.config.max_source_positions = encoder.max_source_positions = frames // 2
    extractor = transformers.WhisperFeatureExtractor.from_pretrained(str(whisper))
    waves = [load_wave(row["path"]) for row in rows]
    options = {"max_length": len(waves[0])} if sliced else {}  # default: pad to 30 s (480,000 samples)
    features = np.concatenate([extractor(waves[i:i + 64], sampling_rate=RATE, return_tensors="np", **options)["input_features"]
                               for i in range(0, len(waves), 64)])
    assert features.shape[1:] == (80, frames), features.shape
    labels = [label2id[row["label"]] for row in rows]

    class Clips(torch.utils.data.Dataset):
        def __len__(self):
            return len(labels)

        def __getitem__(self, i):
            return {"input_features": torch.from_numpy(features[i]), "labels": labels[i]}

    times: list[float] = []
    losses: list[float] = []

    clock = trainer_clock(times, losses)

    with tempfile.TemporaryDirectory() as tmp:
        args = transformers.TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=BATCH, max_steps=steps, learning_rate=LR, weight_decay=WEIGHT_DECAY,
            lr_scheduler_type="linear", warmup_steps=int(WARMUP * steps), max_grad_norm=1.0, save_strategy="no",
            eval_strategy="no", logging_steps=1, report_to="none", disable_tqdm=True, use_cpu=True, bf16=precision == "bf16",
            dataloader_num_workers=0, seed=SEED,
        )
        transformers.Trainer(model=model, args=args, train_dataset=Clips(), callbacks=[clock]).train()
    return timed(times, losses, frames, steps, warmup, whisper)


def child(args: argparse.Namespace) -> None:
    """One contender, one repetition, in its own process; prints a JSON line."""
    global SEED
    SEED = args.seed
    if args.tool == "pretune":
        result = run_pretune(Path(args.whisper), Path(args.manifest), args.steps, args.warmup, args.precision)
    else:
        result = run_hf(Path(args.whisper), Path(args.manifest), args.steps, args.warmup, args.precision, args.tool == "hf-sliced")
    report_result({**result, "precision": args.precision, "seed": SEED})


def peaks() -> dict:
    import torch

    from pretune.trainer.flops import measure_peak

    found = {"fp32": measure_peak(torch.float32, torch.device("cpu"), seconds=1.0)}
    if HAS_BF16:
        found["bf16"] = measure_peak(torch.bfloat16, torch.device("cpu"), seconds=1.0)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke size for CI")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--data", default="/tmp/lid/train", help="one sub-folder of WAV clips per language")
    parser.add_argument("--whisper", default="/tmp/whisper-tiny", help="pretune convert --packaged-whisper OUT")
    parser.add_argument("--contenders", default=",".join(name for name, _, _ in CONTENDERS))
    parser.add_argument("--seed", type=int, default=SEED, help="repetition r runs every contender with seed + r")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tool", help=argparse.SUPPRESS)
    parser.add_argument("--precision", help=argparse.SUPPRESS)
    parser.add_argument("--manifest", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    # (steps, warm-up steps) per tool: hf-30s costs ~30x more per clip, so it runs fewer steps
    plan = {"pretune": (10, 3), "hf-sliced": (10, 3), "hf-30s": (4, 1)} if args.quick else \
           {"pretune": (40, 8), "hf-sliced": (40, 8), "hf-30s": (12, 4)}
    repeats = args.repeats or (1 if args.quick else 3)
    contenders = [c for c in CONTENDERS if c[0] in args.contenders.split(",")]
    work = Path(tempfile.mkdtemp(prefix="pretune-bench-audio-"))
    try:
        peak = peaks()
        manifest = work / "clips.csv"
        report = {**report_header(), "model": "Whisper tiny.en encoder (d 384, 4 layers, 6 heads, ffn 1536)",
                  "data": {"source": args.data, **write_manifest(Path(args.data), manifest)}, "seconds": SECONDS,
                  "batch": BATCH, "lr": LR, "plan": {name: plan[tool] for name, tool, _ in contenders}, "repeats": repeats,
                  "rows": []}
        runs = {name: [] for name, _, _ in contenders}
        for rep in range(repeats):  # repetition r: every contender with the same seed (paired), the order alternating
            seed = args.seed + rep
            done = run_alternating(
                contenders if rep % 2 == 0 else contenders[::-1], 1,
                lambda tool, precision: [__file__, "--child", "--tool", tool, "--precision", precision, "--whisper", args.whisper,
                                         "--manifest", str(manifest), "--steps", str(plan[tool][0]),
                                         "--warmup", str(plan[tool][1]), "--seed", str(seed)],
                bench_env(), lambda name, _, r: (f"{name} seed {r['seed']}: {r['clips_per_s']:.2f} clips/s over "
                                                 f"{r['steps'] - r['warmup']} steps, last-quarter train loss {r['final_loss']:.3f}"))
            for name, rows in done.items():
                runs[name] += rows
        peak = {k: max(v, w) for (k, v), w in zip(peak.items(), peaks().values())}  # before and after: the best of both
        report["peak_gflops"] = {k: v / 1e9 for k, v in peak.items()}
        check_source(report)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    loads = load_summary(runs)
    for name, tool, precision in contenders:
        speed = spread([r["clips_per_s"] for r in runs[name]])
        ours = statistics.median(r["clips_per_s"] for r in runs.get("pretune" if precision == "fp32" else "pretune-bf16", runs[name]))
        row = {"contender": name, "precision": precision, "frames": FRAMES[tool], "steps": plan[tool][0], "warmup": plan[tool][1],
               "clips_per_s": speed["median"], "min": speed["min"], "max": speed["max"], "pretune_speedup": ours / speed["median"],
               "mfu": statistics.median(r["flop_per_s"] for r in runs[name]) / peak[precision],
               "final_loss": statistics.median(r["final_loss"] for r in runs[name]),
               "foreign_load": loads[name]["max_foreign_load"], "peak_rss_mb": loads[name]["median_peak_rss_mb"], "runs": runs[name]}
        if tool == "pretune":
            row["mfu_logged"] = statistics.median(r["mfu_logged"] for r in runs[name])
        report["rows"].append(row)
    write_results("audio", args.quick, report)
    print(table(report))


def table(report: dict) -> str:
    lines = [f"{report['date']} · {report['machine']} · torch {report['torch']} · transformers {report['transformers']} · "
             f"{report['model']} · {report['data']['clips']} clips of {report['seconds']:g} s, 5 languages · batch {report['batch']}, "
             f"lr {report['lr']:g} · × {report['repeats']} repeats · GEMM peak "
             + " / ".join(f"{k} {v:.0f}" for k, v in report["peak_gflops"].items()) + " GFLOP/s", "",
             "| contender | frames | steps (warm-up) | clips/s (median) | min–max | pretune ÷ this | MFU | last-quarter train loss | "
             "peak RSS MB | foreign load (max) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['contender']} ({r['precision']}) | {r['frames']} | {r['steps']} ({r['warmup']}) | {r['clips_per_s']:.1f} | "
                     f"{r['min']:.1f}–{r['max']:.1f} | {r['pretune_speedup']:.2f}× | {r['mfu']:.1%} | {r['final_loss']:.3f} | "
                     f"{r['peak_rss_mb']:.0f} | {r['foreign_load']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
