"""The model card: a ``README.md`` in every saved model folder, in the Hugging Face model-card layout.

A YAML header (``library_name``, ``pipeline_tag``, ``tags``, ``base_model`` when it is a Hub name,
``model-index``-free metrics list) and sections a reader of the Hub expects: what the model is and
came from (base model, and the objective and data of that model's pretraining when a pretune
folder says so), how it was trained (the strategy and optimiser settings, then the whole recipe),
how well it does (best validation and test metrics), its labels, how to use it, and its limits.
Written once at the end of a run, after the test set is scored; ``pretune export`` copies it and
``pretune compare`` adds the study's headline.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

CARD = "README.md"
PIPELINES = {("text", "single"): "text-classification", ("text", "multi"): "text-classification",
             ("text", "regression"): "text-classification", ("text", "tags"): "token-classification",
             ("image", "single"): "image-classification", ("image", "multi"): "image-classification"}
OBJECTIVES = {"mlm": "masked language modelling (BERT)", "clm": "causal next-token language modelling (GPT)",
              "simcse": "contrastive sentence embeddings (SimCSE: NT-Xent over dropout views)",
              "simclr": "contrastive learning (SimCLR: NT-Xent over augmented views)",
              "autoencoder": "(denoising) autoencoding", "gan": "a generative adversarial network (the discriminator)",
              "classify": "supervised classification", "regress": "supervised regression", "tag": "token tagging"}


SHOWN = ("accuracy", "f1_macro", "precision_macro", "recall_macro", "f1_micro", "rmse", "mae", "r2", "pearson", "spearman",
         "f1", "perplexity", "loss")


def write_card(model_dir: Path, recipe: Any, metrics: dict[str, Any]) -> Path:
    """Write ``model_dir/README.md`` for the run that saved ``model_dir`` (``recipe``: its resolved Recipe)."""
    model_dir = Path(model_dir)
    meta = _json(model_dir / "pretune.json")
    config = recipe.model_dump(mode="json")
    task = config["task"]["name"]
    base = config["backbone"].get("path")
    base_meta = _json(Path(base) / "pretune.json") if base else {}
    modality = meta.get("modality") or ("text" if (model_dir / "tokenizer.json").is_file() or (model_dir / "tokenizer_config.json").is_file() else "image")
    header: dict[str, Any] = {"library_name": "pretune" if meta.get("family") not in (None, "hf") else "transformers",
                              "tags": ["pretune", task, *( [config["strategy"]["name"]] if recipe.kind == "finetune" else [])]}
    if pipeline := PIPELINES.get((modality, meta.get("kind"))):
        header["pipeline_tag"] = pipeline
    if base and _hub_name(base):
        header["base_model"] = base
    name = Path(config["run_dir"]).name
    lines = ["---", yaml.safe_dump(header, sort_keys=False).strip(), "---", "", f"# {name}", ""]
    lines += _description(recipe, config, task, base, base_meta, modality)
    lines += _training(recipe, config)
    lines += _evaluation(metrics)
    if meta.get("label_names"):
        lines += ["## Labels", "", "| id | label |", "|---|---|", *[f"| {i} | {n} |" for i, n in enumerate(meta["label_names"])], ""]
    lines += _usage(model_dir, meta, modality)
    lines += ["## Intended use and limitations", "",
              "Trained for the task and data described above; its metrics hold for data like its validation and test "
              "sets, not beyond.  Check it on your own held-out data before relying on it, and mind that it inherits "
              "the biases of its base model and of its training data.", ""]
    lines += ["## Recipe", "", "The resolved recipe of the run (`pretune " + recipe.kind + " recipe.yaml` reproduces it):", "",
              "```yaml", recipe.dump().strip(), "```", ""]
    path = model_dir / CARD
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def add_section(model_dir: Path, title: str, body: list[str]) -> None:
    """Append (or replace) a ``## title`` section of a model folder's card; no card, nothing to do."""
    path = Path(model_dir) / CARD
    if not path.is_file():
        return
    text = path.read_text(encoding="utf-8")
    marker = f"\n## {title}\n"
    if marker in text:
        head, rest = text.split(marker, 1)
        tail = rest[rest.find("\n## "):] if "\n## " in rest else "\n"
        text = head + tail
    path.write_text(text.rstrip("\n") + "\n" + marker + "\n" + "\n".join(body) + "\n", encoding="utf-8")


def _description(recipe: Any, config: dict, task: str, base: str | None, base_meta: dict, modality: str) -> list[str]:
    backbone = config["backbone"]
    lines = ["## Model description", ""]
    if recipe.kind == "pretrain":
        lines.append(f"A {modality} model ({_architecture(backbone)}) pretrained with {OBJECTIVES.get(task, task)}"
                     + (f", continuing `{base}`." if base else " from scratch."))
    else:
        what = {"classify": "a classifier", "regress": "a regressor", "tag": "a token tagger"}.get(task, task)
        lines.append(f"{what[0].upper() + what[1:]} fine-tuned from `{base}` with the `{recipe.strategy}` strategy."
                     if base else f"{what[0].upper() + what[1:]} trained from scratch ({_architecture(backbone)}).")
        if base_meta.get("task") in OBJECTIVES and base_meta.get("task") not in ("classify", "regress", "tag"):
            lines.append(f"The base model was pretrained by pretune with {OBJECTIVES[base_meta['task']]}.")
        if base and (Path(base) / CARD).is_file():
            lines.append(f"The base model's own card: `{Path(base) / CARD}`.")
    data = config["data"]
    sources = [f"`{k}`: `{v}`" for k, v in data.items() if k in ("files", "train", "validation", "test", "dataset") and v]
    lines += ["", "## Training data", "", ("Data: " + ", ".join(sources) + ".") if sources else "The data given in the recipe below.", ""]
    return lines


def _training(recipe: Any, config: dict) -> list[str]:
    t = config["trainer"]
    settings = [f"optimizer {t['optimizer']}", f"learning rate {t['lr']:g}"]
    if t.get("head_lr"):
        settings.append(f"task-layer learning rate {t['head_lr']:g}")
    settings += [f"schedule {t['schedule']} with warm-up {t['warmup']:g}", f"batch size {t['batch_size']}",
                 f"{t['max_steps']} steps" if t.get("max_steps") else f"{t['epochs']:g} epochs", f"seed {config['seed']}"]
    lines = ["## Training procedure", ""]
    if recipe.kind == "finetune":
        lines.append(f"Strategy `{recipe.strategy}`; " + ", ".join(settings) + ".")
    else:
        lines.append(", ".join(settings).capitalize() + ".")
    return [*lines, ""]


def _evaluation(metrics: dict[str, Any]) -> list[str]:
    """The headline metrics (validation of the kept checkpoint, and test when a test set was scored)."""
    shown = [k for k in SHOWN if k in metrics or f"test_{k}" in metrics]
    if not shown:
        return []
    cell = lambda key: f"{metrics[key]:.4g}" if isinstance(metrics.get(key), (int, float)) else "–"  # noqa: E731
    lines = ["## Evaluation", "", "| metric | validation | test |", "|---|---|---|",
             *[f"| {k} | {cell(k)} | {cell('test_' + k)} |" for k in shown], ""]
    if isinstance(metrics.get("warning"), str):
        lines += [f"Note from training: {metrics['warning'].removeprefix('warning: ')}", ""]
    return lines


def _usage(model_dir: Path, meta: dict, modality: str) -> list[str]:
    if "kind" not in meta:  # a pretrained model: fine-tune it
        return ["## How to use", "", "```bash", f"pretune finetune recipes/text-classify.yaml model={model_dir} data.train=train.csv"
                if modality == "text" else f"pretune finetune recipes/image-classify.yaml model={model_dir} data.train=folder/", "```", ""]
    example = '["an example text"]' if modality == "text" else '"image.png"'
    lines = ["## How to use", "", "```python", "import pretune", "", f'model = pretune.load("{model_dir}")',
             f"print(model.predict({example}))", "```", "",
             f"From the command line: `pretune predict {model_dir} inputs.csv --out predictions.jsonl`; "
             f"`pretune serve {model_dir}` serves it over HTTP and `pretune export {model_dir} --int8` writes it as ONNX."]
    if meta.get("family") == "hf" and not meta.get("pooling"):
        auto = "AutoModelForTokenClassification" if meta.get("kind") == "tags" else "AutoModelForSequenceClassification"
        lines += ["", f"It is also a plain Hugging Face folder: `transformers.{auto}.from_pretrained(\"{model_dir}\")` loads it "
                  "with the same predictions."]
    return [*lines, ""]


def _architecture(backbone: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in backbone.items() if k in ("name", "size") and v) or "the recipe's backbone"


def _hub_name(base: str) -> bool:
    """A Hub model id (``org/name``) rather than a local folder."""
    return not Path(base).exists() and base.count("/") == 1 and not base.startswith((".", "/", "~"))


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
