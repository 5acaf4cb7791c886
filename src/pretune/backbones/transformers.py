"""Hugging Face ``transformers`` text backbones: BERT-family encoders and GPT-2 / Llama decoders.

A backbone is built fresh from a size preset (``tiny``, ``mini``, ``small``, ``base``) plus any
explicit config fields, or loaded from a local checkpoint folder (a pretune run's ``model/`` or
any Hugging Face folder).  Tasks ask for the Hugging Face model class that carries their head
(``AutoModelForMaskedLM``, ``BertForPreTraining``, ``AutoModelForCausalLM``), so what pretune
saves is an ordinary Hugging Face folder that the rest of the ecosystem loads, and vice versa.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import transformers
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from pretune.errors import CheckpointError, RecipeError
from pretune.recipe import Section
from pretune.trainer import checkpoint

# Layers, hidden size, heads.  Feed-forward width is 4x hidden, as in BERT and GPT-2.
SIZES: dict[str, tuple[int, int, int]] = {
    "nano": (1, 32, 2),  # for smoke tests: trains in seconds, learns little
    "tiny": (2, 128, 2),
    "mini": (4, 256, 4),
    "small": (4, 512, 8),
    "base": (12, 768, 12),
}

FAMILIES: dict[str, str] = {"bert": "encoder", "gpt2": "decoder", "llama": "decoder"}


class TransformerConfig(Section):
    name: str = "bert"  # bert | gpt2 | llama (fresh), or "hf" with a path
    size: Literal["nano", "tiny", "mini", "small", "base"] = "tiny"
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
    checkpoint.check_model_folder(path)  # weights only from safetensors unless --trust-pickle
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


def build_model(cfg: TransformerConfig, auto_class: Any, *, vocab_size: int, special: dict[str, int], max_positions: int) -> PreTrainedModel:
    """Build ``auto_class`` (e.g. ``AutoModelForMaskedLM``) fresh from a preset or load it from ``cfg.path``."""
    if cfg.path:
        load_config(cfg.path)  # clear error if the folder is not a model
        try:
            model = auto_class.from_pretrained(cfg.path, local_files_only=True, attn_implementation=cfg.attention,
                                               use_safetensors=None if checkpoint.pickle_trusted() else True, **cfg.config)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{cfg.path}: cannot load as {auto_class.__name__}: {exc}") from None
        if model.config.vocab_size < vocab_size:
            model.resize_token_embeddings(vocab_size)
        return model
    config = fresh_config(cfg, vocab_size, special, max_positions)
    config._attn_implementation = cfg.attention
    if hasattr(auto_class, "from_config"):  # Auto* classes
        return auto_class.from_config(config, attn_implementation=cfg.attention)
    return auto_class(config)  # a concrete class such as BertForPreTraining


def count_parameters(model: Any) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable
