"""Cached features for linear probes: run the frozen backbone once, train the head many times.

With a frozen backbone in eval mode nothing stochastic runs before the head, so the backbone's
output for an example is the same at every epoch.  We encode the train and validation sets once
(the representation the head reads: the ``[CLS]`` state for encoders, the last real token for
decoders) and replay only the head on it.  ``head_logits(model, features)`` must equal
``model(**inputs).logits``; a test checks it for every supported family.
"""

from __future__ import annotations

from typing import Any

import datasets
import torch
from torch import nn
from tqdm.auto import tqdm

from pretune.trainer.precision import autocast


def _family(model: nn.Module) -> str | None:
    name = type(model).__name__
    if name in ("BertForSequenceClassification", "RobertaForSequenceClassification", "XLMRobertaForSequenceClassification",
                "DistilBertForSequenceClassification", "CamembertForSequenceClassification", "ElectraForSequenceClassification"):
        return "encoder"
    if name in ("GPT2ForSequenceClassification", "LlamaForSequenceClassification", "MistralForSequenceClassification",
                "Qwen2ForSequenceClassification"):
        return "decoder"
    return None


def supports_cache(model: nn.Module) -> bool:
    return _family(model) is not None


def head_logits(model: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """The logits the model's own head computes from the cached representation ``features`` [B, H]."""
    if hasattr(model, "head_logits"):  # image / vector classifiers
        return model.head_logits(features)
    name = type(model).__name__
    states = features.unsqueeze(1)  # a sequence of length 1: heads that read position 0 read it
    if name == "BertForSequenceClassification":
        pooled = model.bert.pooler(states) if model.bert.pooler is not None else features
        return model.classifier(model.dropout(pooled))
    if name == "DistilBertForSequenceClassification":
        hidden = torch.relu(model.pre_classifier(features))
        return model.classifier(model.dropout(hidden))
    if name == "ElectraForSequenceClassification":
        return model.classifier(states)
    if _family(model) == "encoder":  # RoBERTa-style heads take the whole sequence and read [:, 0]
        return model.classifier(states)
    return model.score(features)


def last_token(input_ids: torch.Tensor, pad_id: int | None) -> torch.Tensor:
    """The rightmost non-pad position of each row: where Hugging Face decoder classifiers read."""
    if pad_id is None:
        return torch.full((len(input_ids),), input_ids.shape[1] - 1, device=input_ids.device)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    return (positions * (input_ids != pad_id)).argmax(-1)


@torch.no_grad()
def encode(model: nn.Module, task: Any, dataset: datasets.Dataset, device: torch.device, precision: str, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The representation the head reads, for every row of ``dataset`` (backbone in eval mode)."""
    base = model.base_model
    was_training = base.training
    base.eval()
    out, lengths = [], []
    text, pair = task.data_cfg.text, task.data_cfg.text_pair
    for start in tqdm(range(0, len(dataset), batch_size), desc="encoding once (frozen backbone)", leave=False, mininterval=5):
        rows = dataset[start:start + batch_size]
        batch = {k: v.to(device) for k, v in task.encode(rows[text], rows[pair] if pair else None).items()}
        with autocast(precision, device):
            hidden = base(**batch).last_hidden_state
        if _family(model) == "decoder":
            hidden = hidden[torch.arange(len(hidden), device=device), last_token(batch["input_ids"], model.config.pad_token_id)]
        else:
            hidden = hidden[:, 0]
        out.append(hidden.float().cpu())
        lengths.append(batch["attention_mask"].sum(-1).cpu())
    base.train(was_training)
    return torch.cat(out), torch.cat(lengths)


def cache_features(model: nn.Module, task: Any, splits: dict[str, datasets.Dataset | None], device: torch.device, precision: str) -> dict:
    if not supports_cache(model):
        return {}
    model.to(device)
    cached = {}
    for name, dataset in splits.items():
        if dataset is None:
            continue
        features, lengths = encode(model, task, dataset, device, precision)
        # "tokens": the text length each feature stands for, so throughput is still reported in tokens
        cached[name] = datasets.Dataset.from_dict({"features": features.numpy(), "tokens": lengths.numpy(),
                                                   "labels": list(dataset["labels"])})
    return cached
