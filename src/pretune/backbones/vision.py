"""Image and vector backbones: timm models by name, and small built-in CNN and MLP networks.

    backbone: {name: cnn, size: small}                    # built-in: CPU-sized, for tiny images
    backbone: {name: mlp, hidden: [512, 128]}             # built-in: vectors (e.g. 784 pixels)
    backbone: {name: resnet18, weights: resnet18.safetensors}   # any timm model, local weights

Every backbone maps inputs to a feature vector ``[B, D]`` and carries its input normalisation as
buffers (per-channel mean and std computed from the pretraining data), so a saved backbone takes
raw pixels in ``[0, 1]`` (or raw vectors) wherever it goes.  A saved model folder holds
``config.json`` (what to build: ``{"pretune": "vision", "backbone": spec, ...}``) and
``model.safetensors`` (the backbone under ``backbone.*`` plus any task layers).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import safetensors.torch
import torch
from pydantic import Field
from torch import nn

from pretune.errors import CheckpointError, RecipeError
from pretune.recipe import Section

BUILTIN = ("cnn", "mlp")
CNN_WIDTHS = {"tiny": (16, 32, 64), "small": (32, 64, 128), "base": (64, 128, 256)}
MLP_HIDDEN = {"tiny": (64, 32), "small": (256, 64), "base": (512, 256, 128)}


class VisionConfig(Section):
    name: str = "cnn"  # cnn | mlp | a timm model name (resnet18, vit_tiny_patch16_224, convnext_atto, ...)
    size: Literal["tiny", "small", "base"] = "small"  # built-in presets (CNN widths, MLP hidden sizes)
    widths: list[int] | None = None  # cnn: channels of each stage (overrides size)
    hidden: list[int] | None = None  # mlp: hidden sizes; the last one is the feature size (overrides size)
    activation: Literal["relu", "leaky_relu", "gelu"] = "relu"
    norm: bool = True  # batch norm after every convolution / linear layer of the built-in networks
    path: str | None = None  # a pretune vision model folder to start from
    pretrained: bool = True  # with path or weights: load them (false: same architecture, random weights)
    weights: str | None = None  # timm: a local weights file (.safetensors / .pth) used as the pretrained weights
    config: dict[str, Any] = Field(default_factory=dict)  # extra keyword arguments of timm.create_model


def is_vision_folder(path: str | Path | None) -> bool:
    if not path or not (Path(path) / "config.json").is_file():
        return False
    try:
        return json.loads((Path(path) / "config.json").read_text()).get("pretune") == "vision"
    except (OSError, ValueError):
        return False


def wants_vision(backbone: dict[str, Any]) -> bool:
    """Whether a recipe's ``backbone`` section names a vision/vector backbone."""
    if is_vision_folder(backbone.get("path")):
        return True
    name = str(backbone.get("name", ""))
    return name in BUILTIN or _timm_knows(name)


def _timm_knows(name: str) -> bool:
    try:
        import timm
    except ImportError:
        return False
    return bool(timm.is_model(name))


# -- the built-in networks --------------------------------------------------------------------------
def _activation(name: str) -> nn.Module:
    return {"relu": nn.ReLU(inplace=True), "leaky_relu": nn.LeakyReLU(0.2, inplace=True), "gelu": nn.GELU()}[name]


class SmallCNN(nn.Module):
    """A VGG-style CNN for small images: a stem, then stages of two 3x3 convolutions.

    Stage 1 keeps the resolution, each later stage halves it; global average pooling gives the
    features (``widths[-1]`` of them).  8x8 digits become 8 -> 8 -> 4 -> 2 before pooling.
    """

    def __init__(self, in_chans: int, widths: tuple[int, ...] = (32, 64, 128), activation: str = "relu", norm: bool = True):
        super().__init__()

        def conv(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=not norm),
                                 nn.BatchNorm2d(cout) if norm else nn.Identity(), _activation(activation))

        self.stem = conv(in_chans, widths[0], 1)
        self.stages = nn.ModuleList(
            nn.Sequential(conv(cin, cout, 1 if i == 0 else 2), conv(cout, cout, 1))
            for i, (cin, cout) in enumerate(zip((widths[0], *widths[:-1]), widths))
        )
        self.num_features = widths[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return x.mean(dim=(2, 3))

    def layer_groups(self) -> list[list[nn.Module]]:
        return [[self.stem], *[[stage] for stage in self.stages]]


class MLP(nn.Module):
    """Linear -> (batch norm) -> activation blocks; the last hidden size is the feature size."""

    def __init__(self, in_features: int, hidden: tuple[int, ...] = (256, 64), activation: str = "relu", norm: bool = True):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(cin, cout), nn.BatchNorm1d(cout) if norm else nn.Identity(), _activation(activation))
            for cin, cout in zip((in_features, *hidden[:-1]), hidden)
        )
        self.num_features = hidden[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x

    def layer_groups(self) -> list[list[nn.Module]]:
        return [[], *[[block] for block in self.blocks]]  # no embeddings: freeze-bottom:N freezes N blocks


class TimmNet(nn.Module):
    """A timm model without its classifier (``num_classes=0``): it returns pooled features."""

    def __init__(self, name: str, in_chans: int, weights: str | None = None, **kwargs: Any):
        super().__init__()
        try:
            import timm
        except ImportError:
            raise RecipeError(f"recipe key 'backbone.name': {name!r} is a timm model; install it with pip install 'pretune[vision]'") from None
        overlay = {"pretrained_cfg_overlay": {"file": str(weights)}} if weights else {}
        try:
            self.model = timm.create_model(name, pretrained=bool(weights), num_classes=0, in_chans=in_chans, **overlay, **kwargs)
        except (RuntimeError, OSError, ValueError, TypeError) as exc:
            where = f"{weights}: cannot be loaded as weights of {name}" if weights else f"recipe key 'backbone': cannot build timm model {name!r}"
            raise CheckpointError(f"{where} ({type(exc).__name__}: {str(exc).splitlines()[0][:300]})") from None
        self.num_features = self.model.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def layer_groups(self) -> list[list[nn.Module]]:
        """timm's own coarse grouping (stem, then stages/blocks): the one its layer-decay code uses."""
        from timm.models import group_modules

        grouped = group_modules(self.model, self.model.group_matcher(coarse=True))
        return [[self.model.get_submodule(name) for name in names] for _, names in sorted(grouped.items())
                if not all(name.startswith(("fc", "head", "classifier")) for name in names)]


# -- the backbone every task uses -------------------------------------------------------------------
class VisionBackbone(nn.Module):
    """Normalise with stored statistics, then run the network; ``forward(x) -> features [B, D]``."""

    def __init__(self, spec: dict[str, Any], mean: torch.Tensor | None = None, std: torch.Tensor | None = None):
        super().__init__()
        self.spec = spec
        shape = tuple(spec["input_shape"])
        name = spec["name"]
        if name == "cnn":
            self.net: nn.Module = SmallCNN(shape[0], tuple(spec["widths"]), spec["activation"], spec["norm"])
        elif name == "mlp":
            self.net = MLP(int(torch.tensor(shape).prod()), tuple(spec["hidden"]), spec["activation"], spec["norm"])
        else:
            self.net = TimmNet(name, shape[0], spec.get("weights"), **spec.get("config", {}))
        stat_shape = (1, shape[0], 1, 1) if len(shape) == 3 else (1, *shape)
        self.register_buffer("mean", (mean if mean is not None else torch.zeros(stat_shape)).reshape(stat_shape).float())
        self.register_buffer("std", (std if std is not None else torch.ones(stat_shape)).reshape(stat_shape).float())
        self.num_features = self.net.num_features

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.spec["input_shape"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        if self.spec["name"] == "mlp":
            x = x.flatten(1)
        return self.net(x)

    def layer_groups(self) -> list[list[nn.Module]]:
        return self.net.layer_groups()


def build_backbone(cfg: VisionConfig, input_shape: tuple[int, ...], mean: torch.Tensor, std: torch.Tensor) -> VisionBackbone:
    """A fresh backbone for inputs of ``input_shape`` (``(C, H, W)`` or ``(D,)``), or the one saved at ``cfg.path``."""
    if cfg.path:
        return load_backbone(cfg.path, pretrained=cfg.pretrained, expect_shape=input_shape)
    if cfg.name == "cnn" and len(input_shape) != 3:
        raise RecipeError(f"recipe key 'backbone.name': cnn needs images, but the data are vectors of shape {input_shape}; use mlp")
    spec: dict[str, Any] = {"name": cfg.name, "input_shape": list(input_shape), "activation": cfg.activation, "norm": cfg.norm}
    if cfg.name == "cnn":
        spec["widths"] = list(cfg.widths or CNN_WIDTHS[cfg.size])
    elif cfg.name == "mlp":
        spec["hidden"] = list(cfg.hidden or MLP_HIDDEN[cfg.size])
    else:
        if len(input_shape) != 3:
            raise RecipeError(f"recipe key 'backbone.name': timm model {cfg.name!r} needs images, but the data are vectors")
        spec.update(config=cfg.config, weights=cfg.weights if cfg.pretrained else None)
        if cfg.weights and not Path(cfg.weights).is_file():
            raise RecipeError(f"recipe key 'backbone.weights': {cfg.weights} does not exist")
        if cfg.weights and cfg.pretrained:
            from pretune.trainer.checkpoint import check_weights_file

            check_weights_file(cfg.weights, "recipe key 'backbone.weights'")  # a .pth is a pickle: refused unless trusted
    backbone = VisionBackbone(spec, mean, std)
    backbone.spec.pop("weights", None)  # the weights are in the model now; a saved folder must not point at the file
    return backbone


def save_model(path: Path, module: nn.Module, backbone: VisionBackbone, extra: dict[str, Any] | None = None) -> None:
    """Write ``config.json`` and ``model.safetensors`` (every parameter and buffer of ``module``)."""
    config = {"pretune": "vision", "backbone": backbone.spec, **(extra or {})}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    safetensors.torch.save_file(state, str(path / "model.safetensors"))


def read_folder(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The ``config.json`` and weights of a saved vision model folder."""
    path = Path(path)
    if not is_vision_folder(path):
        raise CheckpointError(f"{path}: not a pretune image/vector model folder (config.json without \"pretune\": \"vision\")")
    try:
        return json.loads((path / "config.json").read_text()), safetensors.torch.load_file(str(path / "model.safetensors"))
    except Exception as exc:  # noqa: BLE001 - a damaged folder is one problem for the user
        raise CheckpointError(f"{path}/model.safetensors: cannot be read ({type(exc).__name__}: {exc})") from None


def load_backbone(path: str | Path, pretrained: bool = True, expect_shape: tuple[int, ...] | None = None) -> VisionBackbone:
    """The backbone saved in a model folder: its weights (``backbone.*``) and normalisation statistics."""
    config, state = read_folder(path)
    spec = config["backbone"]
    if expect_shape is not None and tuple(spec["input_shape"]) != tuple(expect_shape):
        raise CheckpointError(f"{path}: the model takes inputs of shape {tuple(spec['input_shape'])} but the data have "
                              f"{tuple(expect_shape)}; set data.size / data.channels to match")
    backbone = VisionBackbone(spec)
    own = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    if not pretrained:  # the architecture (and its input statistics), randomly initialised: the from-scratch arm
        own = {k: v for k, v in own.items() if k in ("mean", "std")}
    missing, unexpected = backbone.load_state_dict(own, strict=False)
    if pretrained and (missing or unexpected):
        raise CheckpointError(f"{path}/model.safetensors: does not match its config.json (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return backbone
