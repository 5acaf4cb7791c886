"""Use a fine-tuned model: ``pretune.load(path).predict(texts)``, ``pretune predict``, ``pretune evaluate``.

The model folder is a standard Hugging Face folder (``AutoModelForSequenceClassification`` or
``AutoModelForTokenClassification`` loads it) plus ``pretune.json`` (task kind, label names, text
columns, threshold), so predictions here and in plain ``transformers`` are the same.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import transformers
from tqdm.auto import tqdm

from pretune.errors import CheckpointError, DataError


class Predictor:
    def __init__(self, path: str | Path, device: str | None = None):
        self.path = Path(path)
        meta_file = self.path / "pretune.json"
        if not meta_file.is_file():
            raise CheckpointError(f"{self.path}: not a fine-tuned pretune model (no pretune.json)")
        self.meta = json.loads(meta_file.read_text())
        self.kind = self.meta.get("kind")
        if self.kind not in ("single", "multi", "regression", "tags"):
            raise CheckpointError(f"{meta_file}: a {self.meta.get('task', 'pretraining')} model has no task head to predict with; fine-tune it first")
        auto = transformers.AutoModelForTokenClassification if self.kind == "tags" else transformers.AutoModelForSequenceClassification
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = auto.from_pretrained(str(self.path)).to(self.device).eval()
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


def load(path: str | Path, device: str | None = None) -> Predictor:
    """A fine-tuned model ready to predict: ``pretune.load("runs/clf/model").predict(["great film"])``."""
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


def evaluate_file(model_dir: str, data_file: str, out: str | None = None, batch_size: int = 32) -> dict[str, Any]:
    """Metrics of a fine-tuned model on a labelled file with the same columns as its training data."""
    from pretune.data.labelled import LabelledDataConfig, read_labelled
    from pretune.evaluate import metrics as M

    predictor = load(model_dir)
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
