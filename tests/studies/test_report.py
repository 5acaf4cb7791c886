"""Reports: a study's and a single run's, and the study report opened in a real browser (headless Chromium)."""

import base64
import json
import re
import shutil
import struct
import subprocess

import pytest

from pretune.cli import main
from pretune.studies import compare as C
from pretune.studies.report import dodged, read_metrics, run_report, series, study_report, tied_arms

MARKER = """<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  document.body.setAttribute("data-widths", images.map(i => i.complete ? i.naturalWidth : -1).join(","));
});
</script></body>"""


def png_width(data: bytes) -> int:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">I", data[16:20])[0]


def browser() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("Debian's chromium is not installed (as root, .ci/test-assets installs it; the README's test command runs it)")
    return found


def test_study_report_images_load_in_chromium(image_study, tmp_path):
    page = (image_study.study_dir / "report.html").read_text()
    embedded = [base64.b64decode(data) for data in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]
    assert len(embedded) == page.count("<img") >= 3  # label efficiency, loss curves, confusion matrix
    assert 'src="' + "plots/" not in page  # self-contained: no file references
    probe = tmp_path / "report.html"
    probe.write_text(page.replace("</body>", MARKER))
    done = subprocess.run([browser(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
                           "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    match = re.search(r'data-widths="([^"]*)"', done.stdout)
    assert match, f"chromium did not run the page's script: {done.stderr[-2000:]}"
    widths = [int(w) for w in match.group(1).split(",")]
    assert widths == [png_width(png) for png in embedded]  # every image decoded, at its own size
    assert all(w > 100 for w in widths)


def test_report_of_a_single_run_via_the_cli(image_study, capsys):
    run_dir = image_study.study_dir / "cells" / "scratch_budget-1.0_seed-0"
    assert main(["report", str(run_dir)]) == 0
    assert str(run_dir / "report.html") in capsys.readouterr().out
    md = (run_dir / "report.md").read_text()
    for plot in ("loss", "lr", "examples_per_s", "validation-accuracy"):
        assert f"plots/{plot}.png" in md and (run_dir / "plots" / f"{plot}.png").is_file()
    # the plotted series is the logged one: validation accuracy after each epoch
    rows = read_metrics(run_dir)
    steps, values = series(rows, "validation", "accuracy")
    assert steps[0] == 0 and values == [r["accuracy"] for r in rows if r["split"] == "validation"]
    # a study directory gets the study report
    assert main(["report", str(image_study.study_dir)]) == 0
    assert "label efficiency" in (image_study.study_dir / "report.md").read_text()


def test_report_of_a_missing_run_is_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 5
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_series_keeps_the_last_value_of_a_repeated_step(tmp_path):
    lines = [{"step": 2, "split": "train", "loss": 3.0}, {"step": 4, "split": "train", "loss": 2.0},
             {"step": 4, "split": "train", "loss": 1.5}, {"step": 4, "split": "validation", "loss": 9.0}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n{\"torn")
    assert series(read_metrics(tmp_path), "train", "loss") == ([2, 4], [3.0, 1.5])


def test_report_of_a_pretraining_run(tiny_encoder):
    run_dir = tiny_encoder.parent
    page = run_report(run_dir).read_text()
    md = (run_dir / "report.md").read_text()
    for plot in ("loss", "lr", "tokens_per_s", "validation-mlm_perplexity", "validation-mlm_accuracy"):
        assert f"plots/{plot}.png" in md
    assert page.count("<img") == md.count("![")


# -- a study report from files alone (no training): ties, sparse train logs, linear-probe FLOPs -------------

def write_study(study_dir, cells):
    """``study.json`` and each cell's ``metrics.jsonl`` / ``recipe.yaml``; ``cells``: (arm, strategy, budget, score, lines, encode)."""
    rows = []
    for arm, strategy, budget, score, lines, encode in cells:
        run_dir = study_dir / "cells" / f"{arm.replace(' ', '-')}_{budget}"
        run_dir.mkdir(parents=True)
        history = [{"step": step, "split": "train", "loss": 2.0 / step, "flops": 4.0e4} for step in lines]
        history += [{"step": 0, "split": "validation", "loss": 2.5}, {"step": max(lines, default=3), "split": "validation", "loss": 1.0}]
        history += [{"step": 0, "split": "encode", "flops": encode}] if encode else []
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
        (run_dir / "recipe.yaml").write_text("kind: finetune\ntrainer:\n  log_every: 10\n")
        rows.append({"arm": arm, "strategy": strategy, "pretrained": arm != "scratch", "budget": budget, "seed": 0, "score": score,
                     "scored_on": "validation", "wall_s": 1.0, **C.logged_compute(read_metrics(run_dir)), "run_dir": str(run_dir)})
    summary = C.summarise(rows)
    headline, matches = C.find_headline(summary, "max", sorted({r["budget"] for r in rows}))
    (study_dir / "study.json").write_text(json.dumps({"metric": "accuracy", "mode": "max", "headline": headline, "matches": matches,
                                                      "summary": summary, "cells": rows}))
    return study_report(study_dir)


def test_tied_arms_are_named_and_drawn_side_by_side(tmp_path):
    """Two arms at 1.0 used to draw one point exactly over the other."""
    write_study(tmp_path, [("pretrained full", "full", 0.1, 0.9, [10, 20], 0), ("scratch", "full", 0.1, 0.8, [10, 20], 0),
                           ("pretrained full", "full", 1.0, 1.0, [10, 20], 0), ("scratch", "full", 1.0, 1.0, [10, 20], 0)])
    md = (tmp_path / "report.md").read_text()
    assert "Tied (equal means to 4 decimals; their points are drawn side by side): pretrained full, scratch at 100% (1.0000)." in md
    assert tied_arms([{"arm": "a", "budget": 0.5, "mean": 0.81234}, {"arm": "b", "budget": 0.5, "mean": 0.81231}]) == [(0.5, 0.8123, ["a", "b"])]
    first, second = dodged([0.1, 1.0], 0, 2, log=True), dodged([0.1, 1.0], 1, 2, log=True)
    assert all(a < b < 1.2 * a for a, b in zip(first, second))  # apart, but near the budget on a log axis
    first, second = dodged([0.5, 1.0], 0, 2, log=False), dodged([0.5, 1.0], 1, 2, log=False)
    assert all(a < b < a + 0.05 for a, b in zip(first, second))  # ... and on a linear one
    assert dodged([0.1, 1.0], 0, 1, True) == [0.1, 1.0]  # one arm: at the budgets themselves


def test_cells_with_fewer_steps_than_log_every_are_named(tmp_path):
    """A cell of 3 steps logs one train line (the last step): one point, no visible line, so the report says so."""
    write_study(tmp_path, [("pretrained full", "full", 0.1, 0.9, [3], 0), ("scratch", "full", 0.1, 0.8, [10, 20], 0),
                           ("pretrained full", "full", 1.0, 0.95, [10, 20], 0), ("scratch", "full", 1.0, 0.9, [10, 20], 0)])
    md = (tmp_path / "report.md").read_text()
    assert ("Train loss logged at fewer than two steps (drawn as single points): pretrained full at 10%, seed 0 "
            "(3 steps, trainer.log_every 10).") in md
    assert md.count("fewer than two steps") == 1


def test_linear_probe_flops_are_not_shown_as_zero(tmp_path):
    """A probe's head costs ~1e5 FLOPs: the table used to round it to "GFLOPs 0"."""
    cells = [("pretrained linear-probe", "linear-probe", 1.0, 0.9, [10, 20], 0), ("scratch", "full", 1.0, 0.8, [10, 20], 0)]
    write_study(tmp_path / "a", cells)
    md = (tmp_path / "a" / "report.md").read_text()
    probe_row = next(line for line in md.splitlines() if line.startswith("| pretrained linear-probe | 100%"))
    assert "| 8e-05 |" in probe_row  # two train lines of 4e4 FLOPs
    assert "linear-probe cells count their head's training only" in md
    # when the trainer logs the one-off encoding (an `encode` line), the cell counts it
    write_study(tmp_path / "b", [(*cells[0][:5], 2.0e9), cells[1]])
    study = json.loads((tmp_path / "b" / "study.json").read_text())
    assert study["cells"][0]["flops"] == 2.0e9 + 8e4 and study["cells"][0]["encode_flops"] == 2.0e9
    assert "include their one-off encoding" in (tmp_path / "b" / "report.md").read_text()
