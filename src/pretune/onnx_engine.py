"""Run an exported model (``pretune export``) with ONNX Runtime behind the Predictor's model interface.

An exported folder holds ``model.onnx``, the ``pretune.json`` of the model it came from (with an
``export`` entry: format, int8, exporter, parity) and, for text models, the tokenizer.  The
:class:`OnnxModel` takes the same ``{name: tensor}`` batch as the PyTorch classifiers and returns
logits as a tensor, so :class:`pretune.predict.Predictor` decodes both engines' outputs with the
same head code (``pretune.load(folder)`` works on either).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pretune.errors import CheckpointError

ONNX_FILE = "model.onnx"


def is_exported(meta: dict[str, Any]) -> bool:
    return (meta.get("export") or {}).get("format") == "onnx"


class OnnxModel:
    """An ONNX Runtime session called like a pretune classifier: ``model(batch) -> logits``."""

    def __init__(self, path: Path, threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise CheckpointError(f"{path}: an ONNX model needs ONNX Runtime: pip install 'pretune[export]'") from None
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: its optimiser's notes are not the user's business
        threads = threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types for unreadable / invalid files
            raise CheckpointError(f"{path}: ONNX Runtime cannot load it ({' '.join(str(exc).split())[:200]})") from None
        self.inputs = [i.name for i in self.session.get_inputs()]

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        missing = [name for name in self.inputs if name not in batch]
        if missing:
            raise CheckpointError(f"the ONNX model takes {', '.join(self.inputs)} but got no {', '.join(missing)}")
        feed = {name: np.ascontiguousarray(batch[name].detach().cpu().numpy()) for name in self.inputs}
        return torch.from_numpy(self.session.run(None, feed)[0])


def load_onnx(path: Path, meta: dict[str, Any]) -> tuple[OnnxModel, Any]:
    """The model and what reads its inputs: a tokenizer (text) or ``{"input_shape": ..., "audio": ...}`` (images, audio, vectors)."""
    model = OnnxModel(path / ONNX_FILE)
    if meta.get("modality") == "text":
        from pretune.data.readers import load_tokenizer

        return model, load_tokenizer(str(path))
    return model, {"input_shape": meta["export"]["input_shape"], "audio": meta["export"].get("audio")}
