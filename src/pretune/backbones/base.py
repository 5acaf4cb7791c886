"""The ``Backbone`` interface and the registry of backbone families.

A *backbone family* is one file in ``backbones/`` and one registry line: it turns the recipe's
``backbone:`` section into networks that map inputs to features, and it knows how its models are
saved, loaded and fed.  Everything after the backbone (tasks, head kinds, strategies, the trainer,
the predictor) talks to a family only through this interface:

=====================  ===========================================================================
``name``               the family's registry name (``hf``, ``builtin``, ``timm``, ``torchvision``)
``modality``           ``"text"`` or ``"array"`` (images / vectors): which data reader feeds it
``Config``             the pydantic class of its ``backbone:`` recipe section
``claims(section)``    whether a recipe's backbone section with no ``family`` key names this family
``pretrained``         whether the recipe starts from pretrained weights (a folder or a weights file)
``classifier(...)``    backbone + a new task layer for a head kind (:class:`Classifier`)
``collate(rows, ...)`` the model inputs of a batch of raw examples (tokenised text, pixels...)
``save(module, path)`` write a model folder that :meth:`load_classifier` (and the ecosystem) reads
``load_classifier``    the fine-tuned model saved in a folder, for the predictor
=====================  ===========================================================================

A :class:`Classifier` (what ``classifier`` returns) is an ``nn.Module`` with ``forward(batch) ->
logits``, ``encode(batch) -> features`` (the representation the head reads, for cached features),
``head_logits(features)``, ``backbone`` (the module a frozen strategy puts in eval mode),
``layer_groups()`` (bottom-to-top groups for freezing, LLRD and gradual unfreezing),
``new_parameters`` (names of the task layers the checkpoint did not have) and ``linear_head()``
(the task layer, when it is one linear layer on the encoded features).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from pretune.errors import RecipeError
from pretune.heads import Head
from pretune.recipe import Section, validate
from pretune.registry import Registry

BACKBONES = Registry("backbone family")


class Classifier(nn.Module):
    """Backbone plus a new task layer (see the module docstring for what each family provides)."""

    backbone: nn.Module
    new_parameters: set[str]

    def encode(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def head_logits(self, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def layer_groups(self) -> list[list[nn.Module]]:
        raise NotImplementedError

    def add_lora(self, options: dict[str, Any]) -> None:
        """Low-rank adapters (strategy ``lora``); families whose networks have none refuse in one line."""
        raise RecipeError(f"recipe key 'strategy': lora applies to transformer backbones (text); for {type(self.backbone).__name__} "
                          "use linear-probe, freeze-bottom:N, gradual-unfreeze or llrd:D")

    def supports_cache(self, head: Head) -> bool:
        """Whether ``head_logits(encode(batch))`` equals ``forward(batch)`` with a frozen backbone."""
        return not head.per_token

    def linear_head(self) -> nn.Linear | None:
        """The task layer when ``head_logits(f)`` is exactly ``linear_head()(f)`` in eval mode (a linear
        probe is then fitted to convergence: :func:`pretune.strategies.fit_probe`); None otherwise."""
        return None


class Backbone:
    """One backbone family, configured by a recipe's ``backbone:`` section."""

    name: ClassVar[str]
    modality: ClassVar[str]
    Config: ClassVar[type[Section]]

    def __init__(self, cfg: Any):
        self.cfg = cfg

    @classmethod
    def claims(cls, section: dict[str, Any]) -> bool:
        return False

    @property
    def pretrained(self) -> bool:
        """Whether the model starts from pretrained weights (a model folder, or a family's weights file)."""
        return bool(self.cfg.pretrained and (self.cfg.path or self.weights))

    @property
    def path(self) -> str | None:
        """The model folder the recipe starts from (it also holds a tokenizer and label map), if any."""
        return self.cfg.path

    @property
    def weights(self) -> str | None:
        """A local pretrained weights file the family loads into a fresh network (timm, torchvision), if any."""
        return None

    def classifier(self, head: Head, label_names: list[str], data: Any, *, dropout: float = 0.0,
                   augment: Any = None) -> Classifier:
        raise NotImplementedError

    def collate(self, rows: dict[str, Any], seeds: list[int], head: Head, data: Any) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def save(self, module: nn.Module, path: Path, data: Any) -> None:
        raise NotImplementedError

    @classmethod
    def load_classifier(cls, path: Path, meta: dict[str, Any], device: torch.device) -> tuple[Classifier, Any]:
        """The fine-tuned model in ``path`` and what reads raw inputs for it (tokenizer / array spec)."""
        raise NotImplementedError


def resolve(section: dict[str, Any]) -> Backbone:
    """The family of a recipe's ``backbone:`` section, with the section validated by the family's ``Config``.

    ``family:`` names it; otherwise the first registered family that claims the section (a model
    folder says what it is; ``bert``/``gpt2``/``llama`` are Hugging Face presets, ``cnn``/``mlp``
    built in, any other name a timm or torchvision model, in that order)."""
    section = dict(section)
    family = section.pop("family", None)
    if family is None:
        family = next((name for name in _registered() if BACKBONES.get(name).claims(section)), None)
    if family is None:
        name = section.get("name")
        raise RecipeError(f"recipe key 'backbone.name': unknown backbone {name!r}; choose bert, gpt2, llama (or set backbone.path), "
                          f"cnn, mlp, a timm or torchvision model name, or set backbone.family to one of {', '.join(ORDER)}")
    cls = BACKBONES.get(str(family))
    try:
        return cls(validate(cls.Config, section, prefix="backbone."))
    except RecipeError as exc:
        if "unknown recipe key" not in str(exc):
            raise
        raise RecipeError(f"{exc} ({section.get('name')!r} is a {cls.name} backbone; to replace a recipe's backbone section "
                          f"of another family, write backbone={section.get('name')} instead of backbone.name=...)") from None


def for_folder(path: str | Path) -> type[Backbone]:
    """The family that saved the model folder ``path``."""
    section = {"path": str(path)}
    for name in _registered():
        cls = BACKBONES.get(name)
        if cls.claims(section):
            return cls
    raise RecipeError(f"{path}: not a model folder any backbone family reads")


ORDER = ("items", "audio", "hf", "builtin", "timm", "torchvision")  # who claims a section without `family:` first


def _registered() -> list[str]:
    """Families in claim order, then any registered by user code (dotted ``family:`` paths need no order)."""
    names = BACKBONES.names()
    return [name for name in ORDER if name in names] + [name for name in names if name not in ORDER]
