"""torchvision classification models by name, headless, with optional local pretrained weights.

    backbone: {family: torchvision, name: mobilenet_v2, weights: mobilenet_v2-b0353104.pth}
    backbone: {family: torchvision, name: resnet18}     # resnet18 alone is claimed by timm when timm is installed

Any name of ``torchvision.models.list_models(module=torchvision.models)`` (classification models:
no detection, segmentation, video or quantized ones).  torchvision is a core dependency of pretune;
it is imported only when this family is asked about a name.  Nothing is downloaded: pretrained
weights come from a local file (``backbone.weights``), a torchvision ``.pth`` (a pickle, refused
unless ``--trust-pickle``; read with ``torch.load(weights_only=True)``) or a ``.safetensors`` file,
loaded strictly into the *full* model before its classifier is removed.  See docs/backbones.md.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from pydantic import Field
from torch import nn

from pretune.backbones.arrays import ArrayFamily
from pretune.backbones.base import BACKBONES
from pretune.errors import CheckpointError, RecipeError
from pretune.recipe import Section
from pretune.safeload import check_weights_file, load_torch_state


class TorchVisionConfig(Section):
    name: str = "mobilenet_v2"  # a torchvision classification model (mobilenet_v2, resnet18, efficientnet_b0, ...)
    path: str | None = None  # a pretune image model folder to start from
    pretrained: bool = True  # with path or weights: load them (false: same architecture, random weights)
    weights: str | None = None  # a local weights file (.pth / .safetensors) of the full torchvision model
    config: dict[str, Any] = Field(default_factory=dict)  # extra keyword arguments of torchvision.models.get_model


HEADS = ("fc", "classifier", "heads", "head")  # where torchvision models keep their final classifier
CONTAINERS = ("features", "layers", "trunk_output", "blocks", "encoder")  # children whose elements are stages
POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
AUX_HEADS = ("aux1", "aux2", "AuxLogits")  # googlenet / inception_v3 auxiliary classifiers
TF_PORTS = ("googlenet", "inception_v3")  # their ImageNet weights expect torchvision's transform_input=True
_DENSENET_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


@functools.cache
def model_names() -> tuple[str, ...]:
    """torchvision's classification models (``list_models`` without detection, segmentation, video, quantized)."""
    import torchvision  # a core dependency, imported late: `pretune --help` does not pay for it

    return tuple(torchvision.models.list_models(module=torchvision.models))


class TorchVisionNet(nn.Module):
    """A torchvision classification model without its classifier: ``forward(x) -> pooled features [B, D]``.

    **Head.**  The final ``nn.Linear`` of the model's classifier (``fc``, ``classifier``, ``heads``
    or ``head``), and the dropout right before it, are removed (replaced by ``nn.Identity`` when
    nothing is left): ``mobilenet_v2`` returns its 1280 pooled features, ``resnet18`` 512, ``vgg16``
    the 4096 of its second fully connected layer (the hidden layers of a classifier stay in the
    backbone).  pretune's own head (with ``task.head_dropout``) goes on top.  SqueezeNet, whose
    classifier is a 1x1 convolution, keeps a global average pool instead.  googlenet and
    inception_v3 lose their auxiliary classifiers, as torchvision's own pretrained builders do.

    **Input channels.**  torchvision models take RGB.  A 1-channel (gray) input is repeated to
    three channels in ``forward``, *not* folded into the first convolution: the network and its
    state dict stay exactly torchvision's (any torchvision weights file loads strictly, for every
    model, whatever its first layer is), and a pretrained first layer sees what it was trained on,
    a gray image as three equal channels.  (Summing the first convolution's weights over its input
    channels would compute the same thing for that first layer, but needs model-specific surgery
    and gives a state dict that torchvision files no longer match.)  The cost is the first layer's
    compute on three channels instead of one.  Other channel counts are refused.

    **Size.**  Models with global pooling (ResNet, MobileNet, EfficientNet, RegNet, ConvNeXt...) run
    on small images (16x16 digits); models with a fixed input size (ViT: ``config.image_size``,
    inception_v3: at least 75x75) are refused at build time with one line.
    """

    def __init__(self, name: str, input_shape: tuple[int, ...], weights: str | None = None, **kwargs: Any):
        super().__init__()
        self.name = name
        self.in_chans = int(input_shape[0])
        if self.in_chans not in (1, 3):
            raise RecipeError(f"recipe key 'data.channels': torchvision model {name!r} takes 1 (gray, repeated to RGB) "
                              f"or 3 channels, not {self.in_chans}")
        self.model, self.num_features = build_headless(name, weights, **kwargs)
        if len(self.layer_groups()) < 2:
            raise RecipeError(f"recipe key 'backbone.name': cannot split torchvision model {name!r} into layer groups "
                              "(stem, then stages) for pretune's strategies; choose another model")
        self._check_runs(tuple(int(d) for d in input_shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # gray -> RGB (a view: no copy)
        return self.model(x)

    def layer_groups(self) -> list[list[nn.Module]]:
        """Bottom-to-top groups: the stem, then each stage / block, then what is left of the classifier.

        Generic over torchvision's layouts: the model's children in order, with ``features`` /
        ``layers`` / ``trunk_output`` / ``blocks`` / ``encoder`` opened into their elements; a
        child with sub-modules (a block, a stage) starts a group; a bare layer (conv, norm, linear)
        joins the group before it unless a pooling layer came in between.  resnet18: ``[conv1,
        bn1], [layer1], ..., [layer4]``; mobilenet_v2: ``[features[0]], ..., [features[18]]``;
        vgg16: its five conv stages, then its hidden fully connected layers.  Parameters held
        directly by the model or a container (ViT's class token and position embedding) join the
        stem.  Every parameter of the headless model is in exactly one group.
        """
        return group_layers(self.model)

    @torch.no_grad()
    def _check_runs(self, input_shape: tuple[int, ...]) -> None:
        """One eval-mode forward of a zero image: a size the model cannot take fails here, in one line."""
        training = self.training
        self.eval()
        try:
            out = self(torch.zeros(1, *input_shape))
        except (RuntimeError, ValueError, AssertionError, IndexError) as exc:
            raise RecipeError(f"recipe key 'data.size': torchvision model {self.name!r} cannot take images of shape "
                              f"{tuple(input_shape)} ({type(exc).__name__}: {_first_line(exc)}); use larger images "
                              "(data.size) or another model (docs/backbones.md lists the smallest sizes)") from None
        finally:
            self.train(training)
        if not isinstance(out, torch.Tensor) or out.shape != (1, self.num_features):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise RecipeError(f"recipe key 'backbone.name': torchvision model {self.name!r} without its classifier returns "
                              f"{shape}, not pooled features of size {self.num_features}; choose another model")


def build_headless(name: str, weights: str | Path | None = None, **kwargs: Any) -> tuple[nn.Module, int]:
    """torchvision's model ``name`` (``weights``: a local file loaded strictly into the full model),
    without auxiliary or final classifiers; returns it and its number of features."""
    import torchvision  # a core dependency, imported late

    if name in TF_PORTS:
        kwargs.setdefault("init_weights", True)  # silences torchvision's FutureWarning; loaded weights replace it
    try:
        model = torchvision.models.get_model(name, weights=None, **kwargs)
    except (RuntimeError, ValueError, TypeError, KeyError) as exc:
        raise RecipeError(f"recipe key 'backbone': cannot build torchvision model {name!r} "
                          f"({type(exc).__name__}: {_first_line(exc)})") from None
    if weights:
        load_full_weights(model, weights, name)
    for aux in AUX_HEADS:  # after loading: torchvision's pretrained files hold the auxiliary heads too
        if getattr(model, aux, None) is not None:
            setattr(model, aux, None)
    if hasattr(model, "aux_logits"):
        model.aux_logits = False
    return model, _remove_head(model, name)


def group_layers(model: nn.Module) -> list[list[nn.Module]]:
    """The layer groups of a headless torchvision model (see :meth:`TorchVisionNet.layer_groups`)."""
    groups: list[list[nn.Module]] = []
    loose: list[nn.Parameter] = []
    closed = True

    def walk(module: nn.Module) -> None:
        nonlocal closed
        loose.extend(module.parameters(recurse=False))
        for name, child in module.named_children():
            if next(child.parameters(), None) is None:
                closed = closed or isinstance(child, POOLS)
            elif name in CONTAINERS:
                walk(child)
            elif next(child.children(), None) is not None or closed or not groups:
                groups.append([child])
                closed = False
            else:
                groups[-1].append(child)

    walk(model)
    if loose and groups:
        groups[0].append(_Parameters(loose))
    return groups


class _Parameters(nn.Module):
    """Loose parameters (a class token...) as a module, so that a layer group can hold them.

    Made afresh by each ``layer_groups()`` call and never attached to the network, so it adds
    nothing to the state dict; it registers the network's own parameter objects."""

    def __init__(self, params: list[nn.Parameter]):
        super().__init__()
        for i, param in enumerate(params):
            self.register_parameter(f"p{i}", param)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:300]


def _remove_head(model: nn.Module, name: str) -> int:
    """Replace the final classifier (see :class:`TorchVisionNet`); returns the number of features left."""
    for attr in HEADS:
        head = getattr(model, attr, None)
        if isinstance(head, nn.Linear):
            setattr(model, attr, nn.Identity())
            return head.in_features
        if isinstance(head, nn.Sequential):
            layers = list(head)
            last = max((i for i, m in enumerate(layers) if isinstance(m, (nn.Linear, nn.Conv2d))), default=None)
            if last is None:
                continue
            final = layers[last]
            keep = last
            while keep > 0 and isinstance(layers[keep - 1], nn.Dropout):
                keep -= 1  # pretune's head has its own dropout (task.head_dropout)
            if isinstance(final, nn.Conv2d):  # squeezenet: conv 1x1 -> relu -> global pool; keep the pool
                setattr(model, attr, nn.Sequential(*layers[:keep], nn.AdaptiveAvgPool2d((1, 1))))
                return final.in_channels
            # the prefix keeps its indices, so state-dict keys of the remaining layers stay torchvision's
            setattr(model, attr, nn.Sequential(*layers[:keep]) if keep else nn.Identity())
            return final.in_features
    raise RecipeError(f"recipe key 'backbone.name': cannot find the classifier of torchvision model {name!r} "
                      f"(looked for a Linear layer at {', '.join(HEADS)}); choose another model")


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in a ``.safetensors`` or torch (``.pth``) file, read without running code.

    A torch file is read with ``torch.load(weights_only=True)`` (tensors and containers only); a
    checkpoint that wraps the state dict in ``{"state_dict": ...}`` or ``{"model": ...}`` and a
    ``DataParallel`` ``module.`` prefix are unwrapped."""
    path = Path(path)
    try:
        if path.name.endswith(".safetensors"):
            state: Any = safetensors.torch.load_file(str(path))
        else:
            state = load_torch_state(path)
    except Exception as exc:  # noqa: BLE001 - unreadable, truncated, or code in the pickle: one line
        raise CheckpointError(f"{path}: cannot be read as a weights file ({type(exc).__name__}: {_first_line(exc)})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not a state dict (a mapping of parameter names to tensors)")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_full_weights(model: nn.Module, path: str | Path, name: str) -> None:
    """Load a weights file strictly into the full torchvision model (with its classifier)."""
    check_weights_file(path, "recipe key 'backbone.weights'")  # a .pth is a pickle: refused unless trusted
    state = read_weights(path)
    if name.startswith("densenet"):  # torchvision's own renaming of its old densenet files
        state = {(_DENSENET_KEY.sub(r"\1\2", k)): v for k, v in state.items()}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise CheckpointError(f"{path}: cannot be loaded as weights of torchvision model {name!r} "
                              f"({' '.join(str(exc).split())[:300]})") from None
    if missing or unexpected:
        raise CheckpointError(f"{path}: does not match torchvision model {name!r} (missing {list(missing)[:3]}, "
                              f"unexpected {list(unexpected)[:3]}); is it a weights file of {name}?")


@BACKBONES.register("torchvision")
class TorchVision(ArrayFamily):
    name = "torchvision"
    Config = TorchVisionConfig

    @classmethod
    def knows(cls, name: str) -> bool:
        try:
            return bool(name) and name in model_names()
        except ImportError:
            return False

    def spec(self, input_shape: tuple[int, ...]) -> dict[str, Any]:
        if len(input_shape) != 3:
            raise RecipeError(f"recipe key 'backbone.name': torchvision model {self.cfg.name!r} needs images, but the data are "
                              f"vectors of shape {tuple(input_shape)}; use mlp")
        if self.cfg.name not in model_names():  # checked here, not in Config: with `path` the folder names the model
            raise RecipeError(f"recipe key 'backbone.name': {self.cfg.name!r} is not a torchvision classification model "
                              "(e.g. mobilenet_v2, resnet18, efficientnet_b0; see torchvision.models.list_models(module=torchvision.models))")
        config = dict(self.cfg.config)
        if self.cfg.name in TF_PORTS and self.cfg.pretrained and self.cfg.weights:
            config.setdefault("transform_input", True)  # as torchvision's pretrained builder; saved in the spec
        return {"name": self.cfg.name, "config": config}

    @classmethod
    def network(cls, spec: dict[str, Any], weights: str | None = None) -> nn.Module:
        return TorchVisionNet(spec["name"], tuple(spec["input_shape"]), weights, **spec.get("config", {}))

    @classmethod
    def export_state(cls, net: nn.Module) -> dict[str, torch.Tensor]:
        """The headless torchvision model's own state dict: ``get_model(name)`` with its classifier
        replaced by ``nn.Identity`` loads it strictly (see docs/backbones.md)."""
        return net.model.state_dict()
