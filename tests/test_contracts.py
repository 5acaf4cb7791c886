"""Contract tests: every task on every backbone family it accepts, every head kind on every modality,
every strategy on every family.  They talk to tasks and families only through the declared
interfaces (``Task``, ``Backbone``/``Classifier``, head kinds), so a new task, family or head kind
that plugs in correctly passes them without a test of its own."""

import csv
import json
from pathlib import Path

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

import pretune.backbones  # noqa: F401
from pretune import heads, strategies
from pretune.backbones.arrays import ArrayClassifier, load_backbone, save_model
from pretune.backbones.audio import Audio, AudioClassifier, AudioConfig
from pretune.backbones.base import BACKBONES
from pretune.backbones.builtin import Builtin, BuiltinConfig
from pretune.errors import RecipeError
from pretune.predict import Predictor
from pretune.recipe import load_recipe
from pretune.registry import TASKS
from pretune.run import assemble

WORDS = "the a cat dog bird fish runs sleeps eats sings blue red green small big happy sad".split()
QUIET = ["trainer.progress=false", "trainer.tensorboard=false", "trainer.precision=fp32"]


def sentences(n: int, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[i] for i in torch.randint(len(WORDS), (int(torch.randint(4, 9, (1,), generator=g)),), generator=g))
            for _ in range(n)]


def save_text_folder(path: Path, model: transformers.PreTrainedModel, decoder: bool) -> Path:
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(sentences(50), trainers.WordLevelTrainer(special_tokens=special))
    if decoder:
        fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[SEP]",
                                                    bos_token="[CLS]")
    else:
        fast = transformers.BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                              sep_token="[SEP]", mask_token="[MASK]")
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Tiny pretrained starting points of every family (random weights, real folder formats) and labelled files."""
    root = tmp_path_factory.mktemp("contracts")
    torch.manual_seed(0)
    encoder = transformers.BertModel(transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                                             intermediate_size=32, max_position_embeddings=64))
    decoder = transformers.GPT2Model(transformers.GPT2Config(vocab_size=40, n_embd=16, n_layer=2, n_head=2, n_positions=64,
                                                                bos_token_id=2, eos_token_id=3))
    out = {"encoder": save_text_folder(root / "bert", encoder, False), "decoder": save_text_folder(root / "gpt2", decoder, True)}
    log = root / "log.csv"  # 12 users, 4-9 events each over 15 items, a rating per event
    g = torch.Generator().manual_seed(2)
    log.write_text("user_id,item_id,rating,timestamp\n" + "".join(
        f"u{u},m{int(torch.randint(15, (1,), generator=g))},{int(torch.randint(1, 6, (1,), generator=g))},{t}\n"
        for u in range(12) for t in range(int(torch.randint(4, 10, (1,), generator=g)))))
    out["log"] = log
    recipe = load_recipe("recipes/interactions-masked.yaml", [f"data.file={log}", "data.max_length=8", "backbone.size=nano", *QUIET])
    task, data, module = assemble(recipe)
    task.save(module, root / "items", data)  # an item model folder to fine-tune
    out["items"] = root / "items"
    texts = sentences(60, seed=1)
    tables = {
        "single": [(t, "animal" if ("cat" in t or "dog" in t) else "other") for t in texts],
        "multi": [(t, ";".join(w for w in ("cat", "blue") if w in t.split())) for t in texts],
        "regression": [(t, float(len(t.split()))) for t in texts],
        "tags": [(t, " ".join("B-ANI" if w in ("cat", "dog", "bird", "fish") else "O" for w in t.split())) for t in texts],
    }
    for kind, rows in tables.items():
        with open(root / f"{kind}.csv", "w", newline="") as handle:
            csv.writer(handle).writerows([("text", "label"), *rows])
        out[kind] = root / f"{kind}.csv"
    for name, shape_cfg, network in (("cnn", ["data.size=8"], "cnn"), ("mlp", ["data.images=null", "data.vectors=builtin:digits", "data.size=null"], "mlp")):
        recipe = load_recipe("recipes/image-classify.yaml", [f"backbone.name={network}", "data.max_examples=60", *shape_cfg, *QUIET])
        _, data, _ = assemble(recipe)
        backbone = Builtin(BuiltinConfig(name=network, size="tiny")).build(data)
        (root / name).mkdir()
        save_model(root / name, ArrayClassifier(backbone, 3), backbone)
        out[name] = root / name
    _, data, _ = assemble(load_recipe("recipes/audio-classify.yaml", [*AUDIO, *QUIET]))
    backbone = Audio(AudioConfig(size="tiny")).build(data)
    (root / "audio").mkdir()
    save_model(root / "audio", AudioClassifier(backbone, 3), backbone)
    out["audio"] = root / "audio"
    whisper = transformers.WhisperModel(transformers.WhisperConfig(  # Whisper's folder format, tiny random weights
        d_model=16, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=32, decoder_layers=1, decoder_attention_heads=2,
        decoder_ffn_dim=32, num_mel_bins=80, max_source_positions=1500, vocab_size=60, max_target_positions=32, pad_token_id=0, bos_token_id=1,
        eos_token_id=1, decoder_start_token_id=1))
    whisper.save_pretrained(root / "whisper")
    out["whisper"] = root / "whisper"
    return out


# -- which task runs on which family --------------------------------------------------------------------
TEXT_PRETRAIN = ["data.max_documents=40", "data.block_size=16", "data.tokenizer.vocab_size=200", "backbone.size=nano"]
IMAGES = ["data.size=8", "data.max_examples=64"]
VECTORS = ["data.images=null", "data.size=null", "data.vectors=builtin:digits", "data.max_examples=64"]
ITEMS = ["data.max_length=8", "backbone.size=nano"]
AUDIO = ["data.duration=0.5", "backbone.size=tiny"]  # the embedded spoken digits, 50 frames per clip


def cases(folders):
    """(id, recipe, overrides) for every registered task on every family it accepts."""
    return [
        ("mlm/hf", "text-mlm.yaml", TEXT_PRETRAIN),
        ("mlm-nsp/hf", "text-mlm-nsp.yaml", TEXT_PRETRAIN),
        ("mlm/hf-folder", "text-mlm.yaml", ["data.max_documents=40", "data.block_size=16", f"model={folders['encoder']}"]),
        ("clm/hf-gpt2", "text-clm.yaml", TEXT_PRETRAIN + ["backbone.name=gpt2"]),
        ("clm/hf-llama", "text-clm.yaml", TEXT_PRETRAIN + ["backbone.name=llama"]),
        ("simcse/hf", "text-simcse.yaml", TEXT_PRETRAIN),
        ("simclr/builtin-cnn", "image-simclr.yaml", IMAGES + ["backbone.size=tiny"]),
        ("simclr/builtin-mlp", "image-simclr.yaml", VECTORS + ["backbone=mlp"]),
        ("simclr/timm", "image-simclr.yaml", ["data.size=32", "data.max_examples=32", "backbone=test_resnet"]),
        ("autoencoder/builtin-cnn", "image-autoencoder.yaml", IMAGES + ["backbone.size=tiny"]),
        ("autoencoder/builtin-mlp", "vector-autoencoder.yaml", ["data.max_examples=64"]),
        ("gan/builtin-cnn", "image-gan.yaml", IMAGES + ["backbone.size=tiny"]),
        ("classify/hf-encoder", "text-classify.yaml", [f"model={folders['encoder']}", f"data.train={folders['single']}"]),
        ("classify/hf-decoder", "text-classify.yaml", [f"model={folders['decoder']}", f"data.train={folders['single']}"]),
        ("classify/builtin-cnn", "image-classify.yaml", IMAGES + [f"model={folders['cnn']}"]),
        ("classify/builtin-mlp", "image-classify.yaml", VECTORS + [f"model={folders['mlp']}", "task.augment=null"]),
        ("classify-scratch/builtin-cnn", "image-supervised.yaml", IMAGES + ["backbone.size=tiny"]),
        ("classify/timm", "image-classify.yaml", ["data.size=32", "data.max_examples=32", "backbone=test_resnet"]),
        ("mlm/items", "interactions-masked.yaml", [f"data.file={folders['log']}", *ITEMS]),
        ("clm/items", "interactions-next.yaml", [f"data.file={folders['log']}", *ITEMS]),
        ("two-tower/items", "interactions-two-tower.yaml", [f"data.file={folders['log']}", *ITEMS]),
        ("regress/items-folder", "interactions-rate.yaml", [f"data.file={folders['log']}", f"model={folders['items']}", "data.max_length=8"]),
        ("best-rq/audio", "audio-masked.yaml", AUDIO),
        ("simclr/audio", "audio-contrastive.yaml", AUDIO),
        ("autoencoder/audio", "audio-autoencoder.yaml", AUDIO),
        ("classify/audio-folder", "audio-classify.yaml", AUDIO + [f"model={folders['audio']}"]),
        ("classify/audio-whisper", "audio-classify.yaml", ["data.duration=0.5", f"model={folders['whisper']}"]),
    ]


CASE_IDS = [case[0] for case in cases({k: "x" for k in ("encoder", "decoder", "single", "cnn", "mlp", "log", "items", "audio", "whisper")})]


def test_every_registered_task_has_a_contract_case():
    covered = {name for case in CASE_IDS for name in (case.split("/")[0], case.split("/")[0].split("-")[0])}  # mlm-nsp is mlm
    assert set(TASKS.names()) - {"regress", "tag"} <= covered  # regress and tag: test_every_head_kind_on_every_modality
    assert set(BACKBONES.names()) - {"torchvision"} <= {case.split("/")[1].split("-")[0] for case in CASE_IDS}


def batch_of(task, data, n=8):
    rows = data.train[list(range(min(n, len(data.train))))]
    return task.collate(rows, list(range(len(next(iter(rows.values()))))))


def saved_outputs_equal(task, module, data, batch, path):
    """The saved folder reloads (with the ecosystem's or pretune's loader) into the same function."""
    module.eval()
    with torch.no_grad():
        if task.head is not None:  # fine-tuned: the one predictor
            predictor = Predictor(path, device="cpu")
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            torch.testing.assert_close(predictor.model(inputs).float(), module.model(inputs).float())
        elif task.unit == "ex":  # image / audio / vector pretraining: the backbone folder
            x = batch["x"]
            x = x.flatten(0, 1) if x.dim() == len(module.backbone.input_shape) + 2 else x  # SimCLR: [B, 2 views, ...]
            torch.testing.assert_close(load_backbone(path).eval()(x), module.backbone(x))
        else:  # text pretraining: a standard Hugging Face folder
            reloaded = transformers.AutoModel.from_pretrained(path).eval()
            ids = batch["input_ids"][:, :8]
            torch.testing.assert_close(reloaded(input_ids=ids).last_hidden_state, module.model.base_model(input_ids=ids).last_hidden_state)


@pytest.mark.parametrize("case", CASE_IDS)
def test_every_task_runs_on_every_family_it_accepts(case, folders, tmp_path):
    if "timm" in case:
        pytest.importorskip("timm")
    _, recipe_file, overrides = next(c for c in cases(folders) if c[0] == case)
    recipe = load_recipe(f"recipes/{recipe_file}", [*overrides, *QUIET, f"run_dir={tmp_path}"])
    task, data, module = assemble(recipe)
    task.on_epoch(module, 0)
    batch = batch_of(task, data)
    units = task.units(batch)
    assert all(float(units[k]) > 0 for k in task.losses)
    module.train()
    for phase, keys in task.optimizer_phases().items():
        out = module(batch, phase) if len(task.optimizer_phases()) > 1 else module(batch)
        loss = sum(out[k] / units[k] for k in keys)
        assert torch.isfinite(loss), (case, phase)
        loss.backward()
        trained = [p for _, p in task.phase_parameters(module, phase) if p.requires_grad]
        assert trained and any(p.grad is not None and p.grad.abs().sum() > 0 for p in trained), (case, phase)
    assert task.tokens(batch) > 0 and task.flops(module, batch) >= 0
    (tmp_path / "model").mkdir()
    task.save(module, tmp_path / "model", data)
    saved_outputs_equal(task, module, data, batch, tmp_path / "model")


# -- head kinds ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(heads.HEADS))
def test_every_head_kind_on_text(kind, folders, tmp_path):
    task_args = {"single": ["task=classify"], "multi": ["task=classify", "task.multi_label=true"], "regression": ["task=regress"],
                 "tags": ["task=tag"]}[kind]
    recipe = load_recipe("recipes/text-classify.yaml", [f"model={folders['encoder']}", f"data.train={folders[kind]}", *task_args,
                                                        *QUIET, f"run_dir={tmp_path}"])
    task, data, module = assemble(recipe)
    assert task.head is heads.get(kind)
    batch = batch_of(task, data)
    out = module(batch)
    assert torch.isfinite(out[task.head.loss_key]) and float(task.units(batch)[task.head.loss_key]) > 0
    scores = task.score([out["logits"]], [batch["labels"]])
    assert task.monitor[0] in scores
    (tmp_path / "model").mkdir()
    task.save(module, tmp_path / "model", data)
    saved_outputs_equal(task, module, data, batch, tmp_path / "model")
    predicted = Predictor(tmp_path / "model", device="cpu").predict(list(data.train[:3]["text"]))
    assert len(predicted) == 3 and set(predicted[0]) & {"label", "labels", "value", "tags"}


@pytest.mark.parametrize("inputs", ["images", "vectors"])
def test_single_label_head_on_images_and_vectors_and_a_clear_refusal_for_others(inputs, folders, tmp_path):
    extra = IMAGES + [f"model={folders['cnn']}"] if inputs == "images" else VECTORS + [f"model={folders['mlp']}", "task.augment=null"]
    task, data, module = assemble(load_recipe("recipes/image-classify.yaml", [*extra, *QUIET]))
    assert task.head is heads.get("single")
    batch = batch_of(task, data)
    assert torch.isfinite(module(batch)["ce"])
    with pytest.raises(RecipeError, match="not supported yet"):
        assemble(load_recipe("recipes/image-classify.yaml", [*extra, *QUIET, "task.multi_label=true"]))


# -- strategies ------------------------------------------------------------------------------------------------
STRATEGIES = ["full", "linear-probe", "freeze-bottom:1", "gradual-unfreeze", "llrd:0.5", "lora:r=2"]


def family_recipe(family, folders):
    return {
        "hf": ("text-classify.yaml", [f"model={folders['encoder']}", f"data.train={folders['single']}"]),
        "builtin-cnn": ("image-classify.yaml", IMAGES + [f"model={folders['cnn']}", "task.augment=null"]),
        "builtin-mlp": ("image-classify.yaml", VECTORS + [f"model={folders['mlp']}", "task.augment=null"]),
        "audio": ("audio-classify.yaml", AUDIO + [f"model={folders['audio']}", "task.augment=null"]),
    }[family]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("family", ["hf", "builtin-cnn", "builtin-mlp", "audio"])
def test_every_strategy_on_every_family_trains_exactly_what_it_says(strategy, family, folders):
    recipe_file, overrides = family_recipe(family, folders)
    recipe = load_recipe(f"recipes/{recipe_file}", [*overrides, *QUIET, f"strategy={strategy}", "task.cache_features=false"])
    if strategy.startswith("lora") and family not in ("hf", "audio"):
        with pytest.raises(RecipeError, match="lora"):
            assemble(recipe)
        return
    task, data, module = assemble(recipe)
    epoch = 1 if strategy == "gradual-unfreeze" else 0  # epoch 1: the head and the top layer group train
    task.on_epoch(module, epoch)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    scales = task.lr_scales(module)
    groups = {}
    for name, param in module.named_parameters():
        if param.requires_grad:
            groups.setdefault(scales.get(name, 1.0), []).append(param)
    optimizer = torch.optim.SGD([{"params": ps, "lr": 0.1 * s} for s, ps in groups.items()])
    module.train()
    batch = batch_of(task, data, 16)
    for _ in range(2):
        optimizer.zero_grad()
        out = module(batch)
        (out[task.head.loss_key] / task.units(batch)[task.head.loss_key]).backward()
        optimizer.step()
    frozen = {n for n, p in module.named_parameters() if not p.requires_grad}
    for name, param in module.named_parameters():
        if name in frozen:
            assert torch.equal(before[name], param), f"{strategy} on {family}: frozen {name} moved"
    moved = {n for n, p in module.named_parameters() if n in before and not torch.equal(before[n], p)}
    new = {f"model.{n}" for n in module.model.new_parameters}
    assert new & moved or strategy.startswith("lora"), f"{strategy}: the task layer did not train"
    groups_trained = strategies.apply(recipe.strategy, module.model, epoch) if not strategy.startswith("lora") else []
    backbone_moved = {n for n in moved if n not in new and "lora" not in n}
    if strategy == "linear-probe":
        assert not backbone_moved
    elif strategy.startswith("lora"):
        assert any("lora" in n for n in moved) and not backbone_moved - {n for n in moved if "modules_to_save" in n}
    else:
        assert backbone_moved and groups_trained


@pytest.mark.parametrize("family", ["hf", "audio"])
def test_saving_a_lora_model_leaves_the_live_adapters_training(family, folders, tmp_path):
    """A checkpoint mid-run saves the adapters merged, into a copy: the model that goes on training keeps them."""
    recipe_file, overrides = family_recipe(family, folders)
    task, data, module = assemble(load_recipe(f"recipes/{recipe_file}", [*overrides, *QUIET, "strategy=lora:r=2", "task.cache_features=false"]))
    task.on_epoch(module, 0)
    training = sorted(n for n, p in module.named_parameters() if p.requires_grad)
    assert any("lora" in n for n in training)
    (tmp_path / "model").mkdir()
    task.save(module, tmp_path / "model", data)
    assert sorted(n for n, p in module.named_parameters() if p.requires_grad) == training
