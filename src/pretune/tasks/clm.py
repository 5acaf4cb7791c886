"""Causal (next-token) language modelling, GPT-style.

Radford et al. 2018/2019: a decoder with causal self-attention predicts every token from the
ones before it.  On a packed block ``x_1..x_T`` (documents joined by ``<eos>``):

    L_CLM = - sum_{t=1}^{T-1} log p(x_{t+1} | x_1..x_t)

Validation reports the mean token loss and the perplexity ``exp(L_CLM / (T-1))``.

Rows that carry an ``attention_mask`` (item histories: one user per row, right-padded) are not
packed: padding is masked out of attention and no loss is taken where the target is padding.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from transformers import AutoModelForCausalLM

from pretune.backbones.transformers import HF
from pretune.data.readers import RunData
from pretune.errors import RecipeError
from pretune.recipe import Section
from pretune.registry import TASKS
from pretune.heads import IGNORE
from pretune.tasks.common import ContinuedLM, DownstreamConfig, downstream_probe, save_hf, stack_rows
from pretune.trainer.flops import transformer_training_flops
from pretune.trainer.linear_ce import linear_cross_entropy


class CLMConfig(Section):
    name: Literal["clm"] = "clm"
    monitor: DownstreamConfig | None = None  # k-NN accuracy of the features on a small labelled set, at every evaluation
    head_warmup: int = Field(0, ge=0)  # continuing a checkpoint without an LM head: steps that train only the new head


class CausalLM(nn.Module):
    """A decoder with its language-modelling head; ``forward`` returns summed token losses.

    In training the head (an ``nn.Linear``, often tied to the input embedding) and the loss are one
    chunked ``linear_cross_entropy``; evaluation keeps the full logits for the argmax accuracy."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.head = model.get_output_embeddings()

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        input_ids, mask = batch["input_ids"], batch.get("attention_mask")
        hidden = self.model.base_model(input_ids=input_ids[:, :-1],
                                       attention_mask=None if mask is None else mask[:, :-1]).last_hidden_state.flatten(0, 1)
        targets = input_ids[:, 1:] if mask is None else input_ids[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE)
        targets = targets.flatten()
        if self.training and type(self.head) is nn.Linear:  # chunked: never the [tokens, vocab] fp32 logits
            return {"clm": linear_cross_entropy(hidden, self.head.weight, self.head.bias, targets)}
        logits = self.head(hidden).float()
        out = {"clm": F.cross_entropy(logits, targets, reduction="sum", ignore_index=IGNORE)}
        if not self.training:  # next-token accuracy for validation only: an argmax over the whole vocabulary
            out["clm_correct"] = (logits.argmax(-1) == targets).sum()  # at every position costs ~1.5% of a step
        return out


@TASKS.register("clm")
class CausalLMTask(ContinuedLM):
    Config = CLMConfig
    family = "decoder"
    losses = ("clm",)
    perplexity = ("clm",)

    def build(self, backbone: HF, data: RunData) -> CausalLM:
        if not backbone.path and backbone.text_family == "encoder":
            raise RecipeError(f"recipe key 'backbone.name': causal LM needs a decoder (gpt2, llama or sasrec), not {backbone.cfg.name}")
        model = CausalLM(backbone.model(AutoModelForCausalLM, data))
        self.continue_from(backbone)
        self.watch_ranking(data)
        return model

    def collate(self, rows: dict[str, list], seeds: list[int]) -> dict[str, torch.Tensor]:
        return stack_rows(rows)

    def units(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        batch_size, length = batch["input_ids"].shape
        mask = batch.get("attention_mask")
        tokens = torch.tensor(batch_size * (length - 1)) if mask is None else mask[:, 1:].sum()
        return {"clm": tokens, "clm_correct": tokens}

    def tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["input_ids"].numel())

    def flops(self, module: CausalLM, batch: dict[str, torch.Tensor]) -> float:
        ids = batch["input_ids"]
        predicted = ids.shape[0] * (ids.shape[1] - 1)
        return transformer_training_flops(module.model.config, predicted, ids.shape[1] - 1, predicted, body=not self.head_only)

    def probe(self, module: CausalLM, data: RunData, *, device: torch.device, precision: str, step: int,
              out_dir: Path | None) -> dict[str, float]:
        return downstream_probe(self, module, data, device)

    def save(self, module: CausalLM, path: Path, data: RunData) -> None:
        save_hf(module.model, data.tokenizer, path, {**data.meta, "task": "clm", "family": self.family}, self.start)
