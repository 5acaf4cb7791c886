"""Reports with plots: ``report.md`` (PNG files beside it) and a self-contained ``report.html``
(the same PNGs embedded as base64 ``data:`` URIs, so the one file can be mailed or archived).

    study_report("runs/study")     # label-efficiency curve, loss curves, confusion matrix, all cells
    run_report("runs/mlm")         # one run: loss, learning rate, throughput, validation metrics

Plots use matplotlib's object API (``Figure`` + Agg canvas): no global pyplot state, no display.
Everything is read from files a run or a study already wrote (``metrics.jsonl``, ``study.json``,
a cell's ``recipe.yaml``), so ``pretune report DIR`` can (re)draw the report of any finished or
interrupted run.  matplotlib is imported only when a figure is drawn (it is slow to import).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from pretune.errors import CheckpointError

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


class Report:
    """A page of headings, paragraphs, tables and plots, written as Markdown and as HTML."""

    def __init__(self, title: str, out_dir: Path):
        self.title, self.out_dir = title, Path(out_dir)
        self.blocks: list[tuple[str, Any]] = []

    def heading(self, text: str) -> None:
        self.blocks.append(("heading", text))

    def text(self, text: str) -> None:
        self.blocks.append(("text", text))

    def table(self, header: list[str], rows: list[list[Any]]) -> None:
        self.blocks.append(("table", (header, [[_cell(v) for v in row] for row in rows])))

    def plot(self, name: str, figure: Any, caption: str) -> None:
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
        self.blocks.append(("plot", (name, buffer.getvalue(), caption)))

    def write(self) -> Path:
        """Write ``report.md``, ``plots/*.png`` and ``report.html`` into ``out_dir``; the HTML path."""
        plots = self.out_dir / "plots"
        plots.mkdir(parents=True, exist_ok=True)
        md, body = [f"# {self.title}", ""], [f"<h1>{html.escape(self.title)}</h1>"]
        for kind, value in self.blocks:
            if kind == "heading":
                md += [f"## {value}", ""]
                body.append(f"<h2>{html.escape(value)}</h2>")
            elif kind == "text":
                md += [value, ""]
                body.append(f"<p>{html.escape(value)}</p>")
            elif kind == "table":
                header, rows = value
                md += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                md += ["| " + " | ".join(row) + " |" for row in rows] + [""]
                body.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"
                            + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
                            + "</table>")
            else:
                name, png, caption = value
                (plots / f"{name}.png").write_bytes(png)
                md += [f"![{caption}](plots/{name}.png)", ""]
                data = base64.b64encode(png).decode("ascii")
                body.append(f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
                            f"<figcaption>{html.escape(caption)}</figcaption></figure>")
        (self.out_dir / "report.md").write_text("\n".join(md), encoding="utf-8")
        page = (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(self.title)}</title>"
                f"<style>{STYLE}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")
        path = self.out_dir / "report.html"
        path.write_text(page, encoding="utf-8")
        return path


STYLE = ("body{font-family:sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}"
         "table{border-collapse:collapse;margin:1em 0;font-size:90%}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
         "th{background:#f3f3f3}img{max-width:100%}figure{margin:1em 0}figcaption{color:#555;font-size:90%}")


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def _blank_figure(width: float, height: float) -> Any:
    """A matplotlib ``Figure`` on the Agg canvas (no display, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # lazy: matplotlib takes ~0.5 s to import
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    return figure


def _figure(width: float = 6.4, height: float = 4.0) -> tuple[Any, Any]:
    figure = _blank_figure(width, height)
    return figure, figure.add_subplot()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of ``RUN_DIR/metrics.jsonl`` (train, validation and test lines)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise CheckpointError(f"{run_dir}: no metrics.jsonl (is this a pretune run or study directory?)")
    rows, lines = [], path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                if number < len(lines):  # only the last line may be torn by a kill
                    raise CheckpointError(f"{path} line {number}: not JSON") from None
    return rows


def series(rows: list[dict[str, Any]], split: str, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric in one split; a resumed run's repeated steps keep the last value."""
    points = {r["step"]: r[key] for r in rows if r.get("split") == split and isinstance(r.get(key), (int, float))}
    steps = sorted(points)
    return steps, [points[s] for s in steps]


# -- one run ---------------------------------------------------------------------------------

SKIP = {"step", "time", "split", "loss", "lr", "tokens_per_s", "examples_per_s", "mfu", "flops"}


def run_report(run_dir: str | Path) -> Path:
    """``RUN_DIR/report.html`` (+ ``report.md``): loss, learning rate, throughput and every
    validation metric over steps, and the test scores if the run has them."""
    run_dir = Path(run_dir)
    if (run_dir / "study.json").is_file():
        return study_report(run_dir)
    rows = read_metrics(run_dir)
    report = Report(f"pretune run {run_dir}", run_dir)
    train_rows = [r for r in rows if r.get("split") == "train"]
    if train_rows:
        last = train_rows[-1]
        flops = sum(r.get("flops", 0.0) for r in train_rows)
        report.text(f"{last['step']} steps, {last.get('time', 0):.1f}s of training, final train loss {last.get('loss', float('nan')):.4g}"
                    + (f", {flops:.3g} model FLOPs" if flops else ""))
    figure, axes = _figure()
    for split, color in (("train", COLORS[0]), ("validation", COLORS[1])):
        steps, values = series(rows, split, "loss")
        if steps:
            axes.plot(steps, values, marker="o" if split == "validation" or len(steps) == 1 else None, color=color, label=split)
    axes.set(xlabel="step", ylabel="loss", title="loss")
    axes.legend()
    report.plot("loss", figure, "training and validation loss")
    for key, label in (("lr", "learning rate"), ("tokens_per_s", "throughput (tokens/s)"), ("examples_per_s", "throughput (examples/s)")):
        steps, values = series(rows, "train", key)
        if steps:
            figure, axes = _figure(6.4, 3.0)
            axes.plot(steps, values, marker="o" if len(steps) == 1 else None, color=COLORS[2])  # one point: a marker, not an invisible line
            axes.set(xlabel="step", ylabel=label, title=label)
            report.plot(key, figure, label)
    keys = sorted({k for r in rows if r.get("split") == "validation" for k, v in r.items()
                   if isinstance(v, (int, float)) and k not in SKIP})
    for key in keys:
        steps, values = series(rows, "validation", key)
        figure, axes = _figure(6.4, 3.0)
        axes.plot(steps, values, marker="o", color=COLORS[3])
        axes.set(xlabel="step", ylabel=key, title=f"validation {key}")
        report.plot(f"validation-{key}", figure, f"validation {key} over steps")
    tests = [r for r in rows if r.get("split") == "test"]
    if tests:
        report.heading("test set")
        scalars = {k: v for k, v in tests[-1].items() if k not in ("step", "split") and isinstance(v, (int, float))}
        report.table(["metric", "value"], [[k, v] for k, v in scalars.items()])
    return report.write()


# -- a study ---------------------------------------------------------------------------------

TIE_DIGITS = 4  # means equal to this many decimals (as the table shows them) are a tie
DODGE = 0.03  # horizontal offset between the points of successive arms, as a fraction of the x range


def budget_label(budget: float | int) -> str:
    """0.1 -> '10%', 0.005 -> '0.5%', 5 -> '5 per class'."""
    if isinstance(budget, int):
        return f"{budget} per class"
    percent = budget * 100
    return f"{percent:.0f}%" if math.isclose(percent, round(percent)) else f"{percent:.3g}%"


def study_report(study_dir: str | Path) -> Path:
    """``STUDY/report.html`` (+ ``report.md``) from ``STUDY/study.json`` (written by ``pretune compare``)."""
    study_dir = Path(study_dir)
    try:
        study = json.loads((study_dir / "study.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{study_dir}: no readable study.json ({exc})") from None
    metric, cells, summary = study["metric"], study["cells"], study["summary"]
    report = Report(f"pretune study {study_dir}", study_dir)
    report.text(f"Did pretraining pay off? {study['headline']}")
    scored = {c["scored_on"] for c in cells}
    report.text(f"{len(cells)} fine-tuning runs; metric: {metric} on the "
                + (" and ".join(sorted(scored)) + " set" if scored else "held-out set")
                + f" ({'higher' if study['mode'] == 'max' else 'lower'} is better); mean ± standard deviation over seeds, "
                "and the 95% interval of the mean (bootstrap over seeds and test examples; see docs/study.md).")

    arms = list(dict.fromkeys(s["arm"] for s in summary))
    budgets = sorted({s["budget"] for s in summary})
    by = {(s["arm"], s["budget"]): s for s in summary}
    if study.get("given"):
        report.text("What each arm was given: " + "; ".join(f"{arm}: {text}" for arm, text in study["given"].items()) + ".")

    report.heading("label efficiency")
    report.plot("label-efficiency", _efficiency(by, arms, budgets, metric, study.get("curves") or {}),
                f"{metric} vs label budget, one line per arm (error bars: std over seeds; dashed: the fitted "
                "saturating power law a - b·x^-c, with three budgets or more)")
    ties = tied_arms(summary)
    if ties:
        report.text("Tied (equal means to 4 decimals; their points are drawn side by side): "
                    + "; ".join(f"{', '.join(tied)} at {budget_label(budget)} ({mean:.4f})" for budget, mean, tied in ties) + ".")
    report.table(["arm", *[budget_label(b) for b in budgets]],
                 [[arm, *[(_mean_cell(by[(arm, b)]) if (arm, b) in by else "") for b in budgets]] for arm in arms])
    if study.get("selection"):
        report.text("Which rows to label (TypiClust picks on the pretrained embeddings, the same number of labels as the "
                    "random per-class picks): " + "; ".join(entry["text"] for entry in study["selection"]) + ".")
    if study.get("adaptation"):
        report.text("Did adapting the model to your text pay off (the adapted model vs the original, fine-tuned alike on the "
                    "same rows and seeds)? " + "; ".join(entry["text"] for entry in study["adaptation"]) + ".")

    report.heading("training curves")
    figure, sparse = _curves(cells, arms, budgets)
    if figure is not None:
        report.plot("loss-curves", figure, "training (left) and validation (right) loss of the first seed, "
                    "smallest budget dashed, largest solid")
    if sparse:
        report.text("Train loss logged at fewer than two steps (drawn as single points): " + "; ".join(sparse)
                    + ". A train line is logged every trainer.log_every steps and at the last step; "
                    "lower trainer.log_every to see these curves.")

    higher = study["mode"] == "max"
    best = max(cells, key=lambda c: c["score"] if higher else -c["score"]) if cells else None
    if best is not None and best.get("confusion_matrix"):
        report.heading("best model")
        report.text(f"{best['arm']}, budget {budget_label(best['budget'])}, seed {best['seed']}: {metric} {best['score']:.4f} "
                    f"({best['run_dir']}/model)")
        report.plot("confusion-matrix", _confusion(best["confusion_matrix"], best.get("labels")),
                    f"confusion matrix of the best model on the {best['scored_on']} set (rows: true class)")

    report.heading("all runs")
    report.table(["arm", "budget", "seed", metric, "scored on", "steps", "wall time (s)", "GFLOPs", "run dir"],
                 [[c["arm"], budget_label(c["budget"]), c["seed"], c["score"], c["scored_on"], c["steps"],
                   round(c["wall_s"], 1), c["flops"] / 1e9, c["run_dir"]] for c in cells])
    cost = study.get("cost") or {}
    if cost.get("pretraining"):
        paid = cost["pretraining"]
        report.text(f"pretraining ({paid['task']}, {paid['run_dir']}): {paid['steps']} steps, {paid['wall_s']:.1f}s of wall time, "
                    f"{paid['flops'] / 1e9:.3g} GFLOPs.")
    for line in cost.get("tradeoff") or []:
        report.text(f"Trade-off: {line}.")
    total_wall, total_flops = sum(c["wall_s"] for c in cells), sum(c["flops"] for c in cells)
    report.text(f"compute: {total_wall:.1f}s of wall time and {total_flops / 1e9:.3g} GFLOPs of model FLOPs in all "
                "(FLOPs as logged by the trainer: the training steps" + _encoding_note(cells) + ").")
    return report.write()


def _mean_cell(entry: dict[str, Any]) -> str:
    """``0.8123 ± 0.0100 [0.7950, 0.8290]``: mean ± std over seeds, then the 95% interval when there is one."""
    text = f"{entry['mean']:.4f} ± {entry['std']:.4f}"
    return text + (f" [{entry['low']:.4f}, {entry['high']:.4f}]" if entry.get("low") is not None else "")


def tied_arms(summary: list[dict[str, Any]]) -> list[tuple[Any, float, list[str]]]:
    """``(budget, mean, arms)`` for every budget at which two or more arms have the same mean (to 4 decimals)."""
    groups: dict[tuple[Any, float], list[str]] = {}
    for s in summary:
        groups.setdefault((s["budget"], round(s["mean"], TIE_DIGITS)), []).append(s["arm"])
    return [(budget, mean, arms) for (budget, mean), arms in sorted(groups.items(), key=lambda item: item[0][0]) if len(arms) > 1]


def dodged(budgets: list, number: int, arms: int, log: bool) -> list[float]:
    """The x positions of arm ``number`` of ``arms``: each arm shifted a little, so equal points stay visible."""
    if arms < 2:
        return list(budgets)
    shift = (number - (arms - 1) / 2) * DODGE
    if log:
        span = math.log10(max(budgets) / min(budgets)) or 1.0
        return [b * 10 ** (shift * span) for b in budgets]
    span = (max(budgets) - min(budgets)) or max(budgets)
    return [b + shift * span for b in budgets]


def _efficiency(by: dict, arms: list[str], budgets: list, metric: str, curves: dict[str, Any]) -> Any:
    figure, axes = _figure()
    log = len(budgets) > 1 and budgets[-1] / budgets[0] >= 10
    dense = np.geomspace(budgets[0], budgets[-1], 100) if log else np.linspace(budgets[0], budgets[-1], 100)
    for number, arm in enumerate(arms):
        present = [b for b in budgets if (arm, b) in by]
        axes.errorbar(dodged(present, number, len(arms), log), [by[(arm, b)]["mean"] for b in present],
                      yerr=[by[(arm, b)]["std"] for b in present], marker="o", capsize=4, color=COLORS[number % len(COLORS)], label=arm)
        if arm in curves:
            c = curves[arm]
            axes.plot(dense, c["sign"] * (c["a"] - c["b"] * dense ** -c["c"]), linestyle="--", color=COLORS[number % len(COLORS)])
    if ("scratch", budgets[-1]) in by:
        axes.axhline(by[("scratch", budgets[-1])]["mean"], color="gray", linestyle=":", label=f"scratch at {budget_label(budgets[-1])}")
    if log:
        axes.set_xscale("log")
    axes.set_xticks(budgets, [budget_label(b) for b in budgets])
    axes.minorticks_off()
    axes.set(xlabel="labels kept per class" + (" (fraction)" if isinstance(budgets[0], float) else ""), ylabel=metric,
             title=f"{metric} vs label budget")
    axes.legend()
    return figure


def _curves(cells: list[dict], arms: list[str], budgets: list) -> tuple[Any, list[str]]:
    """The loss-curve figure (None if no cell has a log) and the cells whose train loss has fewer than two points."""
    figure = _blank_figure(10, 4)
    left, right = figure.subplots(1, 2)
    drawn, sparse = False, []
    first_seed = min(c["seed"] for c in cells)
    for number, arm in enumerate(arms):
        for budget in sorted({budgets[0], budgets[-1]}):
            cell = next((c for c in cells if c["arm"] == arm and c["budget"] == budget and c["seed"] == first_seed), None)
            if cell is None or not (Path(cell["run_dir"]) / "metrics.jsonl").is_file():
                continue
            rows = read_metrics(Path(cell["run_dir"]))
            style = dict(color=COLORS[number % len(COLORS)], linestyle="-" if budget == budgets[-1] else "--")
            for axes, split in ((left, "train"), (right, "validation")):
                steps, values = series(rows, split, "loss")
                if steps:
                    axes.plot(steps, values, label=f"{arm}, {budget_label(budget)}", marker="o" if len(steps) == 1 else None, **style)
                    drawn = True
                if split == "train" and len(steps) < 2:
                    sparse.append(f"{arm} at {budget_label(budget)}, seed {cell['seed']} ({_steps_and_interval(cell)})")
    for axes, split in ((left, "train"), (right, "validation")):
        axes.set(xlabel="step", ylabel="loss", title=f"{split} loss")
    left.legend(fontsize=7)
    return (figure if drawn else None), sparse


def _steps_and_interval(cell: dict) -> str:
    """"3 steps, trainer.log_every 10" from the cell's row and its saved recipe."""
    try:
        log_every = yaml.safe_load((Path(cell["run_dir"]) / "recipe.yaml").read_text())["trainer"]["log_every"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return f"{cell['steps']} steps"
    return f"{cell['steps']} steps, trainer.log_every {log_every}"


def _encoding_note(cells: list[dict]) -> str:
    """What the FLOPs of linear-probe cells leave out, if anything."""
    probes = [c for c in cells if c.get("strategy") == "linear-probe"]
    if not probes:
        return ""
    if all(c.get("encode_flops") for c in probes):
        return "; linear-probe cells include their one-off encoding of the data by the frozen backbone"
    return ("; linear-probe cells count their head's training only: the one-off encoding of the data by the frozen "
            "backbone is not in their log")


def _confusion(matrix: list[list[int]], labels: list[str] | None) -> Any:
    values = np.asarray(matrix)
    size = len(values)
    figure, axes = _figure(min(3 + 0.4 * size, 12), min(3 + 0.4 * size, 12))
    axes.imshow(values, cmap="Blues")
    names = [str(n)[:16] for n in labels] if labels and len(labels) == size else [str(i) for i in range(size)]
    axes.set_xticks(range(size), names, rotation=90, fontsize=7)
    axes.set_yticks(range(size), names, fontsize=7)
    axes.set(xlabel="predicted", ylabel="true")
    if size <= 20:
        top = values.max() if values.size else 0
        for i in range(size):
            for j in range(size):
                axes.text(j, i, str(values[i, j]), ha="center", va="center", fontsize=7,
                          color="white" if values[i, j] > top / 2 else "black")
    return figure
