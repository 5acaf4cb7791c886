"""Every image / vector objective end to end on tiny models and the embedded digits: it learns,
saves a backbone that fine-tuning loads, and strategies freeze what they should."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pretune.backbones.arrays import load_backbone
from pretune.recipe import load_recipe
from pretune.run import train
from tests.integration.helpers import weights

TINY = ["backbone.size=tiny", "data.size=8", "trainer.progress=false", "trainer.tensorboard=false", "trainer.log_every=5",
        "trainer.precision=fp32", "trainer.threads=1"]


def run(recipe: str, run_dir: Path, *overrides: str, resume: bool = False):
    cfg = load_recipe(str(run_dir) if resume else f"recipes/{recipe}.yaml", [f"run_dir={run_dir}", *TINY, *overrides])
    return train(cfg, resume=resume, overwrite=not resume)


def log(run_dir: Path, split: str) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["split"] == split]


def test_simclr_learns_and_saves_a_backbone(tmp_path):
    result = run("image-simclr", tmp_path, "trainer.max_steps=40", "trainer.eval_every=20", "trainer.batch_size=64")
    evals = log(tmp_path, "validation")
    assert evals[-1]["contrastive_loss"] < evals[0]["contrastive_loss"] - 0.3
    assert evals[-1]["contrastive_accuracy"] > 5 * evals[0]["contrastive_accuracy"]
    assert evals[-1]["knn_accuracy"] > 0.5  # chance is 0.1
    backbone = load_backbone(result.model_dir)
    assert backbone.input_shape == (1, 8, 8)
    saved = weights(result.model_dir)
    for name, value in backbone.state_dict().items():
        torch.testing.assert_close(value, saved[f"backbone.{name}"])
    assert log(tmp_path, "train")[-1]["examples_per_s"] > 0 and 0 < log(tmp_path, "train")[-1]["mfu"] < 1


@pytest.mark.parametrize("recipe,noise", [("image-autoencoder", "gaussian"), ("image-autoencoder", "mask"),
                                          ("vector-autoencoder", "mask"), ("vector-autoencoder", "gaussian")])
def test_autoencoders_learn_to_reconstruct(tmp_path, recipe, noise):
    run(recipe, tmp_path, f"task.noise={noise}", "trainer.max_steps=40", "trainer.eval_every=40", "trainer.lr=3e-3")
    evals = log(tmp_path, "validation")
    assert evals[-1]["reconstruction_loss"] < 0.6 * evals[0]["reconstruction_loss"]
    assert evals[-1]["knn_accuracy"] > 0.5


def test_gan_trains_both_players_and_writes_samples(tmp_path):
    result = run("image-gan", tmp_path, "trainer.max_steps=30", "trainer.eval_every=15", "task.generator_width=32")
    evals = log(tmp_path, "validation")
    # the discriminator learns to tell real from generated images: below the 2 ln 2 of chance
    assert evals[-1]["d_real_loss"] + evals[-1]["d_fake_loss"] < 2 * 0.693 - 0.1
    assert evals[-1]["d_accuracy"] > 0.6
    assert {"grad_norm_discriminator", "grad_norm_generator"} <= log(tmp_path, "train")[-1].keys()
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["step-00000000.png", "step-00000015.png", "step-00000030.png"]
    assert (result.model_dir / "samples.png").is_file()
    # the generator moved (its samples changed) and the discriminator's trunk is a backbone
    from PIL import Image

    first, last = (torch.tensor(list(Image.open(tmp_path / "samples" / n).get_flattened_data())).float() for n in ("step-00000000.png", "step-00000030.png"))
    assert (first - last).abs().mean() > 1.0
    assert load_backbone(result.model_dir).num_features == 64


def test_gan_resume_is_exact_with_two_optimizers(tmp_path):
    common = ["trainer.max_steps=6", "trainer.save_every=3", "trainer.eval_every=100", "task.generator_width=16", "data.max_examples=200"]
    run("image-gan", tmp_path / "full", *common)
    run("image-gan", tmp_path / "cut", *common[:1], *common[1:], "trainer.max_steps=3")
    run("image-gan", tmp_path / "cut", "trainer.max_steps=6", resume=True)
    a, b = weights(tmp_path / "full" / "model"), weights(tmp_path / "cut" / "model")
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_supervised_pretraining_transfers_to_other_classes(tmp_path):
    source = run("image-supervised", tmp_path / "source", "trainer.epochs=3")
    assert log(tmp_path / "source", "validation")[-1]["accuracy"] > 0.8
    target = run("image-classify", tmp_path / "target", f"model={source.model_dir}", "data.classes=[5,6,7,8,9]",
                 "data.budget=0.2", "trainer.epochs=10", "strategy=freeze-bottom:2")
    meta = json.loads((target.model_dir / "pretune.json").read_text())
    assert meta["label_names"] == ["5", "6", "7", "8", "9"]
    assert log(tmp_path / "target", "validation")[-1]["accuracy"] > 0.6
    # freeze-bottom:2 kept the stem and the first two stages exactly as pretrained
    before, after = weights(source.model_dir), weights(target.model_dir)
    for name in after:
        if name.startswith(("backbone.net.stem.", "backbone.net.stages.0.")) and "running" not in name and "num_batches" not in name:
            assert torch.equal(before[name], after[name]), name
        if name.startswith("backbone.net.stages.2.") and name.endswith("weight"):
            assert not torch.equal(before[name], after[name]), name


def test_linear_probe_trains_only_the_head_on_cached_features(tmp_path):
    pre = run("image-simclr", tmp_path / "pre", "trainer.max_steps=30", "trainer.eval_every=100", "trainer.batch_size=64")
    probe = run("image-classify", tmp_path / "probe", f"model={pre.model_dir}", "strategy=linear-probe", "data.budget=0.1",
                "trainer.epochs=20", "trainer.lr=0.05")
    before, after = weights(pre.model_dir), weights(probe.model_dir)
    for name, value in after.items():
        if name.startswith("backbone."):
            assert torch.equal(before[name], value), name  # batch-norm statistics too: the backbone ran in eval mode
    assert log(tmp_path / "probe", "validation")[-1]["accuracy"] > 0.5


def test_llrd_and_gradual_unfreezing_on_a_cnn(tmp_path):
    from pretune import strategies
    from pretune.backbones.arrays import ArrayClassifier

    backbone = load_backbone(run("image-simclr", tmp_path / "pre", "trainer.max_steps=2", "trainer.eval_every=100",
                                 "trainer.batch_size=64").model_dir)
    model = ArrayClassifier(backbone, 10)
    scales = strategies.lr_scales(strategies.parse("llrd:0.5"), model, 1.0)
    assert scales["backbone.net.stages.2.0.0.weight"] == 0.5 and scales["backbone.net.stem.0.weight"] == 0.5 ** 4
    assert scales["head.weight"] == 1.0
    gradual = strategies.parse("gradual-unfreeze")
    for epoch, trainable_stages in ((0, []), (1, [2]), (2, [1, 2])):
        strategies.apply(gradual, model, epoch)
        trains = {i for i in range(3) if model.backbone.net.stages[i][0][0].weight.requires_grad}
        assert trains == set(trainable_stages) and model.head.weight.requires_grad


def test_timm_backbone_with_local_weights_file(tmp_path):
    timm = pytest.importorskip("timm")
    import safetensors.torch

    reference = timm.create_model("test_resnet", num_classes=0, in_chans=1)
    file = tmp_path / "test_resnet.safetensors"
    safetensors.torch.save_file(reference.state_dict(), str(file))
    result = run("image-simclr", tmp_path / "run", "backbone=test_resnet", f"backbone.weights={file}", "data.size=16",
                 "trainer.max_steps=1", "trainer.eval_every=100", "trainer.batch_size=16", "trainer.lr=1e-9")
    saved = weights(result.model_dir)
    for name, value in reference.state_dict().items():
        if "running" not in name and "num_batches" not in name:
            torch.testing.assert_close(saved[f"backbone.net.model.{name}"], value, atol=1e-5, rtol=0), name
    assert json.loads((result.model_dir / "config.json").read_text())["backbone"]["name"] == "test_resnet"
    assert "weights" not in json.loads((result.model_dir / "config.json").read_text())["backbone"]
    assert load_backbone(result.model_dir).num_features == reference.num_features


def test_a_saved_timm_backbone_loads_in_timm_itself_with_the_saved_normalisation(tmp_path):
    timm = pytest.importorskip("timm")
    result = run("image-simclr", tmp_path / "run", "backbone=test_resnet", "data.size=16", "trainer.max_steps=2",
                 "trainer.eval_every=100", "trainer.batch_size=16")
    config = json.loads((result.model_dir / "config.json").read_text())
    mean, std = (torch.tensor(config["normalization"][k]).view(1, -1, 1, 1) for k in ("mean", "std"))
    plain = timm.create_model("test_resnet", pretrained=True, num_classes=0, in_chans=1,
                              pretrained_cfg_overlay={"file": str(result.model_dir / "backbone.safetensors")}).eval()
    ours = load_backbone(result.model_dir).eval()
    x = torch.rand(4, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(plain((x - mean) / std), ours(x))


def test_a_local_weights_file_counts_as_pretrained_for_a_linear_probe(tmp_path):
    """The seed documents' recipe: a headless pretrained CNN, trainable=False, a new dense head."""
    timm = pytest.importorskip("timm")
    import safetensors.torch

    reference = timm.create_model("test_resnet", num_classes=0, in_chans=1)
    file = tmp_path / "test_resnet.safetensors"
    safetensors.torch.save_file(reference.state_dict(), str(file))
    result = run("image-classify", tmp_path / "probe", "backbone=test_resnet", f"backbone.weights={file}", "data.size=16",
                 "strategy=linear-probe", "trainer.epochs=2", "trainer.batch_size=64")
    saved = weights(result.model_dir)
    for name, value in reference.state_dict().items():  # the frozen backbone is the file's, untouched
        torch.testing.assert_close(saved[f"backbone.net.model.{name}"], value, atol=0, rtol=0), name
