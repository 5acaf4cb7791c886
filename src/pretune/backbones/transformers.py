"""Hugging Face ``transformers`` text backbones: BERT-family encoders and GPT-2 / Llama decoders.

A backbone is built fresh from a size preset (``tiny``, ``mini``, ``small``, ``base``) plus any
explicit config fields, or loaded from a local checkpoint folder (a pretune run's ``model/`` or
any Hugging Face folder).  Tasks ask for the Hugging Face model class that carries their head
(``AutoModelForMaskedLM``, ``BertForPreTraining``, ``AutoModelForCausalLM``), so what pretune
saves is an ordinary Hugging Face folder that the rest of the ecosystem loads, and vice versa.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any, Literal

import safetensors.torch
import torch
import transformers
from torch import nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from pretune.backbones.arrays import is_vision_folder
from pretune.backbones.base import BACKBONES, Backbone, Classifier
from pretune.backbones.start import Start, load_start
from pretune.data.readers import load_tokenizer
from pretune.data.vocabulary import init_new_rows
from pretune.errors import CheckpointError, RecipeError
from pretune import heads
from pretune.heads import IGNORE, Head
from pretune.recipe import Section
from pretune.safeload import check_model_folder, pickle_trusted

# Layers, hidden size, heads.  Feed-forward width is 4x hidden, as in BERT and GPT-2.
SIZES: dict[str, tuple[int, int, int]] = {
    "nano": (1, 32, 2),  # for smoke tests: trains in seconds, learns little
    "rec": (2, 64, 2),  # BERT4Rec's and SASRec's MovieLens shape (item sequences: backbones/items.py)
    "tiny": (2, 128, 2),
    "mini": (4, 256, 4),
    "small": (4, 512, 8),
    "base": (12, 768, 12),
}

FAMILIES: dict[str, str] = {"bert": "encoder", "gpt2": "decoder", "llama": "decoder"}


class TransformerConfig(Section):
    name: str = "bert"  # bert | gpt2 | llama (fresh), or "hf" with a path
    size: Literal["nano", "rec", "tiny", "mini", "small", "base"] = "tiny"
    path: str | None = None  # local Hugging Face checkpoint folder to start from
    pretrained: bool = True  # false: the architecture of `path`, randomly initialised (the from-scratch baseline)
    config: dict[str, Any] = {}  # extra Hugging Face config fields, e.g. {hidden_dropout_prob: 0.0}
    attention: Literal["sdpa", "eager"] = "sdpa"


def family_of(cfg: TransformerConfig) -> str:
    """``'encoder'`` or ``'decoder'``: decides tokenizer kind and packing."""
    if cfg.path:
        model_type = load_config(cfg.path).model_type
        return "decoder" if model_type in _DECODER_TYPES else "encoder"
    return FAMILIES[cfg.name]


_DECODER_TYPES = {"gpt2", "llama", "mistral", "qwen2", "qwen3", "gpt_neo", "gptj", "gpt_neox", "phi", "phi3", "smollm3", "gemma", "gemma2", "olmo", "opt"}


def load_config(path: str | Path) -> PretrainedConfig:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: not a model folder (no config.json)")
    check_model_folder(path)  # weights only from safetensors unless --trust-pickle
    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (ValueError, OSError, KeyError) as exc:
        raise CheckpointError(f"{path}/config.json: cannot be read as a Hugging Face config: {exc}") from None


def fresh_config(cfg: TransformerConfig, vocab_size: int, special: dict[str, int], max_positions: int) -> PretrainedConfig:
    """A Hugging Face config for a new model of the preset size."""
    layers, hidden, heads = SIZES[cfg.size]
    if cfg.name == "bert":
        config: PretrainedConfig = transformers.BertConfig(
            vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
            intermediate_size=4 * hidden, max_position_embeddings=max(512, max_positions),
            pad_token_id=special.get("pad_token_id", 0),
        )
    elif cfg.name == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=heads,
            n_positions=max(1024, max_positions),
            # GPT-2's tanh-approximated GELU ("gelu_new") as one fused PyTorch op instead of ~8 Python-level
            # element-wise ops: the same function, ~5% of a CPU training step saved (docs/performance.md)
            activation_function="gelu_pytorch_tanh",
            bos_token_id=special.get("bos_token_id", 0), eos_token_id=special.get("eos_token_id", 0),
        )
    elif cfg.name == "llama":
        config = transformers.LlamaConfig(
            vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
            num_key_value_heads=heads, intermediate_size=int(8 * hidden / 3) // 32 * 32 or 4 * hidden,
            max_position_embeddings=max(2048, max_positions), tie_word_embeddings=True,
            bos_token_id=special.get("bos_token_id", 0), eos_token_id=special.get("eos_token_id", 0),
            pad_token_id=special.get("pad_token_id"),
        )
    else:
        raise RecipeError(f"recipe key 'backbone.name': unknown transformer {cfg.name!r}; choose bert, gpt2 or llama, or set backbone.path")
    for key, value in cfg.config.items():
        if not hasattr(config, key):
            raise RecipeError(f"recipe key 'backbone.config.{key}': {type(config).__name__} has no such field")
        setattr(config, key, value)
    return config


def build_model(cfg: TransformerConfig, auto_class: Any, *, tokenizer: Any, max_positions: int) -> tuple[PreTrainedModel, Start | None]:
    """Build ``auto_class`` (e.g. ``AutoModelForMaskedLM``) fresh from a preset, or continue ``cfg.path``
    (then also return its :class:`~pretune.backbones.start.Start`: what was created, what is kept).

    A continued model whose tokenizer gained words (``data.vocabulary``) gets their rows initialised
    as the mean of the rows of the pieces the original tokenizer split them into."""
    if cfg.path:
        load_config(cfg.path)  # clear error if the folder is not a model
        model, start = load_start(auto_class, cfg.path, attn_implementation=cfg.attention, **cfg.config)
        original = len(load_tokenizer(cfg.path))
        if len(tokenizer) > original:
            if model.get_input_embeddings().num_embeddings < len(tokenizer):
                model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
            init_new_rows(model, tokenizer, load_tokenizer(cfg.path))
        elif model.config.vocab_size < len(tokenizer):
            model.resize_token_embeddings(len(tokenizer))
        return model, start
    config = fresh_config(cfg, len(tokenizer), special_ids(tokenizer), max_positions)
    config._attn_implementation = cfg.attention
    if hasattr(auto_class, "from_config"):  # Auto* classes
        return auto_class.from_config(config, attn_implementation=cfg.attention), None
    return auto_class(config), None  # a concrete class such as BertForPreTraining




# -- fine-tuning: the architecture's own Hugging Face head classes ------------------------------------
_ENCODER_HEADS = ("BertForSequenceClassification", "RobertaForSequenceClassification", "XLMRobertaForSequenceClassification",
                  "DistilBertForSequenceClassification", "CamembertForSequenceClassification", "ElectraForSequenceClassification")
_DECODER_HEADS = ("GPT2ForSequenceClassification", "LlamaForSequenceClassification", "MistralForSequenceClassification",
                  "Qwen2ForSequenceClassification")
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def last_token(input_ids: torch.Tensor, pad_id: int | None) -> torch.Tensor:
    """The rightmost non-pad position of each row: where Hugging Face decoder classifiers read."""
    if pad_id is None:
        return torch.full((len(input_ids),), input_ids.shape[1] - 1, device=input_ids.device)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    return (positions * (input_ids != pad_id)).argmax(-1)


class HFClassifier(Classifier):
    """A Hugging Face ``AutoModelFor{Sequence,Token}Classification``: the exported folder is one that
    ``transformers`` loads and gives the same predictions with.

    For cached features, ``encode`` returns the representation the architecture's head reads (the
    ``[CLS]`` state for encoders, the last real token for decoders) and ``head_logits`` replays only
    the head on it; a test checks ``head_logits(encode(batch)) == forward(batch)`` per family."""

    def __init__(self, model: nn.Module, new_parameters: set[str]):
        super().__init__()
        self.model = model
        self.new_parameters = {f"model.{n}" for n in new_parameters}
        self.lora = False

    @property
    def backbone(self) -> nn.Module:
        return self.model.base_model

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(**{k: batch[k] for k in TEXT_INPUTS if k in batch}).logits

    def _kind(self) -> str | None:
        name = type(self.model).__name__
        return "encoder" if name in _ENCODER_HEADS else "decoder" if name in _DECODER_HEADS else None

    def supports_cache(self, head: Head) -> bool:
        return not head.per_token and self._kind() is not None

    def encode(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = self.model.base_model(**{k: batch[k] for k in TEXT_INPUTS if k in batch}).last_hidden_state
        if self._kind() == "decoder":
            return hidden[torch.arange(len(hidden), device=hidden.device), last_token(batch["input_ids"], self.model.config.pad_token_id)]
        return hidden[:, 0]

    def head_logits(self, features: torch.Tensor) -> torch.Tensor:
        """The logits the model's own head computes from the cached representation ``features`` [B, H]."""
        model, name = self.model, type(self.model).__name__
        states = features.unsqueeze(1)  # a sequence of length 1: heads that read position 0 read it
        if name == "BertForSequenceClassification":
            pooled = model.bert.pooler(states) if model.bert.pooler is not None else features
            return model.classifier(model.dropout(pooled))
        if name == "DistilBertForSequenceClassification":
            return model.classifier(model.dropout(torch.relu(model.pre_classifier(features))))
        if self._kind() == "encoder":  # RoBERTa / ELECTRA-style heads take the whole sequence and read [:, 0]
            return model.classifier(states)
        return model.score(features)

    def layer_groups(self) -> list[list[nn.Module]]:
        return layer_groups(self.model)

    def add_lora(self, options: dict[str, Any]) -> None:
        """Low-rank adapters (PEFT) on every linear layer of the blocks; the new task layers train fully."""
        from peft import LoraConfig, get_peft_model  # imported only for LoRA runs

        heads = sorted({n[len("model."):].rsplit(".", 1)[0] for n in self.new_parameters})
        config = LoraConfig(r=options["r"], lora_alpha=options["alpha"], lora_dropout=options["dropout"],
                            target_modules="all-linear", modules_to_save=heads)
        self.model = get_peft_model(self.model, config)
        self.lora = True
        # the task layers' trainable copies; the adapters are not task layers: they train at lr x strategy.lr_scale
        self.new_parameters = {n for n, p in self.named_parameters() if p.requires_grad and ".lora_" not in n}

    def exportable(self) -> nn.Module:
        """The plain Hugging Face model to save: LoRA adapters merged into the weights."""
        return copy.deepcopy(self.model).merge_and_unload() if self.lora else self.model


def layer_groups(model: nn.Module) -> list[list[nn.Module]]:
    """Bottom-to-top groups of a Hugging Face backbone: embeddings, then each transformer layer."""
    base = model.base_model
    embeddings = [m for name in ("embeddings", "embed_tokens", "wte", "wpe", "word_embedding") if (m := getattr(base, name, None)) is not None]
    for path in ("encoder.layer", "layers", "h", "transformer.layer", "layer"):
        node: Any = base
        for part in path.split("."):
            node = getattr(node, part, None)
        if isinstance(node, nn.ModuleList):
            return [embeddings, *[[layer] for layer in node]]
    raise RecipeError(f"{type(base).__name__}: cannot find its transformer layers for layer-wise strategies")


# -- a pooling of our choice: AutoModel + pooling + dropout + linear head ------------------------------------
POOLINGS = ("cls", "mean", "max", "last")
HEAD_FILE = "head.safetensors"  # the linear head of a pooled classifier, beside the base model's model.safetensors
# sentence-transformers' Pooling config: boolean keys (every version reads them; newer ones write "pooling_mode": name)
ST_LEGACY = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max", "pooling_mode_mean_tokens": "mean",
             "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens": "weightedmean",
             "pooling_mode_lasttoken": "lasttoken"}
ST_MODES = {"cls": "cls", "mean": "mean", "max": "max", "lasttoken": "last"}  # the modes pretune computes -> task.pooling
ST_KEYS = {ST_MODES[mode]: key for key, mode in ST_LEGACY.items() if mode in ST_MODES}  # task.pooling -> boolean key


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """One vector per row of ``hidden`` [B, T, H] from its real positions (``mask`` [B, T] = 1), as
    sentence-transformers' ``Pooling``: ``cls`` the first real token, ``last`` the last one, ``mean``
    ``sum_t m_t h_t / sum_t m_t``, ``max`` the element-wise maximum over real tokens."""
    real = mask.to(hidden.dtype).unsqueeze(-1)
    if how == "mean":
        return (hidden * real).sum(1) / real.sum(1).clamp(min=1e-9)
    if how == "max":
        return hidden.masked_fill(real == 0, float("-inf")).max(1).values
    positions = torch.arange(hidden.shape[1], device=hidden.device)
    index = (mask > 0).int().argmax(-1) if how == "cls" else (positions * (mask > 0)).argmax(-1)
    return hidden[torch.arange(len(hidden), device=hidden.device), index]


def declared_pooling(path: str | Path) -> str | None:
    """The pooling a sentence-transformers folder declares (``modules.json`` -> its ``Pooling`` module's
    ``config.json``), or None (no such files, or a pooling pretune does not compute: said on stderr)."""
    modules = Path(path) / "modules.json"
    if not modules.is_file():
        return None
    try:
        entry = next((m for m in json.loads(modules.read_text()) if str(m.get("type", "")).endswith("Pooling")), None)
        config = json.loads((Path(path) / entry["path"] / "config.json").read_text()) if entry else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{modules}: cannot read the sentence-transformers pooling ({exc})") from None
    if config is None:
        return None
    modes = config.get("pooling_mode") or [mode for key, mode in ST_LEGACY.items() if config.get(key)] or ["mean"]  # none set: mean
    modes = [modes] if isinstance(modes, str) else list(modes)
    if len(modes) != 1 or modes[0] not in ST_MODES:
        print(f"pretune: note: {path} declares the pooling {'+'.join(map(str, modes))}, which pretune does not compute; "
              "set task.pooling (cls, mean, max or last)", file=sys.stderr, flush=True)
        return None
    return ST_MODES[modes[0]]


def choose_pooling(path: str | Path, requested: str, decoder: bool, linear: bool, sentence: bool = False) -> tuple[str | None, str]:
    """The pooling a classifier reads (None: the architecture's own Hugging Face head) and why.

    ``auto``: the folder's sentence-transformers pooling; otherwise the architecture's head (BERT's
    pooled ``[CLS]``, a decoder's last real token).  ``linear`` (a linear probe fitted on frozen
    features) wants one linear layer on the pooled vector, so ``auto`` then reads the token the
    architecture's head reads (``cls`` / ``last``) without the head's extra layers (a pooler or
    dense layer the probe could not fit, a decoder's bias-free score).  ``sentence`` (SetFit, which
    trains sentence embeddings) reads mean pooling when the folder declares none: what
    sentence-transformers gives a plain transformer."""
    if requested != "auto":
        own = requested == "last" and decoder and not linear  # exactly what a decoder's own head reads
        return (None if own else requested), f"task.pooling={requested}"
    declared = declared_pooling(path)
    if declared is not None:
        return declared, "the folder's sentence-transformers pooling"
    if sentence:
        return "mean", "a sentence embedding: sentence-transformers' default pooling for a plain transformer"
    if linear:
        return ("last" if decoder else "cls"), "a linear probe reads the token the architecture's head reads"
    return None, "the architecture's own head"


class PooledModel(nn.Module):
    """A transformers base model under its own prefix (``bert``, ``transformer``...), then pooling,
    dropout and ``classifier``: parameter names as in Hugging Face's ``*ForSequenceClassification``."""

    def __init__(self, base: PreTrainedModel, pooling: str, outputs: int, dropout: float):
        super().__init__()
        self.prefix, self.pooling = base.base_model_prefix, pooling
        setattr(self, self.prefix, base)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(base.config.hidden_size, outputs)

    @property
    def base_model(self) -> nn.Module:
        return getattr(self, self.prefix)


class PooledClassifier(Classifier):
    """``AutoModel`` + a pooling + dropout + a linear head: for a pooling that the architecture's own
    head does not compute (mean pooling of a sentence-transformers model, ``task.pooling``...).

    Saved (:func:`save_pooled`) as the base model (``AutoModel`` loads it), the head in
    ``head.safetensors``, the pooling in ``pretune.json``, and sentence-transformers' own files, so
    ``SentenceTransformer(folder).encode(texts)`` gives exactly the vectors the head reads."""

    def __init__(self, base: PreTrainedModel, pooling: str, outputs: int, dropout: float = 0.0, new_parameters: set[str] = frozenset()):
        super().__init__()
        self.unused = drop_pooler(base)  # saved as loaded, so that AutoModel loads the folder without a MISSING pooler
        self.model = PooledModel(base, pooling, outputs, dropout)
        self.pooling = pooling
        self.new_parameters = {f"model.{n}" for n in new_parameters} | {"model.classifier.weight", "model.classifier.bias"}
        self.lora = False

    @property
    def backbone(self) -> nn.Module:
        return self.model.base_model

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.head_logits(self.encode(batch))

    def encode(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = self.model.base_model(**{k: batch[k] for k in TEXT_INPUTS if k in batch}).last_hidden_state
        mask = batch.get("attention_mask")
        return pool(hidden, mask if mask is not None else torch.ones(hidden.shape[:2], device=hidden.device), self.pooling)

    def head_logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.classifier(self.model.dropout(features))

    def linear_head(self) -> nn.Linear:
        return self.model.classifier

    def layer_groups(self) -> list[list[nn.Module]]:
        return layer_groups(self.model)

    def add_lora(self, options: dict[str, Any]) -> None:
        """Low-rank adapters (PEFT) on every linear layer of the base model; the head trains fully."""
        from peft import LoraConfig, get_peft_model  # imported only for LoRA runs

        config = LoraConfig(r=options["r"], lora_alpha=options["alpha"], lora_dropout=options["dropout"], target_modules="all-linear")
        setattr(self.model, self.model.prefix, get_peft_model(self.model.base_model, config))
        self.lora = True

    def exportable(self) -> PooledModel:
        """The model to save: LoRA adapters merged into the base weights."""
        if not self.lora:
            return self.model
        model = copy.deepcopy(self.model)
        setattr(model, model.prefix, model.base_model.merge_and_unload())
        return model


def drop_pooler(base: PreTrainedModel) -> dict[str, torch.Tensor]:
    """Remove BERT's pooler (it reads [CLS] for BERT's own head; a pooling replaces it, so it neither
    trains nor runs); returns its weights, which are saved unchanged."""
    pooler = getattr(base, "pooler", None)
    if pooler is None:
        return {}
    base.pooler = None
    return {f"pooler.{k}": v.detach().clone() for k, v in pooler.state_dict().items()}


def pooled_classifier(cfg: TransformerConfig, pooling: str, why: str, head: Head, label_names: list[str], data: Any) -> PooledClassifier:
    """``AutoModel`` from ``cfg.path`` (or its architecture, randomly initialised) with ``pooling`` and a linear head."""
    kwargs = {"pad_token_id": data.tokenizer.pad_token_id} if load_config(cfg.path).pad_token_id is None else {}
    verbosity = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()
    try:
        if cfg.pretrained:
            base, info = transformers.AutoModel.from_pretrained(cfg.path, output_loading_info=True, attn_implementation=cfg.attention,
                                                                use_safetensors=None if pickle_trusted() else True, **kwargs, **cfg.config)
            new = set(info["missing_keys"])
        else:
            base = transformers.AutoModel.from_config(AutoConfig.from_pretrained(cfg.path, **kwargs, **cfg.config), attn_implementation=cfg.attention)
            new = {n for n, _ in base.named_parameters()}
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{cfg.path}: cannot load as AutoModel: {exc}") from None
    finally:
        transformers.utils.logging.set_verbosity(verbosity)
    new = {f"{base.base_model_prefix}.{n}" for n in new if not n.startswith("pooler.")}
    config = base.config
    dropout = next((v for k in ("classifier_dropout", "hidden_dropout_prob", "summary_first_dropout", "dropout")
                    if isinstance(v := getattr(config, k, None), float)), 0.0)
    model = PooledClassifier(base, pooling, head.outputs(label_names), dropout, new)
    saved = Path(cfg.path) / HEAD_FILE
    meta = Path(cfg.path) / "pretune.json"
    if cfg.pretrained and saved.is_file() and meta.is_file():  # a pretune classifier of the same kind and labels keeps its head
        old = json.loads(meta.read_text())
        state = safetensors.torch.load_file(str(saved))
        if old.get("kind") == head.name and old.get("label_names") == list(label_names) and \
                state["classifier.weight"].shape == model.model.classifier.weight.shape:
            model.model.classifier.load_state_dict({k[len("classifier."):]: v for k, v in state.items()})
    if cfg.pretrained:
        shown = sorted({n.rsplit(".", 1)[0] for n in model.new_parameters})
        print(f"pretune: {cfg.path} loaded as {type(base).__name__} with {pooling} pooling ({why}) and a linear head; "
              f"new task layers: {', '.join(n[len('model.'):] for n in shown)}", file=sys.stderr, flush=True)
    return model


def save_pooled(classifier: PooledClassifier, path: Path, max_length: int) -> None:
    """The base model under its prefix (as a ``*ForSequenceClassification`` checkpoint: ``AutoModel``
    and sentence-transformers load it), ``head.safetensors``, and sentence-transformers' files
    (``modules.json``, ``1_Pooling/config.json``, ``sentence_bert_config.json``) in the format of
    all-MiniLM-L6-v2's folder.  The pooling also goes to ``pretune.json``."""
    model = classifier.exportable()
    base = model.base_model
    base.save_pretrained(path, state_dict={f"{model.prefix}.{k}": v for k, v in {**base.state_dict(), **classifier.unused}.items()})
    safetensors.torch.save_file({k: v.detach().contiguous() for k, v in model.classifier.state_dict(prefix="classifier.").items()},
                                str(path / HEAD_FILE))
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    (path / "modules.json").write_text(json.dumps(modules, indent=2))
    (path / "1_Pooling").mkdir(exist_ok=True)
    keys = ["pooling_mode_cls_token", "pooling_mode_mean_tokens", "pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens"]
    keys += ["pooling_mode_lasttoken"] if model.pooling == "last" else []  # known to sentence-transformers >= 2.3 only
    pooling = {"word_embedding_dimension": base.config.hidden_size, **{key: key == ST_KEYS[model.pooling] for key in keys}}
    (path / "1_Pooling" / "config.json").write_text(json.dumps(pooling, indent=2))
    (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_length, "do_lower_case": False}, indent=2))
    (path / "pretune.json").write_text(json.dumps({"pooling": model.pooling}))  # Finetune.save adds the task's keys


def load_pooled(path: Path, pooling: str) -> PooledClassifier:
    verbosity = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()  # "pooler MISSING": the pooling replaced it
    try:
        base = transformers.AutoModel.from_pretrained(str(path), use_safetensors=None if pickle_trusted() else True)
    finally:
        transformers.utils.logging.set_verbosity(verbosity)
    state = safetensors.torch.load_file(str(path / HEAD_FILE))
    model = PooledClassifier(base, pooling, state["classifier.weight"].shape[0])
    model.model.classifier.load_state_dict({k[len("classifier."):]: v for k, v in state.items()})
    return model


def align_tags(word_ids: list[list[int | None]], tags: list[list[int]], names: list[str], all_subwords: bool) -> torch.Tensor:
    """Word labels -> piece labels: the first piece of each word carries the word's tag, the rest -100.

    With ``all_subwords`` the other pieces carry the tag too, ``B-X`` turned into ``I-X`` (when
    ``I-X`` is a known tag) so that a word split into pieces still counts as one entity."""
    inside = {i: names.index("I-" + name[2:]) for i, name in enumerate(names) if name.startswith("B-") and "I-" + name[2:] in names}
    out = torch.full((len(word_ids), len(word_ids[0])), IGNORE, dtype=torch.long)
    for row, (ids, word_tags) in enumerate(zip(word_ids, tags)):
        previous = None
        for position, word in enumerate(ids):
            if word is not None and word != previous:
                out[row, position] = word_tags[word]
            elif word is not None and all_subwords:
                out[row, position] = inside.get(word_tags[word], word_tags[word])
            previous = word
    return out


def tokenize(tokenizer: Any, texts: list, pairs: list | None, max_length: int, per_token: bool) -> tuple[dict[str, torch.Tensor], Any]:
    encoded = tokenizer(texts, pairs, truncation=True, max_length=max_length, padding=True, is_split_into_words=per_token,
                        return_tensors="pt")
    return {k: encoded[k] for k in TEXT_INPUTS if k in encoded}, encoded


@BACKBONES.register("hf")
class HF(Backbone):
    """Hugging Face ``transformers`` text models: BERT-family encoders, GPT-2 / Llama decoders, any local folder."""

    name = "hf"
    modality = "text"
    Config = TransformerConfig
    start: Start | None = None  # set by model(): what a continued checkpoint lacked, and what it keeps

    @classmethod
    def claims(cls, section: dict[str, Any]) -> bool:
        if section.get("path") and (Path(section["path"]) / "config.json").is_file():  # a folder says what it is
            return not is_vision_folder(section["path"])
        return section.get("name", "bert") in (*FAMILIES, "hf")

    @property
    def text_family(self) -> str:
        """``'encoder'`` or ``'decoder'``: decides tokenizer kind and packing."""
        return family_of(self.cfg)

    def model(self, auto_class: Any, data: Any) -> PreTrainedModel:
        """A pretraining model (``auto_class`` carries the objective's head), fresh or continued from ``cfg.path``
        (``self.start`` then says what was created and keeps what the saved model must carry on)."""
        model, self.start = build_model(self.cfg, auto_class, tokenizer=data.tokenizer, max_positions=len(data.train[0]["input_ids"]))
        if self.start is not None:
            print(f"pretune: {self.start.describe(model)}", file=sys.stderr, flush=True)
        return model

    def classifier(self, head: Head, label_names: list[str], data: Any, *, dropout: float = 0.0, augment: Any = None,
                   pooling: str = "auto", linear: bool = False, sentence: bool = False) -> Classifier:
        """The architecture's own Hugging Face head class, or :class:`PooledClassifier` when the pooling
        (:func:`choose_pooling`: ``task.pooling``, the folder's sentence-transformers pooling, or a linear
        probe's ``linear`` head, SetFit's ``sentence`` embedding) is not what that head computes."""
        cfg = self.cfg
        if not cfg.path:
            raise RecipeError("recipe key 'backbone.path': fine-tuning needs a model folder to start from (a pretune run's model/ or a Hugging Face folder)")
        config = load_config(cfg.path)
        chosen, why = (None, "") if head.per_token else choose_pooling(cfg.path, pooling, family_of(cfg) == "decoder", linear, sentence)
        if chosen is not None:
            return pooled_classifier(cfg, chosen, why, head, label_names, data)
        kwargs: dict[str, Any] = {"num_labels": head.outputs(label_names)}
        if label_names:
            kwargs.update(id2label=dict(enumerate(label_names)), label2id={n: i for i, n in enumerate(label_names)})
        if head.hf_problem_type:
            kwargs["problem_type"] = head.hf_problem_type
        if config.pad_token_id is None:
            kwargs["pad_token_id"] = data.tokenizer.pad_token_id
        auto = transformers.AutoModelForTokenClassification if head.per_token else transformers.AutoModelForSequenceClassification
        verbosity = transformers.utils.logging.get_verbosity()
        transformers.utils.logging.set_verbosity_error()  # its load report table: we say what is new in one line
        try:
            if cfg.pretrained:
                model, info = auto.from_pretrained(cfg.path, output_loading_info=True, ignore_mismatched_sizes=True,  # a head of another size is new
                                                   attn_implementation=cfg.attention, use_safetensors=None if pickle_trusted() else True,
                                                   **kwargs, **cfg.config)
                new = set(info["missing_keys"]) | {k for k, *_ in info.get("mismatched_keys", [])}
            else:  # the same architecture, randomly initialised: the "from scratch" arm
                model = auto.from_config(AutoConfig.from_pretrained(cfg.path, **kwargs, **cfg.config), attn_implementation=cfg.attention)
                new = {n for n, _ in model.named_parameters()}
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{cfg.path}: cannot load as {auto.__name__}: {exc}") from None
        finally:
            transformers.utils.logging.set_verbosity(verbosity)
        saved_labels = [str(config.id2label[i]) for i in sorted(config.id2label)] if _has_task_head(config) else None
        if cfg.pretrained and saved_labels is not None and saved_labels != [str(n) for n in label_names]:
            _reset_head(model)  # the folder's head was trained for other labels: a new task layer, like any other
            new |= head_parameters(model)
        fresh = new & {n for n, _ in model.named_parameters()}
        if cfg.pretrained:
            shown = sorted({n.rsplit(".", 1)[0] for n in fresh})
            print(f"pretune: {cfg.path} loaded as {type(model).__name__}; new task layers: {', '.join(shown) or 'none'}",
                  file=sys.stderr, flush=True)
        return HFClassifier(model, fresh | head_parameters(model))  # the task layer always trains, loaded or new

    def collate(self, rows: dict[str, Any], seeds: list[int], head: Head, data: Any) -> dict[str, torch.Tensor]:
        pairs = rows[data.text_pair] if data.text_pair else None
        batch, encoded = tokenize(data.tokenizer, rows[data.text], pairs, data.max_length, head.per_token)
        if head.per_token:
            word_ids = [encoded.word_ids(i) for i in range(len(rows[data.text]))]
            batch["labels"] = align_tags(word_ids, rows["labels"], data.label_names, data.all_subwords)
        return batch

    def save(self, module: nn.Module, path: Path, data: Any) -> None:
        transformers.utils.logging.disable_progress_bar()  # no "Writing model shards" bar at every checkpoint
        if isinstance(module, PooledClassifier):
            save_pooled(module, path, data.max_length)
        else:
            module.exportable().save_pretrained(path)
        data.tokenizer.save_pretrained(path)

    @classmethod
    def load_classifier(cls, path: Path, meta: dict[str, Any], device: torch.device) -> tuple[Classifier, Any]:
        check_model_folder(path)  # weights only from safetensors unless --trust-pickle
        if meta.get("pooling") in POOLINGS and (path / HEAD_FILE).is_file():
            return load_pooled(path, meta["pooling"]).to(device).eval(), load_tokenizer(str(path))
        auto = transformers.AutoModelForTokenClassification if heads.get(meta["kind"]).per_token else transformers.AutoModelForSequenceClassification
        model = auto.from_pretrained(str(path), use_safetensors=None if pickle_trusted() else True)
        return HFClassifier(model, set()).to(device).eval(), load_tokenizer(str(path))


def special_ids(tokenizer: Any) -> dict[str, int]:
    ids = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    return {key: value for key, value in ids.items() if value is not None}


def _has_task_head(config: PretrainedConfig) -> bool:
    return any(str(name).endswith(("ForSequenceClassification", "ForTokenClassification")) for name in config.architectures or [])


def head_parameters(model: PreTrainedModel) -> set[str]:
    """Names of the parameters outside the base model: the task head of a ``*For...Classification`` model."""
    prefix = model.base_model_prefix + "."
    return {n for n, _ in model.named_parameters() if not n.startswith(prefix)}


def _reset_head(model: PreTrainedModel) -> None:
    """Re-initialise the task head with the architecture's own initialisation."""
    for module_name in {n.rsplit(".", 1)[0] for n in head_parameters(model)}:
        model._init_weights(model.get_submodule(module_name))
