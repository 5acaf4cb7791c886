"""``trainer.report_to``: MLflow's local store and W&B's offline files read back with their own client / protobuf
schema after a tiny run (the linear task of test_loop.py), a resumed run continuing the same tracker run, the
recipe key's one-line errors, and trackers that raise without stopping training."""

import json
import os
import sys
from pathlib import Path

import pytest

from pretune.errors import RecipeError
from pretune.recipe import TrainerConfig, load_recipe
from pretune.trainer import checkpoint, tracking
from tests.trainer.test_loop import records, run


@pytest.fixture(autouse=True)
def local_only(monkeypatch, tmp_path):
    """No GEMM peak measurement (half a second), no user tracker settings, W&B's own files under tmp_path."""
    import pretune.trainer.loop as loop

    monkeypatch.setattr(loop, "measure_peak", lambda dtype, device: 1e12)
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_DISABLE_TELEMETRY", "WANDB_MODE", "WANDB_PROJECT",
                 "WANDB_DIR", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_SILENT", "WANDB_ERROR_REPORTING"):
        monkeypatch.setenv(name, "")  # recorded, so what the trackers set (WANDB_SILENT...) is undone after the test
        monkeypatch.delenv(name)
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))


def steps(rows, key):
    return [(row["step"], pytest.approx(row[key])) for row in rows]


@pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")  # MLflow 3.17 on SQLAlchemy 2.1
def test_mlflow_keeps_params_metrics_notes_and_the_model_in_the_run_directory(tmp_path):
    from mlflow import MlflowClient

    run_dir = tmp_path / "mlrun"
    run(run_dir, report_to=["mlflow"], max_steps=8, save_every=4)  # then resumed to step 16: the same MLflow run goes on
    first_id = (run_dir / "mlflow" / "run_id").read_text()
    run(run_dir, resume_from=checkpoint.latest_checkpoint(run_dir), report_to=["mlflow"], max_steps=16, save_every=4)

    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"  # the local store sends no usage telemetry either
    client = MlflowClient(f"sqlite:///{run_dir.resolve() / 'mlflow' / 'mlflow.db'}")
    (found,) = client.search_runs([client.get_experiment_by_name("mlrun").experiment_id])
    run_id = found.info.run_id
    assert run_id == first_id == (run_dir / "mlflow" / "run_id").read_text()
    assert found.info.status == "FINISHED" and found.info.run_name == "mlrun"
    assert found.data.params["trainer.optimizer"] == "sgd" and found.data.params["trainer.lr"] == "0.05"
    assert found.data.params["trainer.max_steps"] == "8"  # params never change; recipe.yaml has the resumed value
    history = client.get_metric_history(run_id, "train/loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == steps(records(run_dir, "train"), "loss")
    assert [m.step for m in client.get_metric_history(run_id, "train/grad_norm")] == list(range(2, 17, 2))
    assert sorted(m.step for m in client.get_metric_history(run_id, "validation/loss")) == [0, 4, 8, 12, 16]
    assert "step 8 (epoch): epoch 1: body unfrozen" in found.data.tags["mlflow.note.content"]

    assert {a.path for a in client.list_artifacts(run_id)} == {"model", "recipe.yaml"}
    assert [a.path for a in client.list_artifacts(run_id, "model")] == ["model/model.safetensors"]
    copy = Path(client.download_artifacts(run_id, "model", str(tmp_path / "download")))
    assert (copy / "model.safetensors").read_bytes() == (run_dir / "model" / "model.safetensors").read_bytes()
    assert "max_steps: 16" in Path(client.download_artifacts(run_id, "recipe.yaml", str(tmp_path / "download"))).read_text()


def wandb_records(path: Path):
    """The protobuf records of a ``.wandb`` file (wandb 0.31 has no public reader of it): a 7-byte header
    (``:W&B``, magic, version), then LevelDB log chunks in 32 KiB blocks, each a 7-byte header (CRC,
    little-endian length, type: 1 full, 2 first, 3 middle, 4 last) and its bytes."""
    from wandb.proto.wandb_internal_pb2 import Record

    data, position, block, pending = path.read_bytes(), 7, 32768, b""
    assert data[:4] == b":W&B"
    while position + 7 <= len(data):
        if block - position % block < 7:  # the tail of a block too short for a header is padding
            position += block - position % block
            continue
        length, kind = int.from_bytes(data[position + 4:position + 6], "little"), data[position + 6]
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


def test_wandb_runs_offline_in_the_run_directory(tmp_path, capsys):
    import wandb

    run_dir = tmp_path / "wbrun"
    run(run_dir, report_to=["wandb"], max_steps=8, save_every=4)  # then resumed to step 16 with the same run id
    run_id = (run_dir / "wandb" / "pretune-run-id").read_text()
    run(run_dir, resume_from=checkpoint.latest_checkpoint(run_dir), report_to=["wandb"], max_steps=16, save_every=4)
    wandb.teardown()  # run.finish() returns before wandb-core has written the .wandb file; teardown waits for it
    assert (run_dir / "wandb" / "pretune-run-id").read_text() == run_id
    err = capsys.readouterr().err
    assert f"wandb: offline run {run_id} in {run_dir.resolve() / 'wandb'}" in err  # pretune's line, then W&B says nothing:
    assert "Tracking run with wandb" not in err and "Adding directory" not in err  # WANDB_SILENT

    config, history, notes, artifacts = {}, {}, [], []
    folders = sorted((run_dir / "wandb").glob("offline-run-*"))  # offline, the resumed part is a second folder (same id)
    assert folders and all(folder.name.endswith("-" + run_id) for folder in folders)
    for record in (r for folder in folders for r in wandb_records(folder / f"run-{run_id}.wandb")):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            assert record.run.project == "pretune" and record.run.display_name == "wbrun"
            notes.append(record.run.notes)
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history[record.history.step.num] = row
        elif kind == "artifact":
            artifacts.append(record.artifact)

    assert config["trainer"]["lr"] == 0.05 and config["trainer"]["report_to"] == ["wandb"]
    assert config["trainer"]["max_steps"] == 16  # the resumed run's recipe
    train = records(run_dir, "train")
    assert [(step, row["train/loss"]) for step, row in sorted(history.items()) if "train/loss" in row] == steps(train, "loss")
    assert [step for step, row in sorted(history.items()) if "validation/loss" in row] == [0, 4, 8, 12, 16]
    assert any("epoch 1: body unfrozen" in text for text in notes)
    assert [(a.type, a.name) for a in artifacts] == [("model", f"model-{run_id}")] * 2  # the model of each part
    assert [entry.path for entry in artifacts[-1].manifest.contents] == ["model.safetensors"]


def test_report_to_names_and_the_tensorboard_switch():
    assert TrainerConfig().report_to == ["tensorboard"]
    assert TrainerConfig(tensorboard=False).report_to == []  # trainer.tensorboard=false: as before, no tb/
    assert TrainerConfig(tensorboard=False, report_to=["tensorboard", "mlflow"]).report_to == ["mlflow"]
    assert load_recipe(None, ["trainer.report_to=mlflow,wandb,mlflow"]).trainer.report_to == ["mlflow", "wandb"]
    assert load_recipe(None, ["trainer.report_to=[]"]).trainer.report_to == []
    with pytest.raises(RecipeError) as bad:
        load_recipe(None, ["trainer.report_to=[mlflow,neptune]"])
    message = str(bad.value)
    assert "'trainer.report_to'" in message and "'neptune'" in message and "tensorboard, mlflow, wandb" in message
    assert "\n" not in message


@pytest.mark.parametrize("package", ["mlflow", "wandb", "sqlalchemy"])
def test_a_tracker_without_its_package_is_a_one_line_error(monkeypatch, package):
    monkeypatch.setitem(sys.modules, package, None)  # import fails, find_spec finds nothing
    name = "wandb" if package == "wandb" else "mlflow"
    with pytest.raises(RecipeError) as missing:
        load_recipe(None, [f"trainer.report_to=[tensorboard,{name}]"])
    message = str(missing.value)
    assert "'trainer.report_to'" in message and package in message and "pip install 'pretune[track]'" in message
    assert "\n" not in message


@pytest.mark.parametrize("method", ["start", "log", "note", "artifact", "close"])
def test_a_tracker_that_raises_is_switched_off_and_training_goes_on(tmp_path, monkeypatch, capsys, method):
    def broken(self, *args):
        raise OSError("disk full\nsecond line")

    monkeypatch.setattr(tracking.TensorBoard, method, broken)
    run(tmp_path, tensorboard=True)  # the default report_to: [tensorboard]
    err = capsys.readouterr().err
    assert err.count("warning: tensorboard failed") == 1
    assert f"warning: tensorboard failed ({method}: disk full second line)" in err
    assert records(tmp_path, "train")[-1]["step"] == 16 and (tmp_path / "model" / "model.safetensors").is_file()


def test_tensorboard_keeps_its_event_files(tmp_path):
    run(tmp_path, report_to=["tensorboard"], tensorboard=True)
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
