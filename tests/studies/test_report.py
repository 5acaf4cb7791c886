"""Reports: a study's and a single run's, and the study report opened in a real browser (headless Chromium)."""

import base64
import json
import re
import shutil
import struct
import subprocess

import pytest

from pretune.cli import main
from pretune.evaluate.report import read_metrics, series

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
        pytest.skip("Debian's chromium is not installed (as root, .ci/browser installs it; the README's test command runs it)")
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
    from pretune.evaluate.report import run_report

    run_dir = tiny_encoder.parent
    page = run_report(run_dir).read_text()
    md = (run_dir / "report.md").read_text()
    for plot in ("loss", "lr", "tokens_per_s", "validation-mlm_perplexity", "validation-mlm_accuracy"):
        assert f"plots/{plot}.png" in md
    assert page.count("<img") == md.count("![")
