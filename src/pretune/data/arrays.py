"""Image and vector data: the ``data:`` section of image/vector recipes, read, split and budgeted.

    data: {images: photos/}                       # one sub-folder per class, or images directly, at their own size
    data: {images: photos/, size: 32}             # resized to 32x32 (one line on stderr says so)
    data: {images: "builtin:digits"}              # the embedded 8x8 digits (the default), read at 16x16
    data: {vectors: features.csv, label: y}       # CSV/TSV, Parquet, NPY or NPZ (``file:`` also works)
    data: {vectors: "builtin:digits"}             # the embedded digits as 64-value vectors
    data: {audio: clips/, duration: 1.0}          # audio clips (a folder or a path,label manifest) as log-mel spectrograms

Examples become ``x``: float32 ``[N, C, H, W]`` in [0, 1] (images, :mod:`pretune.data.images`),
Whisper log-mel spectrograms ``[N, n_mels, frames]`` (audio, :mod:`pretune.data.audio`) or raw
float32 ``[N, D]`` (vectors, :mod:`pretune.data.vectors`), with ``labels`` (class ids) when the data
are labelled.  Classes sort numerically when all look like integers, unless a saved
model's ``label_names`` fix the map.

The validation split is drawn from *all* examples, stratified by class and seeded by
``split_seed`` alone, before ``classes`` and ``max_examples`` select rows: an example is on the
same side of the split in every run that reads the same data (pretraining on digits 0-4, then
fine-tuning on 0-9 never validates on an image the backbone trained on).  ``budget`` then keeps
part of train per class (nested across budgets, as for text); ``unlabelled_train`` is train
before the budget, for pretraining.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from pydantic import AliasChoices, ConfigDict, Field, field_validator, model_validator

from pretune.data.audio import AudioSpec, list_audio, load_audio_files, log_mel
from pretune.data.images import BUILTIN_DIGITS, DIGITS_SIZE, Channels, list_images, load_digits, load_image_files, own_sizes
from pretune.data.labelled import apply_budget, check_budget, not_in_map, stratified_split
from pretune.data.vectors import read_vectors
from pretune.errors import DataError
from pretune.recipe import Section

SHOWN_SKIPPED = 3  # names listed in the skipped-files warning


def modality(data: dict) -> str:
    """``'image'`` if a recipe's data section names ``images``, ``'audio'`` if it names ``audio``,
    ``'vector'`` if it names ``vectors`` (or ``file``), else ``'text'``."""
    if data.get("images") is not None:
        return "image"
    if data.get("audio") is not None:
        return "audio"
    return "vector" if data.get("vectors") is not None or data.get("file") is not None else "text"


class ArrayDataConfig(Section):
    """The ``data:`` section of image and vector recipes; without ``images`` or ``vectors``, the
    embedded digits."""

    model_config = ConfigDict(**Section.model_config, populate_by_name=True)

    images: str | None = None  # folder (one sub-folder per class, or images directly) or 'builtin:digits'
    vectors: str | None = Field(None, validation_alias=AliasChoices("vectors", "file"))  # CSV/TSV/NPY/NPZ/Parquet
    audio: str | None = None  # folder of clips (one sub-folder per class, or clips directly) or a CSV/JSONL manifest (path, label)
    sample_rate: int = Field(16000, ge=1000)  # audio: clips are resampled to this rate
    duration: float = Field(1.0, gt=0, le=30)  # audio: seconds per clip (longer: centre-cropped; shorter: silence appended)
    n_mels: int = Field(80, ge=8)  # audio: mel bins (Whisper: 80)
    silent: Literal["skip", "keep"] = "skip"  # audio: clips with no signal (peak below -80 dBFS)
    label: str | None = "label"  # vectors: label column (CSV/Parquet); NPZ: array 'y'; absent => unlabelled
    size: int | None = Field(None, ge=1)  # images: resize to size x size; None: their own size (all must match; the 8x8 digits: 16x16)
    channels: Channels = "auto"  # auto: 1 if every image is gray, else 3
    validation_fraction: float = Field(0.2, ge=0, lt=1)  # 0: no validation split
    split_seed: int = 0  # the split, independent of the run seed, so pretraining and fine-tuning agree
    test: str | None = None  # a test folder / file, read like the main data
    budget: float | int | None = None  # float in (0, 1]: fraction of train per class; int >= 1: rows per class
    budget_seed: int = 0
    classes: list[str] | None = None  # keep only these classes
    max_examples: int | None = Field(None, ge=1)  # a seeded random subset (split_seed) of the main data
    bad_files: Literal["skip", "error"] = "skip"  # undecodable / truncated images

    @model_validator(mode="before")
    @classmethod
    def _default_source(cls, data: Any) -> Any:
        if isinstance(data, dict) and "file" in data:  # `data.file=x.csv` on the command line replaces the recipe's vectors
            data = {**{k: v for k, v in data.items() if k != "file"}, "vectors": data["file"]}
        if isinstance(data, dict) and all(data.get(key) is None for key in ("images", "vectors", "file", "audio")):
            data = {**data, "images": BUILTIN_DIGITS}
        return data

    @model_validator(mode="after")
    def _one_source(self) -> ArrayDataConfig:
        if sum(source is not None for source in (self.images, self.vectors, self.audio)) > 1:
            raise ValueError("set one of data.images, data.audio or data.vectors")
        return self

    def audio_spec(self) -> AudioSpec:
        return AudioSpec(sample_rate=self.sample_rate, duration=self.duration, n_mels=self.n_mels)

    @property
    def source(self) -> str:
        return self.images or self.audio or self.vectors

    @field_validator("budget", mode="before")  # before: True is not 1 and 1 is not 1.0
    @classmethod
    def _budget_range(cls, value: Any) -> float | int | None:
        return value if value is None else check_budget(value)

    @field_validator("classes", mode="before")  # YAML reads `classes: [0, 1]` as integers
    @classmethod
    def _class_names(cls, value: Any) -> Any:
        return [str(name) for name in value] if isinstance(value, (list, tuple)) else value


@dataclass
class ArrayDataset:
    x: torch.Tensor  # images: float32 [N, C, H, W] in [0, 1]; vectors: float32 [N, D]
    labels: torch.Tensor | None  # long [N] class ids, or None (unlabelled)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, indices) -> dict[str, torch.Tensor]:
        """A batch: ``{"x": ..., "labels": ...}`` (no ``labels`` when unlabelled)."""
        batch = {"x": self.x[indices]}
        if self.labels is not None:
            batch["labels"] = self.labels[indices]
        return batch


@dataclass
class ArrayData:
    train: ArrayDataset  # after the budget
    validation: ArrayDataset | None
    test: ArrayDataset | None
    modality: str  # "image" | "audio" | "vector"
    label_names: list[str] | None  # class names by id; None when unlabelled
    shape: tuple[int, ...]  # one example, e.g. (1, 8, 8) or (64,)
    skipped: list[str]  # "path (reason)" of image files left out by bad_files: skip
    unlabelled_train: ArrayDataset  # the whole train split before the budget
    audio: dict[str, Any] | None = None  # audio: how clips became features (an AudioSpec as a dict)


@dataclass
class _Examples:
    x: torch.Tensor  # the examples of `rows`, in that order
    keys: list[str] | None  # their class names
    rows: list[int]  # positions in the source (files in sorted order, rows of the file)
    skipped: list[str]


def _read(source: str, cfg: ArrayDataConfig, main: bool, channels: Channels) -> tuple[_Examples, list[int]]:
    """The examples of ``source`` that ``classes`` (and for the main data ``max_examples``)
    select, and the source rows held out for validation (main data only)."""
    paths = None
    if cfg.vectors is not None and source == BUILTIN_DIGITS:  # the digits as 64-pixel vectors
        x, keys = load_digits(None, 1)
        x = x.flatten(1)
    elif cfg.vectors is not None:
        x, keys = read_vectors(source, cfg.label)
    elif source == BUILTIN_DIGITS:
        x, keys = load_digits(cfg.size or DIGITS_SIZE, channels)
    elif cfg.audio is not None:
        paths, keys = list_audio(source)
    else:
        paths, keys = list_images(source)
    total = len(paths if paths is not None else x)
    held: list[int] = []
    if main and cfg.validation_fraction > 0:
        strata = keys if keys is not None else [0] * total
        held = stratified_split(strata, cfg.validation_fraction, cfg.split_seed)[1]
    rows = _select(keys, total, cfg, source, main)
    skipped: list[str] = []
    if paths is None:
        x = x if len(rows) == total else x[rows]
    elif cfg.audio is not None:
        spec = cfg.audio_spec()
        waves, kept, skipped = load_audio_files([paths[i] for i in rows], spec, cfg.bad_files, cfg.silent)
        x, rows = log_mel(waves, spec), [rows[i] for i in kept]
    else:
        x, kept, skipped = load_image_files([paths[i] for i in rows], cfg.size, channels, cfg.bad_files)
        rows = [rows[i] for i in kept]
        if cfg.size is not None:
            _note_resize(source, [paths[i] for i in rows], cfg.size)
    return _Examples(x, None if keys is None else [keys[i] for i in rows], rows, skipped), held


def _note_resize(source: str, paths: list, size: int) -> None:
    """One line on stderr when ``data.size`` changes the images' own size (a recipe's size is easy to miss)."""
    sizes = own_sizes(paths)
    if sizes == [f"{size}x{size}"]:
        return
    own = f"are {sizes[0]}" if len(sizes) == 1 else f"have {len(sizes)} sizes ({', '.join(sizes[:3])}{', ...' if len(sizes) > 3 else ''})"
    print(f"pretune: note: the images of {source} {own}; they are resized to {size}x{size} because data.size={size} "
          "(unset data.size to keep their own size)", file=sys.stderr, flush=True)


def _select(keys: list[str] | None, total: int, cfg: ArrayDataConfig, source: str, main: bool) -> list[int]:
    """Sorted source rows of the wanted classes; of the main data, at most ``max_examples``."""
    rows = list(range(total))
    if cfg.classes is not None:
        if keys is None:
            raise DataError(f"data.classes needs labelled data, but {source} has no labels")
        known = _sorted_names(set(keys))
        unknown = [name for name in cfg.classes if name not in known]
        if main and unknown:
            raise DataError(f"data.classes: {unknown[0]!r} is not a class of {source}; "
                            f"its classes are: {', '.join(known)}")
        wanted = set(cfg.classes)
        rows = [i for i in rows if keys[i] in wanted]
        if not rows:
            raise DataError(f"{source} holds no example of data.classes ({', '.join(cfg.classes)})")
    if main and cfg.max_examples is not None and len(rows) > cfg.max_examples:
        picked = np.random.default_rng(cfg.split_seed).permutation(len(rows))[: cfg.max_examples]
        rows = [rows[i] for i in sorted(picked.tolist())]
    return rows


def _sorted_names(keys: set[str]) -> list[str]:
    return sorted(keys, key=int) if all(re.fullmatch(r"[+-]?\d+", k) for k in keys) else sorted(keys)


def encode_labels(keys: list[str], names: list[str], source: str, unseen: str) -> torch.Tensor:
    label2id = {name: i for i, name in enumerate(names)}
    for key in keys:
        if key not in label2id:
            raise DataError(f"class {key!r} of {source} {unseen}")
    return torch.tensor([label2id[key] for key in keys], dtype=torch.long)


def _dataset(examples: _Examples, labels: torch.Tensor | None, positions: list[int] | None = None) -> ArrayDataset:
    if positions is None:
        return ArrayDataset(examples.x, labels)
    return ArrayDataset(examples.x[positions], None if labels is None else labels[positions])


def build_array_data(cfg: ArrayDataConfig, seed: int = 0, label_names: list[str] | None = None) -> ArrayData:
    """Train (after the budget), validation and test of an image or vector recipe.

    ``seed`` (the run seed) is accepted for symmetry with ``build_labelled`` but draws nothing:
    the split depends on ``cfg.split_seed`` and the budget on ``cfg.budget_seed`` only.
    ``label_names`` (a saved model's label map) fix the class ids."""
    kind = "image" if cfg.images is not None else "audio" if cfg.audio is not None else "vector"
    source = cfg.source
    main, held = _read(source, cfg, main=True, channels=cfg.channels)
    test = None
    if cfg.test is not None:
        channels = main.x.shape[1] if kind == "image" else cfg.channels
        test = _read(cfg.test, cfg, main=False, channels=channels)[0]
        if test.x.shape[1:] != main.x.shape[1:]:
            raise DataError(f"examples of {cfg.test} have shape {tuple(test.x.shape[1:])} but those of {source} "
                            f"have {tuple(main.x.shape[1:])}" + ("; set data.size" if kind == "image" else ""))

    names = labels = test_labels = None
    if main.keys is not None:
        if label_names is not None:
            names = [str(name) for name in label_names]
            unseen = not_in_map(names)
        else:
            names = _sorted_names(set(main.keys))
            unseen = f"never appears in {source}"
        labels = encode_labels(main.keys, names, source, unseen)
        if test is not None and test.keys is not None:
            test_labels = encode_labels(test.keys, names, cfg.test, unseen)

    held_rows = set(held)
    train_pos = [p for p, row in enumerate(main.rows) if row not in held_rows]
    valid_pos = [p for p, row in enumerate(main.rows) if row in held_rows]
    if not train_pos:
        raise DataError(f"{source}: no example is left for training; lower data.validation_fraction")
    unlabelled_train = _dataset(main, labels, train_pos)
    train = unlabelled_train
    if cfg.budget is not None:
        if labels is None:
            raise DataError(f"data.budget needs labelled data, but {source} has no labels")
        kept = apply_budget(unlabelled_train.labels.tolist(), cfg.budget, cfg.budget_seed)
        train = ArrayDataset(unlabelled_train.x[kept], unlabelled_train.labels[kept])

    skipped = main.skipped + (test.skipped if test is not None else [])
    if skipped:
        shown = ", ".join(skipped[:SHOWN_SKIPPED]) + (", ..." if len(skipped) > SHOWN_SKIPPED else "")
        what = "audio file(s) (undecodable, too short or silent; data.bad_files, data.silent)" if kind == "audio" else "unreadable image file(s) (data.bad_files: skip)"
        print(f"pretune: warning: skipped {len(skipped)} {what}: "
              + " ".join(shown.split()), file=sys.stderr, flush=True)
    return ArrayData(
        train=train,
        validation=_dataset(main, labels, valid_pos) if valid_pos else None,
        test=None if test is None else _dataset(test, test_labels),
        modality=kind,
        label_names=names,
        shape=tuple(main.x.shape[1:]),
        skipped=skipped,
        unlabelled_train=unlabelled_train,
        audio=dataclasses.asdict(cfg.audio_spec()) if kind == "audio" else None,
    )


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (``[N, C, H, W]``) or per-feature (``[N, D]``) mean and standard deviation
    (population, float32), the std clamped to at least 1e-6 so constant inputs divide safely."""
    dims = [0] + list(range(2, x.dim()))
    std, mean = torch.std_mean(x.float(), dim=dims, correction=0)
    return mean.float(), std.clamp_min(1e-6).float()
