"""Interaction logs for recommendation: ``(user, item[, target][, time])`` rows -> per-user item sequences.

    log = read_log(cfg)                       # one-line errors naming the file, row and column
    split = leave_last_out(histories(log))    # or time_split(...): train / validation / test per user
    data = build_interactions(cfg, "corpus", family="encoder")

A user's history, sorted by time, is a sequence of item ids: a *sentence whose words are items*.  So
the item vocabulary is a word-level tokenizer (one token per item of the training events, most
frequent first, after ``[PAD] [UNK] [CLS] [SEP] [MASK]``), saved with the model as an ordinary
Hugging Face ``tokenizer.json``, and the text objectives run unchanged on item sequences: masked
language modelling is BERT4Rec's masked item modelling (Sun et al. 2019), causal language modelling
is SASRec's next-item prediction (Kang & McAuley 2018).  Rating or click fine-tuning is a sentence
pair, ``(history, item) -> target``, for the text fine-tuning heads.

Splits (``data.split``):

- ``leave-last-out`` (SASRec, BERT4Rec): a user's last event is the test target, the second to
  last the validation target, everything before trains.  Users with fewer than 3 events only train.
- ``time``: one global cut (``data.time_split`` quantiles of the timestamps): events before the
  first cut train, then validation, then test; a user's first validation (test) event is that
  user's validation (test) target, with every earlier event as history.

Policies (documented in docs/recommendation.md): exact duplicate events (same user, item and time)
are dropped and counted; items never seen in training map to ``[UNK]`` in a history, and as a target
they cannot be ranked, so they count as misses (reported as ``cold_targets``); a user without a
training event has no history and is skipped at evaluation (``cold_users``).
"""

from __future__ import annotations

import math
import random
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

import datasets
import transformers
from pydantic import Field, field_validator
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from pretune import heads
from pretune.data.labelled import read_columns
from pretune.errors import DataError, RecipeError
from pretune.heads import Head, finite_number
from pretune.recipe import Section

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
PAD, UNK, CLS, SEP, MASK = range(len(SPECIALS))


class InteractionsConfig(Section):
    """The ``data:`` section of a recommendation recipe."""

    file: str | None = None  # the interaction log: CSV / TSV / JSONL / Parquet (``format`` for another suffix)
    format: Literal["auto", "csv", "tsv", "jsonl", "parquet"] = "auto"
    user: str = "user_id"
    item: str = "item_id"
    time: str | None = "timestamp"  # None: the file's row order is the time order
    target: str | None = None  # fine-tuning: the rating (regression) or click / like (classification) column
    max_length: int = Field(50, ge=2, le=4096)  # items per history (the most recent ones)
    split: Literal["leave-last-out", "time"] = "leave-last-out"
    time_split: tuple[float, float] = (0.8, 0.9)  # split=time: the timestamp quantiles where validation, then test, start
    budget: float | int | None = None  # fine-tuning: the share (0-1] or number of users whose labelled events train
    budget_seed: int = 0

    @field_validator("budget")
    @classmethod
    def _budget_range(cls, value: Any) -> float | int | None:
        if isinstance(value, float) and 0 < value <= 1 or type(value) is int and value >= 1 or value is None:
            return value
        raise ValueError("must be a share of the users in (0, 1] (1.0: all) or a number of users >= 1")

    @field_validator("time_split")
    @classmethod
    def _cuts(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 < value[0] <= value[1] < 1:
            raise ValueError("time_split must be two quantiles 0 < validation <= test < 1")
        return value


@dataclass
class Event:
    item: str
    time: float
    target: Any = None
    row: int = 0  # the file's row, counted from 1 as every reader's errors count (a CSV header is not a row)


@dataclass
class Log:
    """The events of a log grouped by user in time order (ties keep the file's order)."""

    users: dict[str, list[Event]]
    path: str
    duplicates: int = 0  # exact duplicate events dropped


@dataclass
class Split:
    """Per user: the training events, and the (history, target) of validation and test."""

    train: dict[str, list[Event]]
    validation: dict[str, tuple[list[Event], Event]]
    test: dict[str, tuple[list[Event], Event]]


@dataclass
class Ranking:
    """Next-item queries: item-id histories (token ids) and the target's id (``UNK`` when unseen in training)."""

    histories: list[list[int]]
    targets: list[int]
    cold_users: int = 0  # users without any training event: not asked

    def __len__(self) -> int:
        return len(self.targets)


@dataclass
class InteractionData:
    train: datasets.Dataset
    validation: datasets.Dataset | None
    test: datasets.Dataset | None
    tokenizer: Any
    ranking: dict[str, Ranking] = field(default_factory=dict)
    label_names: list[str] | None = None
    stats: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------- reading


def read_log(cfg: InteractionsConfig, target: bool = False) -> Log:
    """The events of ``cfg.file`` grouped by user; ``target``: also read ``cfg.target`` (fine-tuning)."""
    if cfg.file is None:
        raise RecipeError("recipe key 'data.file': recommendation needs an interaction log (CSV / TSV / JSONL / Parquet)")
    if target and cfg.target is None:
        raise RecipeError("recipe key 'data.target': fine-tuning on interactions needs the column to predict (e.g. rating)")
    names = {"user": cfg.user, "item": cfg.item} | ({"time": cfg.time} if cfg.time else {}) | ({"target": cfg.target} if target else {})
    columns = read_columns(cfg.file, list(dict.fromkeys(names.values())), None if cfg.format == "auto" else cfg.format)
    users: dict[str, list[Event]] = {}
    seen: set[tuple[str, str, float]] = set()
    duplicates = 0
    for row in range(len(columns[cfg.user])):
        where = f"row {row + 1} of {cfg.file}"
        user = _id(columns[cfg.user][row], f"{where} column {cfg.user!r}", "user")
        item = _id(columns[cfg.item][row], f"{where} column {cfg.item!r}", "item")
        stamp = columns[cfg.time][row] if cfg.time else row
        time = finite_number(stamp, f"{where} column {cfg.time!r}: timestamp {stamp!r}") if cfg.time else float(row)
        key = (user, item, time)
        if key in seen:
            duplicates += 1
            continue
        seen.add(key)
        value = columns[cfg.target][row] if target else None
        users.setdefault(user, []).append(Event(item, time, value, row + 1))
    for events in users.values():
        events.sort(key=lambda event: event.time)  # stable: equal times keep the file's order
    if duplicates:
        print(f"pretune: note: {cfg.file}: {duplicates} duplicate events (same user, item and time) dropped", file=sys.stderr, flush=True)
    return Log(users, cfg.file, duplicates)


def _id(value: Any, where: str, what: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)) or not str(value).strip():
        raise DataError(f"{where}: missing {what} id")
    text = str(value).strip()
    if isinstance(value, float) and value.is_integer():
        text = str(int(value))  # 12.0 from a float column is the id 12
    if any(ch.isspace() for ch in text) or text in SPECIALS:
        raise DataError(f"{where}: {what} id {text!r} contains whitespace or is a reserved token ({', '.join(SPECIALS)})")
    return text


# ---------------------------------------------------------------------------- splits


def leave_last_out(log: Log) -> Split:
    """Last event test, second to last validation, the rest training; users with < 3 events only train."""
    train, validation, test = {}, {}, {}
    for user, events in log.users.items():
        if len(events) < 3:
            train[user] = events
            continue
        train[user] = events[:-2]
        validation[user] = (events[:-2], events[-2])
        test[user] = (events[:-1], events[-1])
    return Split(train, validation, test)


def time_split(log: Log, cuts: tuple[float, float]) -> Split:
    """Events before the ``cuts[0]`` quantile of all timestamps train, then validation until ``cuts[1]``, then test."""
    times = sorted(event.time for events in log.users.values() for event in events)
    start_val, start_test = (times[min(len(times) - 1, int(q * len(times)))] for q in cuts)
    train, validation, test = {}, {}, {}
    for user, events in log.users.items():
        train[user] = [event for event in events if event.time < start_val]
        for position, event in enumerate(events):
            if start_val <= event.time < start_test and user not in validation:
                validation[user] = (events[:position], event)
            if event.time >= start_test:
                test[user] = (events[:position], event)
                break
    return Split({user: events for user, events in train.items() if events}, validation, test)


def split_log(log: Log, cfg: InteractionsConfig) -> Split:
    return leave_last_out(log) if cfg.split == "leave-last-out" else time_split(log, cfg.time_split)


# ---------------------------------------------------------------------------- the item vocabulary


def item_tokenizer(train: dict[str, list[Event]], family: str, max_length: int) -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer over the items of the training events, most frequent first (ties by id).

    Encoders get BERT's template (``[CLS] A [SEP]``, pairs ``[CLS] A [SEP] B [SEP]``); decoders none."""
    counts = Counter(event.item for events in train.values() for event in events)
    items = sorted(counts, key=lambda item: (-counts[item], item))
    vocab = {token: i for i, token in enumerate([*SPECIALS, *items])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if family == "encoder":
        backend.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", CLS), ("[SEP]", SEP)])
    inputs = ["input_ids", "token_type_ids", "attention_mask"] if family == "encoder" else ["input_ids", "attention_mask"]
    # truncation_side left: a history too long for the model loses its oldest items, never its latest
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_max_length=max_length + 3, model_input_names=inputs, truncation_side="left")


def item_ids(tokenizer: Any, items: list[str]) -> list[int]:
    """Token ids of item ids (``[UNK]`` for items the vocabulary lacks)."""
    return tokenizer.convert_tokens_to_ids(items)


def windows(ids: list[int], length: int) -> list[list[int]]:
    """A long history cut into windows of ``length`` items ending at its last item, half-overlapping
    (every item appears, none thrown away); a short one is one window."""
    if len(ids) <= length:
        return [ids]
    step = max(1, length // 2)
    ends = list(range(len(ids), length - 1, -step))
    if ends[-1] != length:
        ends.append(length)
    return [ids[end - length:end] for end in reversed(ends)]


def sequence_row(ids: list[int], family: str, length: int) -> dict[str, list[int]]:
    """One padded model input: ``[CLS] ids [SEP]`` for encoders, ``ids`` for decoders, right-padded to
    the fixed width of the family (so rows stack), with its attention mask."""
    tokens = [CLS, *ids, SEP] if family == "encoder" else list(ids)
    width = length + 2 if family == "encoder" else length
    return {"input_ids": tokens + [PAD] * (width - len(tokens)), "attention_mask": [1] * len(tokens) + [0] * (width - len(tokens))}


def sequences(rows: list[list[int]], family: str, length: int) -> datasets.Dataset:
    table = [sequence_row(ids, family, length) for ids in rows]
    return datasets.Dataset.from_dict({"input_ids": [r["input_ids"] for r in table], "attention_mask": [r["attention_mask"] for r in table]})


def ranking(queries: dict[str, tuple[list[Event], Event]], tokenizer: Any) -> Ranking:
    """Next-item queries from ``(history, target)`` per user; users without history are not asked."""
    histories, targets, cold = [], [], 0
    for history, target in queries.values():
        if not history:
            cold += 1
            continue
        histories.append(item_ids(tokenizer, [event.item for event in history]))
        targets.append(item_ids(tokenizer, [target.item])[0])
    return Ranking(histories, targets, cold)


# ---------------------------------------------------------------------------- what a run reads


def build_interactions(cfg: InteractionsConfig, kind: str, *, family: str = "encoder", tokenizer: Any = None,
                       head: Head | str | None = None, label_names: list[str] | None = None) -> InteractionData:
    """Pretraining sequences (``kind="corpus"``) or labelled ``(history, item) -> target`` pairs (``"labelled"``).

    ``tokenizer``: the model's item vocabulary (fine-tuning, a resumed run, the other ranks); without
    one a new vocabulary is built from the training events."""
    log = read_log(cfg, target=kind == "labelled")
    split = split_log(log, cfg)
    if not split.train:
        raise DataError(f"{cfg.file}: no training events ({cfg.split} split of {len(log.users)} users)")
    if tokenizer is None:
        if kind == "labelled":
            raise RecipeError("recipe key 'backbone.path': fine-tuning needs a model folder to start from (its items are the vocabulary)")
        tokenizer = item_tokenizer(split.train, family, cfg.max_length)
    stats = {"users": len(log.users), "events": sum(map(len, log.users.values())), "duplicates": log.duplicates,
             "items": len(tokenizer) - len(SPECIALS)}
    queries = {"validation": ranking(split.validation, tokenizer), "test": ranking(split.test, tokenizer)}
    if kind == "corpus":
        rows = [window for events in split.train.values()
                for window in windows(item_ids(tokenizer, [e.item for e in events]), cfg.max_length)]
        held = [q.histories[i][-(cfg.max_length - 1):] + [q.targets[i]] for q in (queries["validation"],) for i in range(len(q))]
        validation = sequences(held, family, cfg.max_length) if held else None
        return InteractionData(sequences(rows, family, cfg.max_length), validation, None, tokenizer, queries, stats=stats)
    head = heads.get(head)
    return _labelled(cfg, split, head, tokenizer, label_names, queries, stats)


def _labelled(cfg: InteractionsConfig, split: Split, head: Head, tokenizer: Any, label_names: list[str] | None,
              queries: dict[str, Ranking], stats: dict[str, Any]) -> InteractionData:
    """Every training event with its earlier items as history; validation and test: each user's target event."""
    def where(event: Event) -> str:
        return f"row {event.row} of {cfg.file} column {cfg.target!r}"

    users = sorted(split.train)
    if cfg.budget is not None:  # the users whose labels train: the same users whatever the seed of the run
        count = min(len(users), cfg.budget if isinstance(cfg.budget, int) else max(1, round(cfg.budget * len(users))))
        users = sorted(random.Random(cfg.budget_seed).sample(users, count))
    rows = {"train": [(user, pair) for user in users for pair in _pairs(split.train[user])],
            "validation": list(split.validation.items()), "test": list(split.test.items())}
    parsed = {name: [(history, event, head.parse(event.target, where(event), 1, "history")) for user, (history, event) in part]
              for name, part in rows.items()}
    if not head.has_classes:
        names: list[str] = []
    elif label_names is not None:
        names = [str(n) for n in label_names]
    else:
        names = sorted({key for _, _, value in parsed["train"] for key in head.keys(value)})
    label2id = {name: i for i, name in enumerate(names)}
    features = datasets.Features({"history": datasets.Value("string"), "item": datasets.Value("string"), "labels": head.feature(names)})

    def table(rows: list[tuple[list[Event], Event, Any]]) -> datasets.Dataset | None:
        if not rows:
            return None
        for _, event, value in rows:
            for key in head.keys(value):
                if key not in label2id:
                    raise DataError(f"{cfg.file} column {cfg.target!r}: label {key!r} never appears in the training events")
        return datasets.Dataset.from_dict({
            "history": [" ".join(e.item for e in history[-(cfg.max_length - 1):]) for history, _, _ in rows],
            "item": [event.item for _, event, _ in rows],
            "labels": [head.encode(value, label2id) for _, _, value in rows]}, features=features)

    train = table(parsed["train"])
    if train is None:
        raise DataError(f"{cfg.file}: no labelled training events")
    return InteractionData(train, table(parsed["validation"]), table(parsed["test"]), tokenizer, queries, names, stats)


def _pairs(events: list[Event]) -> list[tuple[list[Event], Event]]:
    return [(events[:i], events[i]) for i in range(len(events))]
