"""Text corpora for language-model pretraining: read, split, tokenize, pack.

    data = build_text_data(recipe.data, family="encoder", nsp=False, seed=0)
    data.train[0]["input_ids"]   # block_size ids: [CLS] doc1 ... [SEP] doc2 ...

The flow is four plain functions: :func:`load_documents` (files -> one row per document),
:func:`~pretune.data.tokenizer.get_tokenizer` (load or train), :func:`pack_blocks` (documents ->
full fixed-length blocks, no padding) or :func:`~pretune.data.nsp.sentence_pair_blocks` (BERT's
sentence pairs).  Everything stays in memory-mapped Arrow files written by ``datasets``, so a
corpus larger than RAM works.  Every step is cached and reused by the next run whose inputs are the
same: the files' *content* (:func:`~pretune.data.files.signature`), the data options, the tokenizer,
the block size and the code that tokenises and packs, so a cache never serves stale ids.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, Iterator

import datasets
import numpy as np
import pyarrow.compute as pc
import transformers
from datasets.fingerprint import Hasher

from pretune.data.builtin import load_stdlib_docstrings
from pretune.data.files import check_file, describe, find_bad_json_line, resolve_files, signature, text_layout
from pretune.data.nsp import sentence_pair_blocks
from pretune.data.tokenizer import get_tokenizer, tokenizer_fingerprint
from pretune.data.vocabulary import domain_words, extend_tokenizer, tokens_per_word
from pretune.errors import DataError, PretuneError
from pretune.recipe import DataConfig

__all__ = ["TextData", "build_text_data", "get_tokenizer", "load_documents", "pack_blocks", "sentence_pair_blocks"]

BUILDERS = {"text": "text", "jsonl": "json", "csv": "csv", "parquet": "parquet"}
TEXT_FEATURES = datasets.Features({"text": datasets.Value("string")})
IDS_FEATURES = datasets.Features({"input_ids": datasets.List(datasets.Value("int32"))})
PARAGRAPH_BREAK = re.compile(r"\n[ \t\r\f\v]*\n")
SAMPLE_BY = {"line": "line", "paragraph": "paragraph", "file": "document"}  # data.document -> datasets' text builder
AUTO_LINES = 50  # data.document=auto: a text file of this many lines and no blank line is one document per line
PROCESSES_FROM = 100_000  # documents: tokenise this many or more in one process per core (fewer: start-up costs more)


@dataclass
class TextData:
    """What a language-modelling task trains on."""

    train: datasets.Dataset  # packed blocks (column input_ids) or sentence pairs (see nsp.py)
    validation: datasets.Dataset | None
    tokenizer: transformers.PreTrainedTokenizerFast
    documents: int  # documents read (train + validation)
    tokens: int  # tokens in the train blocks (real tokens, not padding)
    general: datasets.Dataset | None = None  # data.general: blocks of general text to replay (None without replay)
    general_held_out: datasets.Dataset | None = None  # data.general: held-out general blocks (the forgetting report)
    vocabulary: dict[str, Any] | None = None  # data.vocabulary: the words added, tokens per word before and after


# ---------------------------------------------------------------------------- documents


def load_documents(cfg: DataConfig, nsp: bool = False) -> datasets.Dataset:
    """One row per non-empty document, column ``text``, from ``cfg.files`` (or the embedded corpus).

    ``cfg.files`` lists files, folders (read recursively) and globs.  The format follows the
    suffix unless ``cfg.format`` is set: ``.txt .text .md`` are plain text, split into documents
    as ``cfg.document`` says (:func:`text_reading`); ``.jsonl .json .csv .parquet`` hold one
    document per row in ``cfg.column``.  ``.gz`` compression works for text, JSON lines and CSV.
    With ``cfg.streaming`` the files are read as a stream and written to Arrow incrementally.
    Documents are stripped, empty ones dropped, and at most ``cfg.max_documents`` kept (the first).
    ``nsp``: the documents feed next-sentence prediction, which needs several sentences per document.
    """
    if cfg.files is None:
        documents = load_stdlib_docstrings().select_columns(["text"])
        return documents.select(range(min(cfg.max_documents or len(documents), len(documents))))
    files = resolve_files(cfg.files, cfg.format)
    for path, fmt in files:
        check_file(path, fmt, cfg.column)
    readings = _text_readings([path for path, fmt in files if fmt == "text"], cfg.document, nsp)
    keyed = [(path, (fmt, readings.get(path))) for path, fmt in files]
    runs = [(key, [path for path, _ in group]) for key, group in itertools.groupby(keyed, key=lambda pk: pk[1])]
    if cfg.streaming:
        documents = _stream_documents(runs, cfg)
    else:
        parts = [_read_run(paths, fmt, reading, cfg) for (fmt, reading), paths in runs]
        documents = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
        if cfg.max_documents is not None and len(documents) > cfg.max_documents:
            documents = documents.select(range(cfg.max_documents))
    if len(documents) == 0:
        raise DataError(f"{describe([path for path, _ in files])}: no non-empty document")
    return documents


def text_reading(path: str, document: str = "auto", nsp: bool = False) -> str:
    """How the text file ``path`` splits into documents: ``line``, ``paragraph`` or ``file``.

    ``data.document`` other than ``auto`` is taken as it is.  ``auto`` reads a file of at least
    ``AUTO_LINES`` lines and no blank line one document per line (a corpus of one sentence or one
    record per line), and any other file by paragraphs (blank-line separated).  With next-sentence
    prediction a line is a sentence, not a document, so ``auto`` keeps paragraphs (BERT's own format
    puts a blank line between documents).
    """
    if document != "auto":
        return document
    lines, blank = text_layout(path)
    return "line" if lines >= AUTO_LINES and not blank and not nsp else "paragraph"


def _text_readings(paths: list[str], document: str, nsp: bool) -> dict[str, str]:
    """:func:`text_reading` of each text file; one line on stderr says when ``auto`` chose lines."""
    readings = {path: text_reading(path, document, nsp) for path in paths}
    by_line = [path for path, reading in readings.items() if reading == "line"]
    if document == "auto" and by_line:
        print(f"pretune: note: {describe(by_line)}: no blank line in {AUTO_LINES}+ lines, read one document per line "
              "(data.document=auto; set data.document=paragraph or file to read otherwise)", file=sys.stderr, flush=True)
    return readings


def _open_run(paths: list[str], fmt: str, reading: str | None, cache_dir: str | None, streaming: bool) -> Any:
    """``datasets.load_dataset`` over files of one format (text: one ``reading``), with one-line errors."""
    options = {"sample_by": SAMPLE_BY[reading]} if fmt == "text" else {}
    try:
        with _quiet_datasets():
            return datasets.load_dataset(
                BUILDERS[fmt], data_files=[os.path.abspath(p) for p in paths], split="train",
                cache_dir=cache_dir, streaming=streaming, **options,
            )
    except Exception as exc:  # datasets wraps pyarrow / pandas errors in DatasetGenerationError
        raise _read_error(paths, fmt, exc) from None


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Silence datasets' own log lines about a failed file: the DataError we raise says it in one line."""
    level = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(level)


def _read_error(paths: list[str], fmt: str, exc: BaseException) -> PretuneError:
    """The most precise one-line error for a failed read: ours if raised inside, else the cause."""
    causes = [exc]
    while (inner := causes[-1].__cause__ or causes[-1].__context__) is not None and inner not in causes:
        causes.append(inner)
    for cause in causes:
        if isinstance(cause, PretuneError):
            return cause
    if fmt == "jsonl":
        for path in paths:
            try:
                find_bad_json_line(path)
            except DataError as bad:
                return bad
    lines = str(causes[-1]).strip().splitlines()
    reason = f"{type(causes[-1]).__name__}: {lines[0]}" if lines else type(causes[-1]).__name__
    return DataError(f"{describe(paths)}: cannot read as {fmt}: {reason}")


def _text_column(paths: list[str], fmt: str, column: str, features: datasets.Features | None) -> str:
    column = "text" if fmt == "text" else column
    if features is None:  # a stream whose schema is unknown until read: checked row by row
        return column
    if column not in features:
        shown = ", ".join(map(repr, features))
        raise DataError(f"{describe(paths)}: no column {column!r}; columns are {shown} (set data.column)")
    feature = features[column]
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        raise DataError(f"{describe(paths)}: column {column!r} holds {feature}, not text")
    return column


def _split_documents(texts: list[Any], paragraphs: bool) -> list[str]:
    """Stripped non-empty documents; text read by paragraphs is further split at blank lines
    (datasets splits at ``\\n\\n`` only, not at lines holding spaces)."""
    out = []
    for text in texts:
        if not isinstance(text, str):
            continue  # null cells
        parts = PARAGRAPH_BREAK.split(text) if paragraphs else [text]
        out.extend(part.strip().lstrip("\ufeff").strip() for part in parts)
    return [text for text in out if text]


def _clean_batch(batch: dict[str, list], column: str, paragraphs: bool) -> dict[str, list]:
    return {"text": _split_documents(batch[column], paragraphs)}


def _read_run(paths: list[str], fmt: str, reading: str | None, cfg: DataConfig) -> datasets.Dataset:
    raw = _open_run(paths, fmt, reading, content_cache(cfg.cache_dir, paths), streaming=False)
    column = _text_column(paths, fmt, cfg.column, raw.features)
    return raw.map(
        _clean_batch, batched=True, remove_columns=raw.column_names, features=TEXT_FEATURES,
        fn_kwargs={"column": column, "paragraphs": reading == "paragraph"}, desc="Reading documents",
    )


def content_cache(cache_dir: str | None, paths: list[str]) -> str:
    """The folder of ``cache_dir`` (datasets' own by default) that holds the Arrow files of ``paths`` and of
    everything derived from them, named by the files' content.  ``datasets`` keys its cache of local files
    on their modification times alone, so a file edited in place with its time restored would be read back
    from the old Arrow files; in a folder of its content it cannot be."""
    root = cache_dir if cache_dir is not None else str(datasets.config.HF_DATASETS_CACHE)
    return os.path.join(root, "pretune-corpus", Hasher.hash(signature(paths)))


def _stream_documents(runs: list[tuple[tuple[str, str | None], list[str]]], cfg: DataConfig) -> datasets.Dataset:
    """Read the files as a stream and write the documents to Arrow as they come (constant memory)."""
    spec = json.dumps({
        "runs": [(fmt, reading, paths, signature(paths)) for (fmt, reading), paths in runs], "column": cfg.column,
        "limit": cfg.max_documents,
    })
    paths = [path for _, run in runs for path in run]
    try:
        with _quiet_datasets():
            return datasets.Dataset.from_generator(
                _generate_documents, features=TEXT_FEATURES, gen_kwargs={"spec": spec}, cache_dir=cfg.cache_dir,
            )
    except ValueError as exc:
        if "corresponds to no data" in str(exc):  # datasets' way of saying the generator yielded nothing
            raise DataError(f"{describe(paths)}: no non-empty document") from None
        raise _read_error(paths, runs[0][0][0], exc) from None
    except Exception as exc:
        raise _read_error(paths, runs[0][0][0], exc) from None


def _generate_documents(spec: str):
    """Generator behind :func:`_stream_documents`; ``spec`` (JSON) also keys the Arrow cache."""
    spec = json.loads(spec)
    count = 0
    for fmt, reading, paths, _hashes in spec["runs"]:  # the content hashes only key the cache
        stream = _open_run(paths, fmt, reading, None, streaming=True)
        column = _text_column(paths, fmt, spec["column"], stream.features)
        for rows in stream.iter(batch_size=1000):
            if column not in rows:
                raise DataError(f"{describe(paths)}: no column {column!r}; columns are {', '.join(map(repr, rows))}")
            for text in _split_documents(rows[column], paragraphs=reading == "paragraph"):
                yield {"text": text}
                count += 1
                if spec["limit"] is not None and count >= spec["limit"]:
                    return


def split_documents(documents: datasets.Dataset, fraction: float, seed: int) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """Hold out a seeded random ``fraction`` of the documents (at least one); order is kept."""
    count = len(documents)
    if fraction <= 0 or count < 2:
        return documents, None
    held = min(max(1, round(count * fraction)), count - 1)
    order = np.random.default_rng(seed).permutation(count)
    return documents.select(np.sort(order[held:])), documents.select(np.sort(order[:held]))


# ---------------------------------------------------------------------------- blocks


def _fingerprint(*parts: Any) -> str:
    return Hasher.hash([str(part) for part in parts])


def _tokenize_batch(batch: dict[str, list], tokenizer: Any, separator: int) -> dict[str, list]:
    encoded = tokenizer(batch["text"], add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False)
    return {"input_ids": [ids + [separator] if ids else [] for ids in encoded["input_ids"]]}


def tokenize_processes(documents: int) -> int | None:
    """Processes that tokenise ``documents``: one per core from ``PROCESSES_FROM`` documents, else None (this one).
    The tokenizers library's own threads left one of 2 cores idle on a corpus of short documents."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return cores if cores > 1 and documents >= PROCESSES_FROM else None


@contextlib.contextmanager
def _tokenizer_threads_off(processes: int | None) -> Iterator[None]:
    """With worker processes, no tokenizer thread pool in them (tokenizers would warn at the fork, and 2 cores
    are taken already); the user's own ``TOKENIZERS_PARALLELISM`` wins."""
    unset = processes is not None and "TOKENIZERS_PARALLELISM" not in os.environ
    if unset:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if unset:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)


def tokenize_documents(documents: datasets.Dataset, tokenizer: Any, separator: int,
                       num_proc: int | None = None) -> datasets.Dataset:
    """Column ``input_ids``: each document's ids followed by ``separator`` (nothing for empty ones).

    Documents are tokenised whole, longer than a pretrained tokenizer's ``model_max_length``: packing cuts
    them into blocks, so transformers' "sequence length is longer than the maximum" warning is silenced.
    ``num_proc``: worker processes (default: :func:`tokenize_processes`)."""
    num_proc = num_proc if num_proc is not None else tokenize_processes(len(documents))
    level = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()
    try:
        with _tokenizer_threads_off(num_proc):
            return documents.map(
                _tokenize_batch, batched=True, remove_columns=documents.column_names, features=IDS_FEATURES,
                fn_kwargs={"tokenizer": tokenizer, "separator": separator}, num_proc=num_proc, desc="Tokenizing",
                new_fingerprint=_fingerprint("tokenize", documents._fingerprint, tokenizer_fingerprint(tokenizer), separator,
                                             Hasher.hash(_tokenize_batch)),
            )
    finally:
        transformers.utils.logging.set_verbosity(level)


def _cut_blocks(batch: dict[str, list], indices: list[int], source: datasets.Dataset, starts: np.ndarray,
                piece: int, count: int, prefix: list[int]) -> dict[str, list]:
    """Blocks that *start* inside this batch of documents; their tails may come from later documents."""
    first, end = indices[0], indices[-1] + 1
    low, high = int(starts[first]), int(starts[end])
    k0, k1 = -(-low // piece), min(-(-high // piece), count)  # blocks k with low <= k*piece < high
    if k0 >= k1:
        return {"input_ids": []}
    stream = list(itertools.chain.from_iterable(batch["input_ids"]))
    need, following = k1 * piece - low, end
    while len(stream) < need:  # the last block runs into the next documents
        stream.extend(itertools.chain.from_iterable(source[following : following + 64]["input_ids"]))
        following += 64
    return {"input_ids": [prefix + stream[k * piece - low : (k + 1) * piece - low] for k in range(k0, k1)]}


def pack_blocks(documents: datasets.Dataset, tokenizer: Any, block_size: int, family: str,
                num_proc: int | None = None) -> datasets.Dataset:
    """Full ``block_size`` blocks of the token stream, no padding (column ``input_ids``).

    decoder: stream = doc1 <eos> doc2 <eos> ..., cut every ``block_size`` tokens.
    encoder: stream = doc1 [SEP] doc2 [SEP] ..., cut every ``block_size - 1`` tokens, each block
    prefixed with [CLS].  The final partial block is dropped, nothing else: blocks are exact,
    consecutive slices of the stream, across document boundaries and map batches.
    """
    if family == "encoder":
        separator, prefix = tokenizer.sep_token_id, [tokenizer.cls_token_id]
    elif family == "decoder":
        separator, prefix = tokenizer.eos_token_id, []
    else:
        raise ValueError(f"family must be 'encoder' or 'decoder', got {family!r}")
    tokens = tokenize_documents(documents, tokenizer, separator, num_proc)  # num_proc None: one process per core if many
    lengths = pc.list_value_length(tokens.data.column("input_ids")).to_numpy(zero_copy_only=False)
    starts = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    piece = block_size - len(prefix)
    count = int(starts[-1]) // piece
    if count == 0:
        raise DataError(
            f"{len(documents)} documents hold {int(starts[-1])} tokens, fewer than one block of "
            f"block_size {block_size}: lower data.block_size or add text"
        )
    return tokens.map(
        _cut_blocks, batched=True, with_indices=True, remove_columns=["input_ids"], features=IDS_FEATURES,
        fn_kwargs={"source": tokens, "starts": starts, "piece": piece, "count": count, "prefix": prefix},
        num_proc=num_proc, desc="Packing blocks",
        new_fingerprint=_fingerprint("pack", tokens._fingerprint, block_size, prefix, Hasher.hash(_cut_blocks)),
    )


# ---------------------------------------------------------------------------- all together


def build_text_data(cfg: DataConfig, *, family: str, nsp: bool, seed: int, extend_vocabulary: bool = True) -> TextData:
    """Documents -> train / validation split -> tokenizer (trained on train only) -> blocks.

    The validation set is ``cfg.validation_files`` if given, else a seeded ``cfg.validation``
    fraction of the documents (at least one when the fraction is positive), else None.
    ``nsp`` gives BERT sentence pairs (:func:`sentence_pair_blocks`) instead of packed blocks.
    Continuing a model (``cfg.tokenizer.path``): ``cfg.vocabulary`` adds the domain's most split words
    to its tokenizer (unless ``extend_vocabulary`` is False: a resumed run's saved tokenizer has them),
    and ``cfg.general`` reads general text for the forgetting report and replay.
    """
    documents = load_documents(cfg, nsp)
    if cfg.validation_files:
        train = documents
        validation = load_documents(cfg.model_copy(update={"files": cfg.validation_files}), nsp)
    else:
        train, validation = split_documents(documents, cfg.validation, seed)
        if validation is None and cfg.validation > 0:
            more = "a blank line between documents" if nsp else "data.document=line reads a text file one document per line"
            print(f"pretune: warning: no validation set: the corpus is one document, which data.validation={cfg.validation} "
                  f"cannot split, so this run reports no validation loss; give more documents ({more}) or data.validation_files",
                  file=sys.stderr, flush=True)
    tokenizer = get_tokenizer(cfg.tokenizer, train, family)
    vocabulary = None
    if cfg.vocabulary.add and extend_vocabulary:
        if not cfg.tokenizer.path:
            raise DataError("recipe key 'data.vocabulary.add': adding words extends an existing model's tokenizer; set backbone.path "
                            "(a tokenizer trained on this corpus already has its words)")
        vocabulary = extend_for_domain(tokenizer, train, cfg.vocabulary.add, cfg.vocabulary.min_count)

    def blocks(docs: datasets.Dataset) -> datasets.Dataset:
        if nsp:
            return sentence_pair_blocks(docs, tokenizer, cfg.block_size, seed)
        return pack_blocks(docs, tokenizer, cfg.block_size, family)

    train_blocks = blocks(train)
    validation_blocks = None
    if validation is not None:
        try:
            validation_blocks = blocks(validation)
        except DataError as exc:
            raise DataError(f"validation set: {exc}; or set data.validation=0") from None
    general, general_held_out = general_blocks(cfg, nsp, seed, blocks) if cfg.general is not None else (None, None)
    mask = train_blocks.data.column("attention_mask") if nsp else None
    tokens = int(pc.sum(pc.list_flatten(mask)).as_py()) if nsp else len(train_blocks) * cfg.block_size
    return TextData(
        train=train_blocks, validation=validation_blocks, tokenizer=tokenizer,
        documents=len(train) + (len(validation) if validation is not None else 0), tokens=tokens,
        general=general, general_held_out=general_held_out, vocabulary=vocabulary,
    )


def general_blocks(cfg: DataConfig, nsp: bool, seed: int, blocks: Any) -> tuple[datasets.Dataset | None, datasets.Dataset]:
    """``data.general``: ``held_out`` seeded general documents as blocks for the forgetting report, and the rest as
    blocks to replay (None when ``replay`` is 0)."""
    general = cfg.general
    documents = load_documents(cfg.model_copy(update={"files": general.files, "max_documents": general.max_documents,
                                                      "format": "auto", "streaming": False}), nsp)
    replay = general.replay > 0
    held = min(general.held_out, len(documents) - 1 if replay else len(documents))
    if held < 1:
        raise DataError(f"recipe key 'data.general': {len(documents)} general document(s) cannot give both held-out and replay text")
    order = np.random.default_rng(seed + 1).permutation(len(documents))
    try:
        held_out = blocks(documents.select(np.sort(order[:held])))
        train = blocks(documents.select(np.sort(order[held:]))) if replay else None
    except DataError as exc:
        raise DataError(f"recipe key 'data.general': {exc}") from None
    return train, held_out


def extend_for_domain(tokenizer: Any, documents: datasets.Dataset, add: int, min_count: int) -> dict[str, Any]:
    """Add the ``add`` words of ``documents`` the tokenizer splits most (:mod:`pretune.data.vocabulary`) and say so."""
    def texts() -> Iterator[str]:
        for start in range(0, len(documents), 1000):
            yield from documents[start:start + 1000]["text"]

    before = tokens_per_word(tokenizer, texts())
    words = domain_words(tokenizer, texts(), add=add, min_count=min_count)
    added = extend_tokenizer(tokenizer, [w.word for w in words])
    after = tokens_per_word(tokenizer, texts())
    shown = ", ".join(f"{w.word} ({w.pieces} pieces x {w.count})" for w in words[:5])
    print(f"pretune: vocabulary: added {added} words of the training documents (e.g. {shown or 'none qualified'}); "
          f"tokens per word {before:.3f} -> {after:.3f}", file=sys.stderr, flush=True)
    return {"added": [{"word": w.word, "count": w.count, "pieces": w.pieces} for w in words], "tokens_per_word_before": before,
            "tokens_per_word_after": after}
