"""A model continued from a checkpoint: what was created, and what is kept for the saved folder.

Continuing the pretraining of an existing model (``pretune adapt``, or ``pretune pretrain`` with
``backbone.path``) loads it into the class that carries the objective's head
(``AutoModelForMaskedLM``, ``AutoModelForCausalLM``).  Two things then go wrong silently with a
plain ``from_pretrained`` + ``save_pretrained``, and this module is the fix for both:

* a checkpoint without that head (a sentence-transformers folder such as all-MiniLM-L6-v2 holds the
  bare encoder) gets one created, and only transformers' load table says so: :func:`load_start`
  reports in one line exactly which parameters are new and which are tied to the input embeddings;
* a checkpoint's tensors that the objective's class has no place for (BERT's **pooler**, which the
  classification head reads; an NSP head) are dropped, so the fine-tuning that follows would start
  from a random pooler.  They are kept unchanged (:attr:`Start.kept`: the objective never trains
  them) and written back into the saved folder by :func:`save_continued`, with the
  sentence-transformers files (the declared pooling), so the adapted folder has everything the
  original had.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors
import torch
import transformers

from pretune.errors import CheckpointError
from pretune.safeload import pickle_trusted

# sentence-transformers' own files: the pooling the folder declares (modules.json -> 1_Pooling/...)
SENTENCE_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")


@dataclass
class Start:
    """Where a continued model came from: the checkpoint folder, the parameters it lacked (created
    for the objective's head; a name tied to another parameter is listed once), and the tensors kept for saving."""

    path: Path
    new: list[str] = field(default_factory=list)
    kept: dict[str, torch.Tensor] = field(default_factory=dict)

    def describe(self, model: Any) -> str:
        """One line for stderr: what was loaded, created, tied and kept."""
        parameters = dict(model.named_parameters())
        count = sum(parameters[name].numel() for name in self.new if name in parameters)
        parts = [f"{self.path} loaded as {type(model).__name__}",
                 f"new (randomly initialised, {count / 1e6:.2f}M parameters): {', '.join(self.new)}" if self.new else "no new parameters"]
        output, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
        if self.new and output is not None and embeddings is not None and output.weight is embeddings.weight:
            parts.append("the output projection is tied to the input embeddings")
        if self.kept:
            parts.append(f"kept unchanged for the saved model (this objective does not train them): "
                         f"{', '.join(sorted({name.rsplit('.', 1)[0] for name in self.kept}))}")
        return "; ".join(parts)


def load_start(auto_class: Any, path: str | Path, **kwargs: Any) -> tuple[Any, Start]:
    """``auto_class.from_pretrained(path)`` (local files, safetensors unless pickles are trusted) and its :class:`Start`."""
    verbosity = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()  # its load table and "checkpoint seems corrupted" notes: one line of ours instead
    transformers.utils.logging.disable_progress_bar()  # its "Loading weights" bar too
    try:
        model, info = auto_class.from_pretrained(str(path), local_files_only=True, output_loading_info=True,
                                                 use_safetensors=None if pickle_trusted() else True, **kwargs)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot load as {auto_class.__name__}: {exc}") from None
    finally:
        transformers.utils.logging.set_verbosity(verbosity)
    missing = set(info["missing_keys"]) | {key for key, *_ in info.get("mismatched_keys", [])}
    start = Start(Path(path), new=sorted(missing - _tied_names(model)))
    unexpected = sorted(info["unexpected_keys"])
    if unexpected:
        kept = read_tensors(Path(path), unexpected)
        prefix = model.base_model_prefix + "."
        bare = not any(name.startswith(prefix) for name in checkpoint_keys(Path(path)))  # a bare encoder: BertModel's keys
        start.kept = {(prefix + name if bare else name): tensor for name, tensor in kept.items()}
    return model, start


def _tied_names(model: Any) -> set[str]:
    """The second and later names of parameters that share one tensor (BERT's ``cls.predictions.decoder.bias``
    is ``cls.predictions.bias``; its decoder weight is the word embeddings)."""
    seen: dict[int, str] = {}
    tied = set()
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if id(parameter) in seen:
            tied.add(name)
        seen.setdefault(id(parameter), name)
    return tied


def checkpoint_keys(path: Path) -> list[str]:
    """Every tensor name in a checkpoint folder's safetensors file(s)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return list(json.loads(index.read_text())["weight_map"])
    if not (path / "model.safetensors").is_file():
        return []
    with safetensors.safe_open(str(path / "model.safetensors"), framework="pt") as handle:
        return list(handle.keys())


def read_tensors(path: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """The named tensors of a checkpoint folder's safetensors file(s) (one file, or the shards of its index)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        where = json.loads(index.read_text())["weight_map"]
        files = {name: path / where[name] for name in names if name in where}
    else:
        files = {name: path / "model.safetensors" for name in names}
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(set(files.values())):
        if not file.is_file():  # a pickled checkpoint (--trust-pickle): nothing to keep beyond what loaded
            continue
        with safetensors.safe_open(str(file), framework="pt") as handle:
            available = set(handle.keys())
            tensors.update({name: handle.get_tensor(name) for name, f in files.items() if f == file and name in available})
    return tensors


def save_continued(model: Any, tokenizer: Any, path: Path, start: Start | None) -> None:
    """``model`` and ``tokenizer`` as a Hugging Face folder; for a continued model, also the checkpoint's
    tensors the objective did not use and its sentence-transformers files, unchanged."""
    transformers.utils.logging.disable_progress_bar()  # no "Writing model shards" bar at every checkpoint
    if start is not None and start.kept:
        model.save_pretrained(path, state_dict={**model.state_dict(), **start.kept})
    else:
        model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    if start is not None:
        copy_sentence_files(start.path, path)


def copy_sentence_files(source: Path, target: Path) -> None:
    """sentence-transformers' files (``modules.json`` and the module folders it names, e.g. ``1_Pooling``)."""
    modules = source / "modules.json"
    if not modules.is_file():
        return
    for name in SENTENCE_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)
    try:
        folders = [entry["path"] for entry in json.loads(modules.read_text()) if entry.get("path")]
    except (ValueError, KeyError, TypeError) as exc:
        print(f"pretune: note: {modules}: not copied ({exc})", file=sys.stderr, flush=True)
        return
    for folder in folders:
        if (source / folder).is_dir():
            shutil.copytree(source / folder, target / folder, dirs_exist_ok=True)
