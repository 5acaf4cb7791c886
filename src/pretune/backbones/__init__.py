"""Backbones: what maps inputs to features, one file per family (see ``base.py`` for the interface).

- ``items`` (``items.py``): BERT4Rec / SASRec-shaped transformers over item ids (interaction logs);
- ``hf`` (``transformers.py``): BERT, GPT-2, Llama presets, any local Hugging Face folder (text);
- ``builtin`` (``builtin.py``): a small CNN for images and an MLP for vectors;
- ``timm`` (``timm.py``): any timm image model by name (optional extra);
- ``torchvision`` (``torchvision.py``): torchvision classification models by name (local weights files);
- ``audio`` (``audio.py``): Whisper's encoder over log-mel spectrograms, built in CPU sizes or Whisper's own weights.

A recipe's ``backbone:`` section names its family with ``family:``, or the first family in
:data:`ORDER` that claims it does (a model folder says what it is; preset names are unambiguous).
"""

from __future__ import annotations

from pretune.backbones import audio, builtin, items, timm, torchvision, transformers  # noqa: F401  (each file registers its family)
from pretune.backbones.base import BACKBONES, ORDER, Backbone, Classifier, for_folder, resolve

__all__ = ["BACKBONES", "Backbone", "Classifier", "ORDER", "for_folder", "resolve"]
