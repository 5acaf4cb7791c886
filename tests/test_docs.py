"""Docs stay in step with the code: every recipe key is documented."""

from pathlib import Path

from pretune.backbones.transformers import TransformerConfig
from pretune.recipe import DataConfig, Recipe, TokenizerConfig, TrainerConfig
from pretune.data.labelled import LabelledDataConfig
from pretune.tasks.finetune import FinetuneConfig
from pretune.tasks.mlm import MLMConfig

DOC = (Path(__file__).parents[1] / "docs" / "recipes.md").read_text()


def test_every_recipe_key_is_documented():
    sections = [(Recipe, ""), (MLMConfig, "task."), (TransformerConfig, "backbone."), (DataConfig, "data."),
                (TokenizerConfig, "data.tokenizer."), (TrainerConfig, "trainer."), (FinetuneConfig, "task."),
                (LabelledDataConfig, "data.")]
    missing = [prefix + name for model, prefix in sections for name, field in model.model_fields.items()
               if not hasattr(field.annotation, "model_fields") and f"`{prefix}{name}`" not in DOC]
    assert not missing, f"document these recipe keys in docs/recipes.md: {missing}"
