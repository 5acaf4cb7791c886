"""Vectors: one example a row of a CSV/TSV, Parquet, NPY or NPZ file, as float32 ``[N, D]``.

    file                  features                                labels
    .csv / .tsv           every column but the label column       the label column, if present
    .parquet              every column but the label column       the label column, if present
    .npy                  the 2-D array                           none
    .npz                  array ``x`` (2-D)                       array ``y`` (1-D), if present

Feature cells must be finite numbers.  CSV files are parsed by pyarrow; when it finds a problem
the file is read again line by line, so the error names the line (1-based, the header is line 1)
and the column of the first bad cell.  Array files name the row and column (both 1-based).
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import torch

from pretune.data.labelled import label_key, read_text_file
from pretune.errors import DataError

SUFFIXES = (".csv", ".tsv", ".parquet", ".npy", ".npz")
FLOAT32_MAX = float(np.finfo(np.float32).max)  # larger values would become inf in the float32 tensor


def read_vectors(path: str, label: str | None = "label") -> tuple[torch.Tensor, list[str] | None]:
    """Features ``[N, D]`` and the label of each row (strings, as in the label map), or None."""
    file, suffix = Path(path), Path(path).suffix.lower()
    if not file.exists():
        raise DataError(f"data file {path!r} does not exist")
    if file.is_dir() or suffix not in SUFFIXES:
        raise DataError(f"{path}: unsupported vector file; use {', '.join(SUFFIXES)} (or data.images for a folder)")
    if file.stat().st_size == 0:
        raise DataError(f"{path} is empty")
    if suffix in (".csv", ".tsv"):
        x, keys = _read_csv(path, "\t" if suffix == ".tsv" else ",", label)
    elif suffix == ".parquet":
        x, keys = _read_parquet(path, label)
    else:
        x, keys = _read_numpy(path, label, suffix)
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), keys


def _read_csv(path: str, delimiter: str, label: str | None) -> tuple[np.ndarray, list[str] | None]:
    header = _header(path, delimiter)
    label_index = header.index(label) if label in header else None
    features = [i for i in range(len(header)) if i != label_index]
    if not features:
        raise DataError(f"{path} has no feature columns (its header: {', '.join(header) or 'empty'})")
    types = {header[i]: pa.float64() for i in features} | ({label: pa.string()} if label_index is not None else {})
    try:
        table = pacsv.read_csv(path, parse_options=pacsv.ParseOptions(delimiter=delimiter),
                               convert_options=pacsv.ConvertOptions(column_types=types, strings_can_be_null=False))
    except pa.ArrowException as exc:
        raise _csv_problem(path, delimiter, label_index) or DataError(f"{path}: {_first_line(exc)}") from None
    if table.num_rows == 0:
        raise DataError(f"{path} has no rows")
    x = np.column_stack([table.column(i).to_numpy(zero_copy_only=False) for i in features])  # missing: NaN
    keys = None if label_index is None else [label_key(value) for value in table.column(label_index).to_pylist()]
    if not (np.abs(x) <= FLOAT32_MAX).all() or (keys is not None and None in keys):  # NaN compares False
        raise _csv_problem(path, delimiter, label_index) or DataError(f"{path}: a missing or non-finite cell")
    return x, keys


def _header(path: str, delimiter: str) -> list[str]:
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            return next(csv.reader(f, delimiter=delimiter), [])
    except (UnicodeDecodeError, csv.Error):
        read_text_file(path)  # names the line of a non-UTF-8 byte
        raise DataError(f"{path}: cannot read the header line") from None


def _csv_problem(path: str, delimiter: str, label_index: int | None) -> DataError | None:
    """The first ragged row, empty label or cell that is not a finite number, by line and column."""
    reader = csv.reader(io.StringIO(read_text_file(path), newline=""), delimiter=delimiter)
    try:
        header = next(reader)
        for row in reader:
            line = reader.line_num
            if row and len(row) != len(header):
                return DataError(f"line {line} of {path} has {len(row)} fields but the header has {len(header)}")
            for index, cell in enumerate(row):
                if index == label_index and label_key(cell) is None:
                    return DataError(f"missing label in line {line} of {path} column {header[index]!r}")
                if index != label_index and not _finite(cell):
                    return DataError(f"line {line} of {path} column {header[index]!r}: {cell!r} is not a finite "
                                     "(float32) number")
    except csv.Error as exc:
        return DataError(f"{path} line {reader.line_num}: {exc}")
    return None


def _finite(cell: str) -> bool:
    try:
        return abs(float(cell)) <= FLOAT32_MAX  # False for NaN and inf
    except ValueError:
        return False


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _read_parquet(path: str, label: str | None) -> tuple[np.ndarray, list[str] | None]:
    try:
        table = pq.read_table(path)
    except Exception as exc:
        raise DataError(f"{path}: cannot read Parquet file: {_first_line(exc)}") from None
    names = table.column_names
    label_index = names.index(label) if label in names else None
    features = [i for i in range(len(names)) if i != label_index]
    if not features:
        raise DataError(f"{path} has no feature columns (its columns: {', '.join(names)})")
    if table.num_rows == 0:
        raise DataError(f"{path} has no rows")
    for i in features:
        column = table.column(i)
        if not any(check(column.type) for check in (pa.types.is_integer, pa.types.is_floating, pa.types.is_boolean)):
            values = enumerate(column.to_pylist(), 1)
            row, value = next(((r, v) for r, v in values if not isinstance(v, (int, float))), (1, None))
            raise DataError(f"row {row} of {path} column {names[i]!r} holds {value!r}: features must be numbers "
                            f"(the column's type is {column.type})")
    x = np.column_stack([table.column(i).to_numpy(zero_copy_only=False).astype(np.float64) for i in features])
    _check_finite(x, path, [names[i] for i in features])
    if label_index is None:
        return x, None
    return x, _label_keys(table.column(label_index).to_pylist(), f"{path} column {label!r}")


def _read_numpy(path: str, label: str | None, suffix: str) -> tuple[np.ndarray, list[str] | None]:
    try:
        if suffix == ".npy":
            x, y = np.load(path, allow_pickle=False), None
        else:
            with np.load(path, allow_pickle=False) as arrays:
                if "x" not in arrays.files:
                    raise DataError(f"{path} has no array 'x' (its arrays: {', '.join(arrays.files) or 'none'})")
                x, y = arrays["x"], arrays["y"] if "y" in arrays.files and label is not None else None
    except (ValueError, OSError, EOFError) as exc:  # not an array file, or an object array (pickles refused)
        raise DataError(f"{path}: cannot read {suffix} file: {_first_line(exc)}") from None
    what = "the array" if suffix == ".npy" else "array 'x'"
    if x.ndim != 2:
        raise DataError(f"{path}: {what} has shape {x.shape}; vectors need a 2-D array [examples, features]")
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == bool) or np.iscomplexobj(x):
        raise DataError(f"{path}: {what} holds {x.dtype} values; features must be real numbers")
    if len(x) == 0 or x.shape[1] == 0:
        raise DataError(f"{path}: {what} has shape {x.shape}; it needs at least one row and one column")
    _check_finite(x.astype(np.float32) if x.dtype == bool else x, path)
    if y is None:
        return x, None
    if y.shape != (len(x),):
        raise DataError(f"{path}: array 'y' has shape {y.shape}; expected one label per row of 'x', shape ({len(x)},)")
    return x, _label_keys(y.tolist(), f"{path} array 'y'")


def _check_finite(x: np.ndarray, path: str, columns: list[str] | None = None) -> None:
    bad = np.argwhere(~(np.abs(x) <= FLOAT32_MAX))  # NaN compares False
    if len(bad):
        row, col = bad[0].tolist()
        name = repr(columns[col]) if columns else str(col + 1)
        value = float(x[row, col])
        what = "missing or NaN" if math.isnan(value) and columns else repr(value)
        raise DataError(f"row {row + 1} of {path} column {name} is {what}: features must be finite (float32) numbers")


def _label_keys(values: list, where: str) -> list[str]:
    keys = [label_key(value) for value in values]
    if None in keys:
        raise DataError(f"missing label in row {keys.index(None) + 1} of {where}")
    return keys
