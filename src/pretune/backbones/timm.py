"""timm image models by name, headless (``num_classes=0``), with optional local pretrained weights.

    backbone: {name: resnet18, weights: resnet18.safetensors}   # any timm model; weights from a local file

timm is an optional extra (``pip install 'pretune[vision]'``).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field
from torch import nn

from pretune.backbones.arrays import ArrayFamily
from pretune.backbones.base import BACKBONES
from pretune.errors import CheckpointError, RecipeError
from pretune.recipe import Section


class TimmConfig(Section):
    name: str = "resnet18"  # a timm model name (resnet18, vit_tiny_patch16_224, convnext_atto, ...)
    path: str | None = None  # a pretune image model folder to start from
    pretrained: bool = True  # with path or weights: load them (false: same architecture, random weights)
    weights: str | None = None  # a local weights file (.safetensors / .pth) used as the pretrained weights
    config: dict[str, Any] = Field(default_factory=dict)  # extra keyword arguments of timm.create_model


class TimmNet(nn.Module):
    """A timm model without its classifier (``num_classes=0``): it returns pooled features."""

    def __init__(self, name: str, in_chans: int, weights: str | None = None, **kwargs: Any):
        super().__init__()
        timm = _import_timm(name)
        overlay = {"pretrained_cfg_overlay": {"file": str(weights)}} if weights else {}
        try:
            self.model = timm.create_model(name, pretrained=bool(weights), num_classes=0, in_chans=in_chans, **overlay, **kwargs)
        except (RuntimeError, OSError, ValueError, TypeError) as exc:
            where = f"{weights}: cannot be loaded as weights of {name}" if weights else f"recipe key 'backbone': cannot build timm model {name!r}"
            raise CheckpointError(f"{where} ({type(exc).__name__}: {str(exc).splitlines()[0][:300]})") from None
        self.num_features = self.model.num_features

    def forward(self, x: Any) -> Any:
        return self.model(x)

    def layer_groups(self) -> list[list[nn.Module]]:
        """timm's own coarse grouping (stem, then stages/blocks): the one its layer-decay code uses."""
        from timm.models import group_modules

        grouped = group_modules(self.model, self.model.group_matcher(coarse=True))
        return [[self.model.get_submodule(name) for name in names] for _, names in sorted(grouped.items())
                if not all(name.startswith(("fc", "head", "classifier")) for name in names)]


def _import_timm(name: str) -> Any:
    try:
        import timm  # optional extra: imported only when a timm model is asked for
    except ImportError:
        raise RecipeError(f"recipe key 'backbone.name': {name!r} is a timm model; install it with pip install 'pretune[vision]'") from None
    return timm


@BACKBONES.register("timm")
class Timm(ArrayFamily):
    name = "timm"
    Config = TimmConfig

    @classmethod
    def knows(cls, name: str) -> bool:
        try:
            import timm  # optional extra
        except ImportError:
            return False
        return bool(name) and bool(timm.is_model(name))

    def spec(self, input_shape: tuple[int, ...]) -> dict[str, Any]:
        if len(input_shape) != 3:
            raise RecipeError(f"recipe key 'backbone.name': timm model {self.cfg.name!r} needs images, but the data are vectors")
        return {"name": self.cfg.name, "config": self.cfg.config}

    @classmethod
    def network(cls, spec: dict[str, Any], weights: str | None = None) -> nn.Module:
        return TimmNet(spec["name"], spec["input_shape"][0], weights, **spec.get("config", {}))

    @classmethod
    def export_state(cls, net: nn.Module) -> dict[str, Any]:
        return net.model.state_dict()
