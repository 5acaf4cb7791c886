"""Built-in image and vector networks, sized for CPUs: a small VGG-style CNN and an MLP.

    backbone: {name: cnn, size: small}          # images: a stem, then stages of two 3x3 convolutions
    backbone: {name: mlp, hidden: [512, 128]}   # vectors (or flattened pixels)
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from pretune.backbones.arrays import ArrayFamily
from pretune.backbones.base import BACKBONES
from pretune.errors import RecipeError
from pretune.recipe import Section

CNN_WIDTHS = {"tiny": (16, 32, 64), "small": (32, 64, 128), "base": (64, 128, 256)}
MLP_HIDDEN = {"tiny": (64, 32), "small": (256, 64), "base": (512, 256, 128)}


class BuiltinConfig(Section):
    name: Literal["cnn", "mlp"] = "cnn"
    size: Literal["tiny", "small", "base"] = "small"  # CNN widths / MLP hidden sizes
    widths: list[int] | None = None  # cnn: channels of each stage (overrides size)
    hidden: list[int] | None = None  # mlp: hidden sizes; the last one is the feature size (overrides size)
    activation: Literal["relu", "leaky_relu", "gelu"] = "relu"
    norm: bool = True  # batch norm after every convolution / linear layer
    path: str | None = None  # a pretune image/vector model folder to start from
    pretrained: bool = True  # with path: load its weights (false: same architecture, random weights)


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
    """Linear -> (batch norm) -> activation blocks on flattened inputs; the last hidden size is the feature size."""

    def __init__(self, in_features: int, hidden: tuple[int, ...] = (256, 64), activation: str = "relu", norm: bool = True):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(cin, cout), nn.BatchNorm1d(cout) if norm else nn.Identity(), _activation(activation))
            for cin, cout in zip((in_features, *hidden[:-1]), hidden)
        )
        self.num_features = hidden[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)  # images become vectors of their pixels
        for block in self.blocks:
            x = block(x)
        return x

    def layer_groups(self) -> list[list[nn.Module]]:
        return [[], *[[block] for block in self.blocks]]  # no embeddings: freeze-bottom:N freezes N blocks


@BACKBONES.register("builtin")
class Builtin(ArrayFamily):
    name = "builtin"
    Config = BuiltinConfig

    @classmethod
    def knows(cls, name: str) -> bool:
        return name in ("cnn", "mlp")

    def spec(self, input_shape: tuple[int, ...]) -> dict[str, Any]:
        cfg = self.cfg
        if cfg.name == "cnn" and len(input_shape) != 3:
            raise RecipeError(f"recipe key 'backbone.name': cnn needs images, but the data are vectors of shape {input_shape}; use mlp")
        spec: dict[str, Any] = {"name": cfg.name, "activation": cfg.activation, "norm": cfg.norm}
        if cfg.name == "cnn":
            spec["widths"] = list(cfg.widths or CNN_WIDTHS[cfg.size])
        else:
            spec["hidden"] = list(cfg.hidden or MLP_HIDDEN[cfg.size])
        return spec

    @classmethod
    def network(cls, spec: dict[str, Any], weights: str | None = None) -> nn.Module:
        shape = tuple(spec["input_shape"])
        if spec["name"] == "cnn":
            return SmallCNN(shape[0], tuple(spec["widths"]), spec["activation"], spec["norm"])
        return MLP(int(torch.tensor(shape).prod()), tuple(spec["hidden"]), spec["activation"], spec["norm"])
