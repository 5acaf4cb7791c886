"""Find the user's corpus files and check them before any library reads them.

Every problem a user can fix (a glob matching nothing, an empty file, Latin-1 bytes, a missing
column) becomes a one-line :class:`DataError` naming the file, and the line or column when there
is one, instead of a traceback from deep inside ``datasets`` or ``pyarrow``.
"""

from __future__ import annotations

import codecs
import csv
import glob
import gzip
import json
import os
from pathlib import Path
from typing import IO, Callable, Iterable

import pyarrow.parquet as pq
import xxhash

from pretune.errors import DataError

SUFFIXES = {
    ".txt": "text", ".text": "text", ".md": "text",
    ".jsonl": "jsonl", ".json": "jsonl",
    ".csv": "csv",
    ".parquet": "parquet",
}
COMPRESSED = ".gz"  # text, JSON lines and CSV may be gzipped: corpus.txt.gz
CHUNK = 1 << 20


def file_format(path: str, forced: str = "auto") -> str | None:
    """``text`` / ``jsonl`` / ``csv`` / ``parquet`` from the suffix (or ``forced``); None if unknown."""
    if forced != "auto":
        return forced
    name = path.lower().removesuffix(COMPRESSED)
    fmt = SUFFIXES.get(os.path.splitext(name)[1])
    return None if fmt == "parquet" and path.lower().endswith(COMPRESSED) else fmt


def resolve_files(patterns: Iterable[str], forced: str = "auto") -> list[tuple[str, str]]:
    """Expand files, folders (recursively) and globs into sorted, unique ``(path, format)`` pairs.

    A file named explicitly must have a supported suffix (unless ``forced``); inside folders and
    glob matches, unsupported and hidden files are skipped, but at least one must remain.
    """
    found: dict[str, str] = {}
    supported = ", ".join(sorted(SUFFIXES))
    for pattern in patterns:
        pattern = os.path.expanduser(str(pattern))
        if any(char in pattern for char in "*?["):
            matches = sorted(glob.glob(pattern, recursive=True))
            files = sorted({f for m in matches for f in (_walk(m) if os.path.isdir(m) else [m])})
            if not matches:
                raise DataError(f"no file matches {pattern!r}")
            kind = f"files matching {pattern!r}"
        elif os.path.isdir(pattern):
            files, kind = _walk(pattern), f"folder {pattern!r}"
        elif os.path.exists(pattern):
            fmt = file_format(pattern, forced)
            if fmt is None:
                raise DataError(f"{pattern}: unsupported file type; use one of {supported} or set data.format")
            found.setdefault(pattern, fmt)
            continue
        else:
            raise DataError(f"{pattern}: no such file or folder")
        typed = [(f, file_format(f, forced)) for f in files]
        typed = [(f, fmt) for f, fmt in typed if fmt is not None]
        if not typed:
            raise DataError(f"{kind} holds no supported file ({supported}); set data.format to read other suffixes")
        for f, fmt in typed:
            found.setdefault(f, fmt)
    return list(found.items())


def _walk(folder: str) -> list[str]:
    files = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files.extend(os.path.join(root, n) for n in sorted(names) if not n.startswith("."))
    return files


def _open(path: str) -> IO[bytes]:
    return gzip.open(path, "rb") if path.lower().endswith(COMPRESSED) else open(path, "rb")


def check_file(path: str, fmt: str, column: str) -> None:
    """Raise :class:`DataError` if ``path`` is empty, not UTF-8, binary, or lacks ``column``."""
    if os.path.getsize(path) == 0:
        raise DataError(f"{path}: file is empty")
    if fmt == "parquet":
        _check_parquet(path, column)
        return
    try:
        check_utf8(path)
    except (OSError, EOFError) as exc:  # e.g. a truncated or fake .gz
        raise DataError(f"{path}: cannot read: {exc}") from None
    if fmt == "csv":
        with _open(path) as raw:
            header = next(csv.reader(codecs.getreader("utf-8-sig")(raw)), [])
        _need_column(path, column, header)
    elif fmt == "jsonl":
        _check_first_json(path, column)


def check_utf8(path: str) -> None:
    """Decode the file incrementally; name the first line holding invalid UTF-8 or a NUL byte."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line = 1
    with _open(path) as raw:
        while chunk := raw.read(CHUNK):
            pending = decoder.getstate()[0]
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                bad = max(exc.start - len(pending), 0)
                byte = (pending + chunk)[exc.start]
                line += chunk.count(b"\n", 0, bad)
                raise DataError(
                    f"{path}, line {line}: not UTF-8 text (byte 0x{byte:02x}); convert the file to UTF-8"
                ) from None
            nul = chunk.find(b"\x00")
            if nul >= 0:
                line += chunk.count(b"\n", 0, nul)
                raise DataError(f"{path}, line {line}: NUL byte, this looks like a binary file, not text")
            line += chunk.count(b"\n")
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise DataError(f"{path}, line {line}: file ends inside a UTF-8 character (truncated?)") from None


def text_layout(path: str) -> tuple[int, bool]:
    """``(non-empty lines, whether a blank line separates two of them)`` of a text file (``.gz`` too).

    Stops at the first blank line between text, so a file of paragraphs is read only up to it.
    Blank lines at the start or the end of the file do not count.
    """
    lines, blank_after_text = 0, False
    with _open(path) as raw:
        for line in raw:
            if not line.strip():
                blank_after_text = lines > 0
            elif blank_after_text:
                return lines + 1, True
            else:
                lines += 1
    return lines, False


def _need_column(path: str, column: str, columns: list[str]) -> None:
    if column not in columns:
        shown = ", ".join(repr(c) for c in columns[:20]) or "none"
        raise DataError(f"{path}: no column {column!r}; columns are {shown} (set data.column)")


def _check_first_json(path: str, column: str) -> None:
    with _open(path) as raw:
        for number, line in enumerate(raw, start=1):
            text = line.decode("utf-8-sig").strip()
            if not text:
                continue
            if text.startswith("["):  # a whole-file JSON array: datasets reads it, columns checked after
                return
            record = parse_json_line(path, number, text)
            _need_column(path, column, list(record))
            return


def list_by_class(root: Path, wanted: Callable[[Path], bool], what: str, suffixes: Iterable[str]) -> tuple[list[Path], list[str] | None]:
    """Files of a folder in sorted order and their class (sub-folder name), or None when the files sit directly in
    the folder.  Class folders are searched recursively; hidden entries, other files and class folders holding no
    wanted file are ignored.  ``what``: "images", "audio files"... for the errors."""
    entries = sorted(entry for entry in root.iterdir() if not entry.name.startswith("."))
    files = [entry for entry in entries if wanted(entry)]
    classes = {entry.name: sorted(p for p in entry.rglob("*") if wanted(p) and not _hidden(p, entry))
               for entry in entries if entry.is_dir()}
    classes = {name: paths for name, paths in classes.items() if paths}
    if files and classes:
        raise DataError(f"{root} holds both {what} ({files[0].name}) and class sub-folders "
                        f"({next(iter(classes))}/); put every one in a class folder, or none")
    if not files and not classes:
        raise DataError(f"no {what} ({', '.join(suffixes)}) in {root}")
    if files:
        return files, None
    return [p for paths in classes.values() for p in paths], [name for name, paths in classes.items() for _ in paths]


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def parse_json_line(path: str, number: int, text: str) -> dict:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}, line {number}: invalid JSON ({exc.msg}, column {exc.colno})") from None
    if not isinstance(record, dict):
        raise DataError(f"{path}, line {number}: expected a JSON object per line, got {type(record).__name__}")
    return record


def find_bad_json_line(path: str) -> None:
    """Raise the :class:`DataError` of the first line of ``path`` that is not a JSON object."""
    with _open(path) as raw:
        for number, line in enumerate(raw, start=1):
            text = line.decode("utf-8-sig").strip()
            if text:
                parse_json_line(path, number, text)


def _check_parquet(path: str, column: str) -> None:
    try:
        names = pq.read_schema(path).names
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError for non-Parquet bytes
        raise DataError(f"{path}: not a readable Parquet file ({_first_line(exc)})") from None
    _need_column(path, column, names)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def describe(paths: list[str]) -> str:
    """``a.txt`` or ``a.txt (and 3 more files)`` for error messages."""
    return paths[0] if len(paths) == 1 else f"{paths[0]} (and {len(paths) - 1} more files)"


def signature(paths: list[str]) -> list[tuple[str, int, str]]:
    """``(absolute path, size, content hash)`` of each file: the key of every cache derived from it.

    The hash is xxh3-128 of the bytes (0.4 s per GB here, beside minutes of tokenising), not the
    modification time: an edit that keeps the size and restores the time (``touch -r``, ``cp -p``,
    an archive or a checkout) must not let a cache serve the old file's ids.
    """
    return [(os.path.abspath(p), os.path.getsize(p), content_hash(p)) for p in paths]


def content_hash(path: str) -> str:
    """xxh3-128 of the file's bytes, as stored (a ``.gz`` file is hashed compressed)."""
    digest = xxhash.xxh3_128()
    with open(path, "rb") as raw:
        while chunk := raw.read(4 * CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
