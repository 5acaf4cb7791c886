"""Labelled data for fine-tuning: read a table, parse its labels, split it, keep a label budget.

A labelled file (CSV/TSV, JSONL/JSON, Parquet, or a folder written by ``Dataset.save_to_disk``)
becomes a :class:`datasets.Dataset` holding the text column(s) and a ``labels`` column:

    kind         labels of a row                          label_names
    single       class id                                 sorted classes of train
    multi        K floats, 1.0 where a label is set       sorted labels of train
    regression   float target                             []
    tags         a tag id per word (the text is words)    sorted tags of train

Labels sort numerically when all look like integers, else alphabetically, unless a saved model's
``label_names`` or the recipe's ``data.labels`` fix the map.  Multi-label cells: lists or ``"a;b"`` (``""``/``[]``: no label);
tagging cells: lists or space-separated strings.  Without a validation file a stratified share of
train is held out; the *budget* keeps part of the rest per class, nested across budgets.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow.parquet as pq
from pydantic import Field, field_validator

from pretune import heads
from pretune.errors import DataError
from pretune.heads import Head, label_key, words
from pretune.recipe import Section

LABEL_MAP_FILE = "label_map.json"


class LabelledDataConfig(Section):
    """The ``data:`` section of fine-tuning recipes."""

    train: str | None = None
    validation: str | None = None  # None: a stratified share of train
    test: str | None = None
    text: str = "text"  # for tagging: a column holding a list of words
    text_pair: str | None = None  # second text column of sentence-pair tasks
    label: str = "label"
    validation_fraction: float = Field(0.1, gt=0, lt=0.9)
    budget: float | int | None = None  # float in (0, 1]: fraction per class; int >= 1: rows per class
    budget_seed: int = 0
    max_length: int = Field(128, ge=8)
    labels: list[str] | None = None  # the label set, by id; null: the sorted labels of train (fix it when train may lack a class)

    @field_validator("budget", mode="before")  # before: True is not 1 and 1 is not 1.0
    @classmethod
    def _budget_range(cls, value: Any) -> float | int | None:
        return value if value is None else check_budget(value)


@dataclass
class LabelledData:
    train: datasets.Dataset
    validation: datasets.Dataset | None  # None only when train is too small to hold any row out
    test: datasets.Dataset | None
    head: Head
    label_names: list[str]


def read_table(path: str, columns: list[str]) -> datasets.Dataset:
    """The given columns of a CSV/TSV, JSONL/JSON or Parquet file or a save_to_disk folder."""
    table = read_columns(path, columns)
    try:
        return datasets.Dataset.from_dict(table)
    except Exception as exc:  # e.g. numbers and strings mixed in one JSON column
        raise DataError(f"{path}: cannot build a table from its columns: {exc}") from None


def read_columns(path: str, columns: list[str], fmt: str | None = None) -> dict[str, list]:
    """The given columns of a table file as lists; ``fmt`` (csv, tsv, jsonl, parquet) overrides the suffix."""
    file, suffix = Path(path), ("." + fmt if fmt else Path(path).suffix.lower())
    if not file.exists():
        raise DataError(f"data file {path!r} does not exist")
    if file.is_dir():
        present, rows, column = _read_disk(path)
    elif suffix in (".csv", ".tsv"):
        present, rows, column = _read_csv(path, "\t" if suffix == ".tsv" else ",")
    elif suffix in (".jsonl", ".json"):
        present, rows, column = _read_json(path)
    elif suffix == ".parquet":
        present, rows, column = _read_parquet(path, columns)
    else:
        kinds = ".csv, .tsv, .jsonl, .json, .parquet or a folder written by datasets' save_to_disk"
        raise DataError(f"{path}: unsupported file type {suffix or '(none)'!r}; use {kinds}")
    if rows == 0:
        raise DataError(f"{path} has no rows")
    for name in columns:
        if name not in present:
            raise DataError(f"{path} has no column {name!r}; its columns are: {', '.join(map(str, present))}")
    return {name: column(name) for name in columns}


def read_text_file(path: str) -> str:
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")  # a byte-order mark (Excel) is not part of the first column name
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(f"{path} is not valid UTF-8 (line {line}, byte {exc.start})") from None


def _read_csv(path: str, delimiter: str):
    csv.field_size_limit(2**31 - 1)  # long documents are fields too (the default limit is 128 KiB)
    reader = csv.reader(io.StringIO(read_text_file(path), newline=""), delimiter=delimiter)
    try:
        header = next(reader, [])
        rows = [row for row in reader if row]  # blank lines are not rows
    except csv.Error as exc:
        raise DataError(f"{path} line {reader.line_num}: {exc}") from None
    for number, row in enumerate(rows, 1):
        if len(row) != len(header):
            raise DataError(f"row {number} of {path} has {len(row)} fields but the header has {len(header)}")
    return header, len(rows), lambda name: [row[header.index(name)] for row in rows]


def _read_json(path: str):
    text = read_text_file(path)
    array = text.lstrip().startswith("[")  # one JSON array of records, else JSON lines
    records: list = []  # lines split on "\n" only: other line breaks may sit inside strings
    for number, line in enumerate([text] if array else text.split("\n"), 1):
        try:
            records.extend(json.loads(line) if array else [json.loads(line)] if line.strip() else [])
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} line {exc.lineno if array else number}: invalid JSON ({exc.msg})") from None
    present: dict[str, None] = {}
    for number, record in enumerate(records, 1):
        if not isinstance(record, dict):
            raise DataError(f"row {number} of {path} is not a JSON object")
        present.update(dict.fromkeys(record))
    return list(present), len(records), lambda name: [record.get(name) for record in records]


def _read_parquet(path: str, columns: list[str]):
    try:
        schema = pq.read_schema(path)
        table = pq.read_table(path, columns=[name for name in columns if name in schema.names])
    except Exception as exc:
        raise DataError(f"{path}: cannot read Parquet file: {exc}") from None
    features: Any = {}
    with contextlib.suppress(Exception):  # datasets keeps ClassLabel names in the schema metadata
        features = datasets.Features.from_arrow_schema(schema)
    return schema.names, table.num_rows, lambda name: _decode(features.get(name), table.column(name).to_pylist())


def _read_disk(path: str):
    try:
        dataset = datasets.load_from_disk(path)
    except FileNotFoundError:
        raise DataError(f"{path} is a folder but not one written by datasets' save_to_disk") from None
    if isinstance(dataset, datasets.DatasetDict):
        example = Path(path) / next(iter(dataset))
        raise DataError(f"{path} holds several splits ({', '.join(dataset)}); name one, e.g. {example}")
    return dataset.column_names, dataset.num_rows, lambda name: _decode(dataset.features[name], dataset[name][:])


def _decode(feature: Any, values: list) -> list:
    """Class ids of a ``ClassLabel`` column back to their names (-1, "no label", becomes None)."""
    if isinstance(feature, datasets.ClassLabel):
        return [feature.int2str(v) if v is not None and v >= 0 else None for v in values]
    inner = getattr(feature, "feature", None)
    if isinstance(feature, (datasets.List, datasets.LargeList)) and isinstance(inner, datasets.ClassLabel):
        return [None if row is None else _decode(inner, row) for row in values]
    return values


def _parse(path: str, cfg: LabelledDataConfig, head: Head) -> tuple[dict[str, list], list]:
    """Texts and labels of one file; labels before ids: keys, lists of keys or float targets."""
    text_columns = [cfg.text] + ([cfg.text_pair] if cfg.text_pair else [])
    table = read_columns(path, text_columns + [cfg.label])
    texts = {}
    for column in text_columns:
        texts[column] = [words(value) if head.per_token else value for value in table[column]]
        for row, value in enumerate(texts[column], 1):
            if not head.per_token and value is not None and not isinstance(value, str):  # e.g. a JSON object in a text column
                raise DataError(f"row {row} of {path} column {column!r} holds {type(value).__name__} {str(value)[:40]!r}, not text")
            if not value or not str(value).strip():
                raise DataError(f"empty text in row {row} of {path} column {column!r}")
    labels = []
    for row, value in enumerate(table[cfg.label], 1):
        where = f"row {row} of {path} column {cfg.label!r}"
        labels.append(head.parse(value, where, len(texts[cfg.text][row - 1]), cfg.text))
    return texts, labels


def _encode(path: str, column: str, head: Head, labels: list, names: list[str], unseen: str) -> list:
    """Label keys to ids (multi: multi-hot floats); ``unseen`` ends the error for an unknown key."""
    label2id = {name: i for i, name in enumerate(names)}
    for row, value in enumerate(labels, 1):
        for key in head.keys(value):
            if key not in label2id:
                raise DataError(f"label {key!r} in row {row} of {path} column {column!r} {unseen}")
    return [head.encode(value, label2id) for value in labels]


def strata(labels: list, head: Head | str = "single") -> list:
    """The class a row counts under when splitting or budgeting: single: its label; multi (multi-hot
    rows): the lowest label id set, -1 for none; regression: one of 5 quantile bins; tags: one class."""
    return heads.get(head).strata(labels)


def _groups(labels: list, head: Head | str) -> dict[Any, list[int]]:
    """Row indices per stratum, strata in order of first appearance (so seeded draws repeat)."""
    groups: dict[Any, list[int]] = {}
    for index, key in enumerate(strata(labels, head)):
        groups.setdefault(key, []).append(index)
    return groups


def stratified_split(labels: list, fraction: float, seed: int, head: Head | str = "single") -> tuple[list[int], list[int]]:
    """(train indices, validation indices), sorted.  round(fraction * n) rows (at least one) go to
    validation, shared among classes by size (largest remainders first); a class of n >= 2 rows
    keeps at least one row in train, a class of one row stays in train."""
    groups = _groups(labels, head)
    quota = {key: fraction * len(members) for key, members in groups.items()}
    room = {key: len(members) - 1 for key, members in groups.items()}
    take = {key: min(math.floor(quota[key]), room[key]) for key in groups}
    extra = (max(1, math.floor(fraction * len(labels) + 0.5)) if any(room.values()) else 0) - sum(take.values())
    for key in sorted(groups, key=lambda k: take[k] - quota[k]):  # stable: ties keep first-appearance order
        if extra > 0 and take[key] < room[key]:
            take[key], extra = take[key] + 1, extra - 1
    rng = np.random.default_rng(seed)
    held = set()
    for key, members in groups.items():
        held.update(rng.permutation(members)[: take[key]].tolist())
    return [i for i in range(len(labels)) if i not in held], sorted(held)


def check_budget(budget: float | int) -> float | int:
    if isinstance(budget, float) and 0 < budget <= 1 or type(budget) is int and budget >= 1:
        return budget
    raise ValueError("must be a fraction in (0, 1] or an integer number of rows per class >= 1")


def apply_budget(labels: list, budget: float | int, seed: int, head: Head | str = "single") -> list[int]:
    """Sorted indices of the rows kept: per class (:func:`strata`), the first k rows of a seeded
    permutation; k = max(1, round(budget * n)) for a fraction, min(budget, n) for an integer.  The
    permutations depend on ``seed`` and the labels only: a smaller budget keeps a subset of a larger."""
    check_budget(budget)
    rng = np.random.default_rng(seed)
    kept = []
    for members in _groups(labels, head).values():
        n = len(members)
        k = min(budget, n) if isinstance(budget, int) else max(1, math.floor(budget * n + 0.5))
        kept.extend(rng.permutation(members)[:k].tolist())
    return sorted(kept)


def _features(cfg: LabelledDataConfig, head: Head, names: list[str]) -> datasets.Features:
    text = datasets.List(datasets.Value("string")) if head.per_token else datasets.Value("string")
    labels = head.feature(names)
    columns = {cfg.text: text} | ({cfg.text_pair: text} if cfg.text_pair else {})
    return datasets.Features(columns | {"labels": labels})


def _dataset(features: datasets.Features, texts: dict[str, list], labels: list, rows: list[int] | None = None):
    columns = texts | {"labels": labels}
    if rows is not None:
        columns = {name: [values[i] for i in rows] for name, values in columns.items()}
    return datasets.Dataset.from_dict(columns, features=features)


def not_in_map(names: list[str]) -> str:
    return f"is not in the label map ({', '.join(names[:10])}{', ...' if len(names) > 10 else ''})"


def read_labelled(path: str, cfg: LabelledDataConfig, head: Head | str, label_names: list[str]) -> datasets.Dataset:
    """One labelled file under a fixed label map (evaluating a saved model on a new file)."""
    head = heads.get(head)
    texts, labels = _parse(path, cfg, head)
    labels = _encode(path, cfg.label, head, labels, list(label_names), not_in_map(list(label_names)))
    return _dataset(_features(cfg, head, list(label_names)), texts, labels)


def build_labelled(cfg: LabelledDataConfig, head: Head | str, seed: int, label_names: list[str] | None = None) -> LabelledData:
    """Train / validation / test of a fine-tuning recipe.  ``seed`` draws the validation share of
    train (without a validation file); ``cfg.budget_seed`` draws the budget from the rest, so
    validation is the same whatever the budget."""
    if cfg.train is None:
        raise DataError("data.train is not set: fine-tuning needs a labelled training file")
    head = heads.get(head)
    texts, raw = _parse(cfg.train, cfg, head)
    if not head.has_classes:
        names: list[str] = []
    elif label_names is not None or cfg.labels is not None:
        names = [str(name) for name in (label_names if label_names is not None else cfg.labels)]
    else:
        keys = {key for value in raw for key in head.keys(value)}
        names = sorted(keys, key=int) if all(re.fullmatch(r"[+-]?\d+", k) for k in keys) else sorted(keys)
    labels = _encode(cfg.train, cfg.label, head, raw, names, not_in_map(names))
    unseen = f"never appears in {cfg.train}" if label_names is None and cfg.labels is None else not_in_map(names)
    features = _features(cfg, head, names)

    def other(path: str | None) -> datasets.Dataset | None:
        if path is None:
            return None
        other_texts, other_raw = _parse(path, cfg, head)
        return _dataset(features, other_texts, _encode(path, cfg.label, head, other_raw, names, unseen))

    validation = other(cfg.validation)
    keep = list(range(len(labels)))
    if validation is None:
        keep, held = stratified_split(labels, cfg.validation_fraction, seed, head)
        validation = _dataset(features, texts, labels, held) if held else None
    if cfg.budget is not None:
        keep = [keep[i] for i in apply_budget([labels[i] for i in keep], cfg.budget, cfg.budget_seed, head)]
    return LabelledData(_dataset(features, texts, labels, keep), validation, other(cfg.test), head, names)


def label_map_json(label_names: list[str]) -> str:
    """``{"id2label": {"0": name, ...}, "label2id": {name: 0, ...}}``, as in a Hugging Face config.json."""
    names = [str(name) for name in label_names]
    id2label, label2id = {str(i): name for i, name in enumerate(names)}, {name: i for i, name in enumerate(names)}
    return json.dumps({"id2label": id2label, "label2id": label2id}, indent=2, ensure_ascii=False)


def load_label_map(path: str) -> list[str]:
    """Label names by id from a label-map JSON file, a config.json, or a folder holding either."""
    file = Path(path)
    for name in (LABEL_MAP_FILE, "config.json"):
        file = file / name if file.is_dir() and (file / name).is_file() else file
    try:
        id2label = json.loads(file.read_text(encoding="utf-8"))["id2label"]
        ids = sorted(int(i) for i in id2label)
    except OSError:
        raise DataError(f"no label map at {path!r}: give a JSON file or a folder with {LABEL_MAP_FILE}") from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:  # JSONDecodeError is a ValueError
        raise DataError(f"{file}: not a label map with an 'id2label' mapping ({type(exc).__name__}: {exc})") from None
    if ids != list(range(len(ids))):
        raise DataError(f"{file}: label ids must be 0..{len(ids) - 1}, got {ids[:10]}")
    return [str(id2label[str(i)]) for i in ids]
