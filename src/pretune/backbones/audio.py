"""Audio backbones: Whisper's encoder (Radford et al. 2022) over log-mel spectrograms.

    backbone: {name: audio, size: small}               # a fresh encoder of Whisper's architecture, sized for CPUs
    backbone: {name: whisper, weights: whisper-tiny/}  # Whisper's pretrained encoder from a Hugging Face Whisper folder
    backbone: {path: runs/audio/model}                 # a pretune audio model folder (pretrained or fine-tuned)

Clips arrive as Whisper's log-mel features ``[B, n_mels, frames]`` (:mod:`pretune.data.audio`), and
both kinds of backbone are ``transformers``' ``WhisperEncoder``: two convolutions (the second halves
the frame rate), fixed sinusoidal positions, pre-norm transformer layers, a final layer norm.  The
features a head reads are the mean of the last hidden states over time.  One architecture for the
built-in and the pretrained encoder means one code path: LoRA targets the same ``q_proj``/``v_proj``
names, strategies freeze the same layer groups, and a model pretrained here loads like Whisper.

Whisper is trained on 30 s windows (1,500 positions).  A short clip does not need padding to 30 s:
the encoder is built for the clip's own length and the position table is sliced to its first
``frames / 2`` rows.  Whisper's positions are sinusoids whose rows do not depend on the table's
length, so the slice is exactly the table Whisper would use for those positions (tested).
A Hugging Face Whisper folder (``WhisperModel`` or ``WhisperForConditionalGeneration``) is what
``transformers`` users download; ``pretune convert`` writes one from the CTranslate2
files some packages ship (``docs/audio.md``).
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import transformers
from pydantic import Field
from torch import nn
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from pretune.backbones.arrays import ArrayClassifier, ArrayFamily
from pretune.backbones.base import BACKBONES
from pretune.errors import CheckpointError, RecipeError
from pretune.recipe import Section
from pretune.safeload import pickle_trusted

# d_model, layers, heads, feed-forward width (Whisper tiny is 384, 4, 6, 1536)
SIZES = {"tiny": (96, 2, 2, 384), "small": (192, 4, 3, 768), "base": (256, 6, 4, 1024)}
ENCODER_FIELDS = ("d_model", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim", "num_mel_bins", "activation_function",
                  "dropout", "attention_dropout", "activation_dropout", "scale_embedding", "init_std")


class AudioConfig(Section):
    name: Literal["audio", "whisper"] = "audio"
    size: Literal["tiny", "small", "base"] = "small"  # audio: the built-in encoder's width and depth (SIZES)
    weights: str | None = None  # whisper: a Hugging Face Whisper folder (config.json + safetensors)
    path: str | None = None  # a pretune audio model folder to start from
    pretrained: bool = True  # with weights / path: load them (false: the same architecture, random weights)
    dropout: float = Field(0.0, ge=0, lt=1)  # inside the encoder (Whisper: 0)


class AudioEncoder(nn.Module):
    """``WhisperEncoder`` sized to the clip: ``frames(mel) -> [B, frames/2, D]``, ``forward(mel) -> [B, D]`` (mean over time)."""

    def __init__(self, config: transformers.WhisperConfig):
        super().__init__()
        self.encoder = WhisperEncoder(config)
        self.num_features = config.d_model

    def frames(self, mel: torch.Tensor) -> torch.Tensor:
        return self.encoder(mel).last_hidden_state

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        return self.frames(mel).mean(dim=1)

    def layer_groups(self) -> list[list[nn.Module]]:
        """The convolutional front end, then each transformer layer (the final layer norm trains with the top)."""
        return [[self.encoder.conv1, self.encoder.conv2], *[[layer] for layer in self.encoder.layers]]


def whisper_config(fields: dict[str, Any], input_shape: tuple[int, ...]) -> transformers.WhisperConfig:
    """The encoder's config for clips of ``input_shape = (n_mels, frames)``."""
    n_mels, frames = input_shape
    if frames % 2:
        raise RecipeError(f"recipe key 'data.duration': the encoder halves the frame rate, so clips need an even number of frames (got {frames})")
    config = transformers.WhisperConfig(**{**fields, "max_source_positions": frames // 2, "encoder_layerdrop": 0.0})
    if config.num_mel_bins != n_mels:
        raise RecipeError(f"recipe key 'data.n_mels': the encoder reads {config.num_mel_bins} mel bins but the data have {n_mels}; "
                          f"set data.n_mels={config.num_mel_bins}")
    return config


def is_whisper_folder(path: str | None) -> bool:
    """Whether ``path`` is a Hugging Face Whisper folder (its config.json says ``model_type: whisper``)."""
    config = Path(path) / "config.json" if path else None
    if config is None or not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("model_type") == "whisper"
    except (OSError, ValueError):
        return False


def whisper_fields(folder: str) -> dict[str, Any]:
    """The encoder fields of a Hugging Face Whisper folder's ``config.json``."""
    root = Path(folder)
    if not (root / "config.json").is_file():
        raise RecipeError(f"recipe key 'backbone.weights': {folder} is not a Hugging Face Whisper folder (no config.json); "
                          "convert a CTranslate2 file with `pretune convert SRC OUT` (or `--packaged-whisper OUT`)")
    config = json.loads((root / "config.json").read_text())
    if config.get("model_type") != "whisper":
        raise RecipeError(f"recipe key 'backbone.weights': {folder}/config.json is a {config.get('model_type')!r} model, not whisper")
    return {key: config[key] for key in ENCODER_FIELDS if key in config}


def whisper_encoder_state(folder: str) -> dict[str, torch.Tensor]:
    """The encoder weights of a Hugging Face Whisper folder, loaded as a user with hub access loads a downloaded
    one: ``WhisperModel.from_pretrained`` (safetensors only, unless pickles are trusted)."""
    verbosity = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()  # a WhisperForConditionalGeneration folder has an LM head WhisperModel ignores
    try:
        model = transformers.WhisperModel.from_pretrained(folder, use_safetensors=None if pickle_trusted() else True)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder}: cannot load as a Whisper model ({' '.join(str(exc).split())[:300]})") from None
    finally:
        transformers.utils.logging.set_verbosity(verbosity)
    return {key: value.detach().float() for key, value in model.encoder.state_dict().items()}


def load_encoder_weights(net: AudioEncoder, state: dict[str, torch.Tensor], source: str) -> None:
    """Whisper's encoder weights into ``net``, the position table sliced to the clip's length."""
    positions = net.encoder.embed_positions.weight
    if "embed_positions.weight" in state:
        table = state["embed_positions.weight"]
        if len(table) < len(positions):
            raise RecipeError(f"recipe key 'data.duration': {source} covers at most {len(table) * 2 // 100} s "
                              f"({len(table)} positions); the clips need {len(positions)}")
        state = {**state, "embed_positions.weight": table[: len(positions)]}
    missing, unexpected = net.encoder.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{source}: the encoder weights do not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})")


class AudioClassifier(ArrayClassifier):
    """An audio backbone + linear head; LoRA (PEFT) on the encoder's attention and feed-forward layers."""

    lora = False

    def add_lora(self, options: dict[str, Any]) -> None:
        from peft import LoraConfig, get_peft_model  # imported only for LoRA runs

        config = LoraConfig(r=options["r"], lora_alpha=options["alpha"], lora_dropout=options["dropout"],
                            target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"])
        with warnings.catch_warnings():  # peft asks transformers a deprecated question; nothing for the user to do
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            self.backbone.net.encoder = get_peft_model(self.backbone.net.encoder, config)
        self.lora = True

    def merge_lora(self) -> None:
        """Fold the adapters into the encoder's weights (before saving: the folder holds a plain encoder)."""
        if self.lora:
            self.backbone.net.encoder = self.backbone.net.encoder.merge_and_unload()
            self.lora = False


@BACKBONES.register("audio")
class Audio(ArrayFamily):
    name = "audio"
    Config = AudioConfig
    classifier_class: ClassVar[type[ArrayClassifier]] = AudioClassifier

    def __init__(self, cfg: AudioConfig):
        if cfg.path and is_whisper_folder(cfg.path):  # model=whisper-tiny/: Whisper's own folder, not a pretune one
            cfg = cfg.model_copy(update={"name": "whisper", "weights": cfg.path, "path": None})
        super().__init__(cfg)

    @classmethod
    def claims(cls, section: dict[str, Any]) -> bool:
        return is_whisper_folder(section.get("path")) or super().claims(section)

    @classmethod
    def knows(cls, name: str) -> bool:
        return name in ("audio", "whisper")

    @property
    def weights(self) -> str | None:
        return self.cfg.weights

    def spec(self, input_shape: tuple[int, ...]) -> dict[str, Any]:
        if len(input_shape) != 2:
            raise RecipeError(f"recipe key 'backbone.name': {self.cfg.name} reads audio (data.audio), not data of shape {input_shape}")
        if self.cfg.name == "whisper":
            if not self.cfg.weights:
                raise RecipeError("recipe key 'backbone.weights': name whisper needs a Hugging Face Whisper folder "
                                  "(e.g. one written by `pretune convert --packaged-whisper OUT`)")
            fields = whisper_fields(self.cfg.weights)
        else:
            d_model, layers, heads, ffn = SIZES[self.cfg.size]
            fields = {"d_model": d_model, "encoder_layers": layers, "encoder_attention_heads": heads, "encoder_ffn_dim": ffn,
                      "num_mel_bins": input_shape[0]}
        fields["dropout"] = self.cfg.dropout
        whisper_config(fields, input_shape)  # refuse now what the network could not read
        return {"name": self.cfg.name, "config": fields}

    @classmethod
    def network(cls, spec: dict[str, Any], weights: str | None = None) -> AudioEncoder:
        net = AudioEncoder(whisper_config(spec["config"], tuple(spec["input_shape"])))
        if weights:
            load_encoder_weights(net, whisper_encoder_state(weights), weights)
        return net

    @classmethod
    def input_stats(cls, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """No normalisation: Whisper's log-mel scaling already puts features in about [-1, 1], and a pretrained
        Whisper encoder expects exactly those values."""
        return torch.zeros(x.shape[1]), torch.ones(x.shape[1])

    def save(self, module: nn.Module, path: Path, data: Any) -> None:
        if isinstance(module, AudioClassifier) and module.lora:  # a merged copy: the live model keeps training its adapters
            module = copy.deepcopy(module)
            module.merge_lora()
        super().save(module, path, data)
