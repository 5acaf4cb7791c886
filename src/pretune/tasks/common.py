"""Pieces shared by the text pretraining tasks (MLM, CLM, SimCSE)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import transformers
from pydantic import Field

from pretune.errors import DataError
from pretune.recipe import Section



INTEGER_COLUMNS = ("input_ids", "attention_mask", "token_type_ids", "next_sentence_label")


def stack_rows(rows: dict[str, list]) -> dict[str, torch.Tensor]:
    """Columnar rows (``dataset[indices]``) -> a dict of long tensors for the known columns."""
    return {key: torch.tensor(rows[key], dtype=torch.long) for key in INTEGER_COLUMNS if key in rows}


def save_hf(model: Any, tokenizer: Any, path: Path, meta: dict[str, Any]) -> None:
    """Write a standard Hugging Face folder (safetensors) plus pretune's own ``pretune.json``."""
    transformers.utils.logging.disable_progress_bar()  # no "Writing model shards" bar at every checkpoint
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "pretune.json").write_text(json.dumps(meta, indent=2, sort_keys=True))


class DownstreamConfig(Section):
    """``task.monitor``: how good the features are for a task, while pretraining: k-NN accuracy on a small
    labelled set (its ``validation_fraction`` queries against the rest), at every evaluation."""

    data: str  # a labelled CSV / JSONL / Parquet file (the fine-tuning format)
    text: str = "text"
    label: str = "label"
    validation_fraction: float = Field(0.5, gt=0, lt=0.9)
    k: int = Field(20, ge=1)
    temperature: float = Field(0.1, gt=0)
    max_length: int = Field(128, ge=8)


class Downstream:
    """The k-NN monitor of a text pretraining run (``probe_knn_accuracy`` in the validation rows): the
    labelled set is read and tokenised once; at each evaluation both halves are encoded with the model's
    mean-pooled last hidden states and the queries are classified by their k nearest neighbours
    (weighted by similarity, as the image tasks' ``knn_accuracy``; Wu et al. 2018)."""

    def __init__(self, cfg: DownstreamConfig, seed: int):
        self.cfg, self.seed, self.data = cfg, seed, None

    @torch.no_grad()
    def __call__(self, model: Any, tokenizer: Any, device: torch.device) -> dict[str, float]:
        from pretune.data.labelled import LabelledDataConfig, build_labelled
        from pretune.evaluate.knn import knn_accuracy

        if self.data is None:
            read = LabelledDataConfig(train=self.cfg.data, text=self.cfg.text, label=self.cfg.label,
                                      validation_fraction=self.cfg.validation_fraction, max_length=self.cfg.max_length)
            self.data = build_labelled(read, "single", self.seed)
            if self.data.validation is None:
                raise DataError(f"task.monitor.data {self.cfg.data}: too few rows to hold any out for the k-NN monitor")
        base = model.base_model
        was_training = base.training
        base.eval()
        features = [self._encode(base, tokenizer, list(part[self.cfg.text]), device) for part in (self.data.train, self.data.validation)]
        base.train(was_training)
        accuracy = knn_accuracy(features[0], torch.tensor(self.data.train["labels"]), features[1],
                                torch.tensor(self.data.validation["labels"]), len(self.data.label_names), self.cfg.k,
                                self.cfg.temperature)
        return {"probe_knn_accuracy": accuracy}

    def _encode(self, base: Any, tokenizer: Any, texts: list[str], device: torch.device) -> torch.Tensor:
        return mean_pooled(base, tokenizer, texts, device, self.cfg.max_length)


@torch.no_grad()
def mean_pooled(base: Any, tokenizer: Any, texts: list[str], device: torch.device, max_length: int,
                batch_size: int = 64) -> torch.Tensor:
    """``[N, hidden]`` float32 on the CPU: the mean of ``base``'s last hidden states over each text's real tokens
    (the pooling of sentence-transformers); what the k-NN monitor and ``pretune select`` embed with."""
    out = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer([str(t) for t in texts[start:start + batch_size]], padding=True, truncation=True, max_length=max_length,
                          return_tensors="pt")
        mask = batch["attention_mask"].to(device)
        hidden = base(input_ids=batch["input_ids"].to(device), attention_mask=mask).last_hidden_state.float()
        out.append(((hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)).cpu())
    return torch.cat(out) if out else torch.zeros(0, 1)


def downstream_probe(task: Any, module: Any, data: Any, device: torch.device) -> dict[str, float]:
    """A text pretraining task's ``probe``: the k-NN monitor when ``task.monitor`` names a labelled set."""
    if task.cfg.monitor is None:
        return {}
    if getattr(task, "downstream", None) is None:
        task.downstream = Downstream(task.cfg.monitor, task.seed)
    return task.downstream(module.model, data.tokenizer, device)
