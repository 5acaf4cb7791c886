"""Bad-input campaign: 200+ generated broken recipes, tables, corpora, images and vector files, run
in this process (torch imported once).  Each one ends in a one-line :class:`PretuneError` naming the
file, row or recipe key, or is accepted under a documented policy (extra columns are ignored,
undecodable images are skipped with ``data.bad_files: skip``); never any other exception.  A CLI
sample checks exit codes and that a failing resume leaves an existing run directory's checkpoints
and model untouched."""

from __future__ import annotations

import hashlib
import io
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pretune.cli import main
from pretune.errors import DataError, PretuneError, RecipeError
from pretune.recipe import TrainerConfig, load_recipe
from pretune.run import compose, data_reader

OUTCOMES: dict[str, int] = {}  # campaign tally, printed at the end of the module


def probe(recipe_file: str | Path, overrides: list[str], tokenizer: str | None = None) -> PretuneError | None:
    """Everything ``pretune`` does before training: read and validate the recipe, then read the data."""
    try:
        recipe = load_recipe(recipe_file, overrides)
        data_reader(compose(recipe), recipe)(tokenizer, None)
    except PretuneError as exc:
        return exc
    return None


def check(case: str, error: PretuneError | None, expect: str, names: tuple[str, ...]) -> None:
    """``expect``: 'error' (must fail), 'ok' (must pass), 'either'.  An error's one line names one of ``names``."""
    OUTCOMES["error" if error else "accepted"] = OUTCOMES.get("error" if error else "accepted", 0) + 1
    if error is None:
        assert expect in ("ok", "either"), f"{case}: accepted, but should have been refused"
        return
    message = str(error)
    assert expect in ("error", "either"), f"{case}: refused: {message}"
    assert "\n" not in message and len(message) < 1500, f"{case}: not one short line: {message!r}"
    assert any(name in message for name in names), f"{case}: {message!r} names none of {names}"


# -- recipes ------------------------------------------------------------------------------------------
def recipe_cases():
    """Every trainer key with a wrong type, an out-of-range value and a misspelling; plus other sections."""
    for name, field in TrainerConfig.model_fields.items():
        yield f"trainer.{name}=[[1]]", "error", f"trainer.{name}"
        yield f"trainer.{name}={{a: {{b: 1}}}}", "error", f"trainer.{name}"
        yield f"trainer.{name}x=1", "error", f"trainer.{name}x"
        if any(getattr(m, "ge", None) is not None or getattr(m, "gt", None) is not None for m in field.metadata):
            yield f"trainer.{name}=-7", "error", f"trainer.{name}"
    for override, key in [("seed=abc", "seed"), ("kind=train", "kind"), ("foo=1", "foo"), ("task.name=nope", "'nope'"),
                          ("backbone.name=nope", "backbone.name"), ("data.block_size=3", "data.block_size"),
                          ("data.validation=1.5", "data.validation"), ("data.tokenizer.vocab_size=10", "data.tokenizer.vocab_size"),
                          ("data.format=xml", "data.format"), ("task.mask_prob=2", "task.mask_prob"), ("task=[1]", "task"),
                          ("strategy=lora:r=8", "strategy"), ("backbone.size=huge", "backbone.size"),
                          ("data.tokenizer.kind=sp", "data.tokenizer.kind"),
                          ("trainer.betas=[0.9]", "trainer.betas"), ("run_dir=[1]", "run_dir"), ("data=5", "data"),
                          ("trainer", "trainer"), ("=3", "=3")]:
        yield override, "error", key


@pytest.mark.parametrize("override, expect, key", list(recipe_cases()))
def test_recipe_values(override, expect, key):
    check(override, probe("recipes/text-mlm.yaml", [override, "data.max_documents=20"]), expect, (key, "recipe", override))


RECIPE_FILES = {
    "empty.yaml": b"", "binary.yaml": bytes(range(256)) * 4, "list.yaml": b"- a\n- b\n", "scalar.yaml": b"42\n",
    "bad-indent.yaml": b"trainer:\n  lr: 1\n batch_size: 2\n", "tabs.yaml": b"trainer:\n\tlr: 1\n",
    "latin1.yaml": "run_dir: caf\xe9\n".encode("latin-1"), "utf16.yaml": "trainer: {lr: 1}\n".encode("utf-16"),
    "unclosed.yaml": b"trainer: {lr: 1\n", "dup-key.yaml": b"seed: 1\nseed: 2\n",
    "huge-line.yaml": b"run_dir: " + b"x" * 2_000_000 + b"\nfoo: 1\n", "anchors.yaml": b"a: &a [*a]\n",
    "unknown-nested.yaml": b"trainer:\n  schedule:\n    kind: cosine\n", "null-section.yaml": b"trainer: null\ndata: null\n",
    "python-tag.yaml": b"seed: !!python/object/apply:os.system ['touch /tmp/pwned-by-yaml']\n",
}


@pytest.mark.parametrize("name", sorted(RECIPE_FILES))
def test_recipe_files(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(RECIPE_FILES[name])
    expect = "either" if name in ("empty.yaml", "null-section.yaml", "dup-key.yaml") else "error"  # YAML: the last duplicate wins
    check(name, probe(path, ["data.max_documents=20", "data.block_size=16"]), expect, (name, "recipe"))
    assert not Path("/tmp/pwned-by-yaml").exists()


def test_missing_recipe_and_folder(tmp_path):
    check("missing", probe(tmp_path / "nope.yaml", []), "error", ("nope.yaml",))
    check("folder", probe(tmp_path, []), "error", (str(tmp_path),))


# -- labelled tables (fine-tuning) -----------------------------------------------------------------------
def write_table(path: Path, rows: list[dict]) -> None:
    """Write ``rows`` in the format of ``path``'s suffix."""
    if path.suffix in (".csv", ".tsv"):
        import csv

        columns = list(dict.fromkeys(k for row in rows for k in row))
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, columns, delimiter="\t" if path.suffix == ".tsv" else ",")
            writer.writeheader()
            writer.writerows(rows)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)


GOOD = [{"text": f"{w} text number {i}", "label": w} for i, w in enumerate(["good", "bad"] * 20)]


def table_cases():
    """(name, suffix, writer(path), extra overrides, expect)."""
    for suffix in (".csv", ".tsv", ".jsonl", ".parquet"):
        def rows(mutate, suffix=suffix):
            return lambda path: write_table(path, mutate([dict(r) for r in GOOD]))

        yield "empty", suffix, lambda p: p.write_bytes(b""), [], "error"
        yield "garbage", suffix, lambda p: p.write_bytes(random.Random(1).randbytes(3000)), [], "error"
        yield "zeros", suffix, lambda p: p.write_bytes(b"\0" * 1000), [], "error"
        yield "truncated", suffix, lambda p, s=suffix: (write_table(p, GOOD), p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])), [], "either"
        yield "no-text-column", suffix, rows(lambda r: [{"body": x["text"], "label": x["label"]} for x in r]), [], "error"
        yield "no-label-column", suffix, rows(lambda r: [{"text": x["text"]} for x in r]), [], "error"
        yield "extra-columns", suffix, rows(lambda r: [{**x, "id": i, "note": "n"} for i, x in enumerate(r)]), [], "ok"
        yield "empty-label", suffix, rows(lambda r: r[:5] + [{"text": "t", "label": ""}] + r[5:]), [], "either"
        yield "null-label", suffix, rows(lambda r: r[:5] + [{"text": "t", "label": None}] + r[5:]), [], "error"
        yield "empty-text", suffix, rows(lambda r: r[:3] + [{"text": "", "label": "good"}] + r[3:]), [], "error"
        yield "huge-line", suffix, rows(lambda r: r + [{"text": "word " * 400_000, "label": "good"}]), [], "ok"
        yield "one-class", suffix, rows(lambda r: [x for x in r if x["label"] == "good"]), [], "either"
        yield "numeric-labels", suffix, rows(lambda r: [{**x, "label": i % 3} for i, x in enumerate(r)]), [], "ok"
        yield "regress-nan", suffix, rows(lambda r: [{"text": x["text"], "label": float("nan") if i == 7 else i} for i, x in enumerate(r)]), ["task.name=regress"], "error"
        yield "regress-inf", suffix, rows(lambda r: [{"text": x["text"], "label": float("inf") if i == 7 else i} for i, x in enumerate(r)]), ["task.name=regress"], "error"
        yield "regress-words", suffix, rows(lambda r: [{"text": x["text"], "label": x["label"]} for x in r]), ["task.name=regress"], "error"
        yield "unknown-val-label", suffix, rows(lambda r: r), ["VALIDATION"], "error"
        yield "header-only", suffix, rows(lambda r: []) if suffix != ".parquet" else (lambda p: p.write_bytes(b"")), [], "error"
    yield "latin1", ".csv", lambda p: p.write_bytes("text,label\ncaf\xe9 ok,good\n".encode("latin-1") * 2), [], "error"
    yield "utf16", ".csv", lambda p: p.write_bytes("text,label\nhi,good\nho,bad\n".encode("utf-16")), [], "error"
    yield "bom", ".csv", lambda p: p.write_bytes("\ufefftext,label\n".encode() + b"".join(f"t {i},{'ab'[i % 2]}\n".encode() for i in range(20))), [], "ok"
    yield "ragged", ".csv", lambda p: p.write_text("text,label\na,good\nb,bad,extra\n" * 3), [], "error"
    yield "unclosed-quote", ".csv", lambda p: p.write_text('text,label\n"a,good\nb,bad\n'), [], "error"
    yield "bad-json-line", ".jsonl", lambda p: p.write_text('{"text": "a", "label": "good"}\n{"text": \n'), [], "error"
    yield "json-list-row", ".jsonl", lambda p: p.write_text('{"text": "a", "label": "good"}\n[1, 2]\n'), [], "error"
    yield "mixed-types", ".jsonl", lambda p: p.write_text('{"text": "a", "label": "good"}\n{"text": 5, "label": {"x": 1}}\n' * 5), [], "error"
    yield "wrong-suffix", ".xlsx", lambda p: p.write_bytes(b"PK\3\4"), [], "error"
    yield "no-suffix", "", lambda p: p.write_text("text,label\na,good\n"), [], "error"


@pytest.mark.parametrize("name, suffix, writer, extra, expect", list(table_cases()), ids=lambda v: v if isinstance(v, str) else "")
def test_labelled_tables(tmp_path, encoder, name, suffix, writer, extra, expect):
    path = tmp_path / f"train-{name}{suffix}"
    writer(path)
    overrides = [f"data.train={path}"]
    if "VALIDATION" in extra:
        validation = tmp_path / f"dev{suffix}"
        write_table(validation, [{"text": "a", "label": "good"}, {"text": "b", "label": "never-seen"}])
        overrides.append(f"data.validation={validation}")
        extra = []
        names = (validation.name,)
    else:
        names = (path.name,)
    error = probe("recipes/text-classify.yaml", [f"model={encoder}", *overrides, *extra], tokenizer=str(encoder))
    check(f"{name}{suffix}", error, expect, names)


# -- text corpora (pretraining) --------------------------------------------------------------------------
CORPORA = {
    "empty.txt": b"", "blank.txt": b"\n\n   \n\t\n", "binary.txt": random.Random(2).randbytes(5000), "nul.txt": b"\0" * 500,
    "latin1.txt": "caf\xe9 cr\xe8me br\xfbl\xe9e\n".encode("latin-1") * 50, "utf16.txt": "hello world\n".encode("utf-16") * 50,
    "huge-line.txt": b"word " * 1_000_000, "ok.txt": b"a small corpus line\n" * 100,
    "nocol.jsonl": b'{"body": "x"}\n' * 20, "badjson.jsonl": b'{"text": "x"}\n{"text"\n', "notobj.jsonl": b'"just a string"\n' * 3,
    "numbers.jsonl": b'{"text": 5}\n' * 10, "nocol.csv": b"body\nx\ny\n", "ragged.csv": b"text,x\na\nb,c,d\n",
    "bad.parquet": b"PAR1" + b"\0" * 100, "image.txt": bytes.fromhex("89504e470d0a1a0a") + b"\0" * 200,
}


@pytest.mark.parametrize("name", sorted(CORPORA))
def test_text_corpora(tmp_path, encoder, name):
    path = tmp_path / name
    path.write_bytes(CORPORA[name])
    expect = "ok" if name in ("ok.txt", "huge-line.txt") else "either" if name in ("utf16.txt", "numbers.jsonl") else "error"
    check(name, probe("recipes/text-mlm.yaml", [f"data.files={path}", "data.block_size=16"], tokenizer=str(encoder)),
          expect, (name, "data.files"))


def test_corpus_glob_matching_nothing(tmp_path, encoder):
    check("glob", probe("recipes/text-mlm.yaml", [f"data.files={tmp_path}/*.txt"], tokenizer=str(encoder)), "error", ("*.txt",))


# -- images ---------------------------------------------------------------------------------------------
def png(mode: str, size=(8, 8)) -> bytes:
    buffer = io.BytesIO()
    image = Image.new(mode, size)
    fmt = "TIFF" if mode in ("CMYK", "F", "I;16") else "PNG"
    image.save(buffer, fmt)
    return buffer.getvalue()


IMAGE_CASES = {  # bad file -> (content, suffix); every folder also holds good images of both classes
    "truncated": (png("RGB")[:40], ".png"), "zero-bytes": (b"", ".png"), "text-as-png": (b"not an image", ".png"),
    "mode-1": (png("1"), ".png"), "mode-P": (png("P"), ".png"), "mode-LA": (png("LA"), ".png"), "mode-RGBA": (png("RGBA"), ".png"),
    "mode-CMYK": (png("CMYK"), ".tif"), "mode-F": (png("F"), ".tif"), "mode-I16": (png("I;16"), ".tif"),
    "other-size": (png("RGB", (5, 9)), ".png"), "one-pixel": (png("L", (1, 1)), ".png"), "jpeg-as-png": (b"\xff\xd8\xff\xe0" + b"\0" * 50, ".png"),
}


@pytest.mark.parametrize("name", sorted(IMAGE_CASES))
@pytest.mark.parametrize("bad_files, size", [("skip", 8), ("error", 8), ("skip", None)])
def test_images(tmp_path, name, bad_files, size):
    for label in ("a", "b"):
        (tmp_path / "imgs" / label).mkdir(parents=True)
        for i in range(6):
            (tmp_path / "imgs" / label / f"{i}.png").write_bytes(png("RGB"))
    content, suffix = IMAGE_CASES[name]
    bad = tmp_path / "imgs" / "a" / f"bad-{name}{suffix}"
    bad.write_bytes(content)
    overrides = [f"data.images={tmp_path / 'imgs'}", f"data.bad_files={bad_files}", f"data.size={size if size else 'null'}"]
    decodes = name.startswith(("mode-", "one-pixel", "other-size"))
    expect = "ok" if decodes and size else "either" if decodes or bad_files == "skip" else "error"
    check(f"{name}/{bad_files}/{size}", probe("recipes/image-classify.yaml", overrides), expect, (bad.name, "bad_files"))


# -- vectors ---------------------------------------------------------------------------------------------
VECTOR_FILES = {
    "nan.csv": b"f1,f2,label\n1,2,a\nnan,3,b\n", "words.csv": b"f1,f2,label\n1,x,a\n2,3,b\n", "empty.csv": b"",
    "objects.npy": None, "noarrays.npz": None, "ragged.csv": b"f1,f2,label\n1,2\n3,4,b\n", "inf.csv": b"f1,label\ninf,a\n1,b\n",
    "3d.npy": None, "garbage.npy": random.Random(3).randbytes(300), "garbage.parquet": b"PAR1junk",
}


@pytest.mark.parametrize("name", sorted(VECTOR_FILES))
def test_vectors(tmp_path, name):
    path = tmp_path / name
    content = VECTOR_FILES[name]
    if name == "objects.npy":
        np.save(path, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    elif name == "noarrays.npz":
        np.savez(path, other=np.zeros(3))
    elif name == "3d.npy":
        np.save(path, np.zeros((4, 2, 2), dtype=np.float32))
    else:
        path.write_bytes(content)
    check(name, probe("recipes/vector-autoencoder.yaml", [f"data.vectors={path}"]), "error", (name,))


# -- the CLI: exit codes, one line, an existing run untouched ------------------------------------------------
def tree_hash(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in ("metrics.jsonl", "recipe.yaml")):
        digest.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    return digest.hexdigest()


def test_cli_exit_codes_and_an_existing_run_stays_intact(tmp_path, encoder, labelled, capsys):
    run_dir = tmp_path / "clf"
    common = [f"model={encoder}", "trainer.max_steps=2", "trainer.progress=false", "trainer.tensorboard=false", "data.max_length=16"]
    assert main(["finetune", "recipes/text-classify.yaml", f"run_dir={run_dir}", f"data.train={labelled}", *common]) == 0
    before = tree_hash(run_dir)
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_bytes(b"\xff\xfe\0garbage")
    cases = [  # (argv, exit code)
        (["finetune", "recipes/text-classify.yaml", f"run_dir={run_dir}", f"data.train={labelled}", *common], 5),  # exists
        (["finetune", str(run_dir), "--resume", "trainer.lr=-1"], RecipeError.exit_code),
        (["finetune", str(run_dir), "--resume", "trainer.nope=1"], RecipeError.exit_code),
        (["finetune", str(run_dir), "--resume", f"data.train={bad_csv}", "trainer.max_steps=4"], DataError.exit_code),
        (["finetune", "recipes/text-classify.yaml", f"run_dir={tmp_path / 'other'}", f"data.train={bad_csv}", *common], 4),
        (["pretrain", "recipes/text-mlm.yaml", f"run_dir={tmp_path / 'm'}", f"data.files={bad_csv}"], 4),
        (["finetune", str(tmp_path / "no-run"), "--resume"], RecipeError.exit_code),  # no recipe.yaml there
    ]
    for argv, code in cases:
        got = main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert got == code, f"{argv}: exit {got}, expected {code}: {err[-1:]}"
        assert err[-1].startswith("pretune: error: ") and "Traceback" not in "\n".join(err), argv
    assert tree_hash(run_dir) == before  # checkpoints, best, model: byte for byte


def test_campaign_size():
    """The figure in docs/reliability.md: how many generated cases ran in this module."""
    assert sum(OUTCOMES.values()) >= 200, OUTCOMES
