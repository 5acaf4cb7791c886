"""Pieces shared by the language-modelling tasks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import transformers

from pretune.data.text import TextData, build_text_data
from pretune.recipe import DataConfig


INTEGER_COLUMNS = ("input_ids", "attention_mask", "token_type_ids", "next_sentence_label")


def stack_rows(rows: dict[str, list]) -> dict[str, torch.Tensor]:
    """Columnar rows (``dataset[indices]``) -> a dict of long tensors for the known columns."""
    return {key: torch.tensor(rows[key], dtype=torch.long) for key in INTEGER_COLUMNS if key in rows}


def text_data(data_cfg: DataConfig, *, family: str, nsp: bool, seed: int, tokenizer_path: str | None) -> TextData:
    if tokenizer_path:  # resuming or continuing: reuse the saved tokenizer
        data_cfg = data_cfg.model_copy(update={"tokenizer": data_cfg.tokenizer.model_copy(update={"path": tokenizer_path})})
    return build_text_data(data_cfg, family=family, nsp=nsp, seed=seed)


def special_ids(tokenizer: Any) -> dict[str, int]:
    ids = {
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    return {key: value for key, value in ids.items() if value is not None}


def save_hf(model: Any, tokenizer: Any, path: Path, meta: dict[str, Any]) -> None:
    """Write a standard Hugging Face folder (safetensors) plus pretune's own ``pretune.json``."""
    transformers.utils.logging.disable_progress_bar()  # no "Writing model shards" bar at every checkpoint
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "pretune.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
