"""Tokenizers: load an existing one, or train WordPiece (BERT) / byte-level BPE (GPT-2) on the corpus.

The trained tokenizer is a plain ``transformers.PreTrainedTokenizerFast`` whose
``save_pretrained`` folder loads back with ``AutoTokenizer.from_pretrained``, so a pretrained
model and its tokenizer are usable by the rest of the Hugging Face ecosystem.

Special tokens by family and kind:

    encoder + wordpiece : [PAD] [UNK] [CLS] [SEP] [MASK], adds [CLS] A [SEP] (B [SEP]) with type ids
    decoder + bpe       : <|endoftext|> as bos / eos / unk / pad, adds nothing
    encoder + bpe       : <|endoftext|> plus [PAD] [CLS] [SEP] [MASK] for MLM, adds [CLS] A [SEP] ...
    decoder + wordpiece : BERT's tokens with [CLS] as bos and [SEP] as eos, adds nothing
"""

from __future__ import annotations

import unicodedata
from pathlib import Path
from typing import Any, Iterator

import datasets
import transformers
from datasets.fingerprint import Hasher
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from pretune.errors import DataError
from pretune.recipe import TokenizerConfig

FAMILIES = ("encoder", "decoder")
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
END_OF_TEXT = "<|endoftext|>"
NEEDED = {"encoder": ("cls_token", "sep_token", "mask_token", "pad_token"), "decoder": ("eos_token",)}


def get_tokenizer(cfg: TokenizerConfig, documents: datasets.Dataset, family: str) -> transformers.PreTrainedTokenizerFast:
    """``cfg.path``'s tokenizer, or one trained on ``documents["text"]``; its special ids are checked.

    ``family`` is ``"encoder"`` (BERT-style: needs [CLS] [SEP] [MASK] [PAD]) or ``"decoder"``
    (GPT-style: needs an end-of-text token; ``pad`` defaults to it).  ``cfg.kind == "auto"``
    trains WordPiece for encoders and byte-level BPE for decoders.  Training is deterministic:
    the same documents and config give the same vocabulary.
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if cfg.path:
        tokenizer = load_tokenizer(cfg.path)
        source = f"tokenizer {cfg.path}"
    else:
        kind = cfg.kind if cfg.kind != "auto" else ("wordpiece" if family == "encoder" else "bpe")
        tokenizer = train_tokenizer(documents, kind, family, cfg.vocab_size, cfg.lowercase, cfg.train_documents)
        source = f"trained {kind} tokenizer"
    if family == "decoder" and tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    missing = [name for name in NEEDED[family] if getattr(tokenizer, name + "_id", None) is None]
    if missing:
        raise DataError(f"{source} lacks the {', '.join(missing)} that a {family} needs")
    return tokenizer


def load_tokenizer(path: str | Path) -> transformers.PreTrainedTokenizerFast:
    """A tokenizer saved with ``save_pretrained`` in a local folder (never downloaded)."""
    if not Path(path).is_dir():
        raise DataError(f"tokenizer folder {str(path)!r} does not exist")
    try:
        return transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # transformers raises OSError / ValueError / JSON errors here
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DataError(f"tokenizer folder {str(path)!r} cannot be loaded: {first}") from None


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A stable hash of what a tokenizer does (keys the ``datasets`` cache of tokenized corpora)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return Hasher.hash(backend.to_str() if backend is not None else tokenizer)


def _texts(documents: datasets.Dataset, limit: int | None, batch: int = 1000) -> Iterator[list[str]]:
    count = len(documents) if limit is None else min(limit, len(documents))
    for start in range(0, count, batch):
        yield documents[start : min(start + batch, count)]["text"]


def train_tokenizer(
    documents: datasets.Dataset, kind: str, family: str, vocab_size: int, lowercase: bool = False, limit: int | None = None
) -> transformers.PreTrainedTokenizerFast:
    """Train a ``wordpiece`` or ``bpe`` tokenizer on the first ``limit`` documents' ``text``."""
    if kind == "wordpiece":
        tokenizer = _train_wordpiece(documents, vocab_size, lowercase, limit)
        names = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]"}
        if family == "decoder":
            names |= {"bos_token": "[CLS]", "eos_token": "[SEP]"}
    elif kind == "bpe":
        tokenizer = Tokenizer(models.BPE())
        if lowercase:
            tokenizer.normalizer = normalizers.Lowercase()
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
        specials = [END_OF_TEXT] + (["[PAD]", "[CLS]", "[SEP]", "[MASK]"] if family == "encoder" else [])
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=specials, show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        tokenizer.train_from_iterator(_texts(documents, limit), trainer)
        names = {"bos_token": END_OF_TEXT, "eos_token": END_OF_TEXT, "unk_token": END_OF_TEXT, "pad_token": END_OF_TEXT}
        if family == "encoder":
            names |= {"pad_token": "[PAD]", "cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]"}
    else:
        raise ValueError(f"tokenizer kind must be 'wordpiece' or 'bpe', got {kind!r}")
    if family == "encoder":
        cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
        template = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
        )
        byte_level = tokenizer.post_processor
        tokenizer.post_processor = processors.Sequence([byte_level, template]) if byte_level else template
    inputs = ["input_ids", "token_type_ids", "attention_mask"] if family == "encoder" else ["input_ids", "attention_mask"]
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_input_names=inputs, **names)


def _train_wordpiece(documents: datasets.Dataset, vocab_size: int, lowercase: bool, limit: int | None) -> Tokenizer:
    """BERT's WordPiece, trained deterministically.

    ``tokenizers``' WordPiece trainer numbers the word-continuation pieces (``##e``) in the
    iteration order of a Rust hash map, which changes from process to process, and ties between
    equally frequent merges are broken by those numbers: two runs learn different vocabularies.
    Declaring every ``##c`` up front (sorted) fixes their numbers; the tokenizer is then rebuilt
    from the learned vocabulary so that those pieces are ordinary, not special, tokens.
    """
    normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    pieces = _continuation_pieces(documents, limit, normalizer)
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=BERT_SPECIALS + pieces, show_progress=False)
    draft = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    draft.normalizer, draft.pre_tokenizer = normalizer, pre_tokenizers.BertPreTokenizer()
    draft.train_from_iterator(_texts(documents, limit), trainer)
    tokenizer = Tokenizer(models.WordPiece(draft.get_vocab(with_added_tokens=False), unk_token="[UNK]"))
    tokenizer.normalizer, tokenizer.pre_tokenizer = normalizer, pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    tokenizer.add_special_tokens(BERT_SPECIALS)
    return tokenizer


def _continuation_pieces(documents: datasets.Dataset, limit: int | None, normalizer: normalizers.Normalizer) -> list[str]:
    """``##c`` for every (normalised) character of the corpus that can continue a word, sorted."""
    raw: set[str] = set()
    for batch in _texts(documents, limit):
        for text in batch:
            raw.update(text)
    chars = {c for r in raw for c in normalizer.normalize_str(r)}
    return [f"##{c}" for c in sorted(chars) if normalizer.normalize_str(c) == c and _inside_word(c)]


def _inside_word(char: str) -> bool:
    """False for what BertPreTokenizer splits on: whitespace and (BERT's) punctuation."""
    code = ord(char)
    ascii_punctuation = 33 <= code <= 47 or 58 <= code <= 64 or 91 <= code <= 96 or 123 <= code <= 126
    return not (char.isspace() or ascii_punctuation or unicodedata.category(char).startswith("P"))
