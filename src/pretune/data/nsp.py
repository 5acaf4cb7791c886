"""BERT sentence pairs for next-sentence prediction (NSP).

Follows ``create_instances_from_document`` of Google's ``create_pretraining_data.py``
(github.com/google-research/bert): a document's sentences are accumulated into a chunk until it
reaches a target length (``block_size - 3``, or with probability ``short_seq_prob`` a random
shorter one); the chunk is cut at a random sentence boundary into A and B.  With probability 0.5
(always, when the chunk is one sentence) B is replaced by text from a random other document
(label 1, "random") and the unused sentences are put back; otherwise B is A's real continuation
(label 0, "is next": the convention of ``BertForPreTraining``).  Pairs too long are trimmed one
token at a time from the longer side, at its front or back at random (``truncate_seq_pair``).

Each example is ``[CLS] A [SEP] B [SEP]`` padded with [PAD] to ``block_size``, with
``token_type_ids`` 0 for [CLS] A [SEP], 1 for B [SEP], 0 for padding, and ``attention_mask``.
Unlike the reference (one random stream over the corpus), each document draws from its own
``random.Random(f"{seed}:{index}")``, so the result is the same in any number of processes.
"""

from __future__ import annotations

import random
import re
from typing import Any

import datasets
from datasets.fingerprint import Hasher

from pretune.data.tokenizer import tokenizer_fingerprint
from pretune.errors import DataError

SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
SEGMENT_FEATURES = datasets.Features({"segments": datasets.List(datasets.List(datasets.Value("int32")))})
PAIR_FEATURES = datasets.Features({
    "input_ids": datasets.List(datasets.Value("int32")),
    "token_type_ids": datasets.List(datasets.Value("int8")),
    "attention_mask": datasets.List(datasets.Value("int8")),
    "next_sentence_label": datasets.Value("int8"),
})


def split_sentences(text: str) -> list[str]:
    """Lines, further split after ``.``, ``!`` or ``?`` followed by whitespace; empty ones dropped."""
    return [s.strip() for line in text.splitlines() for s in SENTENCE_END.split(line) if s.strip()]


def _segment_batch(batch: dict[str, list], tokenizer: Any) -> dict[str, list]:
    """Documents -> lists of tokenized sentences; documents without tokens are dropped."""
    sentences = [split_sentences(text) for text in batch["text"]]
    flat = [s for doc in sentences for s in doc]
    ids = []
    if flat:
        ids = tokenizer(flat, add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False)["input_ids"]
    out, at = [], 0
    for doc in sentences:
        segments = [seg for seg in ids[at : at + len(doc)] if seg]
        at += len(doc)
        if segments:
            out.append(segments)
    return {"segments": out}


def truncate_seq_pair(tokens_a: list[int], tokens_b: list[int], max_tokens: int, rng: random.Random) -> None:
    """Trim the longer of A and B, one token at a time from its front or back, until they fit."""
    while len(tokens_a) + len(tokens_b) > max_tokens:
        longer = tokens_a if len(tokens_a) > len(tokens_b) else tokens_b
        if rng.random() < 0.5:
            del longer[0]
        else:
            longer.pop()


def document_pairs(index: int, document: list[list[int]], corpus: Any, max_tokens: int, short_seq_prob: float,
                   rng: random.Random) -> list[tuple[list[int], list[int], int]]:
    """``(A, B, label)`` pairs from one document (a list of tokenized sentences), as in the reference."""
    target = max_tokens
    if rng.random() < short_seq_prob:
        target = rng.randint(2, max_tokens)
    pairs, chunk, length, i = [], [], 0, 0
    while i < len(document):
        chunk.append(document[i])
        length += len(document[i])
        if i == len(document) - 1 or length >= target:
            a_end = rng.randint(1, len(chunk) - 1) if len(chunk) >= 2 else 1
            tokens_a = [t for segment in chunk[:a_end] for t in segment]
            tokens_b: list[int] = []
            if len(chunk) == 1 or rng.random() < 0.5:
                label = 1
                other = index
                for _ in range(10):
                    other = rng.randint(0, len(corpus) - 1)
                    if other != index:
                        break
                other_doc = corpus[other]["segments"]
                for segment in other_doc[rng.randint(0, len(other_doc) - 1) :]:
                    tokens_b.extend(segment)
                    if len(tokens_b) >= target - len(tokens_a):
                        break
                i -= len(chunk) - a_end  # the unused sentences start the next chunk
            else:
                label = 0
                tokens_b = [t for segment in chunk[a_end:] for t in segment]
            truncate_seq_pair(tokens_a, tokens_b, max_tokens, rng)
            pairs.append((tokens_a, tokens_b, label))
            chunk, length = [], 0
        i += 1
    return pairs


def _pair_batch(batch: dict[str, list], indices: list[int], corpus: datasets.Dataset, block_size: int, seed: int,
                short_seq_prob: float, cls: int, sep: int, pad: int) -> dict[str, list]:
    out: dict[str, list] = {name: [] for name in PAIR_FEATURES}
    for index, document in zip(indices, batch["segments"]):
        rng = random.Random(f"{seed}:{index}")
        for tokens_a, tokens_b, label in document_pairs(index, document, corpus, block_size - 3, short_seq_prob, rng):
            ids = [cls, *tokens_a, sep, *tokens_b, sep]
            padding = block_size - len(ids)
            out["input_ids"].append(ids + [pad] * padding)
            out["token_type_ids"].append([0] * (len(tokens_a) + 2) + [1] * (len(tokens_b) + 1) + [0] * padding)
            out["attention_mask"].append([1] * len(ids) + [0] * padding)
            out["next_sentence_label"].append(label)
    return out


def sentence_pair_blocks(documents: datasets.Dataset, tokenizer: Any, block_size: int, seed: int,
                         short_seq_prob: float = 0.1) -> datasets.Dataset:
    """NSP examples (columns input_ids, token_type_ids, attention_mask, next_sentence_label).

    Deterministic for a given ``seed``; documents whose text has no tokens are skipped.
    """
    special = {name: getattr(tokenizer, f"{name}_token_id", None) for name in ("cls", "sep", "pad")}
    if None in special.values():
        raise ValueError(f"sentence pairs need [CLS], [SEP] and [PAD] tokens; the tokenizer has {special}")
    segments = documents.map(
        _segment_batch, batched=True, remove_columns=documents.column_names, features=SEGMENT_FEATURES,
        fn_kwargs={"tokenizer": tokenizer}, desc="Splitting sentences",
        new_fingerprint=Hasher.hash(["nsp-segments", documents._fingerprint, tokenizer_fingerprint(tokenizer)]),
    )
    if len(segments) == 0:
        raise DataError(f"none of the {len(documents)} documents holds a token: no sentence pairs")
    return segments.map(
        _pair_batch, batched=True, with_indices=True, remove_columns=["segments"], features=PAIR_FEATURES,
        fn_kwargs={"corpus": segments, "block_size": block_size, "seed": seed, "short_seq_prob": short_seq_prob, **special},
        desc="Making sentence pairs",
        new_fingerprint=Hasher.hash(["nsp-pairs", segments._fingerprint, block_size, seed, short_seq_prob, *special.values()]),
    )
