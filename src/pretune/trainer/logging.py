"""Where numbers go: a JSONL file, a progress bar and the trackers of ``trainer.report_to`` (TensorBoard,
MLflow, W&B: :mod:`pretune.trainer.tracking`), on the main process only."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from tqdm.auto import tqdm

from pretune.trainer import tracking


class RunLogger:
    """``report_to``: tracker names (``trainer.report_to``); ``config``: the resolved recipe they record.
    A tracker that raises prints one warning line and is dropped; the run goes on."""

    def __init__(self, run_dir: Path, enabled: bool, total_steps: int, start_step: int, progress: bool,
                 report_to: Sequence[str] = ("tensorboard",), config: dict[str, Any] | None = None):
        self.enabled, self.run_dir = enabled, run_dir
        self.start = time.perf_counter()
        self.jsonl = open(run_dir / "metrics.jsonl", "a", encoding="utf-8") if enabled else None
        self.bar = None
        if enabled and progress:
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                            mininterval=1.0 if sys.stderr.isatty() else 30.0, file=sys.stderr)
        self.trackers = tracking.create(list(report_to), run_dir, resumed=start_step > 0) if enabled else []
        self._fan_out("start", config or {})
        for tracker in self.trackers:
            if tracker.where:
                self.print(tracker.where)

    def log(self, step: int, split: str, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, "split": split, "time": round(time.perf_counter() - self.start, 3), **values}
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        numbers = {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        if numbers:
            self._fan_out("log", step, split, numbers)
        if split != "train":
            self.print(f"step {step} {split}: " + "  ".join(f"{k} {_fmt(v)}" for k, v in values.items()))

    def note(self, step: int, split: str, message: str, **values: Any) -> None:
        """One line for the reader (an epoch's change of what trains, a warning), also kept in metrics.jsonl."""
        if not self.enabled:
            return
        row = {"step": step, "split": split, "time": round(time.perf_counter() - self.start, 3), "message": message, **values}
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        self._fan_out("note", step, split, message)
        self.print(message)

    def progress(self, step: int, postfix: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix({k: _fmt(v) for k, v in postfix.items()}, refresh=False)
            self.bar.update(0)

    def print(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        """The final model folder (if any) goes to the trackers, then everything is closed."""
        if (self.run_dir / "model").is_dir():
            self._fan_out("artifact", self.run_dir / "model")
        self._fan_out("close")
        if self.bar is not None:
            self.bar.close()
        if self.jsonl is not None:
            self.jsonl.close()

    def _fan_out(self, method: str, *args: Any) -> None:
        """``tracker.method(*args)`` on every tracker; one that raises is closed, dropped and named in one line."""
        for tracker in list(self.trackers):
            try:
                getattr(tracker, method)(*args)
            except Exception as exc:  # noqa: BLE001 - a tracker never stops training
                self.trackers.remove(tracker)
                reason = " ".join(str(exc).split())[:300] or type(exc).__name__
                self.print(f"warning: {tracker.name} failed ({method}: {reason}); it is off for the rest of the run, training goes on")
                if method != "close":
                    try:
                        tracker.close()
                    except Exception:  # noqa: BLE001 - it already failed once
                        pass


def name_metrics(means: dict[str, float], task: Any) -> dict[str, float]:
    """``{"mlm": 2.1, "mlm_correct": 0.4}`` -> ``{"loss": ..., "mlm_loss": 2.1, "mlm_accuracy": 0.4, ...}``."""
    named: dict[str, float] = {}
    if all(k in means for k in task.losses):
        named["loss"] = sum(means[k] for k in task.losses)
    for key, value in means.items():
        if key.endswith("_correct"):
            named[key[: -len("_correct")] + "_accuracy"] = value
        elif key in task.losses:
            named[f"{key}_loss"] = value
            if key in task.perplexity:
                named[f"{key}_perplexity"] = math.exp(min(value, 50.0))
        else:
            named[key] = value
    return named


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def before_after(run_dir: Path, sets: dict[str, str], baseline: int = 0) -> dict[str, dict[str, list[float]]]:
    """The forgetting report of a continued model: accuracy and perplexity metrics of each held-out set at the
    evaluation of step ``baseline`` (0, or the end of a new head's warm-up: the starting model) and the last, from
    ``metrics.jsonl``.  ``sets`` maps a metric prefix ("" for the validation set, "general_" ...) to the name shown;
    the report is also printed."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evaluations = [line for line in lines if line.get("split") == "validation"]
    first = next((line for line in evaluations if line.get("step") == baseline), None)
    if first is None or evaluations[-1]["step"] <= baseline:
        return {}
    last = evaluations[-1]
    report: dict[str, dict[str, list[float]]] = {}
    shown = []
    for prefix, name in sets.items():
        keys = [k[len(prefix):] for k in first if k.startswith(prefix) and k.endswith(("_accuracy", "_perplexity"))
                and k in last and (prefix or not any(k.startswith(p) for p in sets if p))]
        report[name] = {key: [first[prefix + key], last[prefix + key]] for key in sorted(keys)}
        parts = [f"{key.replace('_', ' ')} {a:.4g} -> {b:.4g} ({b - a:+.4g})" for key, (a, b) in report[name].items()]
        shown.append(f"  {name}: {', '.join(parts)}")
    start = f"step {baseline}, the original model with its new head warmed up" if baseline else "step 0, the original model"
    print(f"forgetting report ({start} -> step {last['step']}):\n" + "\n".join(shown), flush=True)
    return report
