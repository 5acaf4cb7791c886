"""The "selected vs random labels" arms of a study (``selection: true``).

A study's ordinary arms keep, for each budget and seed, a random share of the labelled rows *per
class* (:func:`pretune.data.labelled.apply_budget`): a simulation that knows every row's class.
A user with an unlabelled pool knows no class, so the question :mod:`pretune.select` answers is
which rows to send for labelling.  A selection arm takes the same number of labels, picked by
TypiClust on the pretrained model's embeddings of the pool (:func:`pretune.select.typiclust`),
and fine-tunes exactly as the random arm does; the study then compares the two at every budget.

Per (budget, seed): the pool is the training file minus that seed's validation rows (the
validation rows of the random arm, so both arms validate on the same rows); the number of picks is
``budget x classes`` for rows-per-class budgets and ``budget x pool`` for fractions; TypiClust's
k-means is seeded with the study seed.  The picks and the validation rows are written to
``STUDY/selected/budget-B_seed-S/{train,validation}.csv`` and the cell reads them, with the label
set fixed to every class of the training file (``data.labels``): the picks may miss a class.
Budgets that would pick the whole pool are skipped (the picks would be the random arm's rows).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import torch

from pretune.data.labelled import LabelledDataConfig, build_labelled
from pretune.errors import RecipeError
from pretune.recipe import Recipe

SELECTION = "typiclust"


def picks(budget: float | int, classes: int, pool: int) -> int:
    """How many rows a selection arm labels: as many as the random arm's per-class budget keeps (about)."""
    return budget * classes if isinstance(budget, int) else max(1, round(budget * pool))


class Selector:
    """Writes the selected training rows of each (budget, seed), embedding each pool text once."""

    def __init__(self, recipe: Recipe, study_dir: Path):
        self.recipe, self.folder = recipe, study_dir / "selected"
        self.data_cfg = LabelledDataConfig(**{**recipe.data, "budget": None})
        if self.data_cfg.text_pair:
            raise RecipeError("study key 'selection': selecting sentence pairs is not supported; use a single text column")
        self.cache: dict[str, torch.Tensor] = {}
        self.encoder: Any = None

    def overrides(self, budget: float | int, seed: int) -> tuple[str, ...]:
        """The data overrides of the selection cell at (budget, seed); writes its files once."""
        folder = self.folder / f"budget-{budget}_seed-{seed}"
        data = build_labelled(self.data_cfg, "single", seed)
        if not (folder / "train.csv").is_file():
            texts = list(data.train[self.data_cfg.text])
            n = picks(budget, len(data.label_names), len(texts))
            if n >= len(texts):
                raise RecipeError(f"study key 'budgets': {budget} labels the whole pool; no selection to make")
            from pretune.select import typiclust

            chosen = [row for row, _ in typiclust(self.embed(texts), n, seed)]
            folder.mkdir(parents=True, exist_ok=True)
            self._write(folder / "validation.csv", data.validation, data.label_names, None)
            self._write(folder / "train.csv", data.train, data.label_names, chosen)
        names = ",".join(json.dumps(n) for n in data.label_names)  # JSON strings are YAML strings: "1" stays a string
        return (f"data.train={folder / 'train.csv'}", f"data.validation={folder / 'validation.csv'}", "data.budget=null",
                f"data.labels=[{names}]", f"data.text={self.data_cfg.text}", f"data.label={self.data_cfg.label}")

    def whole_pool(self, budget: float | int, seed: int) -> bool:
        data = build_labelled(self.data_cfg, "single", seed)
        return picks(budget, len(data.label_names), len(data.train)) >= len(data.train)

    def embed(self, texts: list[str]) -> torch.Tensor:
        """Mean-pooled embeddings of ``texts`` by the pretrained model (as ``pretune select``), cached per text."""
        new = [t for t in dict.fromkeys(texts) if t not in self.cache]
        if new:
            from pretune.select import text_encoder
            from pretune.tasks.common import mean_pooled

            if self.encoder is None:
                self.encoder = text_encoder(self.recipe.backbone["path"])
            vectors = mean_pooled(*self.encoder, new, torch.device("cpu"), self.data_cfg.max_length, 64)
            self.cache.update(zip(new, vectors))
        return torch.stack([self.cache[t] for t in texts])

    def _write(self, path: Path, rows: Any, names: list[str], keep: list[int] | None) -> None:
        if rows is None:
            raise RecipeError("study key 'selection': needs validation rows (data.validation, or a training file large enough to hold some out)")
        texts, labels = rows[self.data_cfg.text], rows["labels"]
        order = keep if keep is not None else range(len(texts))
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow([self.data_cfg.text, self.data_cfg.label])
            writer.writerows((texts[i], names[labels[i]]) for i in order)

