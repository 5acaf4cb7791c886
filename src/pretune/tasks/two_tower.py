"""Two-tower retrieval on interaction logs: a user tower and an item tower trained with in-batch negatives.

The **user tower** is a transformer encoder over the user's history (``[CLS] items [SEP]``, the
``[CLS]`` state); the **item tower** is the encoder's item embedding table, so the two share one
vocabulary and a model folder stays an ordinary Hugging Face ``AutoModel`` folder.  Each training row
is cut at a point drawn from its own seed: the items before the cut are the history, the item at the
cut is the positive.  The loss is InfoNCE (the SimCLR / SimCSE loss), every other row's positive item
in the (global, under DDP) batch being a negative, with Yi et al.'s (RecSys 2019) sampling-bias
correction: in-batch negatives are drawn by popularity, so without it the towers learn to push popular
items down, and a full ranking suffers.  With ``q_j`` the share of training events on item j:

    L = - sum_i log( exp(s_ii) / sum_j exp(s_ij) ),   s_ij = cos(u_i, v_j) / t - log q_j

A row whose positive is also another row's positive sees it as a negative once (the usual in-batch
false negative; with thousands of items and batches of 64 it is rare).  Retrieval scores every item
by ``cos(u, v_item) / t``: what validation ranks and ``predict --top-k`` returns.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from transformers import AutoModel

from pretune.backbones.transformers import HF
from pretune.data.interactions import PAD, SEP, SPECIALS
from pretune.data.readers import RunData
from pretune.errors import RecipeError
from pretune.recipe import Section
from pretune.registry import TASKS
from pretune.tasks.base import Task
from pretune.tasks.common import save_hf, stack_rows
from pretune.tasks.contrastive import _gather
from pretune.tasks.recommend import RANKING_K, rank_queries
from pretune.trainer.flops import transformer_training_flops


class TwoTowerConfig(Section):
    name: Literal["two-tower"] = "two-tower"
    temperature: float = Field(0.1, gt=0)
    min_history: int = Field(1, ge=1)  # items a cut leaves in the history at least


class ItemTower(nn.Module):
    """Hidden states -> cosine scores of every item (``/ temperature``): the head the ranking code calls."""

    def __init__(self, embeddings: nn.Embedding, temperature: float):
        super().__init__()
        self.embeddings, self.temperature = embeddings, temperature

    def forward(self, users: torch.Tensor) -> torch.Tensor:
        return F.normalize(users.float(), dim=-1) @ F.normalize(self.embeddings.weight.float(), dim=-1).T / self.temperature


def _gather_ids(ids: torch.Tensor) -> torch.Tensor:
    """Every rank's ``ids`` (no gradient), in rank order: the items of the global batch's negatives."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return ids
    parts = [torch.empty_like(ids) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, ids)
    return torch.cat(parts)


class TwoTower(nn.Module):
    def __init__(self, model: nn.Module, temperature: float):
        super().__init__()
        self.model, self.temperature = model, temperature
        self.head = ItemTower(model.get_input_embeddings(), temperature)
        # log q_j (training only; retrieval scores are the plain cosines); zeros: no correction.  Not saved:
        # it is a function of the training data, rebuilt by build() on a resume
        self.register_buffer("log_q", torch.zeros(model.get_input_embeddings().num_embeddings), persistent=False)

    def users(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        users = F.normalize(self.users(batch["input_ids"], batch["attention_mask"]).float(), dim=1)
        items = F.normalize(self.model.get_input_embeddings()(batch["positive"]).float(), dim=1)
        keys, offset = _gather(items)
        logits = users @ keys.T / self.temperature - self.log_q[_gather_ids(batch["positive"])]
        positive = torch.arange(len(users), device=users.device) + offset
        return {"contrastive": F.cross_entropy(logits, positive, reduction="sum"),
                "contrastive_correct": (logits.argmax(1) == positive).sum()}


@TASKS.register("two-tower")
class TwoTowerTask(Task):
    """User and item towers with in-batch negatives (``backbone: bert4rec``)."""

    Config = TwoTowerConfig
    modalities = ("interactions",)
    family = "encoder"
    losses = ("contrastive",)

    def build(self, backbone: HF, data: RunData) -> TwoTower:
        if backbone.text_family != "encoder":
            raise RecipeError("recipe key 'backbone.name': the two-tower user tower is an encoder (bert4rec), not a decoder")
        self.start = None
        if data.extra.get("ranking", {}).get("validation"):
            self.monitor = (f"ndcg@{RANKING_K}", "max")
        model = TwoTower(backbone.model(AutoModel, data), self.cfg.temperature)
        ids = torch.tensor(data.train["input_ids"])
        counts = torch.bincount(ids[ids >= len(SPECIALS)], minlength=model.log_q.numel()).double()
        model.log_q.copy_((counts / counts.sum()).clamp_min(1e-12).log().float())  # the sampling-bias correction
        return model

    def collate(self, rows: dict[str, list], seeds: list[int]) -> dict[str, torch.Tensor]:
        """Cut each ``[CLS] items [SEP]`` row at a point drawn from its seed: the history before it, the item at it."""
        batch = stack_rows(rows)
        ids, mask = batch["input_ids"].clone(), batch["attention_mask"].clone()
        positive = torch.empty(len(ids), dtype=torch.long)
        for row, seed in enumerate(seeds):
            items = int(mask[row].sum()) - 2  # item k of the row sits at position k ([CLS] is position 0)
            earliest = min(1 + self.cfg.min_history, items)  # a one-item row has no history: [CLS] [SEP] -> its item
            cut = int(torch.randint(earliest, items + 1, (1,), generator=torch.Generator().manual_seed(seed)))
            positive[row] = ids[row, cut]
            ids[row, cut] = SEP
            ids[row, cut + 1:] = PAD
            mask[row, cut + 1:] = 0
        return {"input_ids": ids, "attention_mask": mask, "positive": positive}

    def units(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        n = torch.tensor(float(len(batch["input_ids"])))
        return {"contrastive": n, "contrastive_correct": n}

    def tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["attention_mask"].sum())

    def flops(self, module: TwoTower, batch: dict[str, torch.Tensor]) -> float:
        ids = batch["input_ids"]
        return transformer_training_flops(module.model.config, ids.numel(), ids.shape[1], 0)

    def probe(self, module: TwoTower, data: RunData, *, device: torch.device, precision: str, step: int,
              out_dir: Path | None) -> dict[str, float]:
        queries = data.extra.get("ranking", {}).get("validation")
        if not queries:
            return {}
        return rank_queries(module.model, module.head, queries.histories, queries.targets, family="tower",
                            max_length=data.meta["interactions"]["max_length"], device=device)

    def save(self, module: TwoTower, path: Path, data: RunData) -> None:
        save_hf(module.model, data.tokenizer, path, {**data.meta, "task": "two-tower", "family": self.family,
                                                     "temperature": self.cfg.temperature}, None)

