"""The embedded corpus: docstrings of Python's standard library.

``builtin/stdlib_docstrings.jsonl.gz`` holds the module, class and function docstrings of the
CPython 3.11 standard library, one JSON record a line::

    {"text": "Return the square root of x.", "package": "math", "kind": "function"}

It is the corpus pretune trains on when a recipe names no files (the demo, the tests, a first
try), so nothing has to be downloaded.  The snapshot is read from the package, never from the
running interpreter, so every machine sees the same documents in the same order.
:func:`stdlib_topics` gives a labelled view (docstring -> its package) for fine-tuning.
"""

from __future__ import annotations

import ast
import gzip
import json
import sysconfig
from collections import Counter
from pathlib import Path

import datasets

STDLIB_FILE = Path(__file__).parent / "builtin" / "stdlib_docstrings.jsonl.gz"
STDLIB_SOURCE_NOTE = (
    "Docstrings extracted from the source of the CPython 3.11 standard library "
    "(https://github.com/python/cpython, Lib/), Copyright (c) 2001-2023 Python Software "
    "Foundation; used under the PSF License Agreement for Python 3.11 "
    "(https://docs.python.org/3.11/license.html)."
)
MIN_CHARS = 40  # shorter docstrings ("Return self.") carry little text
PUBLIC_NAME = {"_pydecimal": "decimal", "_pyio": "io", "_py_abc": "abc"}  # pure-Python twins of C modules
SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "__pycache__", "turtledemo", "ensurepip"}


def _docstrings(tree: ast.Module) -> list[tuple[str, str]]:
    """``(kind, docstring)`` of the module, then of every class and function in source order."""
    found = [("module", ast.get_docstring(tree))]
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            found.append(("class", ast.get_docstring(node)))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found.append(("function", ast.get_docstring(node)))
    return [(kind, text) for kind, text in found if text]


def make_stdlib_docstrings(out_path: str | Path = STDLIB_FILE, stdlib: str | Path | None = None) -> dict[str, int]:
    """Regenerate the snapshot from a Python 3.11 standard library; returns counts.

    Run it with a CPython 3.11 interpreter (the shipped file was made with 3.11.7)::

        python -c "from pretune.data.builtin import make_stdlib_docstrings as m; print(m())"

    Files are visited in sorted path order; tests, idlelib, lib2to3, turtledemo, ensurepip and
    site-packages are skipped; docstrings shorter than ``MIN_CHARS`` and exact duplicates are
    dropped.  The gzip header carries no timestamp, so the same sources give the same bytes.
    """
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    seen: set[str] = set()
    records = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if SKIP_DIRS.intersection(relative.parts[:-1]) or relative.name.startswith("_sysconfigdata"):
            continue
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError):  # a few deliberately broken files (e.g. bad encodings)
            continue
        package = relative.parts[0].removesuffix(".py")
        package = PUBLIC_NAME.get(package, package)
        for kind, text in _docstrings(tree):
            text = text.strip()
            if len(text) >= MIN_CHARS and text not in seen:
                seen.add(text)
                records.append({"text": text, "package": package, "kind": kind})
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with open(out_path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as out:
        for record in records:
            out.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
    return {
        "documents": len(records),
        "characters": sum(len(record["text"]) for record in records),
        "packages": len({record["package"] for record in records}),
    }


def load_stdlib_docstrings() -> datasets.Dataset:
    """The embedded corpus as a Dataset with columns ``text``, ``package`` and ``kind``."""
    columns: dict[str, list[str]] = {"text": [], "package": [], "kind": []}
    with gzip.open(STDLIB_FILE, "rt", encoding="utf-8") as lines:
        for line in lines:
            record = json.loads(line)
            for key, values in columns.items():
                values.append(record[key])
    return datasets.Dataset.from_dict(columns)


def stdlib_topics(min_count: int = 60, max_classes: int = 20) -> datasets.Dataset:
    """Labelled view of the corpus: columns ``text`` and ``label`` (the docstring's package).

    Keeps the ``max_classes`` most frequent packages having at least ``min_count`` docstrings
    (ties broken by name), in corpus order: a topic-classification task with real text.
    """
    corpus = load_stdlib_docstrings()
    counts = Counter(corpus["package"])
    ranked = sorted((package for package, count in counts.items() if count >= min_count), key=lambda p: (-counts[p], p))
    keep = set(ranked[:max_classes])
    rows = [i for i, package in enumerate(corpus["package"]) if package in keep]
    return corpus.select(rows).rename_column("package", "label").remove_columns("kind")
