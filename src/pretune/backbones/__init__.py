"""Backbones: what maps inputs to features.

- text: Hugging Face transformers (``transformers.py``): BERT, GPT-2, Llama, any local HF folder;
- images and vectors (``vision.py``): built-in CNN and MLP, any timm model, pretune vision folders.
"""

from __future__ import annotations

from typing import Any

from pretune.backbones.transformers import FAMILIES, TransformerConfig
from pretune.backbones.vision import BUILTIN, VisionConfig, wants_vision
from pretune.errors import RecipeError
from pretune.recipe import Recipe


def backbone_config(recipe: Recipe) -> Any:
    """Validate the recipe's ``backbone`` section with the config class of its family."""
    section = recipe.backbone
    if wants_vision(section):
        return recipe.section("backbone", VisionConfig)
    name = section.get("name", "bert")
    if name in FAMILIES or name == "hf" or section.get("path"):
        return recipe.section("backbone", TransformerConfig)
    raise RecipeError(f"recipe key 'backbone.name': unknown backbone {name!r}; choose one of "
                      f"{', '.join([*FAMILIES, *BUILTIN])}, a timm model name, or set backbone.path")
