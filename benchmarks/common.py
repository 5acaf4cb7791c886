"""What every benchmark here shares: contenders in their own processes, alternating, JSON results."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Callable

MARK = "RESULT "


def report_result(result: dict) -> None:
    """Child side: hand one repetition's numbers to the parent."""
    print(MARK + json.dumps(result), flush=True)


def run_alternating(contenders: list[tuple[str, str, str]], repeats: int, child_args: Callable[[str, str], list[str]],
                    env: dict, describe: Callable[[str, int, dict], str]) -> dict[str, list[dict]]:
    """Run each ``(name, tool, precision)`` contender ``repeats`` times, each run in a fresh process,
    reversing the order on odd repetitions so neither side always runs on a warm (or hot) machine."""
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in contenders}
    for rep in range(repeats):
        for name, tool, precision in (contenders if rep % 2 == 0 else contenders[::-1]):
            done = subprocess.run([sys.executable, *child_args(tool, precision)], env=env, capture_output=True, text=True)
            lines = [line for line in done.stdout.splitlines() if line.startswith(MARK)]
            if done.returncode != 0 or not lines:
                sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
            runs[name].append(json.loads(lines[0][len(MARK):]))
            print(describe(name, rep, runs[name][-1]), flush=True)
    return runs
