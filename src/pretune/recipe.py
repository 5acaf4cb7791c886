"""Recipes: YAML files validated into typed objects, with dotted ``key=value`` overrides.

A recipe says what to run (``task``), on what (``data``, ``backbone``) and how (``trainer``).
Every field has a default that runs on a laptop CPU.  ``task`` and ``backbone`` are open sets
(see :mod:`pretune.registry`): each registered task or backbone validates its own section with
its own ``Config`` class, so a new objective brings its options with it.

    recipe = load_recipe("recipes/text-mlm.yaml", ["trainer.lr=3e-4", "data.files=corpus/*.txt"])

Errors are one line naming the key, the value and what is allowed:

    recipe key 'trainer.lr': input should be greater than 0 (got -1)
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from pretune.errors import RecipeError


Probability = Annotated[float, Field(ge=0, le=1)]  # a recipe key that is a probability


class Section(BaseModel):
    """Base of every recipe section: unknown keys are errors, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TokenizerConfig(Section):
    path: str | None = None  # an existing tokenizer folder; otherwise one is trained on the corpus
    kind: Literal["wordpiece", "bpe", "auto"] = "auto"  # auto: wordpiece for encoders, bpe for decoders
    vocab_size: int = Field(8000, ge=64, le=1_000_000)
    lowercase: bool = False
    train_documents: int | None = Field(None, ge=1)  # cap the documents used to train the tokenizer


class GeneralTextConfig(Section):
    """``data.general``: general text beside the domain corpus when continuing a model (``pretune adapt``): its
    held-out documents measure forgetting at every evaluation, and ``replay`` mixes the rest into every batch."""

    files: list[str] | str | None = None  # files, folders or globs; None: the embedded corpus (Python docstrings)
    replay: float = Field(0.0, ge=0.0, lt=1.0)  # share of every batch drawn from general text (0: none, report only)
    held_out: int = Field(200, ge=1)  # general documents held out for the forgetting report
    max_documents: int | None = Field(None, ge=1)

    @field_validator("files")
    @classmethod
    def _as_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class VocabularyConfig(Section):
    """``data.vocabulary``: add the domain's most split words to the tokenizer (``data/vocabulary.py``)."""

    add: int = Field(0, ge=0)  # how many words to add (0: the tokenizer as it is)
    min_count: int = Field(10, ge=1)  # a word must occur this often in the training documents


class TaskSelectionConfig(Section):
    """``data.select``: task-adaptive pretraining on the ``documents`` of ``data.files`` nearest to the task's own
    texts in the starting model's embedding space (kNN-TAPT, Gururangan et al. 2020), plus those texts."""

    task: str  # the task's labelled (or unlabelled) texts: CSV / TSV / JSONL / TXT
    column: str = "text"
    documents: int = Field(ge=1)  # how many pool documents to select
    include_task: bool = True  # also pretrain on the task's own texts
    max_length: int = Field(128, ge=8)  # tokens embedded per text


class DataConfig(Section):
    files: list[str] | str | None = None  # files, folders or globs; None: the embedded corpus
    format: Literal["auto", "text", "jsonl", "csv", "parquet"] = "auto"
    column: str = "text"  # the text column of JSONL / CSV / Parquet files
    document: Literal["auto", "line", "paragraph", "file"] = "auto"  # how a .txt file splits into documents
    validation: float = Field(0.05, ge=0.0, lt=1.0)  # fraction of documents held out
    validation_files: list[str] | str | None = None
    block_size: int = Field(128, ge=8, le=65536)
    max_documents: int | None = Field(None, ge=1)
    streaming: bool = False  # read through an iterable dataset (corpora larger than RAM)
    tokenizer: TokenizerConfig = TokenizerConfig()
    cache_dir: str | None = None
    general: GeneralTextConfig | None = None  # continuing a model: forgetting report on general text, optional replay
    vocabulary: VocabularyConfig = VocabularyConfig()  # continuing a model: add the domain's most split words
    select: TaskSelectionConfig | None = None  # continuing a model: pretrain on the pool documents nearest the task (kNN-TAPT)

    @field_validator("files", "validation_files")
    @classmethod
    def _as_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class TrainerConfig(Section):
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = Field(0.9, ge=0, lt=1)  # SGD only
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup: float = Field(0.06, ge=0)  # < 1: fraction of all steps; >= 1: number of steps
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    batch_size: int = Field(32, ge=1)  # per device, per micro-batch
    accumulate: int = Field(1, ge=1)
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1)  # optimizer steps; overrides epochs
    min_steps: int | None = Field(None, ge=1)  # fine-tuning: at least this many optimizer steps (small label budgets get more epochs)
    max_time: float | None = Field(None, gt=0)  # seconds of training (a resumed run counts what it ran before); stop cleanly when spent
    dist_timeout: float | None = Field(None, gt=0)  # seconds a collective may wait under torchrun (null: PRETUNE_DIST_TIMEOUT or 600)
    head_lr: float | None = Field(None, gt=0)  # learning rate of the new layers: fine-tuning's task layers, a continued model's new head (default: lr)
    clip: float | None = Field(1.0, gt=0)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    compile: bool = False
    distributed: Literal["ddp", "fsdp"] = "ddp"  # under torchrun: full replicas (ddp) or sharded weights, gradients, optimizer state (fsdp)
    activation_checkpointing: bool = False  # recompute each block's activations in the backward pass (less memory, ~1/3 more compute)
    fast_dropout: bool = True  # CPU: dropout masks from 16-bit integer draws instead of bernoulli_ (same operation, cheaper)
    group_by_length: bool = True  # fine-tuning text: batches of similar length, so little padding (trainer/data.py)
    workers: int = Field(0, ge=0)  # data-loader worker processes (collation, masking, augmentation)
    eval_every: int | Literal["epoch"] = 200
    patience: int | None = Field(None, ge=1)  # stop after this many evaluations without improvement
    monitor: str = "auto"  # validation metric that picks the best checkpoint; auto: the task's own (loss, accuracy...)
    eval_batches: int | None = Field(None, ge=1)
    log_every: int = Field(10, ge=1)
    save_every: int = Field(500, ge=1)
    keep_last: int = Field(2, ge=1)
    progress: bool = True
    tensorboard: bool = True  # false removes tensorboard from report_to (older recipes say trainer.tensorboard=false)
    report_to: list[str] = Field(["tensorboard"], validate_default=True)  # tensorboard, mlflow, wandb (trainer/tracking.py)
    threads: int | None = Field(None, ge=1)
    on_nan: Literal["stop", "skip"] = "stop"  # a non-finite loss or gradient: stop, or skip that optimizer step
    max_nan_skips: int = Field(5, ge=1)  # on_nan=skip: stop after this many skipped steps in a row

    @field_validator("report_to", mode="before")
    @classmethod
    def _trackers(cls, value: Any, info: ValidationInfo) -> list[str]:
        """Known tracker names, once each, their packages installed; ``tensorboard: false`` (validated
        before this field) takes tensorboard out (:func:`pretune.trainer.tracking.resolve`)."""
        from pretune.trainer.tracking import resolve  # no tracker package is imported before a run starts

        try:
            return resolve(value, tensorboard=info.data.get("tensorboard") is not False)
        except ValueError as exc:
            raise PydanticCustomError("report_to", "{why}", {"why": str(exc)}) from None


STRATEGIES = ("full", "linear-probe", "freeze-bottom", "gradual-unfreeze", "llrd", "lora", "setfit")
STRATEGY_HINT = "full, linear-probe, freeze-bottom:N, gradual-unfreeze, llrd:D, lora:r=R, setfit"


class StrategyConfig(Section):
    """Which backbone parameters train, and how fast (fine-tuning); see :mod:`pretune.strategies`.

    Written in full (``strategy: {name: lora, r: 16}``) or as the short string ``name:argument``:
    ``freeze-bottom:4``, ``llrd:0.8``, ``lora:r=8,alpha=16,dropout=0.0,lr_scale=20``, ``setfit:pairs=20``."""

    name: Literal["full", "linear-probe", "freeze-bottom", "gradual-unfreeze", "llrd", "lora", "setfit"] = "full"
    layers: int = Field(0, ge=0)  # freeze-bottom: the embeddings and the bottom N layers stay frozen
    decay: float = Field(0.8, gt=0, le=1)  # llrd: layer l of L trains at lr * decay**(L - l)
    r: int = Field(8, ge=1)  # lora: rank
    alpha: float = Field(16.0, gt=0)  # lora: scaling alpha / r
    dropout: float = Field(0.0, ge=0, lt=1)  # lora: dropout on the adapter input (0: none; it costs ~15% of a CPU step)
    lr_scale: float | None = Field(None, gt=0)  # trainer.lr multiplier of what trains besides the task layers; null: 20 for lora, 0.4 for setfit, else 1
    pairs: int = Field(20, ge=1)  # setfit: positive and negative pairs each example anchors over the run (SetFit's num_iterations)
    max_pairs: int = Field(20_000, ge=2)  # setfit: at most this many pairs in the whole run

    @model_validator(mode="before")
    @classmethod
    def _short_form(cls, value: Any) -> Any:
        """``'llrd:0.8'`` (or ``{name: 'llrd:0.8'}``) -> ``{name: llrd, decay: 0.8}``."""
        if isinstance(value, dict) and isinstance(value.get("name"), str) and ":" in value["name"]:
            return {**parse_strategy(value["name"]), **{k: v for k, v in value.items() if k != "name"}}
        return parse_strategy(value) if isinstance(value, str) else value

    @property
    def frozen_backbone(self) -> bool:
        return self.name == "linear-probe"

    @property
    def backbone_lr_scale(self) -> float:
        """``lr_scale``, or the strategy's own default: LoRA adapters train at 20x full fine-tuning's rate
        (Hu et al. 2021 tune RoBERTa's adapters at 4e-4 to 5e-4 over long schedules, ~10x full fine-tuning's;
        on MiniLM with 3 epochs, 10x / 20x / 40x gave 0.757 / 0.813 / 0.840 test accuracy, full 0.821).  SetFit's
        encoder trains at 0.4x: its paper's 2e-5 against the text recipe's 5e-5 for ordinary fine-tuning."""
        if self.lr_scale is not None:
            return self.lr_scale
        return {"lora": 20.0, "setfit": 0.4}.get(self.name, 1.0)

    def __str__(self) -> str:
        arg = {"freeze-bottom": f"{self.layers}", "llrd": f"{self.decay:g}",
               "lora": f"r={self.r},alpha={self.alpha:g},dropout={self.dropout:g}",
               "setfit": f"pairs={self.pairs},max_pairs={self.max_pairs}"}.get(self.name)
        if self.name == "lora" and self.lr_scale is not None:
            arg += f",lr_scale={self.lr_scale:g}"
        return f"{self.name}:{arg}" if arg else self.name


def parse_strategy(spec: str) -> dict[str, Any]:
    """``'freeze-bottom:4'`` -> ``{"name": "freeze-bottom", "layers": 4}`` (values checked by :class:`StrategyConfig`)."""
    name, _, arg = str(spec).strip().partition(":")
    if name not in STRATEGIES:
        raise ValueError(f"{spec!r} is not a strategy; choose one of {STRATEGY_HINT}")
    if not arg:
        return {"name": name}
    fields = {"freeze-bottom": "layers", "llrd": "decay"}
    if name in fields:
        return {"name": name, fields[name]: arg}
    keyed = {"lora": (("r", "alpha", "dropout", "lr_scale"), "lora:r=8,alpha=16,dropout=0.0,lr_scale=20"),
             "setfit": (("pairs", "max_pairs", "lr_scale"), "setfit:pairs=20,max_pairs=20000")}
    if name in keyed:
        keys, example = keyed[name]
        options: dict[str, Any] = {"name": name}
        for item in filter(None, arg.split(",")):
            key, _, value = item.partition("=")
            if key not in keys or not value:
                raise ValueError(f"{spec!r} has a bad argument {item!r} (e.g. {example})")
            options[key] = value
        return options
    raise ValueError(f"{spec!r}: {name} takes no argument")


class Recipe(Section):
    kind: Literal["pretrain", "finetune"] = "pretrain"
    run_dir: str = "runs/run"
    seed: int = 0
    strategy: StrategyConfig = StrategyConfig()  # fine-tuning: full | linear-probe | freeze-bottom:N | gradual-unfreeze | llrd:D | lora:r=R
    task: dict[str, Any] = {"name": "mlm"}
    backbone: dict[str, Any] = {"name": "bert", "size": "tiny"}
    data: dict[str, Any] = {}  # validated by the task's own data config (text corpus, labelled table...)
    trainer: TrainerConfig = TrainerConfig()

    @field_validator("task", "backbone", mode="before")
    @classmethod
    def _named(cls, value: Any, info: Any) -> Any:
        """``task: mlm`` is short for ``task: {name: mlm}``; a section without a name gets the default one."""
        if isinstance(value, str):
            value = {"name": value}
        if isinstance(value, dict) and "name" not in value:
            value = {"name": cls.model_fields[info.field_name].default["name"], **value}
        return value

    def section(self, key: Literal["task", "backbone", "data"], config_class: type[BaseModel]) -> Any:
        """Validate the open ``task``/``backbone`` section with the class that owns it."""
        return validate(config_class, getattr(self, key), prefix=f"{key}.")

    def dump(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def validate(model: type[BaseModel], data: dict[str, Any], prefix: str = "", source: Any = "") -> Any:
    """``model.model_validate(data)`` with a one-line error naming the first bad key; ``source`` (a string,
    or a function of the dotted key) says where the value came from."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(_describe(model, exc, prefix, source)) from None


def _describe(model: type[BaseModel], exc: ValidationError, prefix: str, source: Any) -> str:
    err = exc.errors()[0]
    loc = [str(part) for part in err["loc"]]
    key = prefix + ".".join(loc)
    origin = source(key) if callable(source) else source
    where = f"{origin}: " if origin else ""
    if err["type"] == "extra_forbidden":
        allowed = _keys_at(model, loc[:-1])
        hint = f"; allowed keys: {', '.join(allowed)}" if allowed else ""
        return f"{where}unknown recipe key {key!r}{hint}"
    ctx = err.get("ctx") or {}
    message = f"must be one of {ctx['expected']}" if "expected" in ctx else err["msg"][0].lower() + err["msg"][1:]
    return f"{where}recipe key {key!r}: {message} (got {err.get('input')!r})"


def _keys_at(model: Any, loc: list[str]) -> list[str]:
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        model = field.annotation
    return list(getattr(model, "model_fields", {}))


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'trainer.lr=3e-4'`` -> (['trainer', 'lr'], 0.0003); values are parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"override {text!r} is not of the form key=value (e.g. trainer.lr=3e-4)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


ALIASES = {"model": ["backbone", "path"]}  # pretune finetune ... model=runs/mlm/model


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    raw = copy.deepcopy(raw)
    for text in overrides:
        path, value = parse_override(text)
        path = ALIASES.get(".".join(path), path)
        node = raw
        for part in path[:-1]:
            child = node.get(part)
            if isinstance(child, str) and part in ("task", "backbone", "strategy"):
                child = {"name": child}
            if child is None:
                child = {}
            if not isinstance(child, dict):
                raise RecipeError(f"override {text!r}: recipe key {part!r} is not a section")
            node[part] = child
            node = child
        node[path[-1]] = value
    return raw


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / "recipe.yaml"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"recipe file {str(path)!r} does not exist") from None
    except (UnicodeDecodeError, IsADirectoryError, PermissionError) as exc:
        raise RecipeError(f"cannot read recipe {str(path)!r}: {exc}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise RecipeError(f"{path}{line}: {problem}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of keys to values, got {type(raw).__name__}")
    return raw


def load_recipe(path: str | Path | None = None, overrides: list[str] = (), **base: Any) -> Recipe:
    """Read a recipe file (or start from ``base``), apply ``key=value`` overrides, validate."""
    raw = dict(base)
    if path is not None:
        raw.update(read_yaml(path))
    raw = apply_overrides(raw, list(overrides))
    given = {".".join(ALIASES.get(key, [key])): text for text in overrides for key in [text.partition("=")[0].strip()]}

    def source(key: str) -> str:  # a bad key typed on the command line is reported as such, not against the file
        typed = next((text for name, text in given.items() if key == name or key.startswith(name + ".") or name.startswith(key + ".")), None)
        return f"override {typed!r}" if typed else (str(path) if path else "")

    return validate(Recipe, raw, source=source)
