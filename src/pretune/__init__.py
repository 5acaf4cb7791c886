"""pretune: pretrain on unlabelled data, fine-tune on a few labels, know whether it paid off.

Public API::

    import pretune
    result = pretune.train("recipes/text-mlm.yaml", ["run_dir=runs/mlm", "trainer.max_steps=100"])
    result = pretune.train("runs/mlm", resume=True)      # continue exactly where it stopped
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["train", "load", "load_recipe", "PretuneError"]

from pretune.errors import PretuneError
from pretune.recipe import load_recipe


def load(path: Any, device: str | None = None):
    """A fine-tuned model ready to predict; see :class:`pretune.predict.Predictor`."""
    from pretune.predict import load as _load

    return _load(path, device)


def train(*args: Any, **kwargs: Any):
    """Run or resume a recipe; see :func:`pretune.run.train`."""
    from pretune.run import train as _train  # imports torch and transformers: only when needed

    return _train(*args, **kwargs)
