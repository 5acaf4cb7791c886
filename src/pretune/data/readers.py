"""One entry point from a recipe's ``data:`` section to what the trainer reads, by modality.

    modality  task data   reader                                   config class
    text      corpus      files -> tokenizer -> packed blocks      recipe.DataConfig
    text      labelled    a labelled table + the model's tokenizer labelled.LabelledDataConfig
    array     either      images / vectors (+ labels when present) arrays.ArrayDataConfig
    interactions either   an interaction log -> item sequences,    interactions.InteractionsConfig
                          or (history, item) -> target pairs

The backbone family gives the modality; the task says whether it reads a corpus or labelled
data (and, for text corpora, the tokenizer family and whether it wants sentence pairs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import datasets
import transformers
from pydantic import BaseModel

from pretune.data.arrays import ArrayData, ArrayDataConfig, build_array_data
from pretune.data.interactions import InteractionsConfig, build_interactions
from pretune.data.labelled import LabelledDataConfig, build_labelled
from pretune.data.text import build_text_data
from pretune.errors import DataError, RecipeError
from pretune.heads import Head
from pretune.recipe import DataConfig


@dataclass
class RunData:
    """What one run trains and validates on, whatever the modality."""

    train: Any  # indexable: ``train[indices]`` -> rows for ``task.collate``
    validation: Any | None
    test: Any | None = None
    label_names: list[str] | None = None  # class names by id (labelled data)
    tokenizer: Any = None  # text
    arrays: ArrayData | None = None  # images / vectors: shape, modality, the whole unlabelled train split
    text: str = "text"  # labelled text: the text column(s) and tokenisation length
    text_pair: str | None = None
    max_length: int = 128
    all_subwords: bool = False  # tagging: label every piece of a word
    meta: dict[str, Any] = field(default_factory=dict)  # how a saved model reads raw inputs (pretune.json)
    extra: dict[str, Any] = field(default_factory=dict)
    held_out: dict[str, Any] = field(default_factory=dict)  # more sets evaluated beside validation: {"general": ...}
    replay: tuple[int, float] | None = None  # the last N rows of train are general text, this share of every batch


TOKENIZED = ("text", "interactions")  # modalities whose models carry a tokenizer (for interactions: the item vocabulary)


def config_class(modality: str, data_kind: str) -> type[BaseModel]:
    """The class that validates the ``data:`` section for this modality and kind of data."""
    if modality == "array":
        return ArrayDataConfig
    if modality == "interactions":
        return InteractionsConfig
    return LabelledDataConfig if data_kind == "labelled" else DataConfig


def read(modality: str, data_kind: str, cfg: Any, *, seed: int, tokenizer_path: str | None = None,
         label_names: list[str] | None = None, head: Head | None = None, text_family: str = "encoder",
         pairs: bool = False, fresh: bool = True) -> RunData:
    """Read the data of a run.  ``tokenizer_path``: the model's (or a resumed run's) tokenizer;
    ``label_names``: a saved label map that fixes class ids (every rank, a resume, a labelled model);
    ``fresh``: the tokenizer is the starting model's, not one saved by this run (``data.vocabulary`` extends it)."""
    if modality == "array":
        arrays = build_array_data(cfg, seed, label_names=label_names)
        meta = {"input_shape": list(arrays.shape), "modality": arrays.modality}
        if arrays.modality == "vector":  # the label column a vector file is read with (predict / evaluate)
            meta["label"] = cfg.label
        if data_kind == "corpus":  # pretraining reads the whole training split, labelled or not
            return RunData(arrays.unlabelled_train, arrays.validation, arrays.test, arrays.label_names, arrays=arrays, meta=meta)
        if arrays.label_names is None:
            source = cfg.source
            raise DataError(f"{source}: classification needs labels (one sub-folder per class, or a '{cfg.label}' column)")
        return RunData(arrays.train, arrays.validation, arrays.test, arrays.label_names, arrays=arrays, meta=meta)
    if modality == "interactions":
        return read_interactions(data_kind, cfg, tokenizer_path=tokenizer_path, label_names=label_names, head=head, family=text_family)
    if data_kind == "corpus":
        if tokenizer_path:  # resuming or continuing: reuse the saved tokenizer
            cfg = cfg.model_copy(update={"tokenizer": cfg.tokenizer.model_copy(update={"path": tokenizer_path})})
        text = build_text_data(cfg, family=text_family, nsp=pairs, seed=seed, extend_vocabulary=fresh)
        extra = {"documents": text.documents, "tokens": text.tokens, "vocabulary": text.vocabulary}
        held_out = {"general": text.general_held_out} if text.general_held_out is not None else {}
        if text.general is None:
            return RunData(text.train, text.validation, tokenizer=text.tokenizer, extra=extra, held_out=held_out)
        train = datasets.concatenate_datasets([text.train, text.general])  # domain rows, then the general rows replayed
        return RunData(train, text.validation, tokenizer=text.tokenizer, extra=extra, held_out=held_out,
                       replay=(len(text.general), cfg.general.replay))
    labelled = build_labelled(cfg, head, seed, label_names=label_names)
    meta = {"modality": "text", "text": cfg.text, "text_pair": cfg.text_pair, "label": cfg.label, "max_length": cfg.max_length}
    return RunData(labelled.train, labelled.validation, labelled.test, labelled.label_names, tokenizer=load_tokenizer(tokenizer_path),
                   text=cfg.text, text_pair=cfg.text_pair, max_length=cfg.max_length, meta=meta)


def read_interactions(data_kind: str, cfg: InteractionsConfig, *, tokenizer_path: str | None,
                      label_names: list[str] | None, head: Head | None, family: str) -> RunData:
    """Item sequences (pretraining) or ``(history, item) -> target`` pairs (fine-tuning) of an interaction log;
    the next-item queries of validation and test ride along in ``extra["ranking"]``."""
    tokenizer = load_tokenizer(tokenizer_path) if tokenizer_path else None
    data = build_interactions(cfg, data_kind, family=family, tokenizer=tokenizer, head=head, label_names=label_names)
    read_as = ("file", "format", "user", "item", "time", "target", "max_length", "split", "time_split")  # evaluate reads logs alike
    meta = {"modality": "interactions", "interactions": {key: getattr(cfg, key) for key in read_as}}
    if data_kind == "labelled":
        meta.update(text="history", text_pair="item", label=cfg.target, max_length=cfg.max_length + 3)
    return RunData(data.train, data.validation, data.test, data.label_names, tokenizer=data.tokenizer, text="history",
                   text_pair="item", max_length=cfg.max_length + 3, meta=meta,
                   extra={"ranking": data.ranking, "interactions": data.stats})


def load_tokenizer(path: str | None) -> Any:
    """The tokenizer of a model folder; decoders without a pad token pad with end-of-text."""
    if not path:
        raise RecipeError("recipe key 'backbone.path': fine-tuning needs a model folder to start from (a pretune run's model/ or a Hugging Face folder)")
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
