"""``pretune demo``: pretrain a tiny BERT on the embedded corpus and show what it learned.

The corpus is the docstrings of Python's standard library (PSF licence, shipped with pretune as a
snapshot; see ``pretune.data.builtin``), so the demo needs no download and runs anywhere.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pretune.recipe import load_recipe
from pretune.run import train

PROBES = [
    "Return a new [MASK] with the same elements.",
    "Raise a [MASK] if the file does not exist.",
    "The default [MASK] is None.",
]


def demo_recipe(run_dir: str, steps: int | None):
    overrides = [
        f"run_dir={run_dir}", "task=mlm", "backbone.name=bert", "backbone.size=tiny",
        # no dropout: a 1.3M-parameter model on 2.9k blocks underfits, and dropout slows it further
        "backbone.config.hidden_dropout_prob=0.0", "backbone.config.attention_probs_dropout_prob=0.0",
        "data.block_size=128", "data.validation=0.05", "data.tokenizer.vocab_size=4000", "data.tokenizer.lowercase=true",
        "trainer.lr=2e-3", "trainer.batch_size=32", "trainer.warmup=0.1", "trainer.eval_every=200",
        "trainer.eval_batches=20", "trainer.save_every=200", "trainer.log_every=10",
    ]
    overrides.append(f"trainer.max_steps={steps}" if steps else "trainer.epochs=12")
    return load_recipe(None, overrides)


def run_demo(run_dir: str = "runs/demo", steps: int | None = None) -> dict:
    recipe = demo_recipe(run_dir, steps)
    print("pretune demo: masked-LM pretraining of a tiny BERT on Python standard-library docstrings (embedded, PSF licence)")
    result = train(recipe, overwrite=True)
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["split"] == "validation"]
    train_rows = [r for r in rows if r["split"] == "train"]
    before, after = evals[0], evals[-1]
    print("\nsummary")
    picks = train_rows[:: max(1, len(train_rows) // 6)] + train_rows[-1:]
    print("  train loss:   " + "  ".join(f"step {r['step']}: {r['loss']:.2f}" for r in picks))
    print(f"  validation:   perplexity {before['mlm_perplexity']:.1f} -> {after['mlm_perplexity']:.1f}, "
          f"masked-token accuracy {before['mlm_accuracy']:.1%} -> {after['mlm_accuracy']:.1%}")
    print(f"  throughput:   {train_rows[-1]['tokens_per_s']:.0f} tokens/s, MFU {train_rows[-1]['mfu']:.1%}")
    print(f"  model:        {result.model_dir} (loads with transformers.AutoModelForMaskedLM.from_pretrained)")
    for text, guesses in fill_mask(result.model_dir, PROBES):
        print(f"  fill-mask:    {text!r} -> {', '.join(guesses)}")
    return {"before": before, "after": after, "model_dir": str(result.model_dir)}


def fill_mask(model_dir: Path, texts: list[str], top: int = 3) -> list[tuple[str, list[str]]]:
    """Top guesses for each ``[MASK]``, through plain ``transformers`` loading of the saved folder."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForMaskedLM.from_pretrained(str(model_dir)).eval()
    results = []
    for text in texts:
        encoded = tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            logits = model(**encoded).logits[0]
        position = (encoded["input_ids"][0] == tokenizer.mask_token_id).nonzero()[0, 0]
        ids = logits[position].topk(top).indices.tolist()
        results.append((text, tokenizer.convert_ids_to_tokens(ids)))
    return results
