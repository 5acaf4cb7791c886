"""Loading files that may come from a stranger without running their code.

Weights are read from safetensors files.  Anything torch must unpickle goes through its restricted
unpickler (``torch.load(weights_only=True)``, always passed explicitly, so
``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` cannot turn it off).  Weights from outside that are pickles
(``pytorch_model.bin``, a timm ``.pth``) are refused with one line unless the user trusts them:
``--trust-pickle`` on the command line sets ``PRETUNE_TRUST_PICKLE=1``, read by
:func:`pickle_trusted`.  There is deliberately no recipe key for it (see docs/reliability.md).

A leaf module: it imports only :mod:`pretune.errors`, so backbones, the trainer and the
predictor all import it downwards.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from pretune.errors import UnsafeFileError

TRUST_PICKLE_ENV = "PRETUNE_TRUST_PICKLE"
SAFE_SUFFIXES = (".safetensors", ".safetensors.index.json")


def pickle_trusted() -> bool:
    """Whether the user allowed pickle weights files (``--trust-pickle`` sets ``PRETUNE_TRUST_PICKLE=1``)."""
    return os.environ.get(TRUST_PICKLE_ENV, "").strip().lower() in ("1", "true", "yes")


def refuse(path: Path, what: str) -> UnsafeFileError:
    """The one-line error for a pickle file ``path`` (``what`` says which file it is to the user)."""
    return UnsafeFileError(
        f"{path}: {what} is a pickle file, which can run code when loaded; convert it to safetensors, "
        f"or pass --trust-pickle (or set {TRUST_PICKLE_ENV}=1) if you trust where it came from")


def load_torch_state(path: str | Path) -> Any:
    """``torch.load`` through the restricted unpickler (tensors, numbers, containers only), on the CPU.

    ``weights_only=True`` is passed explicitly: the environment variable
    ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` changes only the default.  A file holding code raises
    ``pickle.UnpicklingError`` without running it; the caller turns that into its own one-line error.
    """
    return torch.load(path, map_location="cpu", weights_only=True)


def check_weights_file(path: str | Path, what: str = "the weights file") -> None:
    """Refuse a weights file that is not safetensors (``.pth``, ``.pt``, ``.bin``...) unless pickles are trusted."""
    path = Path(path)
    if path.name.endswith(".safetensors") or pickle_trusted():
        return
    raise refuse(path, what)


def check_model_folder(path: str | Path) -> None:
    """Refuse a Hugging Face folder whose weights would be read from a pickle, unless pickles are trusted.

    Hugging Face reads ``model.safetensors`` (or a sharded index) first; a folder with only
    ``pytorch_model.bin``, a ``config.json`` whose ``transformers_weights`` names a non-safetensors
    file, or PEFT adapters only in ``adapter_model.bin`` would be unpickled.
    """
    path = Path(path)
    if pickle_trusted() or not path.is_dir():
        return
    names = {p.name for p in path.iterdir()}
    has_safe = any(n.endswith(SAFE_SUFFIXES) and not n.startswith("adapter_model") for n in names)
    pickles = sorted(n for n in names if n.startswith("pytorch_model") and n.endswith((".bin", ".bin.index.json")))
    if pickles and not has_safe:
        raise refuse(path / pickles[0], "the model's only weights file")
    if "adapter_config.json" in names and "adapter_model.bin" in names and "adapter_model.safetensors" not in names:
        raise refuse(path / "adapter_model.bin", "the adapter weights file")
    try:
        explicit = json.loads((path / "config.json").read_text()).get("transformers_weights")
    except (OSError, ValueError, AttributeError):
        explicit = None
    if isinstance(explicit, str) and not explicit.endswith(SAFE_SUFFIXES):
        raise refuse(path / explicit, "the weights file named by config.json (transformers_weights)")
