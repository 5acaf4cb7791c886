"""Untrusted files cannot run code: weights only from safetensors, trainer state through the
restricted unpickler (explicitly, so TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD cannot undo it), and pickle
weights from outside refused with one line unless the user passes --trust-pickle."""

import ast
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from pretune.cli import main
from pretune import safeload
from pretune.errors import CheckpointError, UnsafeFileError
from pretune.trainer import checkpoint
from tests.integration.helpers import ENV
from tests.reliability.payload import plant

FAST = ["trainer.batch_size=8", "trainer.progress=false", "trainer.tensorboard=false", "trainer.precision=fp32",
        "trainer.max_steps=2", "data.max_length=32"]


@pytest.fixture(autouse=True)
def unsafe_environment(monkeypatch):
    """The worst common setting: torch told to unpickle everything by default (as in many Dockerfiles)."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    monkeypatch.delenv("PRETUNE_TRUST_PICKLE", raising=False)


def test_the_payload_is_real(tmp_path):
    """Control: an unrestricted load of the planted file does run its code (so its absence below means something)."""
    marker = tmp_path / "ran"
    plant(tmp_path / "evil.pt", marker)
    subprocess.run([sys.executable, "-c", f"import torch; torch.load({str(tmp_path / 'evil.pt')!r})"], env=ENV | {
        "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}, capture_output=True, check=False)
    assert marker.read_text() == "code ran"


def test_trainer_state_with_a_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "ran"
    folder = tmp_path / "run" / "checkpoints" / "step-00000001"
    plant(folder / "state.pt", marker)
    with pytest.raises(CheckpointError, match=r"state\.pt: cannot be loaded as trainer state"):
        checkpoint.load_state(folder)
    assert not marker.exists()


def test_load_torch_state_never_runs_a_payload(tmp_path):
    """The one torch.load of pretune: restricted unpickler even under TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1."""
    marker = tmp_path / "ran"
    plant(tmp_path / "evil.pt", marker)
    with pytest.raises(Exception, match="(?i)weights.only|unpickl"):
        safeload.load_torch_state(tmp_path / "evil.pt")
    assert not marker.exists()
    torch.save({"step": 3, "w": torch.ones(2)}, tmp_path / "good.pt")
    assert safeload.load_torch_state(tmp_path / "good.pt")["step"] == 3


def test_safeload_is_a_leaf_module():
    """Backbones, the trainer and the predictor import it downwards: it imports no other pretune module."""
    tree = ast.parse(open(safeload.__file__, encoding="utf-8").read())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert {name for name in imported if name.startswith("pretune")} == {"pretune.errors"}


def test_resume_from_a_planted_state_exits_with_the_checkpoint_code(tmp_path, encoder, labelled):
    run_dir = tmp_path / "clf"
    assert main(["finetune", "recipes/text-classify.yaml", f"model={encoder}", f"run_dir={run_dir}",
                 f"data.train={labelled}", *FAST, "trainer.save_every=1"]) == 0
    latest = checkpoint.latest_checkpoint(run_dir)
    marker = tmp_path / "ran"
    plant(latest / "state.pt", marker)
    assert main(["finetune", str(run_dir), "--resume", "trainer.max_steps=3"]) == CheckpointError.exit_code
    assert not marker.exists()


def hf_folder_with_pickle_weights(encoder, folder, marker=None):
    """A copy of a model folder whose only weights are ``pytorch_model.bin`` (real tensors, or a payload)."""
    shutil.copytree(encoder, folder)
    (folder / "model.safetensors").unlink()
    if marker is None:
        torch.save(load_file(str(encoder / "model.safetensors")), folder / "pytorch_model.bin")
    else:
        plant(folder / "pytorch_model.bin", marker)
    return folder


def test_hf_folder_with_only_pytorch_model_bin_is_refused_with_one_line(tmp_path, encoder, labelled, capsys):
    marker = tmp_path / "ran"
    folder = hf_folder_with_pickle_weights(encoder, tmp_path / "stranger", marker)
    code = main(["finetune", "recipes/text-classify.yaml", f"model={folder}", f"run_dir={tmp_path / 'clf'}",
                 f"data.train={labelled}", *FAST])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == UnsafeFileError.exit_code == 9
    assert err[-1].startswith("pretune: error:") and "pytorch_model.bin" in err[-1] and "--trust-pickle" in err[-1]
    assert not marker.exists()
    # pretraining from the same folder (backbone.path) is refused the same way
    code = main(["pretrain", "recipes/text-mlm.yaml", f"backbone.path={folder}", f"run_dir={tmp_path / 'mlm'}", *FAST[:-1]])
    assert code == 9 and not marker.exists()


def test_trust_pickle_still_goes_through_the_restricted_unpickler(tmp_path, encoder, labelled, capsys, monkeypatch):
    """--trust-pickle lets tensor-only pickles in; a payload still cannot run (transformers passes weights_only=True)."""
    marker = tmp_path / "ran"
    folder = hf_folder_with_pickle_weights(encoder, tmp_path / "evil", marker)
    code = main(["finetune", "recipes/text-classify.yaml", f"model={folder}", f"run_dir={tmp_path / 'a'}",
                 f"data.train={labelled}", *FAST, "--trust-pickle"])
    os.environ.pop("PRETUNE_TRUST_PICKLE", None)
    assert code == UnsafeFileError.exit_code and not marker.exists()
    assert "restricted unpickler" in capsys.readouterr().err


def test_trust_pickle_loads_a_genuine_pytorch_model_bin(tmp_path, encoder, labelled, monkeypatch):
    folder = hf_folder_with_pickle_weights(encoder, tmp_path / "legacy")
    run_dir = tmp_path / "clf"
    assert main(["finetune", "recipes/text-classify.yaml", f"model={folder}", f"run_dir={run_dir}",
                 f"data.train={labelled}", *FAST, "strategy=linear-probe", "--trust-pickle"]) == 0
    os.environ.pop("PRETUNE_TRUST_PICKLE", None)  # main() set it for this process
    # the pretrained weights were really read from the .bin: the frozen encoder equals them exactly
    pretrained, tuned = load_file(str(encoder / "model.safetensors")), load_file(str(run_dir / "model" / "model.safetensors"))
    name = "bert.embeddings.word_embeddings.weight"
    assert torch.equal(tuned[name], pretrained[name])


@pytest.mark.parametrize("files, config_extra, refused", [
    ({"model.safetensors": b"", "pytorch_model.bin": b""}, {}, None),  # safetensors present: transformers reads it
    ({"pytorch_model.bin.index.json": b"{}"}, {}, "pytorch_model.bin.index.json"),
    ({"model.safetensors": b"", "adapter_config.json": b"{}", "adapter_model.bin": b""}, {}, "adapter_model.bin"),
    ({"model.safetensors": b""}, {"transformers_weights": "adapter_model.bin"}, "adapter_model.bin"),
    ({"model.safetensors": b""}, {"transformers_weights": "model.safetensors"}, None),
])
def test_model_folder_rules(tmp_path, files, config_extra, refused):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", **config_extra}))
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    if refused is None:
        safeload.check_model_folder(tmp_path)
    else:
        with pytest.raises(UnsafeFileError, match=refused):
            safeload.check_model_folder(tmp_path)


def test_timm_pth_weights_are_refused_unless_trusted(tmp_path, monkeypatch):
    pytest.importorskip("timm")
    import timm

    from types import SimpleNamespace

    from pretune.backbones.timm import Timm, TimmConfig

    marker = tmp_path / "ran"
    evil = plant(tmp_path / "weights.pth", marker)
    data = SimpleNamespace(arrays=SimpleNamespace(shape=(3, 32, 32), unlabelled_train=SimpleNamespace(x=torch.rand(4, 3, 32, 32))))

    def build_backbone(cfg):
        return Timm(cfg).build(data)

    cfg = TimmConfig(name="test_resnet", weights=str(evil))
    with pytest.raises(UnsafeFileError, match=r"weights\.pth.*backbone\.weights.*--trust-pickle"):
        build_backbone(cfg)
    monkeypatch.setenv("PRETUNE_TRUST_PICKLE", "1")  # trusted, but timm still unpickles with weights_only=True
    with pytest.raises(CheckpointError):
        build_backbone(cfg)
    assert not marker.exists()
    genuine = tmp_path / "genuine.pth"  # a real timm state dict loads when trusted
    reference = timm.create_model("test_resnet", num_classes=0)
    torch.save(reference.state_dict(), genuine)
    backbone = build_backbone(TimmConfig(name="test_resnet", weights=str(genuine)))
    name, tensor = next(iter(reference.state_dict().items()))
    assert torch.equal(backbone.net.model.state_dict()[name], tensor)


def test_predict_refuses_a_pickle_model_folder(tmp_path, encoder, capsys):
    from pretune.predict import Predictor

    marker = tmp_path / "ran"
    folder = hf_folder_with_pickle_weights(encoder, tmp_path / "clf", marker)
    (folder / "pretune.json").write_text(json.dumps({"kind": "single", "label_names": ["a", "b"]}))
    with pytest.raises(UnsafeFileError, match="pytorch_model.bin"):
        Predictor(folder)
    (tmp_path / "in.txt").write_text("hello\n")
    assert main(["predict", str(folder), str(tmp_path / "in.txt"), "--out", str(tmp_path / "p.jsonl")]) == 9
    assert not marker.exists()
