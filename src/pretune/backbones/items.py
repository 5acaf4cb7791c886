"""Sequential recommenders: Hugging Face transformers over item ids (the ``items`` family).

A user's history is a sentence whose words are items (``data/interactions.py``), so the family is
the ``hf`` family with an item vocabulary for a tokenizer and the recommendation papers' shapes:

- ``bert4rec`` (Sun et al. 2019): a BERT encoder, trained by masked item modelling (``task: mlm``);
- ``sasrec`` (Kang & McAuley 2018): a GPT-2 decoder, trained by next-item prediction (``task: clm``).

Both default to ``size: rec`` (2 layers, hidden 64, 2 heads), the papers' MovieLens settings.  What
is saved is an ordinary Hugging Face folder (``AutoModelForMaskedLM`` / ``AutoModelForCausalLM``,
or a ``*ForSequenceClassification`` after fine-tuning) whose ``tokenizer.json`` is the item
vocabulary, and ``pretune.json`` says how the log was read (its ``interactions`` key).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from transformers import PreTrainedModel

from pretune.backbones.base import BACKBONES
from pretune.backbones.transformers import HF, TransformerConfig, family_of
from pretune.errors import RecipeError

ARCHITECTURES = {"bert4rec": "bert", "sasrec": "gpt2"}


class ItemsConfig(TransformerConfig):
    name: str = "bert4rec"  # bert4rec | sasrec (fresh), or a path to an item model folder
    size: Literal["nano", "rec", "tiny", "mini", "small", "base"] = "rec"  # rec: 2 layers, hidden 64, 2 heads


def is_items_folder(path: str | Path) -> bool:
    """A model folder saved from interaction data (its ``pretune.json`` has an ``interactions`` key)."""
    meta = Path(path) / "pretune.json"
    try:
        return meta.is_file() and "interactions" in json.loads(meta.read_text())
    except (OSError, ValueError):
        return False


@BACKBONES.register("items")
class Items(HF):
    """Transformers over item-id sequences: ``bert4rec`` and ``sasrec`` presets, or an item model folder."""

    name = "items"
    modality = "interactions"
    Config = ItemsConfig

    @classmethod
    def claims(cls, section: dict[str, Any]) -> bool:
        if section.get("path"):
            return is_items_folder(section["path"])
        return section.get("name") in ARCHITECTURES

    def __init__(self, cfg: ItemsConfig):
        super().__init__(cfg)
        if cfg.path and (Path(cfg.path) / "config.json").is_file() and not is_items_folder(cfg.path):
            raise RecipeError(f"recipe key 'backbone.path': {cfg.path} is not an item model (its pretune.json has no "
                              "'interactions' key); pretrain one on the log first (recipes/interactions-masked.yaml)")

    @property
    def text_family(self) -> str:
        return family_of(self._architecture())

    def _architecture(self) -> TransformerConfig:
        """The section as the ``hf`` family reads it: ``bert4rec`` is ``bert``, ``sasrec`` is ``gpt2``."""
        cfg = self.cfg
        return cfg if cfg.path else TransformerConfig(**{**cfg.model_dump(), "name": ARCHITECTURES.get(cfg.name, cfg.name)})

    def model(self, auto_class: Any, data: Any) -> PreTrainedModel:
        original, self.cfg = self.cfg, self._architecture()
        try:
            return super().model(auto_class, data)
        finally:
            self.cfg = original
