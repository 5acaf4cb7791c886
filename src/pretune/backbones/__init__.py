"""Backbones: what maps inputs to features.  Text: Hugging Face transformers (``transformers.py``)."""

from __future__ import annotations

from typing import Any

from pretune.backbones.transformers import FAMILIES, TransformerConfig
from pretune.errors import RecipeError
from pretune.recipe import Recipe


def backbone_config(recipe: Recipe) -> Any:
    """Validate the recipe's ``backbone`` section with the config class of its family."""
    name = recipe.backbone.get("name", "bert")
    if name in FAMILIES or name == "hf" or recipe.backbone.get("path"):
        return recipe.section("backbone", TransformerConfig)
    raise RecipeError(f"recipe key 'backbone.name': unknown backbone {name!r}; choose one of {', '.join(FAMILIES)} or set backbone.path")
