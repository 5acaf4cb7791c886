"""``pretune export``: a fine-tuned model as ONNX (optionally int8), written only if it predicts as the original.

    pretune export runs/clf/model --format onnx --int8 --out runs/clf/onnx

The model is traced with PyTorch's own exporter (``torch.onnx.export(..., dynamo=True)``: the
``torch.export`` path, the one PyTorch maintains; the TorchScript-based path is only a fallback for
a model ``torch.export`` cannot capture, and the folder records which one ran), with dynamic batch
(and, for text, sequence) axes.  Text models get their tokenizer beside the graph; image and vector
models carry their input normalisation inside it.  ``--int8`` quantises the weights of the
matrix multiplications with ONNX Runtime's dynamic quantiser (activations stay float, quantised on
the fly per batch); everything else (embedding lookups, products of two activations) stays float,
which is what kept a MiniLM classifier's accuracy (see ``_quantise``).

Every export is checked before it is written: the exported model and the original predict the same
real examples (the run's validation data, or ``data=``), and the export is refused with one line
saying by how much when

- fp32: the largest absolute difference of the logits exceeds ``tolerance`` (1e-3); or
- int8: the monitored metric (accuracy, F1, RMSE...) on those examples falls by more than
  ``max_drop`` (0.02) from the original's.

The folder is written under a temporary name and renamed when the check passes, so a failed or
interrupted export never leaves a folder that looks usable.  ``pretune.load(folder)`` and
``pretune predict folder ...`` run it with ONNX Runtime (:mod:`pretune.onnx_engine`).
"""

from __future__ import annotations

import dataclasses

import json
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from pretune.card import add_section
from pretune.errors import CheckpointError, DataError
from pretune.onnx_engine import ONNX_FILE, is_exported
from pretune.predict import Examples, Generator, Predictor, labelled_examples, load, score_examples

TOLERANCE = 1e-3  # fp32: largest |logit difference| accepted
MAX_DROP = 0.02  # int8: largest fall of the monitored metric accepted (absolute)
EXAMPLES = 256  # parity is checked on at most this many real examples


@dataclass
class Exported:
    """What ``export`` wrote and what its check measured."""

    folder: Path
    int8: bool
    exporter: str
    parity: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        p = self.parity
        lines = [f"exported to {self.folder} ({'int8' if self.int8 else 'fp32'} ONNX, {self.exporter}, "
                 f"{p['size_mb']:.1f} MB from {p['original_size_mb']:.1f} MB)",
                 f"parity on {p['examples']} examples of {p['data']}: max |logit difference| {p['max_abs_diff']:.2e}, "
                 f"same prediction for {100 * p['agreement']:.1f}%",
                 f"{p['metric']}: original {p['metric_original']:.4f}, exported {p['metric_exported']:.4f}"]
        return "\n".join(lines)


class _TextGraph(nn.Module):
    """The classifier with tensor arguments (the exporter traces positional / keyword tensors, not a dict)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            batch["token_type_ids"] = token_type_ids
        return self.model(batch)


class _ArrayGraph(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model({"x": x})


def export(model: str | Path, out: str | Path | None = None, *, int8: bool = False, data: str | None = None,
           tolerance: float = TOLERANCE, max_drop: float = MAX_DROP, examples: int = EXAMPLES) -> Exported:
    """Export the fine-tuned model folder ``model`` to ONNX in ``out`` after checking parity (see the module doc)."""
    model = Path(model)
    original = load(model, device="cpu")
    if isinstance(original, Generator):
        raise CheckpointError(f"{model}: a causal language model; pretune export writes classifiers, regressors and taggers")
    if is_exported(original.meta):
        raise CheckpointError(f"{model}: already an exported ONNX model; export the fine-tuned model folder it came from")
    out = Path(out) if out else model.parent / ("onnx-int8" if int8 else "onnx")
    if out.resolve() == model.resolve():
        raise CheckpointError(f"--out {out}: would overwrite the model being exported; choose another folder")
    source = data or _validation_data(model)
    known = None if original.modality == "text" else original.labels  # an image set may hold classes the model never learned
    sample = spread(labelled_examples(original, source, classes=known), examples)
    if not len(sample):
        raise DataError(f"{source}: no labelled examples to check the export with")

    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        exporter = _write_graph(original, sample, partial / ONNX_FILE)
        if int8:
            _quantise(partial / ONNX_FILE)
        _write_meta(original, partial, exporter, int8)
        parity = check_parity(original, Predictor(partial), sample, source, tolerance=tolerance, max_drop=max_drop, int8=int8)
        parity["original_size_mb"] = _size_mb(model)
        parity["size_mb"] = (partial / ONNX_FILE).stat().st_size / 2**20
        meta = json.loads((partial / "pretune.json").read_text())
        meta["export"]["parity"] = parity
        (partial / "pretune.json").write_text(json.dumps(meta, indent=2))
        add_section(partial, "Export", [f"This folder is `{model}` exported by `pretune export` "
                                        f"({'int8' if int8 else 'fp32'} ONNX, {exporter}); run it with `pretune.load` or ONNX Runtime.",
                                        "", Exported(out, int8, exporter, parity).summary().split("\n", 1)[1].replace("\n", "; ") + "."])
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    return Exported(out, int8, exporter, parity)


def check_parity(original: Predictor, exported: Predictor, sample: Examples, source: str, *, tolerance: float, max_drop: float,
                 int8: bool) -> dict[str, Any]:
    """Logit differences, prediction agreement and the monitored metric of both engines on the same examples;
    raises :class:`CheckpointError` (one line) when the export does not predict as the original."""
    diff, same = 0.0, 0
    for start in range(0, len(sample), 32):
        part = sample.head(start + 32)
        part = Examples(part.inputs[start:], part.pairs[start:] if part.pairs else None, part.truth[start:])
        a, b = _logits(original, part), _logits(exported, part)
        diff = max(diff, float((a - b).abs().max()))
        same += sum(_decision(original, x) == _decision(exported, y) for x, y in zip(a, b))
    name, mode = original.head.monitor
    before, after = score_examples(original, sample)[name], score_examples(exported, sample)[name]
    fall = (before - after) if mode == "max" else (after - before)
    parity = {"data": str(source), "examples": len(sample), "max_abs_diff": diff, "agreement": same / len(sample),
              "metric": name, "metric_original": before, "metric_exported": after}
    if not int8 and diff > tolerance:
        raise CheckpointError(f"export refused: the ONNX model's logits differ from the original's by up to {diff:.2e} "
                              f"(tolerance {tolerance:g}) on {len(sample)} examples of {source}")
    if int8 and fall > max_drop:
        raise CheckpointError(f"export refused: int8 quantisation lowers {name} from {before:.4f} to {after:.4f} on {len(sample)} "
                              f"examples of {source} (more than {max_drop:g}); export without --int8")
    return parity


def spread(examples: Examples, n: int) -> Examples:
    """At most ``n`` examples spread evenly over the file (a file sorted by class must not give one class)."""
    if len(examples) <= n:
        return examples
    rows = sorted({round(i * (len(examples) - 1) / (n - 1)) for i in range(n)})
    inputs = examples.inputs[rows] if isinstance(examples.inputs, torch.Tensor) else [examples.inputs[i] for i in rows]
    return Examples(inputs, [examples.pairs[i] for i in rows] if examples.pairs else None, [examples.truth[i] for i in rows])


def _logits(predictor: Predictor, part: Examples) -> torch.Tensor:
    if predictor.modality == "text":
        texts = [t.split() if isinstance(t, str) else t for t in part.inputs] if predictor.head.per_token else list(part.inputs)
        return predictor.text_logits(texts, part.pairs)[0]
    return predictor.logits(part.inputs)


def _decision(predictor: Predictor, logits: torch.Tensor) -> Any:
    """What the model decides from one example's logits (a class per example or per token, labels, a value)."""
    if predictor.head.has_classes and predictor.kind != "multi":
        return logits.argmax(-1).tolist()
    if predictor.kind == "multi":
        return (logits.sigmoid() > predictor.meta.get("threshold", 0.5)).tolist()
    return round(float(logits.flatten()[0]), 3)


def _write_graph(original: Predictor, sample: Examples, path: Path) -> str:
    """Trace the classifier to ``path``; returns which exporter wrote it."""
    model = original.model.float().eval()
    if original.modality == "text":
        texts = [t.split() if isinstance(t, str) else t for t in sample.inputs[:2]] if original.head.per_token else list(sample.inputs[:2])
        batch = _tokenized(original, texts, sample.pairs[:2] if sample.pairs else None)
        graph, names = _TextGraph(model), list(batch)
        kwargs = {name: batch[name] for name in names}
        dims = {name: {0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence")} for name in names}
        axes = {**{name: {0: "batch", 1: "sequence"} for name in names}, "logits": {0: "batch"}}
    else:
        graph, names = _ArrayGraph(model), ["x"]
        kwargs = {"x": sample.inputs[:2].float()}
        dims = {"x": {0: torch.export.Dim("batch")}}
        axes = {"x": {0: "batch"}, "logits": {0: "batch"}}
    graph.eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporters' deprecation and tracing notes are not the user's business
        try:
            torch.onnx.export(graph, (), str(path), kwargs=kwargs, input_names=names, output_names=["logits"],
                              dynamic_shapes=dims, dynamo=True, verbose=False, optimize=True, external_data=False)
            return "torch.export (dynamo)"
        except Exception as exc:  # noqa: BLE001  (torch.export raises many types; the fallback decides)
            first = " ".join(str(exc).split())[:200]
        try:
            torch.onnx.export(graph, tuple(kwargs.values()), str(path), input_names=names, output_names=["logits"],
                              dynamic_axes=axes, dynamo=False, opset_version=17)
            return "TorchScript (torch.export failed: " + first + ")"
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(f"{original.path}: cannot export to ONNX ({' '.join(str(exc).split())[:200]})") from None


def _tokenized(predictor: Predictor, texts: list, pairs: list | None) -> dict[str, torch.Tensor]:
    from pretune.backbones.transformers import tokenize

    return tokenize(predictor.tokenizer, texts, pairs, predictor.meta.get("max_length", 512), predictor.head.per_token)[0]


def _quantise(path: Path) -> None:
    """Dynamic int8 quantisation (ONNX Runtime) of the matrix multiplications *by a weight*, per output channel.

    Only those: ONNX Runtime's defaults quantise every node of a supported type, which includes the
    embedding lookups (Gather) and, even restricted to MatMul/Gemm, took a MiniLM classifier from 0.868
    to 0.236 test accuracy (which node does the harm was not isolated); quantising the 37 products
    whose second input is a weight, per channel, kept 0.862."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32 = path.with_name("model.fp32.onnx")
    path.rename(fp32)
    prepared = path.with_name("model.prep.onnx")
    try:
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
    except Exception:  # noqa: BLE001  (pre-processing only helps; quantising the raw graph also works)
        shutil.copy(fp32, prepared)
    graph = onnx.load(str(prepared)).graph
    weights = {tensor.name for tensor in graph.initializer}
    nodes = [n.name for n in graph.node if n.op_type in ("MatMul", "Gemm") and any(i in weights for i in n.input)]
    quantize_dynamic(str(prepared), str(path), weight_type=QuantType.QInt8, per_channel=True, nodes_to_quantize=nodes)
    fp32.unlink()
    prepared.unlink()


def _write_meta(original: Predictor, folder: Path, exporter: str, int8: bool) -> None:
    meta = dict(original.meta)
    meta["export"] = {"format": "onnx", "int8": int8, "exporter": exporter, "from": str(original.path),
                      "date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__}
    if original.modality == "text":
        original.tokenizer.save_pretrained(str(folder))
    else:
        meta["export"]["input_shape"] = list(original.input_shape)
        meta["modality"] = original.modality
        if original.audio is not None:  # how clips become the exported model's input features
            meta["export"]["audio"] = dataclasses.asdict(original.audio)
    (folder / "pretune.json").write_text(json.dumps(meta, indent=2))
    card = original.path / "README.md"
    if card.is_file():
        shutil.copy(card, folder / "README.md")


def _validation_data(model: Path) -> str:
    """The labelled data of the run that wrote ``model``: its validation file, else its test file, else its training file
    (images, audio, vectors: the folder or file the validation split was drawn from)."""
    recipe_file = model.parent / "recipe.yaml"
    if not recipe_file.is_file():
        raise DataError(f"{model}: no run recipe beside it to find validation data; give labelled data with --data FILE")
    section = (yaml.safe_load(recipe_file.read_text()) or {}).get("data") or {}
    for key in ("validation", "test", "train", "images", "audio", "vectors"):
        value = section.get(key)
        if isinstance(value, str) and (value.startswith("builtin:") or Path(value).exists()):
            return value
    raise DataError(f"{recipe_file}: its data files are gone; give labelled data with --data FILE")


def _size_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**20
