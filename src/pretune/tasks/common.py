"""Pieces shared by the text pretraining tasks (MLM, CLM, SimCSE)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from pydantic import Field

from pretune.backbones.start import Start, save_continued
from pretune.errors import DataError
from pretune.recipe import Section
from pretune.tasks.base import Task
from pretune.tasks.recommend import RANKING_K, rank_queries



INTEGER_COLUMNS = ("input_ids", "attention_mask", "token_type_ids", "next_sentence_label")


def stack_rows(rows: dict[str, list]) -> dict[str, torch.Tensor]:
    """Columnar rows (``dataset[indices]``) -> a dict of long tensors for the known columns."""
    return {key: torch.tensor(rows[key], dtype=torch.long) for key in INTEGER_COLUMNS if key in rows}


def save_hf(model: Any, tokenizer: Any, path: Path, meta: dict[str, Any], start: Start | None = None) -> None:
    """Write a standard Hugging Face folder (safetensors) plus pretune's own ``pretune.json``; a model continued
    from a checkpoint (``start``) also keeps the checkpoint's tensors and files its objective did not use."""
    save_continued(model, tokenizer, path, start)
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
                batch_size: int = 64, progress: str | None = None) -> torch.Tensor:
    """``[N, hidden]`` float32 on the CPU: the mean of ``base``'s last hidden states over each text's real tokens
    (the pooling of sentence-transformers); what the k-NN monitor and ``pretune select`` embed with.
    ``progress``: the description of a progress bar over the batches (none by default)."""
    out = []
    starts = range(0, len(texts), batch_size)
    for start in tqdm(starts, desc=progress, unit="batch", disable=progress is None or len(starts) < 2):
        batch = tokenizer([str(t) for t in texts[start:start + batch_size]], padding=True, truncation=True, max_length=max_length,
                          return_tensors="pt")
        mask = batch["attention_mask"].to(device)
        hidden = base(input_ids=batch["input_ids"].to(device), attention_mask=mask).last_hidden_state.float()
        out.append(((hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)).cpu())
    return torch.cat(out) if out else torch.zeros(0, 1)


def downstream_probe(task: Any, module: Any, data: Any, device: torch.device) -> dict[str, float]:
    """A text pretraining task's ``probe``: the k-NN monitor when ``task.monitor`` names a labelled set, and
    next-item ranking (HR@K, NDCG@K, MRR over all items) when the data is an interaction log."""
    queries = data.extra.get("ranking", {}).get("validation")
    out = {}
    if queries:
        out.update(rank_queries(module.model.base_model, module.head, queries.histories, queries.targets, family=task.family,
                                max_length=data.meta["interactions"]["max_length"], device=device))
    if task.cfg.monitor is None:
        return out
    if getattr(task, "downstream", None) is None:
        task.downstream = Downstream(task.cfg.monitor, task.seed)
    return {**out, **task.downstream(module.model, data.tokenizer, device)}


def warm_head(task: Any, module: Any, step: int) -> str | None:
    """A text pretraining task's ``on_step``: ``task.head_warmup`` steps in which only the parameters the starting
    checkpoint lacked (the MLM head a sentence-transformers folder has not) train, the rest frozen; then everything.

    A new head is random: its first gradients would pull the pretrained encoder towards noise, and its masked-token
    accuracy says nothing about the encoder.  Trained alone first (as linear probing before fine-tuning, Kumar et al.
    2022), it reads the original encoder, and the evaluation at the end of the warm-up is the starting model's
    baseline for the forgetting report."""
    if not task.warmup_steps:
        return None
    head_only = step < task.warmup_steps
    if task.head_only == head_only:
        return None
    task.head_only = head_only
    new = {f"model.{name}" for name in task.start.new}
    for name, parameter in module.named_parameters():
        parameter.requires_grad_(not head_only or name in new)
    if head_only:
        return f"head warm-up: only the new parameters ({len(new)} tensors) train until step {task.warmup_steps}, the rest frozen"
    return f"head warm-up done at step {step}: every parameter trains"


def new_head_scales(task: Any) -> dict[str, float] | None:
    """A text pretraining task's ``lr_scales``: the parameters a continued checkpoint lacked (a new head) train at
    ``trainer.head_lr``; a random head learning at the small rate that suits the pretrained encoder would stay
    random for hundreds of steps, and the encoder would bend towards it meanwhile."""
    if task.start is None or not task.start.new or task.head_lr_scale == 1.0:
        return None
    return {f"model.{name}": task.head_lr_scale for name in task.start.new}


def warmup_steps(cfg: Any, start: Any) -> int:
    """``task.head_warmup`` when the starting checkpoint lacked some parameters (a new head), else 0."""
    return cfg.head_warmup if start is not None and start.new else 0


class ContinuedLM(Task):
    """Base of the language-modelling tasks (MLM, CLM) that may continue a checkpoint: after ``build`` calls
    :meth:`continue_from`, a new head warms up alone (``on_step``) at its own rate (``lr_scales``).  They also
    model item sequences (modality ``interactions``: BERT4Rec's masked items, SASRec's next item)."""

    modalities = ("text", "interactions")

    def watch_ranking(self, data: Any) -> None:
        """On an interaction log, validation ranks each user's next item, and the best checkpoint is the one
        with the highest NDCG@10 (the papers' model selection)."""
        if data.extra.get("ranking", {}).get("validation"):
            self.monitor = (f"ndcg@{RANKING_K}", "max")

    def continue_from(self, backbone: Any) -> None:
        """Record what the backbone's checkpoint lacked and keeps (``backbone.start``) and the head warm-up it needs."""
        self.start = backbone.start  # a continued checkpoint: what it keeps in the saved model (BERT's pooler...)
        self.warmup_steps = warmup_steps(self.cfg, self.start)

    def on_step(self, module: Any, step: int) -> str | None:
        return warm_head(self, module, step)

    def lr_scales(self, module: Any) -> dict[str, float] | None:
        return new_head_scales(self)
