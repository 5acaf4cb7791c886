"""Docs stay in step with the code: every recipe key is documented."""

from pathlib import Path

from pretune.backbones.transformers import TransformerConfig
from pretune.recipe import (DataConfig, GeneralTextConfig, Recipe, StrategyConfig, TaskSelectionConfig, TokenizerConfig, TrainerConfig,
                            VocabularyConfig, load_recipe)
from pretune.data.interactions import InteractionsConfig
from pretune.data.labelled import LabelledDataConfig
from pretune.tasks.finetune import FinetuneConfig
from pretune.tasks.mlm import MLMConfig

DOC = (Path(__file__).parents[1] / "docs" / "recipes.md").read_text()


def test_every_recipe_key_is_documented():
    from pretune.backbones.builtin import BuiltinConfig
    from pretune.backbones.timm import TimmConfig
    from pretune.backbones.torchvision import TorchVisionConfig
    from pretune.data.arrays import ArrayDataConfig
    from pretune.data.augment import AugmentConfig
    from pretune.tasks.autoencoder import AutoencoderConfig
    from pretune.tasks.contrastive import ContrastiveConfig
    from pretune.tasks.gan import GANConfig
    from pretune.tasks.simcse import SimCSEConfig
    from pretune.tasks.vision import MonitorConfig
    from pretune.backbones.audio import AudioConfig
    from pretune.data.audio_augment import AudioAugmentConfig
    from pretune.tasks.masked_audio import MaskedAudioConfig

    sections = [(Recipe, ""), (MLMConfig, "task."), (TransformerConfig, "backbone."), (DataConfig, "data."),
                (TokenizerConfig, "data.tokenizer."), (TrainerConfig, "trainer."), (FinetuneConfig, "task."),
                (LabelledDataConfig, "data."), (ContrastiveConfig, "task."), (AutoencoderConfig, "task."), (GANConfig, "task."),
                (AugmentConfig, "task.augment."), (MonitorConfig, "task.monitor."),
                (BuiltinConfig, "backbone."), (TimmConfig, "backbone."), (TorchVisionConfig, "backbone."), (StrategyConfig, "strategy."), (ArrayDataConfig, "data."),
                (SimCSEConfig, "task."), (GeneralTextConfig, "data.general."), (VocabularyConfig, "data.vocabulary."),
                (TaskSelectionConfig, "data.select."), (InteractionsConfig, "data."), (AudioConfig, "backbone."),
                (AudioAugmentConfig, "task.augment.audio."), (MaskedAudioConfig, "task.")]
    missing = [prefix + name for model, prefix in sections for name, field in model.model_fields.items()
               if not hasattr(field.annotation, "model_fields") and f"`{prefix}{name}`" not in DOC]
    assert not missing, f"document these recipe keys in docs/recipes.md: {missing}"


def documented_commands():
    """Every ``pretune pretrain|adapt|finetune RECIPE key=value ...`` line in the README and docs/."""
    import re
    import shlex

    root = Path(__file__).parents[1]
    for doc in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        language = None  # the language of the fenced block we are in, or None outside blocks
        for line in doc.read_text().replace("\\\n", " ").splitlines():
            if line.startswith("```"):
                language = None if language is not None else (line[3:].strip() or "text")
                continue
            if language in ("bash", "sh", "text"):
                match = re.search(r"pretune (pretrain|adapt|finetune) (.*)", line.split("#", 1)[0])
                if match and match.group(2).split()[0].endswith(".yaml"):
                    yield doc.name, match.group(1), shlex.split(match.group(2))


def test_documented_commands_have_valid_recipes_and_overrides():
    from pretune.run import compose

    commands = list(documented_commands())
    assert len(commands) >= 12  # a floor: the docs show at least these journeys
    root = Path(__file__).parents[1]
    for doc, command, args in commands:
        # overrides only (not --flags); shell variables of a surrounding loop ($b) are not ours to check
        recipe, overrides = args[0], [a for a in args[1:] if "=" in a and not a.startswith("-") and "$" not in a]
        try:
            compose(load_recipe(root / recipe, overrides))
        except Exception as exc:  # noqa: BLE001 - report which documented command broke
            raise AssertionError(f"{doc}: pretune {command} {' '.join(args)} -> {exc}") from None
