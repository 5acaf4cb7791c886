"""``pretune adapt``: continue a bare encoder's pretraining on domain text, keeping its pooler and pooling, with a
head warm-up, general-text replay, the forgetting report, vocabulary extension, kNN-TAPT and exact resume."""

import csv
import json
import signal
import subprocess
import sys
import time

import pytest
import torch
import transformers
from safetensors.torch import load_file

from tests.backbones.test_start import bare_encoder
from tests.integration.helpers import ENV, pretune, weights

ADAPT = ["data.max_documents=240", "data.block_size=32", "data.validation=0.1", "data.general.max_documents=150",
         "data.general.held_out=20", "data.general.replay=0.25", "data.vocabulary.add=5", "data.vocabulary.min_count=3",
         "task.head_warmup=2", "trainer.head_lr=1e-3", "trainer.max_steps=8", "trainer.eval_every=4", "trainer.eval_batches=2",
         "trainer.batch_size=8", "trainer.save_every=2", "trainer.keep_last=10", "trainer.log_every=2", "trainer.progress=false",
         "trainer.tensorboard=false", "trainer.precision=fp32"]


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    return bare_encoder(tmp_path_factory.mktemp("start") / "encoder")


@pytest.fixture(scope="module")
def adapted(start, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("adapt") / "run"
    done = pretune("adapt", "recipes/text-adapt-mlm.yaml", f"model={start}", f"run_dir={run_dir}", *ADAPT)
    return run_dir, done


def test_adapt_needs_a_model_to_continue(tmp_path):
    done = pretune("adapt", "recipes/text-adapt-mlm.yaml", f"run_dir={tmp_path / 'run'}", check=False)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1].startswith("pretune: error: recipe key 'backbone.path'")


def test_the_load_line_says_what_is_new_and_what_is_kept(adapted):
    _, done = adapted
    line = next(l for l in done.stderr.splitlines() if "loaded as BertForMaskedLM" in l)
    assert "new (randomly initialised" in line and "cls.predictions.transform.dense.weight" in line
    assert "kept unchanged for the saved model" in line and "bert.pooler.dense" in line


def test_the_head_warms_up_alone_then_everything_trains(adapted, start):
    run_dir, _ = adapted
    original = load_file(str(start / "model.safetensors"))
    warm = load_file(str(run_dir / "checkpoints" / "step-00000002" / "model" / "model.safetensors"))
    final = weights(run_dir / "model")
    layer = "encoder.layer.0.attention.self.query.weight"
    assert torch.equal(warm[f"bert.{layer}"], original[layer])  # frozen through the warm-up
    assert not torch.equal(final[f"bert.{layer}"], original[layer])  # trained after it
    assert not torch.equal(warm["cls.predictions.transform.dense.weight"], final["cls.predictions.transform.dense.weight"])


def test_the_adapted_folder_keeps_the_pooler_and_the_pooling(adapted, start):
    run_dir, _ = adapted
    original = load_file(str(start / "model.safetensors"))
    final = weights(run_dir / "model")
    assert torch.equal(final["bert.pooler.dense.weight"], original["pooler.dense.weight"])
    assert (run_dir / "model" / "modules.json").is_file() and (run_dir / "model" / "1_Pooling" / "config.json").is_file()
    model = transformers.AutoModelForSequenceClassification.from_pretrained(run_dir / "model", num_labels=2)
    assert torch.equal(model.bert.pooler.dense.weight, original["pooler.dense.weight"])


def test_forgetting_report_starts_after_the_warm_up(adapted):
    run_dir, done = adapted
    report = json.loads((run_dir / "forgetting.json").read_text())
    assert report["baseline_step"] == 2
    domain, general = report["domain (validation)"], report["general (data.general, held out)"]
    assert set(domain) == set(general) == {"mlm_accuracy", "mlm_perplexity"}
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    at_two = next(l for l in lines if l.get("split") == "validation" and l["step"] == 2)
    assert general["mlm_perplexity"][0] == at_two["general_mlm_perplexity"]
    assert "forgetting report (step 2" in done.stdout


def test_vocabulary_extension_is_saved_and_loads_together(adapted, start):
    run_dir, _ = adapted
    added = json.loads((run_dir / "vocabulary.json").read_text())
    assert len(added["added"]) == 5 and added["tokens_per_word_after"] < added["tokens_per_word_before"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(run_dir / "model")
    assert len(tokenizer) == len(transformers.AutoTokenizer.from_pretrained(start)) + 5
    model = transformers.AutoModelForMaskedLM.from_pretrained(run_dir / "model")
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)
    word = added["added"][0]["word"]
    assert len(tokenizer(word, add_special_tokens=False)["input_ids"]) == 1


def _adapt_until(run_dir, args, after):
    """Start ``pretune adapt``, SIGKILL it once checkpoint ``after`` exists."""
    proc = subprocess.Popen([sys.executable, "-m", "pretune", "adapt", *args], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    target, deadline = run_dir / "checkpoints" / f"step-{after:08d}", time.time() + 240
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return proc.returncode


@pytest.mark.slow  # adaptation resumes through the one loop; bit-identical resume is tested by test_resume.py and test_kill_resume.py
def test_a_killed_adaptation_resumes_bit_identical(adapted, start, tmp_path):
    """Killed in the head warm-up, after the vocabulary grew: the resumed run reads the saved tokenizer (no second
    extension) and the same replayed rows, and ends with the uninterrupted run's weights."""
    reference, _ = adapted
    run_dir = tmp_path / "run"
    code = _adapt_until(run_dir, ["recipes/text-adapt-mlm.yaml", f"model={start}", f"run_dir={run_dir}", *ADAPT], after=2)
    assert code == -signal.SIGKILL, "the run ended before it could be killed"
    pretune("adapt", str(run_dir), "--resume")
    expected, resumed = weights(reference / "model"), weights(run_dir / "model")
    assert resumed.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(resumed[name], tensor), f"{name} differs after resume"


def test_task_adaptive_selection_is_saved_and_deterministic(start, topics, tmp_path):
    """kNN-TAPT: the pool documents nearest the task's texts, and those texts, written to selected.jsonl (what the run
    then reads as data.files); the same inputs select the same documents."""
    from pretune.recipe import DataConfig
    from pretune.select import task_selection

    cfg = DataConfig(max_documents=400, select={"task": str(topics / "train.csv"), "documents": 60})
    selected = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        read = task_selection(cfg, str(start), tmp_path / name, main=True)
        assert read.files == [str(tmp_path / name / "selected.jsonl")] and read.select is None and read.format == "jsonl"
        selected.append([json.loads(line) for line in (tmp_path / name / "selected.jsonl").read_text().splitlines()])
    rows = selected[0]
    pool = [r for r in rows if r["source"] == "pool"]
    assert len(pool) == 60 and len({r["pool_row"] for r in pool}) == 60
    with open(topics / "train.csv") as handle:
        assert len(rows) - 60 == len(list(csv.DictReader(handle)))  # and every task text
    assert selected[0] == selected[1]


def test_a_bare_decoder_continues_with_next_token_prediction(tmp_path):
    """A GPT-2 folder without its LM head: the head is the tied embeddings (nothing new, no warm-up); the forgetting
    report is perplexity on domain and general text."""
    from pretune.data.builtin import load_stdlib_docstrings
    from pretune.data.tokenizer import train_tokenizer

    start = tmp_path / "decoder"
    tokenizer = train_tokenizer(load_stdlib_docstrings().select(range(300)), "bpe", "decoder", 500)
    torch.manual_seed(0)
    transformers.GPT2Model(transformers.GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=128)).save_pretrained(start)
    tokenizer.save_pretrained(start)
    run_dir = tmp_path / "run"
    done = pretune("adapt", "recipes/text-adapt-clm.yaml", f"model={start}", f"run_dir={run_dir}", "data.max_documents=200",
                   "data.block_size=32", "data.validation=0.1", "data.general.max_documents=100", "data.general.held_out=10",
                   "trainer.max_steps=4", "trainer.eval_every=2", "trainer.batch_size=4", "trainer.progress=false", "trainer.tensorboard=false")
    assert "loaded as GPT2LMHeadModel; no new parameters" in done.stderr
    report = json.loads((run_dir / "forgetting.json").read_text())
    assert report["baseline_step"] == 0 and set(report["general (data.general, held out)"]) == {"clm_accuracy", "clm_perplexity"}
    assert transformers.AutoModelForCausalLM.from_pretrained(run_dir / "model").lm_head.weight.shape[0] == len(tokenizer)


def test_assemble_refuses_a_selection_it_has_no_run_directory_for(start, topics):
    import pretune
    from pretune.errors import RecipeError
    from pretune.recipe import load_recipe

    recipe = load_recipe("recipes/text-adapt-mlm.yaml", [f"model={start}", f"data.select={{task: {topics / 'train.csv'}, documents: 5}}"])
    with pytest.raises(RecipeError, match="data.select"):
        pretune.run.assemble(recipe)
