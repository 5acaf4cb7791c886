"""Experiment trackers beside ``metrics.jsonl``: TensorBoard, MLflow, Weights & Biases (``trainer.report_to``).

A tracker is a small object that :class:`pretune.trainer.logging.RunLogger` fans out to, on the main
process only, and disables (one warning line) the first time it raises; training goes on without it:

    start(config)              the resolved recipe, as a nested dict; then ``where`` may say where to look
    log(step, split, values)   finite numbers, recorded as ``{split}/{key}`` at ``step``
    note(step, split, message) a line for the reader (an epoch's unfreezing, a warning)
    artifact(path)             the final model folder, at the end
    close()

Nothing leaves the machine unless the user says so: MLflow writes a local store in ``RUN_DIR/mlflow``
(unless ``MLFLOW_TRACKING_URI`` is set), W&B runs offline in ``RUN_DIR/wandb`` (unless ``WANDB_MODE``
is set).  A resumed run (``start_step > 0``) continues the same MLflow run and the same W&B run id,
both kept in the run directory.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

TRACKERS = ("tensorboard", "mlflow", "wandb")
INSTALL = "pip install 'pretune[track]'"


def resolve(value: Any, tensorboard: bool = True) -> list[str]:
    """``trainer.report_to`` (a list, ``"mlflow"`` or ``"mlflow,wandb"``) -> tracker names, once each;
    ``tensorboard=False`` (``trainer.tensorboard: false``) drops tensorboard.  Raises ``ValueError`` for an
    unknown name or a tracker whose packages are not installed."""
    names = value.split(",") if isinstance(value, str) else [] if value is None else value
    if not isinstance(names, (list, tuple)) or not all(isinstance(name, str) for name in names):
        raise ValueError("must be a list of tracker names: " + ", ".join(TRACKERS))
    names = list(dict.fromkeys(name.strip() for name in names if name.strip()))
    unknown = [name for name in names if name not in TRACKERS]
    if unknown:
        raise ValueError(f"unknown tracker {unknown[0]!r}; choose from " + ", ".join(TRACKERS))
    names = [name for name in names if tensorboard or name != "tensorboard"]
    for name in names:
        absent = [package for package in _needs(name) if importlib.util.find_spec(package) is None]
        if absent:
            what = f"{name} is not installed" if absent[0] == name else f"{name} needs {' and '.join(absent)}, not installed"
            raise ValueError(f"{what}: {INSTALL}")
    return names


def _needs(name: str) -> tuple[str, ...]:
    if name == "mlflow":  # the default local store is SQLite, which MLflow reaches through SQLAlchemy and Alembic
        return ("mlflow",) if os.environ.get("MLFLOW_TRACKING_URI") else ("mlflow", "sqlalchemy", "alembic")
    return {"wandb": ("wandb",), "tensorboard": ("tensorboard",)}[name]


def create(names: list[str], run_dir: Path, resumed: bool) -> list[Any]:
    """The trackers named by ``trainer.report_to``, not started yet."""
    kinds = {"tensorboard": TensorBoard, "mlflow": MLflow, "wandb": WandB}
    return [kinds[name](run_dir, resumed) for name in names]


class TensorBoard:
    """Event files in ``RUN_DIR/tb`` (``tensorboard --logdir RUN_DIR/tb``)."""

    name, where = "tensorboard", None

    def __init__(self, run_dir: Path, resumed: bool):
        self.folder, self.writer = run_dir / "tb", None

    def start(self, config: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(self.folder))

    def log(self, step: int, split: str, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(f"{split}/{key}", value, step)

    def note(self, step: int, split: str, message: str) -> None:
        self.writer.add_text(f"notes/{split}", message, step)

    def artifact(self, path: Path) -> None:
        pass  # the model is in RUN_DIR/model already

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class MLflow:
    """One MLflow run: the recipe as params (dotted keys) and ``recipe.yaml``, every metric row, the notes as
    the run's description, the model folder as the ``model`` artifact.

    The default store is ``sqlite:///RUN_DIR/mlflow/mlflow.db`` with artifacts in ``RUN_DIR/mlflow/artifacts``
    (view it with ``mlflow ui --backend-store-uri sqlite:///RUN_DIR/mlflow/mlflow.db``).  Not the ``file:``
    store: MLflow deprecated it in February 2026 (3.10), and since 3.13 it refuses to open one unless
    ``MLFLOW_ALLOW_FILE_STORE=true`` (mlflow/mlflow#18534, #22773); SQLite has been MLflow's own default
    store since 3.7.  The price: SQLAlchemy and Alembic (not dependencies of mlflow-skinny) and a few
    seconds of table creation the first time.  ``MLFLOW_TRACKING_URI`` (a server, a shared database) and
    ``MLFLOW_EXPERIMENT_NAME`` (default: the run directory's name) take over when set.  With the local store,
    MLflow's usage telemetry is off (``MLFLOW_DISABLE_TELEMETRY``, unless set): nothing leaves the machine.
    """

    name, where = "mlflow", None
    PARAM_LENGTH = 500  # longer values (a long data.files list) are cut; recipe.yaml holds them whole

    def __init__(self, run_dir: Path, resumed: bool):
        self.run_dir, self.resumed = run_dir.resolve(), resumed
        self.folder = self.run_dir / "mlflow"
        self.client, self.run_id, self.notes = None, None, []

    def start(self, config: dict[str, Any]) -> None:
        local = not os.environ.get("MLFLOW_TRACKING_URI")
        if local:  # MLflow's usage telemetry starts at `import mlflow` and is checked again at each event
            os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        for noisy in ("mlflow.store.db.utils", "alembic"):  # "Creating initial MLflow database tables..." and each migration
            logging.getLogger(noisy).setLevel(logging.WARNING)
        from mlflow import MlflowClient
        from mlflow.entities import Param

        self.folder.mkdir(parents=True, exist_ok=True)
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{self.folder / 'mlflow.db'}"
        self.client = MlflowClient(tracking_uri=uri)
        experiment_name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or self.run_dir.name
        experiment = self.client.get_experiment_by_name(experiment_name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(
            experiment_name, artifact_location=(self.folder / "artifacts").as_uri() if local else None)

        id_file, logged = self.folder / "run_id", {}
        if self.resumed and id_file.is_file():
            self.run_id = id_file.read_text().strip()
            run = self.client.get_run(self.run_id)  # raises if the store lost it: the tracker is disabled, training goes on
            logged = run.data.params
            self.notes = [line for line in run.data.tags.get("mlflow.note.content", "").splitlines() if line]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            self.run_id = self.client.create_run(experiment_id, run_name=self.run_dir.name,
                                                 tags={"pretune.run_dir": str(self.run_dir)}).info.run_id
            id_file.write_text(self.run_id)
        # params cannot change once logged: a value overridden on resume is in recipe.yaml (logged again below)
        params = [Param(key, value) for key, value in flatten(config, self.PARAM_LENGTH).items() if key not in logged]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per request
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        self.client.log_dict(self.run_id, config, "recipe.yaml")
        self.where = f"mlflow: run {self.run_id}" + (f" (mlflow ui --backend-store-uri {uri})" if local else f" in {uri}")

    def log(self, step: int, split: str, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(_key(f"{split}/{k}"), v, now, step) for k, v in values.items()])

    def note(self, step: int, split: str, message: str) -> None:
        self.notes.append(f"step {step} ({split}): {message}")
        text = "\n\n".join(self.notes)[-8000:]  # MLflow's longest tag value; the newest notes are kept
        self.client.set_tag(self.run_id, "mlflow.note.content", text)  # the run's description in the UI

    def artifact(self, path: Path) -> None:
        self.client.log_artifacts(self.run_id, str(path), artifact_path=path.name)

    def close(self) -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, "FINISHED")


class WandB:
    """One W&B run, offline unless ``WANDB_MODE`` says otherwise: the recipe as config, every metric row
    at its step, the notes as the run's notes, the model folder as a ``model`` artifact.

    Files go to ``RUN_DIR/wandb/offline-run-*``; ``wandb sync RUN_DIR/wandb/offline-run-*`` uploads them
    later.  The project is ``WANDB_PROJECT`` or ``pretune``, the run name the run directory's name.  No code,
    git state, system metrics or machine metadata are collected, the console is not captured, W&B prints
    nothing (``WANDB_SILENT``) and, offline, wandb-core sends no error reports (``WANDB_ERROR_REPORTING``),
    unless those variables are set: nothing tries the network.  ``run.finish()`` returns before wandb-core
    has written the ``.wandb`` file; it is complete when the process exits (or after ``wandb.teardown()``).

    A resumed run reuses the run id (``RUN_DIR/wandb/pretune-run-id``); offline, W&B writes it to a second
    ``offline-run-*`` folder of the same id (``wandb sync --append`` joins them); online, W&B drops the steps
    replayed since the last checkpoint, which it already has.
    """

    name, where = "wandb", None

    def __init__(self, run_dir: Path, resumed: bool):
        self.run_dir, self.resumed = run_dir.resolve(), resumed
        self.run = None

    def start(self, config: dict[str, Any]) -> None:
        os.environ.setdefault("WANDB_SILENT", "true")  # no banner, no "Adding directory to artifact..." (read at wandb's setup)
        if os.environ.get("WANDB_MODE", "offline") in ("offline", "dryrun", "disabled"):
            os.environ.setdefault("WANDB_ERROR_REPORTING", "false")  # read when wandb-core starts
        import wandb

        id_file = self.run_dir / "wandb" / "pretune-run-id"
        run_id = id_file.read_text().strip() if self.resumed and id_file.is_file() else None
        settings = wandb.Settings(
            save_code=False, disable_code=True, disable_git=True, console="off", reinit="create_new",  # others' runs stay open
            x_disable_stats=True, x_disable_meta=True, x_disable_machine_info=True)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "pretune", name=self.run_dir.name, dir=str(self.run_dir),
                              id=run_id, resume="allow" if run_id else None, settings=settings,
                              mode=None if os.environ.get("WANDB_MODE") else "offline")  # WANDB_MODE=online: the user's choice
        self.run.config.update(config, allow_val_change=True)  # an override given on resume replaces the old value
        id_file.parent.mkdir(parents=True, exist_ok=True)
        id_file.write_text(self.run.id)
        settings = self.run.settings
        self.where = (f"wandb: offline run {self.run.id} in {settings.sync_dir} (upload it later: wandb sync {settings.sync_dir})"
                      if settings.mode in ("offline", "dryrun") else f"wandb: {settings.mode} run {self.run.id}")

    def log(self, step: int, split: str, values: dict[str, float]) -> None:
        self.run.log({f"{split}/{key}": value for key, value in values.items()}, step=step)

    def note(self, step: int, split: str, message: str) -> None:
        self.run.notes = "\n".join(filter(None, [self.run.notes, f"step {step} ({split}): {message}"]))

    def artifact(self, path: Path) -> None:
        import wandb

        artifact = wandb.Artifact(f"model-{self.run.id}", type="model")
        artifact.add_dir(str(path), skip_cache=True, policy="immutable")  # no copy: RUN_DIR/model is final
        self.run.log_artifact(artifact)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()


def flatten(config: dict[str, Any], max_length: int = 500, prefix: str = "") -> dict[str, str]:
    """``{"trainer": {"lr": 0.001}, "data": {"files": ["a"]}}`` -> ``{"trainer.lr": "0.001", "data.files": '["a"]'}``."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = _key(prefix + str(key))
        if isinstance(value, dict) and value:
            flat.update(flatten(value, max_length, name + "."))
        else:
            text = value if isinstance(value, str) else json.dumps(value)
            flat[name] = text if len(text) <= max_length else text[: max_length - 3] + "..."
    return flat


def _key(name: str) -> str:
    """A metric or param name MLflow accepts (letters, digits, ``_ - . / :`` and spaces)."""
    return re.sub(r"[^\w\-./: ]", "_", name)
