"""Where numbers go: a JSONL file, TensorBoard event files, a progress bar (main process only)."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm


class RunLogger:
    def __init__(self, run_dir: Path, enabled: bool, total_steps: int, start_step: int, progress: bool, tensorboard: bool):
        self.enabled = enabled
        self.start = time.perf_counter()
        self.jsonl = open(run_dir / "metrics.jsonl", "a", encoding="utf-8") if enabled else None
        self.writer = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tb"))
        self.bar = None
        if enabled and progress:
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                            mininterval=1.0 if sys.stderr.isatty() else 30.0, file=sys.stderr)

    def log(self, step: int, split: str, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, "split": split, "time": round(time.perf_counter() - self.start, 3), **values}
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(f"{split}/{key}", value, step)
        if split != "train":
            self.print(f"step {step} {split}: " + "  ".join(f"{k} {_fmt(v)}" for k, v in values.items()))

    def note(self, step: int, split: str, message: str, **values: Any) -> None:
        """One line for the reader (an epoch's change of what trains, a warning), also kept in metrics.jsonl."""
        if not self.enabled:
            return
        row = {"step": step, "split": split, "time": round(time.perf_counter() - self.start, 3), "message": message, **values}
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
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
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()


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
