"""What every image / vector backbone family shares: input normalisation, the model folder, the classifier.

A family (``builtin.py``, ``timm.py``, ``torchvision.py``) only says how to build its network from
a *spec* (a JSON-able dict saved in the model folder); :class:`ArrayBackbone` wraps that network:

    raw input (pixels in [0, 1], or raw vectors) -> (x - mean) / std -> network -> features [B, D]

The normalisation statistics are buffers computed from the pretraining data, so a saved backbone
takes raw inputs wherever it goes.  A model folder holds ``config.json`` (``{"pretune": "vision",
"backbone": spec, ...}``; the spec names its ``family``) and ``model.safetensors`` (the backbone
under ``backbone.*`` plus any task layers).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import safetensors.torch
import torch
from torch import nn

from pretune.backbones.base import BACKBONES, Backbone, Classifier
from pretune.data.arrays import channel_stats
from pretune.data.augment import AugmentConfig, augment_examples
from pretune.errors import CheckpointError, RecipeError
from pretune.heads import Head
from pretune.safeload import check_weights_file


def is_vision_folder(path: str | Path | None) -> bool:
    if not path or not (Path(path) / "config.json").is_file():
        return False
    try:
        return json.loads((Path(path) / "config.json").read_text()).get("pretune") == "vision"
    except (OSError, ValueError):
        return False


def spec_family(spec: dict[str, Any]) -> str:
    """The family of a saved spec (folders written before families were recorded: cnn/mlp built in, else timm)."""
    return spec.get("family") or ("builtin" if spec["name"] in ("cnn", "mlp") else "timm")


class ArrayBackbone(nn.Module):
    """Normalise with stored statistics, then run the family's network; ``forward(x) -> features [B, D]``."""

    def __init__(self, spec: dict[str, Any], net: nn.Module, mean: torch.Tensor | None = None, std: torch.Tensor | None = None):
        super().__init__()
        self.spec = spec
        self.net = net
        shape = tuple(spec["input_shape"])
        # per channel (images [C, H, W]), per mel bin (spectrograms [M, T]), per feature (vectors [D])
        stat_shape = (1, shape[0], 1, 1) if len(shape) == 3 else (1, shape[0], 1) if len(shape) == 2 else (1, *shape)
        self.register_buffer("mean", (mean if mean is not None else torch.zeros(stat_shape)).reshape(stat_shape).float())
        self.register_buffer("std", (std if std is not None else torch.ones(stat_shape)).reshape(stat_shape).float())
        self.num_features = net.num_features

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.spec["input_shape"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)

    def frames(self, x: torch.Tensor) -> torch.Tensor:
        """Features per time step ``[B, T', D]``, for networks with a time axis (audio encoders)."""
        return self.net.frames((x - self.mean) / self.std)

    def layer_groups(self) -> list[list[nn.Module]]:
        return self.net.layer_groups()


class ArrayClassifier(Classifier):
    """Backbone features -> dropout -> linear head; augments its input while training, if asked."""

    def __init__(self, backbone: ArrayBackbone, outputs: int, dropout: float = 0.0, augment: AugmentConfig | None = None):
        super().__init__()
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(backbone.num_features, outputs)
        self.augment = augment
        self.new_parameters = {"head.weight", "head.bias"}

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x = batch["x"]
        if self.training and self.augment is not None and "seed" in batch:
            seeds = batch["seed"].tolist()
            x = augment_examples(x, seeds, self.augment, audio=self.backbone.spec.get("audio"))
        return self.head_logits(self.backbone(x))

    def encode(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.backbone(batch["x"])

    def head_logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(features))

    def linear_head(self) -> nn.Linear:
        return self.head

    def layer_groups(self) -> list[list[nn.Module]]:
        return self.backbone.layer_groups()


class ArrayFamily(Backbone):
    """Base of the image / vector families: they differ only in ``spec`` and ``network``."""

    modality: ClassVar[str] = "array"
    classifier_class: ClassVar[type[ArrayClassifier]] = ArrayClassifier

    # -- what a family provides --------------------------------------------------------------------
    def spec(self, input_shape: tuple[int, ...]) -> dict[str, Any]:
        """What to build, as saved in ``config.json`` (at least ``name``; ``family`` and ``input_shape`` are added)."""
        raise NotImplementedError

    @classmethod
    def network(cls, spec: dict[str, Any], weights: str | None = None) -> nn.Module:
        """The network of ``spec`` with ``num_features`` and ``layer_groups()``; ``weights``: a local pretrained file."""
        raise NotImplementedError

    # -- shared --------------------------------------------------------------------------------------
    @property
    def weights(self) -> str | None:
        return self.cfg.model_dump().get("weights")  # families with a `weights` key (timm, torchvision)

    @classmethod
    def claims(cls, section: dict[str, Any]) -> bool:
        path = section.get("path")
        if path and (Path(path) / "config.json").is_file():  # a folder says what it is
            return is_vision_folder(path) and spec_family(json.loads((Path(path) / "config.json").read_text())["backbone"]) == cls.name
        return cls.knows(str(section.get("name", "")))

    @classmethod
    def knows(cls, name: str) -> bool:
        return False

    @classmethod
    def export_state(cls, net: nn.Module) -> dict[str, torch.Tensor] | None:
        """The network's weights under the keys its own library loads (timm / torchvision), or None."""
        return None

    def build(self, data: Any) -> ArrayBackbone:
        """A fresh backbone for the data (normalised by their statistics), or the one saved at ``cfg.path``."""
        shape = tuple(data.arrays.shape)
        if self.cfg.path:
            return load_backbone(self.cfg.path, pretrained=self.cfg.pretrained, expect_shape=shape)
        weights = self.weights if self.cfg.pretrained else None
        if weights:
            if not Path(weights).exists():
                raise RecipeError(f"recipe key 'backbone.weights': {weights} does not exist")
            if Path(weights).is_file():
                check_weights_file(weights, "recipe key 'backbone.weights'")  # a .pth is a pickle: refused unless trusted
        spec = {"family": self.name, **self.spec(shape), "input_shape": list(shape)}
        if getattr(data.arrays, "audio", None) is not None:
            spec["audio"] = data.arrays.audio  # how clips become features: predict reads them alike
        mean, std = self.input_stats(data.arrays.unlabelled_train.x)
        return ArrayBackbone(spec, self.network(spec, weights), mean, std)

    @classmethod
    def input_stats(cls, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean and standard deviation the backbone normalises its inputs with (from the pretraining data)."""
        return channel_stats(x)

    def classifier(self, head: Head, label_names: list[str], data: Any, *, dropout: float = 0.0,
                   augment: AugmentConfig | None = None) -> ArrayClassifier:
        if head.per_token or head.name != "single":
            raise RecipeError(f"recipe key 'task': {head.name} heads on images and vectors are not supported yet; use classify")
        model = self.classifier_class(self.build(data), head.outputs(label_names), dropout, augment)
        if self.cfg.path and self.cfg.pretrained and _saved_labels(self.cfg.path) == label_names:
            _, state = read_folder(self.cfg.path)  # the folder already has a head for these labels
            if all(k in state and state[k].shape == model.state_dict()[k].shape for k in model.new_parameters):
                model.head.load_state_dict({k[len("head."):]: state[k] for k in model.new_parameters})  # it still trains
        return model

    def collate(self, rows: dict[str, Any], seeds: list[int], head: Head, data: Any) -> dict[str, torch.Tensor]:
        return {"x": rows["x"], "seed": torch.tensor(seeds)}

    def save(self, module: nn.Module, path: Path, data: Any) -> None:
        save_model(path, module, module.backbone, {"outputs": module.head.out_features} if isinstance(module, ArrayClassifier) else None)

    @classmethod
    def load_classifier(cls, path: Path, meta: dict[str, Any], device: torch.device) -> tuple[ArrayClassifier, dict[str, Any]]:
        config, state = read_folder(path)
        labels = meta.get("label_names") or []
        model = cls.classifier_class(make_backbone(config["backbone"]), int(config.get("outputs", len(labels))))
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise CheckpointError(f"{path}/model.safetensors: does not match its config.json ({' '.join(str(exc).split())[:300]})") from None
        if len(labels) != model.head.out_features:
            raise CheckpointError(f"{path}/pretune.json: {len(labels)} label names for a head of {model.head.out_features} outputs")
        return model.to(device).eval(), config["backbone"]


def _saved_labels(path: str) -> list[str] | None:
    meta = Path(path) / "pretune.json"
    return json.loads(meta.read_text()).get("label_names") if meta.is_file() else None


def make_backbone(spec: dict[str, Any]) -> ArrayBackbone:
    """An untrained backbone of a saved spec (its family builds the network; weights are loaded after)."""
    return ArrayBackbone(spec, BACKBONES.get(spec_family(spec)).network(spec))


def save_model(path: Path, module: nn.Module, backbone: ArrayBackbone, extra: dict[str, Any] | None = None) -> None:
    """Write ``config.json`` (with the input normalisation), ``model.safetensors`` (every parameter and
    buffer of ``module``) and, for timm / torchvision networks, ``backbone.safetensors``: the network
    under its own library's keys, so ``timm.create_model(name, pretrained=True, num_classes=0,
    pretrained_cfg_overlay={"file": ...})`` loads it directly (see docs/backbones.md)."""
    normalization = {"mean": backbone.mean.flatten().tolist(), "std": backbone.std.flatten().tolist()}
    config = {"pretune": "vision", "backbone": backbone.spec, "normalization": normalization, **(extra or {})}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    safetensors.torch.save_file(state, str(path / "model.safetensors"))
    exported = BACKBONES.get(spec_family(backbone.spec)).export_state(backbone.net)
    if exported is not None:
        safetensors.torch.save_file({k: v.detach().contiguous() for k, v in exported.items()}, str(path / "backbone.safetensors"))


def read_folder(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The ``config.json`` and weights of a saved vision model folder."""
    path = Path(path)
    if not is_vision_folder(path):
        raise CheckpointError(f"{path}: not a pretune image/vector model folder (config.json without \"pretune\": \"vision\")")
    try:
        return json.loads((path / "config.json").read_text()), safetensors.torch.load_file(str(path / "model.safetensors"))
    except Exception as exc:  # noqa: BLE001 - a damaged folder is one problem for the user
        raise CheckpointError(f"{path}/model.safetensors: cannot be read ({type(exc).__name__}: {exc})") from None


def load_backbone(path: str | Path, pretrained: bool = True, expect_shape: tuple[int, ...] | None = None) -> ArrayBackbone:
    """The backbone saved in a model folder: its weights (``backbone.*``) and normalisation statistics."""
    config, state = read_folder(path)
    spec = config["backbone"]
    if expect_shape is not None and tuple(spec["input_shape"]) != tuple(expect_shape):
        audio = spec.get("audio")
        fix = (f"set data.duration={audio['duration']:g} data.sample_rate={audio['sample_rate']} data.n_mels={audio['n_mels']} "
               "(the model's)" if audio else "set data.size / data.channels to match")
        raise CheckpointError(f"{path}: the model takes inputs of shape {tuple(spec['input_shape'])} but the data have "
                              f"{tuple(expect_shape)}; {fix}")
    backbone = make_backbone(spec)
    own = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    if not pretrained:  # the architecture (and its input statistics), randomly initialised: the from-scratch arm
        own = {k: v for k, v in own.items() if k in ("mean", "std")}
    missing, unexpected = backbone.load_state_dict(own, strict=False)
    if pretrained and (missing or unexpected):
        raise CheckpointError(f"{path}/model.safetensors: does not match its config.json (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return backbone
