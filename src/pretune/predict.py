"""Use a fine-tuned model: ``pretune.load(path).predict(texts)``, ``pretune predict``, ``pretune evaluate``.

The model folder is a standard Hugging Face folder (``AutoModelForSequenceClassification`` or
``AutoModelForTokenClassification`` loads it) plus ``pretune.json`` (task kind, label names, text
columns, threshold), so predictions here and in plain ``transformers`` are the same.

An image or vector classifier is a pretune vision folder (``config.json`` with ``"pretune":
"vision"``, see :mod:`pretune.backbones.vision`); ``load`` returns a :class:`VisionPredictor` for
it, which reads image files / folders and vector files with the training readers, at the model's
input size and channels.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from tqdm.auto import tqdm

from pretune.errors import CheckpointError, DataError


def read_meta(path: Path) -> tuple[dict[str, Any], Path]:
    """``pretune.json`` of a model folder (what it predicts, its labels) and its path."""
    meta_file = path / "pretune.json"
    if not meta_file.is_file():
        raise CheckpointError(f"{path}: not a fine-tuned pretune model (no pretune.json)")
    return json.loads(meta_file.read_text()), meta_file


class Predictor:
    def __init__(self, path: str | Path, device: str | None = None):
        self.path = Path(path)
        self.meta, meta_file = read_meta(self.path)
        self.kind = self.meta.get("kind")
        if self.kind not in ("single", "multi", "regression", "tags"):
            raise CheckpointError(f"{meta_file}: a {self.meta.get('task', 'pretraining')} model has no task head to predict with; fine-tune it first")
        auto = transformers.AutoModelForTokenClassification if self.kind == "tags" else transformers.AutoModelForSequenceClassification
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        from pretune.trainer.checkpoint import check_model_folder, pickle_trusted

        check_model_folder(self.path)  # weights only from safetensors unless --trust-pickle
        self.model = auto.from_pretrained(str(self.path), use_safetensors=None if pickle_trusted() else True).to(self.device).eval()
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(self.path))
        self.labels: list[str] = self.meta.get("label_names") or []

    @torch.no_grad()
    def logits(self, texts: list, pairs: list | None = None) -> tuple[torch.Tensor, Any]:
        encoded = self.tokenizer(texts, pairs, truncation=True, max_length=self.meta.get("max_length", 512), padding=True,
                                 is_split_into_words=self.kind == "tags", return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in encoded.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        return self.model(**inputs).logits.float().cpu(), encoded

    def predict(self, texts: str | list, pairs: list | None = None, batch_size: int = 32, progress: bool = False) -> list[dict[str, Any]]:
        """One dict per input: ``label`` and ``probabilities`` (classification), ``labels`` (multi-label),
        ``value`` (regression) or ``tags`` (one per word, for tagging).  Tagging takes lists of words; a
        string is split on whitespace, and a list of strings is one sentence of words unless one of them
        holds whitespace (then it is a list of sentences)."""
        single = isinstance(texts, str) or (self.kind == "tags" and bool(texts) and all(isinstance(t, str) for t in texts)
                                            and not any(len(t.split()) > 1 for t in texts))
        texts = [texts] if single else list(texts)
        if self.kind == "tags":
            texts = [t.split() if isinstance(t, str) else t for t in texts]
        results: list[dict[str, Any]] = []
        starts = range(0, len(texts), batch_size)
        for start in tqdm(starts, desc="predicting", disable=not progress, mininterval=2):
            batch = texts[start:start + batch_size]
            logits, encoded = self.logits(batch, pairs[start:start + batch_size] if pairs else None)
            results.extend(self._decode(logits, encoded, batch))
        return results[0:1] if single else results

    def _decode(self, logits: torch.Tensor, encoded: Any, batch: list) -> list[dict[str, Any]]:
        if self.kind == "single":
            probs = logits.softmax(-1)
            return [{"label": self.labels[int(p.argmax())], "probabilities": dict(zip(self.labels, p.tolist()))} for p in probs]
        if self.kind == "multi":
            probs = logits.sigmoid()
            threshold = self.meta.get("threshold", 0.5)
            return [{"labels": [l for l, x in zip(self.labels, p.tolist()) if x > threshold], "probabilities": dict(zip(self.labels, p.tolist()))} for p in probs]
        if self.kind == "regression":
            return [{"value": float(v[0]) if v.numel() == 1 else v.tolist()} for v in logits]
        out = []
        for row, words in enumerate(batch):
            tags, previous = ["O"] * len(words), None
            for position, word in enumerate(encoded.word_ids(row)):
                if word is not None and word != previous:
                    tags[word] = self.labels[int(logits[row, position].argmax())]
                previous = word
            out.append({"words": words, "tags": tags})
        return out


class VisionPredictor:
    """A fine-tuned image or vector classifier: the backbone (which normalises its input) plus the
    linear head, as :class:`pretune.tasks.supervised.Classifier` trained it.

    ``predict`` takes image file paths, a folder of images (flat or one sub-folder per class), a
    vector file (CSV/TSV/Parquet/NPY/NPZ, for vector models), ``"builtin:digits"``, or a tensor /
    numpy array of examples (``[N, C, H, W]`` pixels in [0, 1], uint8 pixels are divided by 255;
    ``[N, D]`` vectors; one example without the batch dimension also works)."""

    kind = "single"

    def __init__(self, path: str | Path, device: str | None = None):
        from pretune.backbones import vision
        from pretune.tasks.supervised import Classifier

        self.path = Path(path)
        self.meta, meta_file = read_meta(self.path)
        if self.meta.get("kind") != "single":
            raise CheckpointError(f"{meta_file}: a {self.meta.get('task', 'pretraining')} model has no classification head to "
                                  "predict with; fine-tune it first (recipes/image-classify.yaml model=...)")
        config, state = vision.read_folder(self.path)
        self.labels: list[str] = [str(name) for name in self.meta.get("label_names") or []]
        self.input_shape: tuple[int, ...] = tuple(config["backbone"]["input_shape"])
        self.modality = self.meta.get("modality") or ("image" if len(self.input_shape) == 3 else "vector")
        model = Classifier(vision.VisionBackbone(config["backbone"]), int(config.get("outputs", len(self.labels))))
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise CheckpointError(f"{self.path}/model.safetensors: does not match its config.json "
                                  f"({' '.join(str(exc).split())[:300]})") from None
        if len(self.labels) != model.head.out_features:
            raise CheckpointError(f"{meta_file}: {len(self.labels)} label names for a head of {model.head.out_features} outputs")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()

    @torch.no_grad()
    def logits(self, x: torch.Tensor, batch_size: int = 256, progress: bool = False) -> torch.Tensor:
        """Logits ``[N, K]`` of examples already shaped like ``input_shape`` (raw pixels / vectors)."""
        starts = range(0, len(x), batch_size)
        out = [self.model(x[start:start + batch_size].to(self.device)).logits.float().cpu()
               for start in tqdm(starts, desc="predicting", disable=not progress, mininterval=2)]
        return torch.cat(out) if out else torch.zeros(0, len(self.labels))

    def predict(self, inputs: Any, batch_size: int = 64, progress: bool = False) -> list[dict[str, Any]]:
        """One dict per example, ``label`` and ``probabilities`` (as for text classification)."""
        return self._decode(self.logits(self.read(inputs).x, batch_size, progress))

    def _decode(self, logits: torch.Tensor) -> list[dict[str, Any]]:
        probs = logits.softmax(-1)
        return [{"label": self.labels[int(p.argmax())], "probabilities": dict(zip(self.labels, p.tolist()))} for p in probs]

    # -- inputs -------------------------------------------------------------------------------------
    def read(self, inputs: Any, *, labelled: bool = False, classes: list[str] | None = None,
             bad_files: str = "error", label: str | None = None) -> ArrayInputs:
        """Examples shaped for the model, with where each came from (``{"path": ...}`` or
        ``{"index": ...}``) and, when the source has them, their class names.  ``labelled``: the
        source must have labels; ``classes``: keep only examples of these classes; ``bad_files``:
        ``skip`` leaves undecodable images out (with a warning), ``error`` stops."""
        from pretune.data.images import BUILTIN_DIGITS, EXTENSIONS, list_images, load_image_files

        paths = keys = x = None
        if isinstance(inputs, (str, Path)):
            source = str(inputs)
            if source == BUILTIN_DIGITS:
                x, keys = self._digits()
            elif self.modality == "vector":
                from pretune.data.vectors import read_vectors

                x, keys = read_vectors(source, label or self.meta.get("label", "label"))
            elif Path(source).is_dir():
                paths, keys = list_images(source)
            elif Path(source).is_file():
                if Path(source).suffix.lower() not in EXTENSIONS:
                    raise DataError(f"{source}: not an image file ({', '.join(EXTENSIONS)}); give an image, a folder of images "
                                    "or a list of image paths")
                paths = [Path(source)]
            else:
                raise DataError(f"{source}: no such image folder or file")
        elif isinstance(inputs, (list, tuple)) and inputs and all(isinstance(item, (str, Path)) for item in inputs):
            if self.modality == "vector":
                raise DataError("a vector model reads one vector file, a tensor or an array, not a list of paths")
            source, paths = "the images", [Path(item) for item in inputs]
            missing = next((p for p in paths if not p.is_file()), None)
            if missing is not None:
                raise DataError(f"{missing}: no such image file")
        else:
            source, x = "the inputs", self._as_tensor(inputs)

        if labelled and keys is None:
            what = "one sub-folder per class" if paths is not None else f"a {label or self.meta.get('label', 'label')!r} column (NPZ: array 'y')"
            raise DataError(f"{source} has no labels; evaluating needs labelled data ({what})")
        rows = list(range(len(paths if paths is not None else x)))
        if classes is not None and keys is not None:
            wanted = {str(name) for name in classes}
            rows = [i for i in rows if keys[i] in wanted]
            if not rows:
                raise DataError(f"{source} holds no example of the classes {', '.join(map(str, classes))}")
        skipped: list[str] = []
        if paths is not None:
            x, kept, skipped = load_image_files([paths[i] for i in rows], self._size(), self.input_shape[0], bad_files)
            rows = [rows[i] for i in kept]
            if skipped:
                shown = ", ".join(skipped[:3]) + (", ..." if len(skipped) > 3 else "")
                print(f"pretune: warning: skipped {len(skipped)} unreadable image file(s): " + " ".join(shown.split()),
                      file=sys.stderr, flush=True)
        elif len(rows) != len(x):
            x = x[rows]
        if tuple(x.shape[1:]) != self.input_shape:
            what = f"{x.shape[1]} features" if x.dim() == 2 else f"shape {tuple(x.shape[1:])}"
            raise DataError(f"examples of {source} have {what} but the model takes inputs of shape {self.input_shape}")
        origins = [{"path": str(paths[i])} for i in rows] if paths is not None else [{"index": i} for i in rows]
        return ArrayInputs(x, origins, None if keys is None else [keys[i] for i in rows], skipped)

    def _size(self) -> int | tuple[int, int]:
        height, width = self.input_shape[1:]
        return height if height == width else (height, width)

    def _digits(self) -> tuple[torch.Tensor, list[str]]:
        from pretune.data.images import load_digits

        x, keys = load_digits(None, 1 if self.modality == "vector" else self.input_shape[0])
        if self.modality == "vector":
            return x.flatten(1), keys
        if tuple(x.shape[2:]) != self.input_shape[1:]:  # as the training reader resizes them
            x = torch.nn.functional.interpolate(x, size=self.input_shape[1:], mode="bilinear", align_corners=False, antialias=False)
        return x.contiguous(), keys

    def _as_tensor(self, inputs: Any) -> torch.Tensor:
        import numpy as np

        try:
            x = inputs if isinstance(inputs, torch.Tensor) else torch.as_tensor(np.asarray(inputs))
        except (TypeError, ValueError, RuntimeError) as exc:
            raise DataError(f"cannot read the inputs as examples ({' '.join(str(exc).split())[:200]}); give file paths, a folder, "
                            "a tensor or a numpy array") from None
        if x.dtype == torch.uint8 and self.modality == "image":
            x = x.float() / 255
        if not (x.is_floating_point() or x.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool)):
            raise DataError(f"the inputs hold {x.dtype} values; give real numbers")
        x = x.detach().float().cpu()
        if x.dim() == len(self.input_shape):  # one example
            x = x[None]
        if x.dim() != len(self.input_shape) + 1 or tuple(x.shape[1:]) != self.input_shape:
            layout = "[N, C, H, W] pixels in [0, 1]" if self.modality == "image" else "[N, D] vectors"
            raise DataError(f"the inputs have shape {tuple(x.shape)}; the model takes {layout} with {self.input_shape} per example")
        if not torch.isfinite(x).all():
            raise DataError("the inputs hold NaN or infinite values")
        return x


@dataclass
class ArrayInputs:
    x: torch.Tensor  # [N, *input_shape]
    origins: list[dict[str, Any]]  # {"path": file} or {"index": row}, one per example
    keys: list[str] | None  # class names, when the source is labelled
    skipped: list[str]  # "path (reason)" of images left out by bad_files="skip"


def load(path: str | Path, device: str | None = None) -> Predictor | VisionPredictor:
    """A fine-tuned model ready to predict: ``pretune.load("runs/clf/model").predict(["great film"])``;
    an image / vector classifier gives a :class:`VisionPredictor` (``.predict("photos/")``)."""
    from pretune.backbones.vision import is_vision_folder

    if is_vision_folder(path):
        return VisionPredictor(path, device)
    return Predictor(path, device)


def read_inputs(path: str, column: str | None = None) -> tuple[list, list[dict]]:
    """Texts to predict from a .txt (one per line), .jsonl or .csv file; returns (texts, original rows)."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"{path}: no such file")
    suffix = file.suffix.lower()
    try:
        raw = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    if suffix in (".txt", ".text"):  # one text per line, under the column the model reads
        rows = [{column or "text": line} for line in raw.splitlines() if line.strip()]
    elif suffix in (".jsonl", ".json"):
        rows = []
        for number, line in enumerate(raw.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path} line {number}: not valid JSON ({exc.msg})") from None
    elif suffix in (".csv", ".tsv"):
        import csv
        import io

        rows = list(csv.DictReader(io.StringIO(raw), delimiter="\t" if suffix == ".tsv" else ","))
    else:
        raise DataError(f"{path}: unsupported input format {suffix!r}; use .txt, .jsonl or .csv")
    if not rows:
        raise DataError(f"{path}: no inputs")
    column = column or "text"
    for number, row in enumerate(rows, 1):
        if not isinstance(row, dict) or column not in row:
            raise DataError(f"{path} row {number}: no column {column!r}")
    return [row[column] for row in rows], rows


def predict_file(model_dir: str, inputs: str, out: str, column: str | None = None, batch_size: int = 32) -> int:
    predictor = load(model_dir)
    if isinstance(predictor, VisionPredictor):
        return _predict_arrays_file(predictor, inputs, out, column, batch_size)
    texts, rows = read_inputs(inputs, column or predictor.meta.get("text"))
    pair_column = predictor.meta.get("text_pair")
    pairs = [row[pair_column] for row in rows] if pair_column and all(pair_column in r for r in rows) else None
    if predictor.kind == "tags":  # one sentence per row: a list of words, or a string of space-separated words
        texts = [text.split() if isinstance(text, str) else text for text in texts]
    results = predictor.predict(texts, pairs, batch_size=batch_size, progress=True)
    with open(out, "w", encoding="utf-8") as handle:
        for row, result in zip(rows, results):
            handle.write(json.dumps({**row, **result}) + "\n")
    return len(results)


def evaluate_file(model_dir: str, data_file: str, out: str | None = None, batch_size: int = 32, *,
                  classes: list[str] | None = None, label: str | None = None, bad_files: str = "skip") -> dict[str, Any]:
    """Metrics of a fine-tuned model on a labelled file with the same columns as its training data
    (an image / vector classifier: a folder with one sub-folder per class, or a labelled vector file).

    Image / vector models only: ``classes`` keeps the examples of these classes (as ``data.classes``),
    ``label`` names the label column of a vector file, ``bad_files`` as ``data.bad_files``."""
    from pretune.data.labelled import LabelledDataConfig, read_labelled
    from pretune.evaluate import metrics as M

    predictor = load(model_dir)
    if isinstance(predictor, VisionPredictor):
        scores = _evaluate_arrays(predictor, data_file, batch_size, classes, label, bad_files)
        if out:
            Path(out).write_text(json.dumps(scores, indent=2))
        return scores
    meta = predictor.meta
    cfg = LabelledDataConfig(train=data_file, text=meta.get("text", "text"), text_pair=meta.get("text_pair"),
                             label=meta.get("label", "label"), max_length=meta.get("max_length", 128))
    table = read_labelled(data_file, cfg, predictor.kind, predictor.labels)
    texts = list(table[cfg.text])
    pairs = list(table[cfg.text_pair]) if cfg.text_pair else None
    results = predictor.predict(texts, pairs, batch_size=batch_size, progress=True)
    truth = list(table["labels"])
    names = predictor.labels
    if predictor.kind == "single":
        scores = M.classification_metrics(truth, [names.index(r["label"]) for r in results], names)
    elif predictor.kind == "multi":
        scores = M.multilabel_metrics([[int(x) for x in t] for t in truth], [[int(n in r["labels"]) for n in names] for r in results], names)
    elif predictor.kind == "regression":
        scores = M.regression_metrics(truth, [r["value"] for r in results])
    else:
        scores = M.entity_metrics([[names[i] for i in t] for t in truth], [r["tags"] for r in results])
    if out:
        Path(out).write_text(json.dumps(scores, indent=2))
    return scores


def _predict_arrays_file(predictor: VisionPredictor, inputs: str, out: str, column: str | None, batch_size: int) -> int:
    """Predictions for an image folder / file or a vector file: JSONL (CSV/TSV when ``out`` ends so),
    one row per image (``path``) or vector (``index``, 0-based row of the file)."""
    if column is not None:
        raise DataError("--column applies to text models; an image / vector model reads whole images or rows")
    read = predictor.read(inputs, bad_files="skip")
    results = predictor._decode(predictor.logits(read.x, batch_size, progress=True))
    rows = [{**origin, **result} for origin, result in zip(read.origins, results)]
    suffix = Path(out).suffix.lower()
    with open(out, "w", encoding="utf-8", newline="" if suffix in (".csv", ".tsv") else None) as handle:
        if suffix in (".csv", ".tsv"):  # flat: one probability column per class
            import csv

            writer = csv.writer(handle, delimiter="\t" if suffix == ".tsv" else ",")
            where = next(iter(read.origins[0])) if read.origins else "path"
            writer.writerow([where, "label", *(f"probability_{name}" for name in predictor.labels)])
            for row in rows:
                writer.writerow([row[where], row["label"], *(row["probabilities"][name] for name in predictor.labels)])
        else:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
    return len(rows)


def _evaluate_arrays(predictor: VisionPredictor, data: str, batch_size: int, classes: list[str] | None,
                     label: str | None, bad_files: str) -> dict[str, Any]:
    from pretune.data.arrays import _encode
    from pretune.data.labelled import _not_in_map
    from pretune.evaluate import metrics as M

    read = predictor.read(data, labelled=True, classes=classes, bad_files=bad_files, label=label)
    names = predictor.labels
    truth = _encode(read.keys, names, data, _not_in_map(names))  # a class the model does not know: one line naming it
    predicted = predictor.logits(read.x, batch_size, progress=True).argmax(-1)
    return M.classification_metrics(truth.tolist(), predicted.tolist(), names)
