"""The benchmark harness (``benchmarks/common.py``): /proc/stat parsing, foreign-load arithmetic, per-run
rusage of a child and its descendants, and ``run_alternating``'s order, records and retries on tiny
Python children.  The machine running these tests may be busy, so nothing here relies on a quiet one:
real loads are only checked for shape, and the retry paths run on a stubbed CPU counter."""

from __future__ import annotations

import itertools
import json
import math
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import common  # noqa: E402

PROC_STAT = """\
cpu  6555828 937 466149 1517414 47738 0 11001 147095 20 5
cpu0 3030146 490 208602 1047102 13265 0 862 74174 10 2
cpu1 3525682 447 257546 470312 34473 0 10139 72921 10 3
intr 123 4 5
ctxt 987654
"""

# A child that prints one RESULT line naming its tool and the call number (argv[1], argv[2]).
BENCHMARKS = str(Path(__file__).resolve().parents[2] / "benchmarks")
# a contender's child: reports through common.report_result, which adds the child's own peak RSS (VmHWM)
ECHO = (f"import sys; sys.path.insert(0, {BENCHMARKS!r}); import common; "
        "common.report_result({'tool': sys.argv[1], 'call': int(sys.argv[2])})")


def fake_counter(monkeypatch, deltas):
    """Stub ``cpu_busy``: each run (or window) reads it twice and sees the next of ``deltas`` CPU-seconds
    pass between the two readings."""
    def readings():
        total = 0.0
        for delta in deltas:
            yield total
            total += delta
            yield total
        while True:
            yield total
    values = readings()
    monkeypatch.setattr(common, "cpu_busy", lambda: next(values))


def echo_args(calls):
    """``child_args`` for :data:`ECHO` that records each (tool, call number) the harness asks for."""
    def child_args(tool, precision):
        calls.append(tool)
        return ["-c", ECHO, tool, str(len(calls))]
    return child_args


def test_parse_cpu_busy_sums_the_non_idle_columns_of_the_cpu_line():
    busy = 6555828 + 937 + 466149 + 0 + 11001 + 147095  # user nice system irq softirq steal; not idle, iowait, guests
    assert common.parse_cpu_busy(PROC_STAT, 100) == pytest.approx(busy / 100)
    assert common.parse_cpu_busy("cpu  10 20 30 400\ncpu0 10 20 30 400\n", 10) == pytest.approx(6.0)  # an old kernel's 4 columns
    with pytest.raises(ValueError):
        common.parse_cpu_busy("cpu0 1 2 3 4\n", 100)


def test_cpu_busy_reads_a_growing_counter():
    first = common.cpu_busy()
    assert 0 < first <= common.cpu_busy()


def test_foreign_load_is_other_cpu_seconds_per_wall_second():
    assert common.foreign_load(busy_s=5.0, own_cpu_s=3.0, wall_s=2.0) == pytest.approx(1.0)  # one foreign thread
    assert common.foreign_load(busy_s=4.1, own_cpu_s=4.0, wall_s=2.0) == pytest.approx(0.05)
    assert common.foreign_load(busy_s=3.9, own_cpu_s=4.0, wall_s=2.0) == 0.0  # tick rounding: never negative
    assert common.foreign_load(busy_s=1.0, own_cpu_s=0.0, wall_s=0.0) == 0.0


def test_run_measured_counts_cpu_and_memory_of_waited_for_descendants(tmp_path):
    grandchild = ("import time\nblock = bytearray(120 << 20)\nstart = time.process_time()\n"
                  "while time.process_time() - start < 0.3:\n    pass\n")
    script = tmp_path / "parent.py"
    script.write_text(f"import subprocess, sys\nprint('hello')\nsubprocess.run([sys.executable, '-c', {grandchild!r}], check=True)\n"
                      "sys.exit(3)\n")
    done = common.run_measured([sys.executable, str(script)])
    assert (done.returncode, done.stdout) == (3, "hello\n")
    assert done.cpu_s >= 0.28  # the grandchild's busy loop, like torchrun's workers
    assert done.peak_rss_mb >= 120  # the largest single process: the grandchild and its buffer
    assert done.wall_s >= done.cpu_s * 0.5 and done.foreign_load >= 0


def test_run_alternating_alternates_and_records_load_memory_and_attempts(monkeypatch, capsys):
    waits, calls = [], []
    monkeypatch.setattr(common, "wait_for_quiet", lambda *a, **k: waits.append(1) or 0.0)
    contenders = [("ours", "a", "fp32"), ("theirs", "b", "fp32")]
    runs = common.run_alternating(contenders, 3, echo_args(calls), None, lambda name, rep, r: f"{name} rep {rep}",
                                  max_load=math.inf)
    assert calls == ["a", "b", "b", "a", "a", "b"] and len(waits) == 6  # a quiet check before every run
    assert [r["tool"] for r in runs["ours"]] == ["a"] * 3 and [r["tool"] for r in runs["theirs"]] == ["b"] * 3
    for result in runs["ours"] + runs["theirs"]:
        assert result["attempts"] == 1 and result["foreign_load"] >= 0
        assert 5 < result["peak_rss_mb"] < 500  # one small Python interpreter, whatever the (pytest) parent's size
        assert "own_peak_rss_mb" not in result
    out = capsys.readouterr().out
    assert out.count("foreign load") == 6 and "ours rep 2 [foreign load" in out


def test_a_loaded_run_is_repeated_until_quiet(monkeypatch, capsys):
    monkeypatch.setattr(common, "wait_for_quiet", lambda *a, **k: 0.0)
    fake_counter(monkeypatch, [1e6, 0.0])  # the first attempt sees the machine flat out, the second nothing
    calls = []
    runs = common.run_alternating([("ours", "a", "fp32")], 1, echo_args(calls), None, lambda name, rep, r: name)
    (result,) = runs["ours"]
    assert (result["call"], result["attempts"], result["foreign_load"]) == (2, 2, 0.0)
    assert "repeating (attempt 2 of 3)" in capsys.readouterr().out


def test_when_every_attempt_is_loaded_the_quietest_is_kept(monkeypatch, capsys):
    monkeypatch.setattr(common, "wait_for_quiet", lambda *a, **k: 0.0)
    fake_counter(monkeypatch, [1e8, 1e5, 1e8])  # far apart, whatever each child's wall time
    calls = []
    runs = common.run_alternating([("ours", "a", "fp32")], 1, echo_args(calls), None, lambda name, rep, r: name, retries=2)
    (result,) = runs["ours"]
    assert len(calls) == 3 and (result["call"], result["attempts"]) == (2, 3)
    assert result["foreign_load"] > common.MAX_LOAD
    assert "WARNING: ours rep 0: all 3 attempts were loaded" in capsys.readouterr().out


def test_a_failing_child_stops_the_benchmark(monkeypatch):
    monkeypatch.setattr(common, "wait_for_quiet", lambda *a, **k: 0.0)
    with pytest.raises(SystemExit, match="ours failed:\n.*boom"):
        common.run_alternating([("ours", "a", "fp32")], 1, lambda tool, precision: ["-c", "raise SystemExit('boom')"], None,
                               lambda name, rep, r: name)


def test_wait_for_quiet_returns_at_once_on_a_quiet_machine(monkeypatch, capsys):
    fake_counter(monkeypatch, [0.0])
    assert common.wait_for_quiet(window=0.01, timeout=1.0) == 0.0
    assert capsys.readouterr().out == ""


def test_wait_for_quiet_says_once_that_it_waits(monkeypatch, capsys):
    fake_counter(monkeypatch, [1e6, 1e6, 1e6, 0.0])
    assert common.wait_for_quiet(window=0.01, timeout=10.0) < common.QUIET_BELOW
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith("machine busy")


def test_wait_for_quiet_gives_up_with_a_warning(monkeypatch, capsys):
    fake_counter(monkeypatch, itertools.repeat(1e6))
    start = time.monotonic()
    assert common.wait_for_quiet(window=0.01, timeout=0.05) > common.QUIET_BELOW
    assert time.monotonic() - start < 1.0
    assert "WARNING: machine still busy" in capsys.readouterr().out.splitlines()[-1]


def test_load_summary_per_contender():
    runs = {"ours": [{"foreign_load": 0.02, "peak_rss_mb": 800.0, "attempts": 1},
                     {"foreign_load": 0.11, "peak_rss_mb": 820.0, "attempts": 2},
                     {"foreign_load": 0.05, "peak_rss_mb": 810.0, "attempts": 1}],
            "theirs": [{"foreign_load": 0.0, "peak_rss_mb": 1500.0, "attempts": 1}]}
    assert common.load_summary(runs) == {"ours": {"max_foreign_load": 0.11, "median_peak_rss_mb": 810.0, "retried_runs": 1},
                                         "theirs": {"max_foreign_load": 0.0, "median_peak_rss_mb": 1500.0, "retried_runs": 0}}
    json.dumps(common.load_summary(runs))  # goes straight into a results JSON


def test_harness_settings_record_the_guards():
    settings = common.harness_settings()
    assert settings["max_foreign_load_cpus"] == common.MAX_LOAD and settings["retries"] == common.RETRIES
    assert settings["quiet_below_cpus"] == common.QUIET_BELOW and settings["quiet_window_s"] == common.QUIET_WINDOW
