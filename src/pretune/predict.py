"""Use a fine-tuned model: ``pretune.load(path).predict(inputs)``, ``pretune predict``, ``pretune evaluate``.

One predictor serves every modality.  The model folder says which backbone family saved it
(:func:`pretune.backbones.for_folder`), the family loads the classifier, ``pretune.json`` names
the head kind (:mod:`pretune.heads`), which decodes logits into predictions and scores them.  Only
reading raw inputs differs by modality: text is tokenised (a Hugging Face folder that
``AutoModelForSequenceClassification`` loads with the same predictions); images and vectors are
read with the training readers at the model's input shape.

A folder written by ``pretune export`` (ONNX) loads as the same :class:`Predictor`, its model run by
ONNX Runtime (:mod:`pretune.onnx_engine`).  A causal language model (``clm``) loads as a
:class:`Generator` instead: ``generate(prompt)``.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from tqdm.auto import tqdm

import pretune.backbones  # noqa: F401  (registers the backbone families)
from pretune import heads
from pretune.backbones.base import for_folder
from pretune.backbones.items import is_items_folder
from pretune.backbones.transformers import tokenize
from pretune.data.arrays import encode_labels
from pretune.data.audio import AudioSpec, clips_from_arrays, is_audio_file, list_audio, load_audio_files, log_mel
from pretune.data.images import BUILTIN_DIGITS, EXTENSIONS, list_images, load_digits, load_image_files
from pretune.data.labelled import LabelledDataConfig, not_in_map, read_labelled
from pretune.data.interactions import UNK, InteractionsConfig, build_interactions, item_ids
from pretune.data.readers import TOKENIZED
from pretune.data.vectors import read_vectors
from pretune.errors import CheckpointError, DataError
from pretune.onnx_engine import is_exported, load_onnx
from pretune.tasks.mlm import mlm_head
from pretune.tasks.recommend import next_item_scores, rank_queries
from pretune.tasks.two_tower import ItemTower
from pretune.safeload import check_model_folder, pickle_trusted


def read_meta(path: Path) -> tuple[dict[str, Any], Path]:
    """``pretune.json`` of a model folder (what it predicts, its labels) and its path."""
    meta_file = path / "pretune.json"
    if not meta_file.is_file():
        raise CheckpointError(f"{path}: not a fine-tuned pretune model (no pretune.json)")
    return json.loads(meta_file.read_text()), meta_file


def _device(device: str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


class Predictor:
    """A fine-tuned classifier, regressor or tagger of any modality.

    ``predict`` takes texts (a string, a list; for tagging, lists of words or space-separated
    strings; ``pairs`` for sentence-pair models), or for image / vector models image file paths, a
    folder of images, a vector file (CSV/TSV/Parquet/NPY/NPZ), ``"builtin:digits"``, or a tensor /
    numpy array (``[N, C, H, W]`` pixels in [0, 1], uint8 pixels are divided by 255; ``[N, D]``
    vectors; one example without the batch dimension also works)."""

    def __init__(self, path: str | Path, device: str | None = None):
        self.path = Path(path)
        self.meta, meta_file = read_meta(self.path)
        if self.meta.get("kind") not in heads.HEADS:
            advice = ("generate text with it (pretune generate)" if self.meta.get("task") == "clm"
                      else "fine-tune it first (pretune finetune ... model=PATH)")
            raise CheckpointError(f"{meta_file}: a {self.meta.get('task', 'pretraining')} model has no task head to predict with; {advice}")
        self.head = heads.get(self.meta["kind"])
        self.labels: list[str] = [str(name) for name in self.meta.get("label_names") or []]
        self.kind = self.head.name
        self.device = _device(device)
        if is_exported(self.meta):  # pretune export: the same predictions from ONNX Runtime
            self.device = torch.device("cpu")
            self.modality = "text" if self.meta.get("modality") == "text" else "array"
            self.model, inputs = load_onnx(self.path, self.meta)
        else:
            family = for_folder(self.path)
            self.modality = "text" if family.modality in TOKENIZED else family.modality  # item histories are text of item ids
            self.model, inputs = family.load_classifier(self.path, self.meta, self.device)
        self.audio: AudioSpec | None = None
        if self.modality == "text":
            self.tokenizer = inputs
        else:
            self.input_shape: tuple[int, ...] = tuple(inputs["input_shape"])
            self.modality = self.meta.get("modality") or ("image" if len(self.input_shape) == 3 else "vector")
            self.audio = AudioSpec(**inputs["audio"]) if inputs.get("audio") else None  # how clips become features

    # -- text -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def text_logits(self, texts: list, pairs: list | None = None) -> tuple[torch.Tensor, Any]:
        batch, encoded = tokenize(self.tokenizer, texts, pairs, self.meta.get("max_length", 512), self.head.per_token)
        return self.model({k: v.to(self.device) for k, v in batch.items()}).float().cpu(), encoded

    def _predict_texts(self, texts: Any, pairs: list | None, batch_size: int, progress: bool) -> list[dict[str, Any]]:
        single = isinstance(texts, str) or (self.head.per_token and bool(texts) and all(isinstance(t, str) for t in texts)
                                            and not any(len(t.split()) > 1 for t in texts))
        texts = [texts] if single else list(texts)
        if self.head.per_token:
            texts = [t.split() if isinstance(t, str) else t for t in texts]
        results: list[dict[str, Any]] = []
        for start in tqdm(range(0, len(texts), batch_size), desc="predicting", disable=not progress, mininterval=2):
            batch = texts[start:start + batch_size]
            logits, encoded = self.text_logits(batch, pairs[start:start + batch_size] if pairs else None)
            if self.head.per_token:
                results.extend({"words": words, "tags": self.head.decode_words(logits[row], encoded.word_ids(row), len(words), self.labels)}
                               for row, words in enumerate(batch))
            else:
                results.extend(self.head.decode(logits, self.labels, self.meta.get("threshold", 0.5)))
        return results[0:1] if single else results

    # -- images, audio and vectors ------------------------------------------------------------------------
    @torch.no_grad()
    def logits(self, x: torch.Tensor, batch_size: int = 256, progress: bool = False) -> torch.Tensor:
        """Logits ``[N, K]`` of examples already shaped like ``input_shape`` (raw pixels / vectors)."""
        out = [self.model({"x": x[start:start + batch_size].to(self.device)}).float().cpu()
               for start in tqdm(range(0, len(x), batch_size), desc="predicting", disable=not progress, mininterval=2)]
        return torch.cat(out) if out else torch.zeros(0, len(self.labels))

    def predict(self, inputs: Any, pairs: list | None = None, batch_size: int = 32, progress: bool = False) -> list[dict[str, Any]]:
        """One dict per input: ``label`` and ``probabilities`` (classification), ``labels`` (multi-label),
        ``value`` (regression) or ``words`` and ``tags`` (tagging).  Tagging takes lists of words; a
        string is split on whitespace, and a list of strings is one sentence of words unless one of them
        holds whitespace (then it is a list of sentences)."""
        if self.modality == "text":
            return self._predict_texts(inputs, pairs, batch_size, progress)
        return self.decode(self.logits(self.read(inputs).x, batch_size, progress))

    def decode(self, logits: torch.Tensor) -> list[dict[str, Any]]:
        return self.head.decode(logits, self.labels, self.meta.get("threshold", 0.5))

    # -- inputs -------------------------------------------------------------------------------------
    def read(self, inputs: Any, *, labelled: bool = False, classes: list[str] | None = None,
             bad_files: str = "error", label: str | None = None) -> ArrayInputs:
        """Examples shaped for the model, with where each came from (``{"path": ...}`` or
        ``{"index": ...}``) and, when the source has them, their class names.  ``labelled``: the
        source must have labels; ``classes``: keep only examples of these classes; ``bad_files``:
        ``skip`` leaves undecodable images out (with a warning), ``error`` stops."""
        paths = keys = x = None
        if self.modality == "audio" and not isinstance(inputs, (str, Path)) and not _paths(inputs):
            source, x = "the inputs", self._waveforms(inputs)
        elif isinstance(inputs, (str, Path)) and self.modality == "audio":
            source = str(inputs)
            paths, keys = ([Path(source)], None) if is_audio_file(Path(source)) else list_audio(source)
        elif isinstance(inputs, (str, Path)):
            source = str(inputs)
            if source == BUILTIN_DIGITS:
                x, keys = self._digits()
            elif self.modality == "vector":
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
        elif _paths(inputs):
            if self.modality == "vector":
                raise DataError("a vector model reads one vector file, a tensor or an array, not a list of paths")
            what = "audio" if self.modality == "audio" else "image"
            source, paths = f"the {what} files", [Path(item) for item in inputs]
            missing = next((p for p in paths if not p.is_file()), None)
            if missing is not None:
                raise DataError(f"{missing}: no such {what} file")
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
        if paths is not None and self.audio is not None:  # silent clips are predicted too: the model was asked about them
            waves, kept, skipped = load_audio_files([paths[i] for i in rows], self.audio, bad_files, silent="keep")
            x, rows = log_mel(waves, self.audio), [rows[i] for i in kept]
        elif paths is not None:
            x, kept, skipped = load_image_files([paths[i] for i in rows], self._size(), self.input_shape[0], bad_files)
            rows = [rows[i] for i in kept]
        if skipped:
            shown = ", ".join(skipped[:3]) + (", ..." if len(skipped) > 3 else "")
            print(f"pretune: warning: skipped {len(skipped)} unreadable {self.modality} file(s): " + " ".join(shown.split()),
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
        x, keys = load_digits(None, 1 if self.modality == "vector" else self.input_shape[0])
        if self.modality == "vector":
            return x.flatten(1), keys
        if tuple(x.shape[2:]) != self.input_shape[1:]:  # as the training reader resizes them
            x = torch.nn.functional.interpolate(x, size=self.input_shape[1:], mode="bilinear", align_corners=False, antialias=False)
        return x.contiguous(), keys

    def _waveforms(self, inputs: Any) -> torch.Tensor:
        """Clips given as waveforms at the model's sample rate (one 1-D array, or a list / 2-D array of them), or
        log-mel spectrograms already shaped ``[N, n_mels, frames]``."""
        if isinstance(inputs, (torch.Tensor, np.ndarray)) and tuple(inputs.shape[-2:]) == self.input_shape:
            return self._as_tensor(inputs)
        if isinstance(inputs, (torch.Tensor, np.ndarray)):
            inputs = [inputs] if inputs.ndim == 1 else list(inputs)
        try:
            clips = [np.asarray(clip.cpu() if isinstance(clip, torch.Tensor) else clip, dtype=np.float32) for clip in inputs]
        except (TypeError, ValueError) as exc:
            raise DataError(f"cannot read the inputs as waveforms ({' '.join(str(exc).split())[:200]}); give audio file paths, "
                            f"a folder, or 1-D arrays of samples at {self.audio.sample_rate} Hz") from None
        if not clips or any(clip.ndim != 1 for clip in clips):
            raise DataError(f"waveforms must be 1-D arrays of samples at {self.audio.sample_rate} Hz (got shapes "
                            f"{[clip.shape for clip in clips[:3]]})")
        if not all(np.isfinite(clip).all() for clip in clips):
            raise DataError("the waveforms hold NaN or infinite values")
        return clips_from_arrays(clips, self.audio.sample_rate, self.audio)

    def _as_tensor(self, inputs: Any) -> torch.Tensor:
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




def _paths(inputs: Any) -> bool:
    return isinstance(inputs, (list, tuple)) and bool(inputs) and all(isinstance(item, (str, Path)) for item in inputs)


@dataclass
class ArrayInputs:
    x: torch.Tensor  # [N, *input_shape]
    origins: list[dict[str, Any]]  # {"path": file} or {"index": row}, one per example
    keys: list[str] | None  # class names, when the source is labelled
    skipped: list[str]  # "path (reason)" of images left out by bad_files="skip"


class Generator:
    """A causal language model (a pretune ``clm`` run, or any local decoder folder): ``generate(prompt)``."""

    def __init__(self, path: str | Path, device: str | None = None):
        self.path = Path(path)
        check_model_folder(self.path)  # weights only from safetensors unless --trust-pickle
        self.device = _device(device)
        try:
            self.model = transformers.AutoModelForCausalLM.from_pretrained(
                str(self.path), use_safetensors=None if pickle_trusted() else True).to(self.device).eval()
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(self.path))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{self.path}: cannot load as a causal language model ({' '.join(str(exc).split())[:200]})") from None

    @torch.no_grad()
    def generate(self, prompt: str | list[str], max_new_tokens: int = 50, *, sample: bool = True, temperature: float = 0.8,
                 top_k: int | None = 50, top_p: float | None = 0.95, seed: int = 0) -> str | list[str]:
        """Continue ``prompt`` (or each of a list of prompts) with transformers' ``generate``; sampling is
        seeded, so the same call gives the same text; ``sample=False`` decodes greedily."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or any(not isinstance(p, str) for p in prompts):
            raise DataError("generate takes a prompt string or a list of prompt strings")
        torch.manual_seed(seed)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        out = []
        for text in prompts:  # one at a time: no left-padding subtleties, and CPU generation is sequential anyway
            ids = self.tokenizer(text, return_tensors="pt").input_ids.to(self.device)
            if ids.shape[1] == 0 and self.tokenizer.bos_token_id is not None:
                ids = torch.tensor([[self.tokenizer.bos_token_id]], device=self.device)
            options = {"do_sample": sample, "max_new_tokens": max_new_tokens, "pad_token_id": pad}
            if sample:
                options.update(temperature=temperature, top_k=top_k, top_p=top_p)
            generated = self.model.generate(ids, attention_mask=torch.ones_like(ids), **options)
            out.append(self.tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True))
        return out[0] if isinstance(prompt, str) else out


class Recommender:
    """A sequential recommender (a pretune ``mlm`` / ``clm`` run on an interaction log):
    ``recommend(histories, top_k)`` ranks every item as the next one of each history.

    A history is a list of item ids (or one string of space-separated ids), oldest first; items the model
    never saw in training are read as ``[UNK]``.  Items already in the history are not recommended unless
    ``exclude_seen=False``."""

    def __init__(self, path: str | Path, device: str | None = None):
        self.path = Path(path)
        check_model_folder(self.path)
        self.meta, _ = read_meta(self.path)
        self.device = _device(device)
        task = self.meta.get("task")
        self.family = {"clm": "decoder", "two-tower": "tower"}.get(task, "encoder")
        auto = {"decoder": transformers.AutoModelForCausalLM, "tower": transformers.AutoModel}.get(self.family, transformers.AutoModelForMaskedLM)
        try:
            self.model = auto.from_pretrained(str(self.path), use_safetensors=None if pickle_trusted() else True).to(self.device).eval()
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(self.path))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{self.path}: cannot load as an item model ({' '.join(str(exc).split())[:200]})") from None
        self.head = {"decoder": lambda: self.model.get_output_embeddings(), "encoder": lambda: mlm_head(self.model),
                     "tower": lambda: ItemTower(self.model.get_input_embeddings(), self.meta["temperature"])}[self.family]()
        self.max_length = int(self.meta["interactions"]["max_length"])

    def ids(self, histories: list) -> list[list[int]]:
        rows = [h.split() if isinstance(h, str) else [str(item) for item in h] for h in histories]
        return [item_ids(self.tokenizer, row) for row in rows]

    def recommend(self, histories: list, top_k: int = 10, exclude_seen: bool = True, batch_size: int = 256) -> list[dict[str, Any]]:
        """The ``top_k`` next items of each history with their scores (the model's logits), best first."""
        if isinstance(histories, str) or (histories and all(not isinstance(h, (list, tuple, str)) for h in histories)):
            raise DataError("recommend takes a list of histories, each a list of item ids or a string of space-separated ids")
        scores = next_item_scores(self.model.base_model, self.head, self.ids(histories), family=self.family,
                                  max_length=self.max_length, exclude_seen=exclude_seen, batch_size=batch_size, device=self.device)
        k = min(top_k, int(torch.isfinite(scores).sum(1).min())) if len(scores) else 0
        best = scores.topk(k, dim=1) if k else None
        return [{"items": self.tokenizer.convert_ids_to_tokens(best.indices[row].tolist()) if best is not None else [],
                 "scores": [round(float(v), 4) for v in best.values[row]] if best is not None else []}
                for row in range(len(histories))]

    def evaluate(self, cfg: InteractionsConfig) -> dict[str, float]:
        """HR@K, NDCG@K and MRR over all items on the test split of the log ``cfg.file`` (read as in training)."""
        data = build_interactions(cfg, "corpus", family="decoder" if self.family == "decoder" else "encoder", tokenizer=self.tokenizer)
        test = data.ranking["test"]
        scores = rank_queries(self.model.base_model, self.head, test.histories, test.targets, family=self.family,
                              max_length=self.max_length, device=self.device)
        return {**scores, "queries": len(test), "cold_targets": sum(t == UNK for t in test.targets), "cold_users": test.cold_users}


def load(path: str | Path, device: str | None = None) -> Predictor | Generator | Recommender:
    """A fine-tuned model ready to predict: ``pretune.load("runs/clf/model").predict(["great film"])``;
    a causal language model gives a :class:`Generator` (``.generate("def main(")``), a model pretrained on
    an interaction log a :class:`Recommender` (``.recommend([["i1", "i7"]], top_k=10)``)."""
    path = Path(path)
    meta_file = path / "pretune.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    if meta.get("modality") == "interactions" and "kind" not in meta:
        return Recommender(path, device)
    if meta.get("task") == "clm" or (not meta and (path / "config.json").is_file() and _is_decoder(path)):
        return Generator(path, device)
    return Predictor(path, device)


def _is_decoder(path: Path) -> bool:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return any(str(name).endswith("ForCausalLM") for name in config.get("architectures") or [])


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


def predict_file(model_dir: str, inputs: str, out: str, column: str | None = None, batch_size: int = 32, top_k: int = 10) -> int:
    """Predictions for a file: texts (.txt / .jsonl / .csv), or images (a file or folder) / vectors.  The
    output format follows ``out``'s extension for every modality: .csv / .tsv (flat: one probability
    column per class), else JSON lines.  An item model reads histories (column ``history``: a list of item
    ids or a string of space-separated ids; a .txt file: one history per line) and writes its ``top_k`` items."""
    predictor = load(model_dir)
    if isinstance(predictor, Generator):
        raise DataError(f"{model_dir}: a causal language model generates text; use pretune generate {model_dir} --prompt ...")
    if isinstance(predictor, Recommender):
        histories, rows = read_inputs(inputs, column or "history")
        results = predictor.recommend(histories, top_k=top_k, batch_size=batch_size)
        write_predictions(out, [{**row, **result} for row, result in zip(rows, results)], [])
        return len(results)
    if predictor.modality == "text":
        texts, rows = read_inputs(inputs, column or predictor.meta.get("text"))
        pair_column = predictor.meta.get("text_pair")
        pairs = [row[pair_column] for row in rows] if pair_column and all(pair_column in r for r in rows) else None
        if predictor.head.per_token:  # one sentence per row: a list of words, or a string of space-separated words
            texts = [text.split() if isinstance(text, str) else text for text in texts]
        results = predictor.predict(texts, pairs, batch_size=batch_size, progress=True)
    else:
        if column is not None:
            raise DataError("--column applies to text models; an image / vector model reads whole images or rows")
        read = predictor.read(inputs, bad_files="skip")
        rows, results = read.origins, predictor.decode(predictor.logits(read.x, batch_size, progress=True))
    write_predictions(out, [{**row, **result} for row, result in zip(rows, results)], predictor.labels)
    return len(results)


def write_predictions(out: str, rows: list[dict[str, Any]], labels: list[str]) -> None:
    """JSON lines, or a flat CSV / TSV when ``out`` ends so (lists joined by spaces, one
    ``probability_<class>`` column per class)."""
    suffix = Path(out).suffix.lower()
    with open(out, "w", encoding="utf-8", newline="" if suffix in (".csv", ".tsv") else None) as handle:
        if suffix not in (".csv", ".tsv"):
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            return
        flat = []
        for row in rows:
            cells = {k: " ".join(map(str, v)) if isinstance(v, list) else v for k, v in row.items() if k != "probabilities"}
            cells.update({f"probability_{name}": p for name, p in (row.get("probabilities") or {}).items()})
            flat.append(cells)
        columns = list(dict.fromkeys(key for cells in flat for key in cells))
        writer = csv.DictWriter(handle, fieldnames=columns, delimiter="\t" if suffix == ".tsv" else ",")
        writer.writeheader()
        writer.writerows(flat)


def evaluate_file(model_dir: str, data_file: str, out: str | None = None, batch_size: int = 32, *,
                  classes: list[str] | None = None, label: str | None = None, bad_files: str = "skip",
                  predictions_out: str | None = None) -> dict[str, Any]:
    """Metrics of a fine-tuned model on a labelled file with the same columns as its training data
    (an image / vector classifier: a folder with one sub-folder per class, or a labelled vector file).

    Image / vector models only: ``classes`` keeps the examples of these classes (as ``data.classes``),
    ``label`` names the label column of a vector file, ``bad_files`` as ``data.bad_files``.
    ``predictions_out``: a single-label classifier also writes each example's true and predicted class
    ids there, in file order (studies resample test examples with them: :mod:`pretune.studies.stats`)."""
    if is_items_folder(model_dir):  # an interaction log, split as in training: its test split is scored
        scores = evaluate_interactions(model_dir, data_file, batch_size)
        if out:
            Path(out).write_text(json.dumps(scores, indent=2))
        return scores
    predictor = load(model_dir)
    if isinstance(predictor, Generator):
        raise DataError(f"{model_dir}: a causal language model has no labels to evaluate; see the perplexity in its run's metrics")
    examples = labelled_examples(predictor, data_file, classes=classes, label=label, bad_files=bad_files)
    scores = score_examples(predictor, examples, batch_size, progress=True, keep=predictions_out is not None)
    predicted = scores.pop("predicted", None)
    if predictions_out and predicted is not None:
        Path(predictions_out).write_text(json.dumps({"truth": [int(t) for t in examples.truth], "predicted": predicted}))
    if out:
        Path(out).write_text(json.dumps(scores, indent=2))
    return scores


def evaluate_interactions(model_dir: str, log_file: str, batch_size: int = 32) -> dict[str, Any]:
    """The test split of an interaction log, read with the columns, length and split the model was trained with:
    next-item ranking for a pretrained item model, the head's metrics (RMSE, MAE / accuracy, F1...) for a fine-tuned one."""
    meta, _ = read_meta(Path(model_dir))
    options = {**meta["interactions"], "file": log_file}
    predictor = load(model_dir)
    if isinstance(predictor, Recommender):
        return predictor.evaluate(InteractionsConfig(**options))
    data = build_interactions(InteractionsConfig(**options), "labelled", tokenizer=predictor.tokenizer, head=predictor.head,
                              label_names=predictor.labels)
    if data.test is None:
        raise DataError(f"{log_file}: no user has a test event ({options.get('split', 'leave-last-out')} split)")
    examples = Examples(list(data.test["history"]), list(data.test["item"]), list(data.test["labels"]))
    return score_examples(predictor, examples, batch_size)


@dataclass
class Examples:
    """Labelled examples read for a model: texts (and pairs) or an array ``[N, *input_shape]``, and the encoded truth."""

    inputs: Any
    pairs: list | None
    truth: list

    def __len__(self) -> int:
        return len(self.truth)

    def head(self, n: int) -> Examples:
        return Examples(self.inputs[:n], self.pairs[:n] if self.pairs else None, self.truth[:n])


def labelled_examples(predictor: Predictor, data_file: str, *, classes: list[str] | None = None, label: str | None = None,
                      bad_files: str = "skip") -> Examples:
    """The examples of a labelled file with the model's training columns (text), or of a labelled image
    folder / vector file, with their labels encoded in the model's label map."""
    names = predictor.labels
    if predictor.modality == "text":
        meta = predictor.meta
        cfg = LabelledDataConfig(train=data_file, text=meta.get("text", "text"), text_pair=meta.get("text_pair"),
                                 label=meta.get("label", "label"), max_length=meta.get("max_length", 128))
        table = read_labelled(data_file, cfg, predictor.head, names)
        return Examples(list(table[cfg.text]), list(table[cfg.text_pair]) if cfg.text_pair else None, list(table["labels"]))
    read = predictor.read(data_file, labelled=True, classes=classes, bad_files=bad_files, label=label)
    return Examples(read.x, None, encode_labels(read.keys, names, data_file, not_in_map(names)).tolist())  # unknown class: one line naming it


def score_examples(predictor: Predictor, examples: Examples, batch_size: int = 32, progress: bool = False,
                   keep: bool = False) -> dict[str, Any]:
    """All metrics of the model's predictions on labelled examples; ``keep``: a single-label classifier's
    predicted class ids too (under ``"predicted"``)."""
    names = predictor.labels
    keep = keep and predictor.kind == "single"
    if predictor.modality == "text":
        results = predictor.predict(examples.inputs, examples.pairs, batch_size=batch_size, progress=progress)
        scores = predictor.head.score_decoded(examples.truth, results, names)
        return {**scores, "predicted": [names.index(r["label"]) for r in results]} if keep else scores
    truth = torch.as_tensor(np.asarray(examples.truth))
    logits = predictor.logits(examples.inputs, batch_size, progress)
    scores = predictor.head.score([logits], [truth], names)
    return {**scores, "predicted": predictor.head.predictions(logits).tolist()} if keep else scores
