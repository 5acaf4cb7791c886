"""Pieces shared by the text pretraining tasks (MLM, CLM, SimCSE)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import transformers



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
