"""Masked language modelling (BERT), optionally with next-sentence prediction.

Devlin et al. 2019, "BERT: Pre-training of Deep Bidirectional Transformers", section 3.1:
a fraction ``mask_prob`` (15%) of the non-special tokens is selected; of those, 80% are replaced
by ``[MASK]``, 10% by a random token and 10% are kept unchanged.  The loss is the cross-entropy
of the original token, **only at selected positions**:

    L_MLM = - sum_{i in selected} log p(x_i | x_masked)

The vocabulary projection is applied only to the hidden states of selected positions (about 15%
of them), not to every position as ``BertForMaskedLM.forward`` does: same loss, ~6x less work in
the output layer; in training, BERT's decoder and the loss are one chunked ``linear_cross_entropy``.
With ``whole_word: true`` a word's pieces are selected together.

Next-sentence prediction (``nsp: true``): inputs are ``[CLS] A [SEP] B [SEP]`` pairs where B is
the true continuation of A half of the time (label 0) and a random segment otherwise (label 1);
a binary head on the pooled ``[CLS]`` output adds ``L_NSP`` (cross-entropy per pair), so that
``L = L_MLM / #selected + L_NSP / #pairs`` as in BERT.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn
from transformers import AutoModelForMaskedLM, BertForPreTraining
from transformers.models.bert.modeling_bert import BertLMPredictionHead

from pretune.backbones.transformers import HF
from pretune.data.readers import RunData
from pretune.errors import CheckpointError, RecipeError
from pretune.recipe import Section
from pretune.registry import TASKS
from pretune.tasks.common import ContinuedLM, DownstreamConfig, downstream_probe, save_hf, stack_rows
from pretune.trainer.flops import transformer_training_flops
from pretune.trainer.linear_ce import linear_cross_entropy

IGNORE = -100


class MLMConfig(Section):
    name: Literal["mlm"] = "mlm"
    monitor: DownstreamConfig | None = None  # k-NN accuracy of the features on a small labelled set, at every evaluation
    mask_prob: float = Field(0.15, gt=0, lt=1)
    replace_mask: float = Field(0.8, ge=0, le=1)  # of the selected tokens: share replaced by [MASK]
    replace_random: float = Field(0.1, ge=0, le=1)  # share replaced by a random token; the rest is kept
    whole_word: bool = False
    nsp: bool = False
    head_warmup: int = Field(0, ge=0)  # continuing a checkpoint without an MLM head: steps that train only the new head

    @model_validator(mode="after")
    def _shares(self) -> "MLMConfig":
        if self.replace_mask + self.replace_random > 1:
            raise ValueError("replace_mask + replace_random must be at most 1")
        return self


def mask_tokens(
    input_ids: torch.Tensor,
    generator: torch.Generator,
    cfg: MLMConfig,
    *,
    mask_id: int,
    vocab_size: int,
    special: torch.Tensor,
    continuation: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Corrupt one sequence for MLM; returns ``(corrupted_ids, labels)``.

    ``special[v]`` is True for token ids never to select ([CLS], [SEP], [PAD]...);
    ``continuation[v]`` is True for word pieces that continue a word (``##ing``), used by
    whole-word masking so that a word is selected or not as a unit.  ``labels`` holds the
    original id at selected positions and -100 elsewhere.
    """
    candidates = ~special[input_ids]
    if cfg.whole_word and continuation is not None:
        starts = ~continuation[input_ids] | ~candidates
        word = torch.cumsum(starts.long(), 0) - 1  # word index of every position
        selected = (torch.rand(int(word[-1]) + 1, generator=generator) < cfg.mask_prob)[word]
    else:
        selected = torch.rand(input_ids.shape, generator=generator) < cfg.mask_prob
    selected &= candidates
    labels = torch.where(selected, input_ids, IGNORE)
    action = torch.rand(input_ids.shape, generator=generator)
    to_mask = selected & (action < cfg.replace_mask)
    to_random = selected & (action >= cfg.replace_mask) & (action < cfg.replace_mask + cfg.replace_random)
    random_ids = torch.randint(vocab_size, input_ids.shape, generator=generator)
    corrupted = torch.where(to_mask, mask_id, input_ids)
    corrupted = torch.where(to_random, random_ids, corrupted)
    return corrupted, labels


def mlm_head(model: nn.Module) -> nn.Module:
    """The module mapping hidden states to vocabulary logits, for the known encoder families."""
    cls = getattr(model, "cls", None)
    if cls is not None and hasattr(cls, "predictions"):  # BERT
        return cls.predictions
    if hasattr(model, "lm_head"):  # RoBERTa, XLM-R, ModernBERT, ...
        return model.lm_head
    raise CheckpointError(f"{type(model).__name__}: no masked-LM head found (expected .cls.predictions or .lm_head)")


class MaskedLM(nn.Module):
    """An encoder with its MLM head (and NSP head); ``forward`` returns summed losses."""

    def __init__(self, model: nn.Module, nsp: bool):
        super().__init__()
        self.model = model
        self.nsp = nsp
        self.head = mlm_head(model)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = self.model.base_model(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            token_type_ids=batch.get("token_type_ids"),
        )
        labels = batch["labels"]
        selected = labels != IGNORE
        hidden, targets = out.last_hidden_state[selected], labels[selected]
        if self.training and type(self.head) is BertLMPredictionHead and type(self.head.decoder) is nn.Linear:
            # its forward is decoder(transform(h)): chunked, without the [selected, vocab] fp32 logits
            decoder = self.head.decoder
            loss, correct = linear_cross_entropy(self.head.transform(hidden), decoder.weight, decoder.bias, targets,
                                                 with_correct=True)
            result = {"mlm": loss, "mlm_correct": correct}
        else:  # evaluation, and heads with no transform to call (RoBERTa's: dense, gelu, norm, decoder inline)
            logits = self.head(hidden).float()
            result = {
                "mlm": F.cross_entropy(logits, targets, reduction="sum"),
                "mlm_correct": (logits.argmax(-1) == targets).sum(),
            }
        if self.nsp:
            nsp_logits = self.model.cls.seq_relationship(out.pooler_output).float()
            nsp_labels = batch["next_sentence_label"]
            result["nsp"] = F.cross_entropy(nsp_logits, nsp_labels, reduction="sum")
            result["nsp_correct"] = (nsp_logits.argmax(-1) == nsp_labels).sum()
        return result


@TASKS.register("mlm")
class MaskedLMTask(ContinuedLM):
    Config = MLMConfig
    family = "encoder"
    perplexity = ("mlm",)

    def __init__(self, cfg: MLMConfig, seed: int = 0):
        super().__init__(cfg, seed)
        self.losses = ("mlm", "nsp") if cfg.nsp else ("mlm",)
        self.pairs = cfg.nsp  # the reader builds [CLS] A [SEP] B [SEP] sentence pairs

    def _prepare(self, tokenizer: Any) -> None:
        if tokenizer.mask_token_id is None:
            raise RecipeError("the tokenizer has no [MASK] token; MLM needs one (train a wordpiece tokenizer or give another)")
        self.mask_id = tokenizer.mask_token_id
        self.vocab_size = len(tokenizer)
        self.special = torch.zeros(self.vocab_size, dtype=torch.bool)
        self.special[tokenizer.all_special_ids] = True
        self.continuation = None
        if self.cfg.whole_word:
            pieces = tokenizer.convert_ids_to_tokens(list(range(self.vocab_size)))
            self.continuation = torch.tensor([p.startswith("##") for p in pieces])

    def build(self, backbone: HF, data: RunData) -> MaskedLM:
        if self.cfg.nsp and not backbone.path and backbone.cfg.name != "bert":
            raise RecipeError("recipe key 'task.nsp': next-sentence prediction needs a BERT backbone")
        self._prepare(data.tokenizer)
        model = MaskedLM(backbone.model(BertForPreTraining if self.cfg.nsp else AutoModelForMaskedLM, data), nsp=self.cfg.nsp)
        self.continue_from(backbone)
        self.watch_ranking(data)
        return model

    def collate(self, rows: dict[str, list], seeds: list[int]) -> dict[str, torch.Tensor]:
        batch = stack_rows(rows)
        corrupted, labels = [], []
        for ids, seed in zip(batch["input_ids"], seeds):
            ids_masked, ids_labels = mask_tokens(
                ids, torch.Generator().manual_seed(seed), self.cfg, mask_id=self.mask_id,
                vocab_size=self.vocab_size, special=self.special, continuation=self.continuation,
            )
            corrupted.append(ids_masked)
            labels.append(ids_labels)
        batch["input_ids"] = torch.stack(corrupted)
        batch["labels"] = torch.stack(labels)
        return batch

    def units(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        selected = (batch["labels"] != IGNORE).sum()
        units = {"mlm": selected, "mlm_correct": selected}
        if self.cfg.nsp:
            pairs = torch.tensor(batch["input_ids"].shape[0])
            units.update(nsp=pairs, nsp_correct=pairs)
        return units

    def tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["input_ids"].numel())

    def flops(self, module: MaskedLM, batch: dict[str, torch.Tensor]) -> float:
        ids = batch["input_ids"]
        return transformer_training_flops(module.model.config, ids.numel(), ids.shape[1], int((batch["labels"] != IGNORE).sum()),
                                          body=not self.head_only)

    def probe(self, module: MaskedLM, data: RunData, *, device: torch.device, precision: str, step: int,
              out_dir: Path | None) -> dict[str, float]:
        return downstream_probe(self, module, data, device)

    def save(self, module: MaskedLM, path: Path, data: RunData) -> None:
        save_hf(module.model, data.tokenizer, path, {**data.meta, "task": "mlm", "family": self.family, "nsp": self.cfg.nsp}, self.start)
