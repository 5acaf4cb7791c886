"""Each pretraining journey end to end on a tiny model, in-process."""

import json

import pytest
import torch
import transformers

from pretune.cli import main
from tests.integration.helpers import TINY


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("recipe, auto_class, extra", [
    ("recipes/text-mlm.yaml", transformers.AutoModelForMaskedLM, []),
    ("recipes/text-mlm-nsp.yaml", transformers.AutoModelForMaskedLM, ["data.block_size=48"]),
    ("recipes/text-clm.yaml", transformers.AutoModelForCausalLM, []),
    ("recipes/text-clm.yaml", transformers.AutoModelForCausalLM, ["backbone.name=llama"]),
])
def test_pretrain_saves_a_hugging_face_model_and_learns(tmp_path, recipe, auto_class, extra):
    run_dir = tmp_path / "run"
    code = main(["pretrain", recipe, f"run_dir={run_dir}", *TINY, "trainer.max_steps=30", "trainer.lr=1e-2",
                 "trainer.warmup=0", "trainer.eval_every=10", "trainer.eval_batches=4", *extra])
    assert code == 0
    model = auto_class.from_pretrained(run_dir / "model")
    tokenizer = transformers.AutoTokenizer.from_pretrained(run_dir / "model")
    assert model.config.vocab_size >= len(tokenizer)
    evals = [r for r in rows(run_dir) if r["split"] == "validation"]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 30
    assert evals[-1]["loss"] < evals[0]["loss"] - 0.15  # it learned something (a 30-step nano model: the unigram)
    assert (run_dir / "recipe.yaml").is_file()
    for r in rows(run_dir):
        if r["split"] == "train":
            assert r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1


def test_existing_run_dir_is_not_overwritten(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["pretrain", "recipes/text-mlm.yaml", f"run_dir={run_dir}", *TINY, "trainer.max_steps=2"]) == 0
    before = (run_dir / "model" / "model.safetensors").read_bytes()
    assert main(["pretrain", "recipes/text-mlm.yaml", f"run_dir={run_dir}", *TINY, "trainer.max_steps=2"]) == 5
    assert "already holds a run" in capsys.readouterr().err
    assert (run_dir / "model" / "model.safetensors").read_bytes() == before


def test_bad_input_is_one_line(tmp_path, capsys):
    code = main(["pretrain", "recipes/text-mlm.yaml", f"run_dir={tmp_path / 'r'}", "data.files=" + str(tmp_path / "none*.txt")])
    err = capsys.readouterr().err.strip()
    assert code == 4 and err.count("\n") == 0 and "none*.txt" in err
    code = main(["pretrain", "recipes/text-mlm.yaml", "trainer.lr=zero"])
    err = capsys.readouterr().err.strip()
    assert code == 3 and "trainer.lr" in err and err.count("\n") == 0


def test_checkpoints_load_weights_only_and_keep_last(tmp_path):
    run_dir = tmp_path / "run"
    assert main(["pretrain", "recipes/text-mlm.yaml", f"run_dir={run_dir}", *TINY, "trainer.max_steps=8",
                 "trainer.save_every=2", "trainer.keep_last=2"]) == 0
    found = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert found == ["step-00000006", "step-00000008"]
    state = torch.load(run_dir / "checkpoints" / "step-00000008" / "state.pt", weights_only=True)
    assert state["progress"]["step"] == 8


def test_a_causal_lm_generates_text_through_pretune_load(tiny_decoder):
    import pretune
    from pretune.predict import Generator

    model = pretune.load(tiny_decoder)
    assert isinstance(model, Generator)
    first = model.generate("Return the", max_new_tokens=8, seed=1)
    assert isinstance(first, str) and first == model.generate("Return the", max_new_tokens=8, seed=1)  # seeded sampling
    greedy = model.generate(["Return the", "Open a"], max_new_tokens=5, sample=False)
    assert len(greedy) == 2 and all(isinstance(text, str) for text in greedy)
    with pytest.raises(Exception, match="generate text with it"):
        from pretune.predict import Predictor

        Predictor(tiny_decoder)


def test_pretune_generate_prints_each_prompt_continued(tiny_decoder, capsys):
    assert main(["generate", str(tiny_decoder), "--prompt", "Return the", "--prompt", "Open a", "--max-new-tokens", "4", "--greedy"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[0].startswith("Return the") and out[1].startswith("Open a")
