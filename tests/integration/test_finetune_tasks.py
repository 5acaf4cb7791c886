"""Every fine-tuning task end to end through the CLI on tiny data: multi-label, sentence pairs,
regression, tagging (NER); class weights, label budgets, early stopping, resume, bad input."""

import csv
import json
import math
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
import torch
import transformers
from safetensors.torch import load_file

import pretune
from pretune.cli import main
from pretune.recipe import load_recipe
from pretune.run import compose, data_reader
from tests.integration.helpers import ENV

FAST = ["trainer.progress=false", "trainer.tensorboard=false", "trainer.precision=fp32", "trainer.warmup=0",
        "trainer.eval_every=epoch", "trainer.batch_size=16", "data.max_length=32", "trainer.lr=3e-3",
        "trainer.head_lr=3e-3", "trainer.threads=1"]
ANIMALS = "cat dog bird fish horse cow sheep goat mouse lion tiger bear".split()


@pytest.fixture(autouse=True)
def keep_threads():
    """``trainer.threads=1`` (bit-identical runs in and out of process) must not leak to other tests."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def finetune(recipe, model, run_dir, *overrides):
    return main(["finetune", f"recipes/{recipe}", f"model={model}", f"run_dir={run_dir}", *FAST, *overrides])


def write_csv(path, header, rows):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def validation_rows(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if row["split"] == "validation"]


def rebuild(run_dir, model, *overrides):
    """The task, data and module of a finished run, built again from its saved recipe."""
    recipe = load_recipe(run_dir / "recipe.yaml", list(overrides))
    plan = compose(recipe)
    data = data_reader(plan, recipe)(str(model), None)
    return plan.task, data, plan.task.build(plan.backbone, data)


# -- multi-label classification ------------------------------------------------------------------
TOPICS = {"sport": ["ball", "goal", "team", "match"], "music": ["song", "guitar", "drum", "band"],
          "food": ["bread", "soup", "cake", "rice"]}


def multi_label_rows(n, seed):
    rng, rows = random.Random(seed), []
    for i in range(n):
        labels = sorted(rng.sample(list(TOPICS), rng.choice([1, 1, 2]))) if i % 10 else []  # every 10th: no label
        words = [w for label in labels for w in rng.sample(TOPICS[label], 2)] + rng.sample(ANIMALS, 2)
        rng.shuffle(words)
        rows.append((" ".join(words), ";".join(labels)))
    return rows


def test_multi_label_predicts_label_lists_and_evaluates_f1_micro(tmp_path, tiny_encoder):
    train = write_csv(tmp_path / "train.csv", ["text", "label"], multi_label_rows(96, 0))
    test = write_csv(tmp_path / "test.csv", ["text", "label"], multi_label_rows(24, 1))
    run_dir = tmp_path / "multi"
    assert finetune("text-classify.yaml", tiny_encoder, run_dir, f"data.train={train}", "task.multi_label=true",
                    "trainer.epochs=2") == 0
    assert "f1_micro" in validation_rows(run_dir)[-1]
    model_dir = run_dir / "model"
    assert json.loads((model_dir / "config.json").read_text())["problem_type"] == "multi_label_classification"

    predictor = pretune.load(model_dir)
    texts = ["ball goal song guitar", "bread soup", "cat dog"]
    results = predictor.predict(texts)
    assert predictor.labels == ["food", "music", "sport"]
    for result in results:
        assert isinstance(result["labels"], list) and set(result["labels"]) <= set(predictor.labels)
        assert result["labels"] == [l for l, p in result["probabilities"].items() if p > 0.5]
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir).eval()  # the export is plain HF
    with torch.no_grad():
        expected = hf(**predictor.tokenizer(texts, padding=True, return_tensors="pt")).logits.sigmoid()
    got = torch.tensor([[r["probabilities"][l] for l in predictor.labels] for r in results])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)

    out = tmp_path / "metrics.json"
    assert main(["evaluate", str(model_dir), f"data={test}", "--out", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert 0 <= metrics["f1_micro"] <= 1 and set(metrics["per_class"]) == {"food", "music", "sport"}


# -- sentence pairs ------------------------------------------------------------------------------
def pair_rows(n, seed):
    rng, rows = random.Random(seed), []
    for _ in range(n):
        a = rng.sample(ANIMALS, 3)
        same = rng.random() < 0.5
        b = rng.sample(a, 3) if same else rng.sample([w for w in ANIMALS if w not in a], 3)
        rows.append((" ".join(a), " ".join(b), "same" if same else "different"))
    return rows


def test_sentence_pairs_train_and_predict_with_both_texts(tmp_path, tiny_encoder):
    train = write_csv(tmp_path / "train.csv", ["premise", "hypothesis", "label"], pair_rows(64, 0))
    run_dir = tmp_path / "pairs"
    assert finetune("text-classify.yaml", tiny_encoder, run_dir, f"data.train={train}", "data.text=premise",
                    "data.text_pair=hypothesis", "trainer.epochs=1") == 0
    model_dir = run_dir / "model"
    predictor = pretune.load(model_dir)
    assert predictor.meta["text_pair"] == "hypothesis"
    texts, pairs = ["cat dog bird", "cat dog bird"], ["bird dog cat", "lion tiger bear"]
    results = predictor.predict(texts, pairs)
    assert [set(r["probabilities"]) for r in results] == [{"different", "same"}] * 2

    hf = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    encoded = predictor.tokenizer(texts, pairs, padding=True, return_tensors="pt")
    assert encoded["token_type_ids"].max() == 1  # [CLS] a [SEP] b [SEP]: the pair is the second segment
    with torch.no_grad():
        expected = hf(**encoded).logits.softmax(-1)
    got = torch.tensor([[r["probabilities"][l] for l in predictor.labels] for r in results])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    alone = torch.tensor([[r["probabilities"][l] for l in predictor.labels] for r in predictor.predict(texts)])
    assert not torch.allclose(got[1], alone[1])  # the second text is used

    inputs = write_csv(tmp_path / "in.csv", ["premise", "hypothesis"], list(zip(texts, pairs)))
    assert main(["predict", str(model_dir), str(inputs), "--out", str(tmp_path / "p.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [r["label"] for r in rows] == [r["label"] for r in results]


# -- regression ----------------------------------------------------------------------------------
def word_count_rows(n, seed):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = rng.randint(1, 12)
        rows.append((" ".join(rng.choice(ANIMALS) for _ in range(words)), words / 10))
    return rows


def test_regression_learns_a_target_read_from_the_text(tmp_path, tiny_encoder):
    train = write_csv(tmp_path / "train.csv", ["text", "label"], word_count_rows(160, 0))
    run_dir = tmp_path / "regress"
    assert finetune("text-regress.yaml", tiny_encoder, run_dir, f"data.train={train}", "trainer.epochs=10",
                    "trainer.patience=null") == 0
    evals = validation_rows(run_dir)
    assert evals[0]["step"] == 0 and evals[-1]["mse"] < 0.5 * evals[0]["mse"]
    assert evals[-1]["r2"] > 0.2  # better than predicting the mean: the count is read from the text
    results = pretune.load(run_dir / "model").predict(["cat", "cat dog cow sheep goat mouse lion tiger bear fish"])
    assert all(isinstance(r["value"], float) for r in results)
    assert results[1]["value"] > results[0]["value"]
    test = write_csv(tmp_path / "test.csv", ["text", "label"], word_count_rows(20, 1))
    out = tmp_path / "m.json"
    assert main(["evaluate", str(run_dir / "model"), f"data={test}", "--out", str(out)]) == 0
    assert {"mse", "rmse", "mae", "r2"} <= set(json.loads(out.read_text()))


# -- token classification (NER) ------------------------------------------------------------------
PEOPLE = ["John", "Mary", "Bartholomew", "Susan", "Alexander"]
PLACES = ["Paris", "London", "Copenhagen", "Berlin", "Madrid"]


def ner_rows(n, seed):
    rng, rows = random.Random(seed), []
    for _ in range(n):
        person, place = rng.choice(PEOPLE), rng.choice(PLACES)
        tokens, tags = rng.choice([
            ([person, "lives", "in", place], ["B-PER", "O", "O", "B-LOC"]),
            (["Yesterday", person, "Smith", "went", "to", place], ["O", "B-PER", "I-PER", "O", "O", "B-LOC"]),
            ([place, "is", "where", person, "works"], ["B-LOC", "O", "O", "B-PER", "O"]),
        ])
        rows.append({"tokens": tokens, "tags": tags})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_tagging_gives_one_tag_per_word_however_it_is_split(tmp_path, tiny_encoder):
    train = write_jsonl(tmp_path / "train.jsonl", ner_rows(96, 0))
    run_dir = tmp_path / "tag"
    assert finetune("text-tag.yaml", tiny_encoder, run_dir, f"data.train={train}", "trainer.epochs=4",
                    "trainer.patience=null") == 0
    evals = validation_rows(run_dir)
    assert {"f1", "precision", "recall"} <= set(evals[-1]) and evals[-1]["f1"] > evals[0]["f1"]

    model_dir = run_dir / "model"
    predictor = pretune.load(model_dir)
    split = [w for w in PEOPLE + PLACES if len(predictor.tokenizer.tokenize(w)) > 1]
    assert "Bartholomew" in split and "Copenhagen" in split  # the check below needs words of several pieces
    sentences = [["John", "lives", "in", "Paris"], ["Bartholomew", "lives", "in", "Copenhagen"], ["Yesterday"]]
    results = predictor.predict(sentences)
    assert [len(r["tags"]) for r in results] == [4, 4, 1]
    assert all(set(r["tags"]) <= set(predictor.labels) for r in results)
    assert predictor.predict(["John", "lives", "in", "Paris"])[0]["tags"] == results[0]["tags"]  # one sentence
    assert [r["tags"] for r in predictor.predict(["John lives in Paris", "Yesterday"])] == [results[0]["tags"], results[2]["tags"]]
    # the tag of a word is the plain HF model's argmax at the word's first piece
    hf = transformers.AutoModelForTokenClassification.from_pretrained(model_dir).eval()
    encoded = predictor.tokenizer(sentences, is_split_into_words=True, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = hf(**{k: encoded[k] for k in ("input_ids", "attention_mask", "token_type_ids")}).logits
    for row, result in enumerate(results):
        ids = encoded.word_ids(row)
        first = [ids.index(word) for word in range(len(result["words"]))]
        assert result["tags"] == [hf.config.id2label[int(logits[row, p].argmax())] for p in first]

    # in training, each word is counted once (its first piece), however many pieces it has
    task, data, _ = rebuild(run_dir, model_dir)
    rows = data.train[:16]
    labels = task.collate(rows, [0] * 16)["labels"]
    assert (labels != -100).sum(-1).tolist() == [len(words) for words in rows["tokens"]]


    # evaluate and predict from files: a .txt line is a sentence of space-separated words
    test = write_jsonl(tmp_path / "test.jsonl", ner_rows(20, 1))
    out = tmp_path / "m.json"
    assert main(["evaluate", str(model_dir), f"data={test}", "--out", str(out)]) == 0
    assert 0 <= json.loads(out.read_text())["f1"] <= 1
    (tmp_path / "in.txt").write_text("John lives in Paris\nBartholomew lives in Copenhagen\n")
    assert main(["predict", str(model_dir), str(tmp_path / "in.txt"), "--out", str(tmp_path / "p.jsonl")]) == 0
    predicted = [json.loads(line)["tags"] for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert predicted == [results[0]["tags"], results[1]["tags"]]


def test_tagging_every_piece_keeps_a_split_entity_one_entity(tmp_path, tiny_encoder):
    train = write_jsonl(tmp_path / "train.jsonl", ner_rows(48, 0))
    run_dir = tmp_path / "tag"
    assert finetune("text-tag.yaml", tiny_encoder, run_dir, f"data.train={train}", "task.label_all_subwords=true",
                    "trainer.epochs=1") == 0
    task, data, _ = rebuild(run_dir, tiny_encoder)
    assert "I-LOC" in task.label_names  # no word is tagged I-LOC, but the later pieces of "Copenhagen" are
    rows = data.train[:16]
    labels = task.collate(rows, [0] * 16)["labels"]
    pieces = [[task.label_names[i] for i in row if i != -100] for row in labels.tolist()]
    words = [[task.label_names[i] for i in row] for row in rows["labels"]]
    assert sum(map(len, pieces)) > sum(map(len, words))  # every piece is labelled...
    begins = [[sum(t.startswith("B-") for t in row) for row in tags] for tags in (pieces, words)]
    assert begins[0] == begins[1]  # ...yet each entity begins once, as B-X then I-X
    results = pretune.load(run_dir / "model").predict([["Bartholomew", "lives", "in", "Copenhagen"]])
    assert len(results[0]["tags"]) == 4


# -- every task under every strategy -------------------------------------------------------------
def task_data(tmp_path, task):
    """(recipe, overrides, output key of a prediction) of a small learnable set for ``task``."""
    if task == "multi":
        train = write_csv(tmp_path / "train.csv", ["text", "label"], multi_label_rows(48, 0))
        return "text-classify.yaml", [f"data.train={train}", "task.multi_label=true"], "labels"
    if task == "pair":
        train = write_csv(tmp_path / "train.csv", ["premise", "hypothesis", "label"], pair_rows(48, 0))
        return "text-classify.yaml", [f"data.train={train}", "data.text=premise", "data.text_pair=hypothesis"], "label"
    if task == "regress":
        return "text-regress.yaml", [f"data.train={write_csv(tmp_path / 'train.csv', ['text', 'label'], word_count_rows(48, 0))}"], "value"
    return "text-tag.yaml", [f"data.train={write_jsonl(tmp_path / 'train.jsonl', ner_rows(48, 0))}"], "tags"


EMBEDDING, QUERY = "bert.embeddings.word_embeddings.weight", "bert.encoder.layer.0.attention.self.query.weight"
MOVES = {"full": (True, True), "llrd:0.8": (True, True), "linear-probe": (False, False), "freeze-bottom:1": (False, False),
         "gradual-unfreeze": (False, False), "lora:r=4": (False, True)}  # (embeddings, layer 0) change? nano has 1 layer


@pytest.mark.parametrize("strategy", list(MOVES))
@pytest.mark.parametrize("task", ["multi", "pair", "regress", "tag"])
def test_every_task_trains_under_every_strategy(tmp_path, tiny_encoder, task, strategy):
    recipe, overrides, key = task_data(tmp_path, task)
    run_dir = tmp_path / "run"
    assert finetune(recipe, tiny_encoder, run_dir, *overrides, f"strategy={strategy}", "trainer.epochs=1") == 0
    pretrained = load_file(str(tiny_encoder / "model.safetensors"))
    last = sorted((run_dir / "checkpoints").iterdir())[-1] / "model"
    trained = load_file(str(last / "model.safetensors"))  # the exported model: LoRA merged, no adapter keys
    assert not any("lora" in name for name in trained)
    moved = tuple(not torch.equal(pretrained[name], trained[name]) for name in (EMBEDDING, QUERY))
    assert moved == MOVES[strategy]
    sample = [["John", "lives", "in", "Paris"]] if task == "tag" else ["cat dog bird"]
    result = pretune.load(last).predict(sample, ["bird dog cat"] if task == "pair" else None)
    assert len(result) == 1 and key in result[0]


@pytest.mark.parametrize("task", ["multi", "pair", "regress", "tag"])
def test_decoder_backbones_take_every_task(tmp_path, tiny_decoder, task):
    recipe, overrides, key = task_data(tmp_path, task)
    assert finetune(recipe, tiny_decoder, tmp_path / "run", *overrides, "strategy=lora:r=4", "trainer.epochs=1") == 0
    sample = [["John", "lives", "in", "Paris"]] if task == "tag" else ["cat dog bird", "cat"]
    results = pretune.load(tmp_path / "run" / "model").predict(sample, ["bird dog cat", "dog"] if task == "pair" else None)
    assert all(key in r for r in results) and len(results) == len(sample)
    if task == "tag":
        assert len(results[0]["tags"]) == 4


def test_start_from_a_model_with_another_head(tmp_path, tiny_encoder, topics):
    """A Hugging Face classifier with 2 labels (no pretune.json) becomes a 5-topic classifier, then a regressor."""
    folder = tmp_path / "sentiment"
    transformers.AutoModelForSequenceClassification.from_pretrained(tiny_encoder, num_labels=2).save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(tiny_encoder).save_pretrained(folder)
    assert finetune("text-classify.yaml", folder, tmp_path / "topics", f"data.train={topics / 'train.csv'}",
                    "strategy=linear-probe", "trainer.max_steps=1") == 0
    assert len(pretune.load(tmp_path / "topics" / "model").labels) == 5
    _, _, module = rebuild(tmp_path / "topics", folder)
    assert {"model.classifier.weight", "model.classifier.bias"} <= module.model.new_parameters  # the resized head is new: it trains
    train = write_csv(tmp_path / "train.csv", ["text", "label"], word_count_rows(48, 0))
    assert finetune("text-regress.yaml", tmp_path / "topics" / "model", tmp_path / "regress", f"data.train={train}",
                    "trainer.max_steps=1") == 0
    assert "value" in pretune.load(tmp_path / "regress" / "model").predict("cat dog")[0]


# -- class weights and label budgets -------------------------------------------------------------
def test_balanced_class_weights_are_n_over_k_n_c(tmp_path, tiny_encoder, capsys):
    words = {"a": "ball goal team", "b": "song guitar drum", "c": "bread soup cake"}
    counts = {"a": 24, "b": 8, "c": 4}  # n = 36, K = 3: weights 36/72, 36/24, 36/12
    rows = [(f"{words[label]} {ANIMALS[i % 12]}", label) for label, count in counts.items() for i in range(count)]
    train = write_csv(tmp_path / "train.csv", ["text", "label"], rows)
    dev = write_csv(tmp_path / "dev.csv", ["text", "label"], rows[::4])
    run_dir = tmp_path / "weighted"
    assert finetune("text-classify.yaml", tiny_encoder, run_dir, f"data.train={train}", f"data.validation={dev}",
                    "task.class_weights=balanced", "trainer.max_steps=2") == 0
    _, _, module = rebuild(run_dir, tiny_encoder)
    assert module.class_weights.tolist() == [0.5, 1.5, 3.0]

    code = finetune("text-classify.yaml", tiny_encoder, tmp_path / "multi", f"data.train={train}",
                    "task.multi_label=true", "task.class_weights=balanced")
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 3 and "task.class_weights" in err


@pytest.mark.parametrize("budget", [0.5, 2])
def test_budget_keeps_the_expected_number_of_examples(tmp_path, tiny_encoder, topics, capsys, budget):
    with open(topics / "train.csv", newline="") as handle:
        per_class = Counter(row["label"] for row in csv.DictReader(handle))
    if isinstance(budget, int):
        expected = sum(min(budget, n) for n in per_class.values())
    else:
        expected = sum(max(1, math.floor(budget * n + 0.5)) for n in per_class.values())
    run_dir = tmp_path / "budget"
    assert finetune("text-classify.yaml", tiny_encoder, run_dir, f"data.train={topics / 'train.csv'}",
                    f"data.validation={topics / 'test.csv'}", f"data.budget={budget}", "trainer.batch_size=8",
                    "trainer.max_steps=1") == 0
    first = next(line for line in capsys.readouterr().err.splitlines() if line.startswith("training "))
    assert int(re.search(r"(\d+) examples", first).group(1)) == expected


# -- early stopping and the best checkpoint ------------------------------------------------------
def test_early_stopping_keeps_the_best_model_not_the_last(tmp_path, tiny_encoder, topics, capsys):
    """A learning rate warming up into divergence: validation loss falls, then rises, and patience stops
    the run.  The untrained step-0 model (random head) is logged but never chosen as the best."""
    run_dir = tmp_path / "diverge"
    assert finetune("text-classify.yaml", tiny_encoder, run_dir, f"data.train={topics / 'train.csv'}",
                    "trainer.lr=1.0", "trainer.head_lr=1.0", "trainer.warmup=40", "trainer.eval_every=4",
                    "trainer.monitor=loss", "trainer.patience=1", "trainer.epochs=5") == 0
    err = capsys.readouterr().err
    total = int(re.search(r"(\d+) steps,", err).group(1))
    evals = validation_rows(run_dir)
    trained = [e for e in evals if e["step"] > 0]
    best = min(trained, key=lambda e: e["loss"])
    assert 0 < best["step"] < trained[-1]["step"]  # the best is in the middle: better before, worse after
    assert trained[-1]["loss"] > best["loss"]
    assert "early stop" in err and evals[-1]["step"] < total
    assert json.loads((run_dir / "best" / "metrics.json").read_text())["step"] == best["step"]
    model = (run_dir / "model" / "model.safetensors").read_bytes()
    assert model == (run_dir / "best" / "model" / "model.safetensors").read_bytes()
    last = sorted((run_dir / "checkpoints").iterdir())[-1]
    assert last.name == f"step-{evals[-1]['step']:08d}"
    assert model != (last / "model" / "model.safetensors").read_bytes()


# -- resume after a kill -------------------------------------------------------------------------
@pytest.mark.slow  # fine-tuning resumes through the one loop; bit-identical resume is tested by test_resume.py and test_kill_resume.py
def test_killed_finetune_resumes_bit_identically(tmp_path, tiny_encoder, topics):
    common = [f"data.train={topics / 'train.csv'}", "trainer.epochs=2", "trainer.batch_size=8", "trainer.save_every=2",
              "trainer.keep_last=1000", "strategy=llrd:0.8"]  # 28 steps, dropout on: resuming must replay it
    reference = tmp_path / "reference"
    assert finetune("text-classify.yaml", tiny_encoder, reference, *common) == 0

    run_dir = tmp_path / "killed"
    args = ["finetune", "recipes/text-classify.yaml", f"model={tiny_encoder}", f"run_dir={run_dir}", *FAST, *common]
    proc = subprocess.Popen([sys.executable, "-m", "pretune", *args], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while not (run_dir / "checkpoints" / "step-00000002").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (run_dir / "model").exists()
    assert main(["finetune", str(run_dir), "--resume"]) == 0

    for name in ("model/model.safetensors", f"checkpoints/{sorted((reference / 'checkpoints').iterdir())[-1].name}/module.safetensors"):
        got, expected = load_file(str(run_dir / name)), load_file(str(reference / name))
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in expected), f"{name} differs after resume"


# -- bad input -----------------------------------------------------------------------------------
BAD = [
    ("text-classify.yaml", "train.csv", "review,label\ngreat film,pos\n", ["train.csv", "column 'text'"]),
    ("text-regress.yaml", "train.csv", "text,label\none,0.1\ntwo words,nan\n", ["train.csv", "row 2", "column 'label'", "NaN"]),
    ("text-regress.yaml", "train.jsonl", '{"text": "one", "label": 0.1}\n{"text": "two", "label": NaN}\n',
     ["train.jsonl", "row 2", "column 'label'"]),
    ("text-classify.yaml", "train.csv", "", ["train.csv", "no rows"]),
    ("text-tag.yaml", "train.jsonl", '{"tokens": ["John", "lives"], "tags": ["B-PER"]}\n', ["train.jsonl", "row 1", "'tags'"]),
]


@pytest.mark.parametrize("recipe, name, content, expected", BAD, ids=["no-column", "nan-csv", "nan-jsonl", "empty", "tag-count"])
def test_bad_data_is_a_one_line_error_and_leaves_no_model(tmp_path, tiny_encoder, capsys, recipe, name, content, expected):
    (tmp_path / name).write_text(content)
    run_dir = tmp_path / "run"
    code = finetune(recipe, tiny_encoder, run_dir, f"data.train={tmp_path / name}")
    err = capsys.readouterr().err.strip()
    assert code == 4 and err.startswith("pretune: error:") and "\n" not in err
    assert all(part in err for part in expected), err
    assert not (run_dir / "model").exists() and not (run_dir / "checkpoints").exists() and not (run_dir / "best").exists()


def test_the_same_command_works_once_the_data_is_fixed(tmp_path, tiny_encoder):
    train = tmp_path / "train.csv"
    train.write_text("review,label\ngreat film,pos\n")
    args = [f"data.train={train}", "trainer.max_steps=1", "trainer.batch_size=2"]
    assert finetune("text-classify.yaml", tiny_encoder, tmp_path / "run", *args) == 4
    write_csv(train, ["text", "label"], [("great film", "pos"), ("bad film", "neg")] * 4)
    assert finetune("text-classify.yaml", tiny_encoder, tmp_path / "run", *args) == 0


def test_the_test_file_is_scored_at_the_end(tmp_path, tiny_encoder, topics):
    run_dir = tmp_path / "run"
    assert finetune("text-classify.yaml", tiny_encoder, run_dir, f"data.train={topics / 'train.csv'}",
                    f"data.test={topics / 'test.csv'}", "trainer.max_steps=1") == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(row["split"] == "test" and "accuracy" in row for row in rows)
