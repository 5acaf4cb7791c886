"""Vocabulary adaptation for continued pretraining: give the domain's most-split words their own tokens.

    words = [c.word for c in domain_words(tokenizer, texts, add=500)]
    original = copy.deepcopy(tokenizer)
    extend_tokenizer(tokenizer, words)
    model.resize_token_embeddings(len(tokenizer))
    init_new_rows(model, tokenizer, original)

Continuing to pretrain a model on domain text helps (Gururangan et al., 2020, "Don't Stop
Pretraining"), but the original tokenizer cuts domain words into many pieces ("cardiomyopathy" ->
card ##iom ##yo ##pathy), which costs sequence length and leaves the model to compose the word from
unrelated pieces.  exBERT (Tai et al., 2020) and AVocaDo (Hong et al., 2021) add domain vocabulary
instead; this module does the simplest form of that:

1. :func:`domain_words` counts the corpus' ``\\w+`` words (after the tokenizer's normaliser) and ranks
   those cut into 2+ pieces by the tokens the corpus would save, ``count * (pieces - 1)``.
2. :func:`extend_tokenizer` adds them as whole-word tokens.
3. :func:`init_new_rows` starts each new row at the mean of its old pieces' rows,
   ``e(w) = (e(p_1) + ... + e(p_k)) / k``, for the input embeddings, an untied output embedding and
   an output bias: the new token starts where the model already reads the word, not at a random
   point (mean-of-pieces as in Fast Vocabulary Transfer, Gee et al., 2022; see Hewitt, 2021,
   "Initializing New Word Embeddings for Pretrained Language Models", on why random rows hurt).

Whole-word matching, per tokenizer kind (checked on transformers 5, tokenizers 0.23):

* The tokenizer drops the space (BERT WordPiece): ``AddedToken(word, single_word=True, normalized=True)``.
  ``single_word`` refuses a match next to a word character, so ``cardio`` leaves ``cardiology`` whole;
  ``normalized`` matches the normalised text, so an uncased tokenizer matches "Cardio".  Added tokens
  are saved in tokenizer.json and come back with every tokenizer class.
* The tokenizer keeps the space in the token (byte-level BPE ``Ġword``, SentencePiece BPE ``▁word``):
  no added token works.  ``"word"`` leaves the space as a lone ``Ġ`` token; ``" word"`` with
  ``single_word`` is refused whenever the word before ends in a letter (the check looks at the character
  before the space); without ``single_word`` it cuts longer words; ``lstrip`` swallows the space, so
  decode loses it.  Instead ``Ġword`` goes into the BPE model's vocabulary and the model's
  ``ignore_merges`` is switched on: a pre-token (the pre-tokenizer has already cut running text into
  words) found whole in the vocabulary is used as is, as Llama-3 tokenizers do; every other word is
  merged as before, and the ByteLevel decoder decodes the new token like any other.  Caveats: old
  vocabulary entries are looked up whole too (for a BPE trained by merges that gives the same tokens;
  no difference on BPE trained by :mod:`pretune.data.tokenizer`); a text's first word (no space before
  it) keeps its old pieces.  Transformers 5 classes with their own ``__init__`` (``GPT2Tokenizer``,
  ``Qwen2Tokenizer``...) rebuild the BPE from vocab and merges on load, dropping ``ignore_merges``;
  such a tokenizer is re-classed as the generic ``TokenizersBackend``, which reloads tokenizer.json as saved.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch
from tokenizers import Tokenizer, models
from transformers import AddedToken, TokenizersBackend

__all__ = ["Candidate", "domain_words", "extend_tokenizer", "init_new_rows", "tokens_per_word"]

WORD = re.compile(r"\w+")
BATCH = 1000


@dataclass
class Candidate:
    """A word worth a token: ``count`` occurrences in the corpus, each cut into ``pieces`` tokens today."""

    word: str
    count: int
    pieces: int

    @property
    def saves(self) -> int:
        """Tokens the corpus saves once the word is one token: ``count * (pieces - 1)``."""
        return self.count * (self.pieces - 1)


def domain_words(tokenizer: Any, texts: Iterable[str], *, add: int, min_count: int = 10) -> list[Candidate]:
    """The ``add`` words to add, best first.

    Words are ``\\w+`` matches in the tokenizer-normalised text (lowercased for uncased BERT) that occur
    at least ``min_count`` times and that the tokenizer cuts into 2+ pieces in running text (after a
    space), ranked by ``count * (pieces - 1)`` (tokens the corpus saves), ties broken by the word.
    Words already one token never qualify, nor words without a letter (numbers such as ``2024``), nor,
    for space-keeping BPE tokenizers, words its pre-tokenizer cuts (``covid19`` -> ``covid`` ``19``).
    """
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(WORD.findall(_normalise(tokenizer, text)))
    keeps_space = _keeps_space(tokenizer)
    words = sorted(
        word for word, count in counts.items()
        if count >= min_count and any(c.isalpha() for c in word) and (not keeps_space or len(_pre_tokens(tokenizer, word)) == 1)
    )
    pieces = [len(ids) for ids in _encode(_plain(tokenizer), [" " + word for word in words])]
    found = [Candidate(word, counts[word], n) for word, n in zip(words, pieces) if n >= 2]
    return sorted(found, key=lambda c: (-c.saves, c.word))[:add]


def extend_tokenizer(tokenizer: Any, words: list[str]) -> int:
    """Add ``words`` as whole-word tokens (normalised first); returns how many were added.

    A word only matches whole: an added ``cardio`` leaves ``cardiology`` as it was.  Uncased tokenizers
    match any case, and byte-level BPE text still decodes to itself.  See the module docstring for how.
    """
    before = len(tokenizer)
    words = list(dict.fromkeys(_normalise(tokenizer, word) for word in words))
    if not _keeps_space(tokenizer):
        known = tokenizer.get_vocab()
        tokenizer.add_tokens([AddedToken(w, single_word=True, normalized=True) for w in words if w not in known])
        return len(tokenizer) - before
    forms = []
    for word in words:
        pieces = _pre_tokens(tokenizer, word)
        if len(pieces) != 1:
            raise ValueError(f"{word!r} is not one word for this tokenizer's pre-tokenizer: {pieces}")
        forms.append(pieces[0])
    known = tokenizer.get_vocab()
    new = [form for form in forms if form not in known]
    if new:
        backend = tokenizer.backend_tokenizer
        spec = json.loads(backend.to_str())
        first = max(known.values()) + 1
        spec["model"]["vocab"].update({form: first + i for i, form in enumerate(new)})
        spec["model"]["ignore_merges"] = True
        backend.model = Tokenizer.from_str(json.dumps(spec)).model
        cls = type(tokenizer)
        if cls is not TokenizersBackend and "__init__" in cls.__dict__:  # the test transformers uses on load
            tokenizer.__class__ = TokenizersBackend
    return len(tokenizer) - before


def tokens_per_word(tokenizer: Any, texts: Iterable[str]) -> float:
    """Tokens (no special tokens) per ``\\w+`` word over ``texts``: the figure to report before and after."""
    tokens = words = 0
    plain = _plain(tokenizer)
    for batch in _batches(texts):
        tokens += sum(len(ids) for ids in _encode(plain, batch))
        words += sum(len(WORD.findall(text)) for text in batch)
    if words == 0:
        raise ValueError("the texts contain no words")
    return tokens / words


@torch.no_grad()
def init_new_rows(model: Any, tokenizer: Any, original_tokenizer: Any) -> list[int]:
    """Start every id ``original_tokenizer`` lacked at the mean of its old pieces; returns those ids.

    Call after ``model.resize_token_embeddings(len(tokenizer))``.  A new token's pieces are how
    ``original_tokenizer`` cuts its word in running text.  Set: the input-embedding row; the output
    row when the output embedding is not tied to the input one; the output bias entry when the LM head
    has one (BERT's ``cls.predictions.bias``; ``resize_token_embeddings`` leaves new bias entries at 0).
    Old rows are not touched.  Ids whose text has no pieces are skipped.
    """
    old_ids = set(original_tokenizer.get_vocab().values())
    new_ids = sorted(set(tokenizer.get_vocab().values()) - old_ids)
    inputs = model.get_input_embeddings().weight
    if new_ids and new_ids[-1] >= inputs.shape[0]:
        raise ValueError(f"token id {new_ids[-1]} has no embedding row: call model.resize_token_embeddings(len(tokenizer)) first")
    head = model.get_output_embeddings()
    rows = [inputs]
    if head is not None and head.weight.data_ptr() != inputs.data_ptr():
        rows.append(head.weight)
    if head is not None and getattr(head, "bias", None) is not None:
        rows.append(head.bias)
    texts = [" " + tokenizer.decode([i]).strip() for i in new_ids]
    done = []
    for i, pieces in zip(new_ids, _encode(_plain(original_tokenizer), texts)):
        if pieces:
            for weight in rows:
                weight[i] = weight[pieces].float().mean(0).to(weight.dtype)
            done.append(i)
    return done


def _normalise(tokenizer: Any, text: str) -> str:
    normalizer = tokenizer.backend_tokenizer.normalizer
    return normalizer.normalize_str(text) if normalizer is not None else text


def _keeps_space(tokenizer: Any) -> bool:
    """True for a BPE whose pre-tokenizer writes the space into the next word (``Ġword``, ``▁word``)."""
    backend = tokenizer.backend_tokenizer
    return isinstance(backend.model, models.BPE) and backend.pre_tokenizer is not None and _pre_tokens(tokenizer, "a") != ["a"]


def _pre_tokens(tokenizer: Any, word: str) -> list[str]:
    """The pre-tokens of ``word`` after a space, e.g. ``["Ġcardio"]`` (byte-level) or ``["cardio"]`` (BERT)."""
    pre = tokenizer.backend_tokenizer.pre_tokenizer
    return [piece for piece, _ in pre.pre_tokenize_str(" " + word)] if pre is not None else [word]


def _plain(tokenizer: Any) -> Tokenizer:
    """The backend without the padding and truncation some tokenizer.json files set (MiniLM pads to 128)."""
    backend = tokenizer.backend_tokenizer
    if backend.padding is None and backend.truncation is None:
        return backend
    plain = Tokenizer.from_str(backend.to_str())
    plain.no_padding()
    plain.no_truncation()
    return plain


def _encode(backend: Tokenizer, texts: list[str]) -> list[list[int]]:
    return [encoding.ids for encoding in backend.encode_batch(texts, add_special_tokens=False)]


def _batches(texts: Iterable[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == BATCH:
            yield batch
            batch = []
    if batch:
        yield batch
