"""Fine-tuning journeys end to end: every strategy, evaluate, predict, load, export."""

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file

import pretune
from pretune.cli import main

FAST = ["trainer.batch_size=8", "trainer.progress=false", "trainer.tensorboard=false", "trainer.precision=fp32",
        "trainer.eval_every=epoch", "trainer.lr=1e-3", "trainer.warmup=0", "data.max_length=48"]


def finetune(tmp_path, model, topics, *extra, name="clf"):
    run_dir = tmp_path / name
    code = main(["finetune", "recipes/text-classify.yaml", f"model={model}", f"run_dir={run_dir}",
                 f"data.train={topics / 'train.csv'}", *FAST, *extra])
    assert code == 0
    return run_dir


def changed(before: dict, after_dir) -> dict[str, bool]:
    after = {k: v for k, v in load_file(str(after_dir / "module.safetensors")).items()}
    return {name: not torch.equal(before[name], after[name]) for name in before}


HF = "model.model."  # checkpoint keys: the fine-tuning module -> the classifier -> the Hugging Face model


@pytest.mark.parametrize("strategy, frozen_prefixes, trained_prefixes", [
    ("linear-probe", [HF + "bert.embeddings", HF + "bert.encoder"], [HF + "classifier", HF + "bert.pooler"]),
    ("freeze-bottom:1", [HF + "bert.embeddings", HF + "bert.encoder.layer.0"], [HF + "classifier"]),
    ("full", [], [HF + "bert.embeddings.word_embeddings", HF + "bert.encoder.layer.0", HF + "classifier"]),
    ("llrd:0.5", [], [HF + "bert.encoder.layer.0", HF + "classifier"]),
])
def test_frozen_parameters_stay_bit_identical_and_trained_ones_move(tmp_path, tiny_encoder, topics, strategy, frozen_prefixes, trained_prefixes):
    run_dir = finetune(tmp_path, tiny_encoder, topics, f"strategy={strategy}", "trainer.epochs=2", "trainer.save_every=1",
                       "trainer.keep_last=1000", "trainer.patience=null", "task.probe=sgd")  # the probe trained by the loop
    checkpoints = sorted((run_dir / "checkpoints").iterdir())
    first = load_file(str(checkpoints[0] / "module.safetensors"))
    initial = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_encoder, num_labels=5).state_dict()
    moved = changed({k: v for k, v in first.items()}, checkpoints[-1])
    for name, did_move in moved.items():
        if any(name.startswith(p) for p in frozen_prefixes):
            assert not did_move, f"{name} is frozen under {strategy} but changed"
            key = name[len(HF):]
            if key in initial:
                assert torch.equal(first[name], initial[key]), f"{name} differs from the pretrained weights"
    for prefix in trained_prefixes:
        assert any(did_move for name, did_move in moved.items() if name.startswith(prefix)), f"nothing under {prefix} trained"


def test_gradual_unfreezing_adds_one_layer_per_epoch(tmp_path, tiny_encoder, topics):
    # nano BERT: [embeddings, layer 0]; epoch 0 trains the head only, epoch 1 also layer 0, epoch 2 everything
    run_dir = finetune(tmp_path, tiny_encoder, topics, "strategy=gradual-unfreeze", "trainer.epochs=3", "trainer.save_every=1",
                       "trainer.keep_last=1000", "trainer.patience=null")
    steps_per_epoch = len(list((run_dir / "checkpoints").iterdir())) // 3
    ckpts = sorted((run_dir / "checkpoints").iterdir())
    epoch_ends = [load_file(str(ckpts[i * steps_per_epoch + steps_per_epoch - 1] / "module.safetensors")) for i in range(3)]
    start = load_file(str(ckpts[0] / "module.safetensors"))
    layer, emb = HF + "bert.encoder.layer.0.attention.self.query.weight", HF + "bert.embeddings.word_embeddings.weight"
    assert torch.equal(start[layer], epoch_ends[0][layer]) and torch.equal(start[emb], epoch_ends[0][emb])
    assert not torch.equal(epoch_ends[0][layer], epoch_ends[1][layer]) and torch.equal(epoch_ends[0][emb], epoch_ends[1][emb])
    assert not torch.equal(epoch_ends[1][emb], epoch_ends[2][emb])


def test_lora_trains_adapters_and_exports_a_merged_plain_model(tmp_path, tiny_encoder, topics):
    run_dir = finetune(tmp_path, tiny_encoder, topics, "strategy=lora:r=4", "trainer.epochs=1", "trainer.monitor=loss")
    last = sorted((run_dir / "checkpoints").iterdir())[-1] / "model"  # model/ is the best, which may be step 0
    model = transformers.AutoModelForSequenceClassification.from_pretrained(last)
    assert not any("lora" in name for name, _ in model.named_parameters())
    base = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_encoder, num_labels=5)
    q = "bert.encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(model.state_dict()[q], base.state_dict()[q])  # merged adapters changed the weight
    predictor = pretune.load(last)
    texts = ["Return the path of the file.", "Send an email message."]
    inputs = predictor.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model.eval()(**inputs).logits.softmax(-1)
    got = torch.tensor([[r["probabilities"][l] for l in predictor.labels] for r in predictor.predict(texts)])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_evaluate_predict_load_and_plain_transformers_agree(tmp_path, tiny_encoder, topics, capsys):
    run_dir = finetune(tmp_path, tiny_encoder, topics, "trainer.epochs=2")
    out = tmp_path / "metrics.json"
    assert main(["evaluate", str(run_dir / "model"), f"data={topics / 'test.csv'}", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads(out.read_text())
    assert "accuracy" in printed and 0 <= metrics["accuracy"] <= 1 and len(metrics["confusion_matrix"]) == 5
    assert main(["predict", str(run_dir / "model"), str(topics / "test.csv"), "--out", str(tmp_path / "p.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    predictor = pretune.load(run_dir / "model")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(run_dir / "model").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(run_dir / "model")
    texts = [r["text"] for r in rows[:8]]
    with torch.no_grad():
        hf_labels = hf(**tokenizer(texts, padding=True, truncation=True, max_length=48, return_tensors="pt")).logits.argmax(-1)
    assert [hf.config.id2label[int(i)] for i in hf_labels] == [r["label"] for r in rows[:8]]
    assert [r["label"] for r in predictor.predict(texts)] == [r["label"] for r in rows[:8]]
    best = json.loads((run_dir / "best" / "metrics.json").read_text())
    assert "accuracy" in best


def test_linear_probe_uses_cached_features_with_the_same_result(tmp_path, tiny_encoder, topics):
    cached = finetune(tmp_path, tiny_encoder, topics, "strategy=linear-probe", "task.probe=sgd", "trainer.epochs=2", name="cached")
    plain = finetune(tmp_path, tiny_encoder, topics, "strategy=linear-probe", "task.probe=sgd", "trainer.epochs=2", "task.cache_features=false",
                     name="plain")
    a, b = load_file(str(cached / "model" / "model.safetensors")), load_file(str(plain / "model" / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)
    for run in (cached, plain):  # throughput counts the text tokens behind cached features too
        train_rows = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]
        assert all(r["tokens_per_s"] > 5 * r["examples_per_s"] > 0 for r in train_rows)


def test_decoder_backbone_classifies(tmp_path, tiny_decoder, topics):
    run_dir = finetune(tmp_path, tiny_decoder, topics, "strategy=linear-probe", "trainer.epochs=1")
    assert pretune.load(run_dir / "model").predict("Open a socket.")[0]["label"]


def test_unseen_validation_label_is_a_one_line_error(tmp_path, tiny_encoder, topics, capsys):
    dev = tmp_path / "dev.csv"
    dev.write_text("text,label\nhello world,nonexistent\n")
    code = main(["finetune", "recipes/text-classify.yaml", f"model={tiny_encoder}", f"run_dir={tmp_path / 'r'}",
                 f"data.train={topics / 'train.csv'}", f"data.validation={dev}", *FAST])
    err = capsys.readouterr().err.strip()
    assert code == 4 and "nonexistent" in err and "dev.csv" in err and "\n" not in err


def test_predictions_follow_the_output_extension_for_text_models(tmp_path, tiny_encoder, topics):
    import csv

    run_dir = finetune(tmp_path, tiny_encoder, topics, "trainer.max_steps=2", "trainer.eval_every=2")
    for out in ("p.csv", "p.tsv", "p.jsonl"):
        assert main(["predict", str(run_dir / "model"), str(topics / "test.csv"), "--out", str(tmp_path / out)]) == 0
    with open(tmp_path / "p.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    labels = pretune.load(run_dir / "model").labels
    assert {"text", "label"} <= set(table[0]) and {f"probability_{name}" for name in labels} <= set(table[0])
    assert abs(sum(float(table[0][f"probability_{name}"]) for name in labels) - 1) < 1e-4
    with open(tmp_path / "p.tsv", newline="") as handle:
        assert len(list(csv.DictReader(handle, delimiter="\t"))) == len(table)
    jsonl = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [row["label"] for row in jsonl] == [row["label"] for row in table]


def test_setfit_trains_the_encoder_on_pairs_and_fits_the_head_before_every_validation(tmp_path, tiny_encoder, topics):
    run_dir = finetune(tmp_path, tiny_encoder, topics, "strategy=setfit:pairs=2", "trainer.epochs=2", "trainer.patience=null",
                       "data.budget=4")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    validated = [r["step"] for r in rows if r["split"] == "validation"]
    refitted = [r["step"] for r in rows if r["split"] == "refit"]
    assert validated == refitted and len(validated) == 3  # step 0 (the probe on the pretrained encoder) and two epochs
    assert all("pair_loss" in r for r in rows if r["split"] == "train")
    start = next(r for r in rows if r["split"] == "start")
    assert start["examples"] == 20  # 4 labels per class x 5 classes, each anchoring ceil(2 / 2) = 1 row per epoch
    model = run_dir / "model"
    assert (model / "head.safetensors").is_file() and json.loads((model / "pretune.json").read_text())["pooling"] == "mean"
    encoder = transformers.AutoModel.from_pretrained(model).state_dict()
    pretrained = transformers.AutoModel.from_pretrained(tiny_encoder).state_dict()
    assert not torch.equal(encoder["encoder.layer.0.attention.self.query.weight"],
                           pretrained["encoder.layer.0.attention.self.query.weight"])
    # the saved head is the fit on the saved encoder's own embeddings of the labelled rows (refit before the best was kept)
    from pretune import heads
    from pretune.recipe import load_recipe
    from pretune.run import compose, data_reader
    from pretune.strategies import fit_probe
    from pretune.tasks.common import mean_pooled

    recipe = load_recipe(run_dir / "recipe.yaml")
    rows = data_reader(compose(recipe), recipe)(str(tiny_encoder), None).train
    tokenizer = transformers.AutoTokenizer.from_pretrained(model)
    with torch.no_grad():
        x = mean_pooled(transformers.AutoModel.from_pretrained(model).eval(), tokenizer, list(rows["text"]), torch.device("cpu"), 48)
    fit = fit_probe(heads.get("single"), x, torch.tensor(rows["labels"]), names=list(map(str, range(5))), seed=recipe.seed)
    head = load_file(str(model / "head.safetensors"))
    torch.testing.assert_close(x @ head["classifier.weight"].T + head["classifier.bias"], x @ fit.weight.T + fit.bias, atol=2e-3, rtol=2e-3)
    assert main(["evaluate", str(model), f"data={topics / 'test.csv'}", "--out", str(tmp_path / "m.json")]) == 0


def test_setfit_refuses_tasks_it_does_not_do(tmp_path, tiny_encoder, topics, capsys):
    code = main(["finetune", "recipes/text-classify.yaml", f"model={tiny_encoder}", f"run_dir={tmp_path / 'r'}",
                 f"data.train={topics / 'train.csv'}", "task.multi_label=true", "strategy=setfit", *FAST])
    assert code != 0
    assert "setfit fine-tunes a text encoder for single-label classification" in capsys.readouterr().err


def test_a_batch_larger_than_the_labelled_set_shrinks_to_fit_it(tmp_path, tiny_encoder, topics, capsys):
    run_dir = finetune(tmp_path, tiny_encoder, topics, "data.budget=1", "trainer.epochs=2", "trainer.patience=null")
    assert "trainer.batch_size 8 is more than the 5 training examples fill" in capsys.readouterr().err
    start = next(json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"start"' in line)
    assert start["examples"] == 5 and start["total_steps"] == 2  # one batch of all 5 labels per epoch


def test_an_early_stop_between_log_lines_still_logs_the_steps_it_ran(tmp_path, tiny_encoder, topics):
    run_dir = finetune(tmp_path, tiny_encoder, topics, "trainer.epochs=20", "trainer.log_every=1000", "trainer.eval_every=2",
                       "trainer.patience=1", "trainer.lr=1e-7", "trainer.head_lr=1e-7")  # learns nothing: stops at the 2nd evaluation
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = max(r["step"] for r in rows if r["split"] == "validation")
    train = [r for r in rows if r["split"] == "train"]
    assert last < 100 and max(r["step"] for r in train) == last  # the study's cost accounting reads these lines
    assert all(r["flops"] > 0 for r in train)
