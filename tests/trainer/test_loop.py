"""The loop against the declared ``Task`` interface only, with a tiny linear-regression task on random tensors:
phases, ``on_epoch`` notes, ``lr_scales``, ``monitor``, the chance-level warning, ties in early stopping,
``trainer.max_time``, and :class:`StepFailed` carrying the step."""

import json
import traceback
from pathlib import Path
from types import SimpleNamespace

import pytest
import safetensors.torch
import torch
from torch import nn

from pretune.recipe import Recipe
from pretune.tasks.base import Task
from pretune.trainer import checkpoint
from pretune.trainer.distributed import World
from pretune.trainer.loop import StepFailed, Trainer, fit


@pytest.fixture(autouse=True)
def no_peak_measurement(monkeypatch):
    """fit measures the GEMM peak for MFU (half a second); these tests do not need it."""
    import pretune.trainer.loop as loop

    monkeypatch.setattr(loop, "measure_peak", lambda dtype, device: 1e12)


class Rows:
    """Indexable like a ``datasets.Dataset``: ``rows[[i, j]]`` -> a dict of columns."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, indices):
        return {"x": self.x[indices], "y": self.y[indices]}


def regression_data(n_train: int = 64, n_validation: int = 32, noise: float = 0.1, seed: int = 0) -> SimpleNamespace:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(4, generator=g)
    x = torch.randn(n_train + n_validation, 4, generator=g)
    y = x @ w + noise * torch.randn(len(x), generator=g)
    return SimpleNamespace(train=Rows(x[:n_train], y[:n_train]), validation=Rows(x[n_train:], y[n_train:]))


class Regressor(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 1)

    def forward(self, batch, phase=None):
        pred = self.head(self.body(batch["x"])).squeeze(1)
        err = pred - batch["y"]
        return {"mse": (err ** 2).sum(), "mae": err.abs().sum().detach(),
                "sign_correct": ((pred > 0) == (batch["y"] > 0)).sum().float(),
                "always_correct": torch.tensor(float(len(pred)))}  # an accuracy saturated at 1.0


class LinearTask(Task):
    """Linear regression; ``body`` frozen in epoch 0 (gradual unfreezing), the head at 10x the learning rate."""

    losses = ("mse",)
    monitor = ("sign_accuracy", "max")
    unit = "ex"

    def __init__(self, monitor=("sign_accuracy", "max"), freeze_first_epoch=True, head_scale=10.0):
        super().__init__(cfg=None)
        self.monitor, self.freeze_first_epoch, self.head_scale = monitor, freeze_first_epoch, head_scale
        self.epochs_seen = []

    def build(self, backbone, data):
        return Regressor()

    def collate(self, rows, seeds):
        return {"x": rows["x"], "y": rows["y"]}

    def units(self, batch):
        n = torch.tensor(float(len(batch["x"])))
        return {"mse": n, "mae": n, "sign_correct": n, "always_correct": n}

    def save(self, module, path, data):
        safetensors.torch.save_model(module, str(Path(path) / "model.safetensors"))

    def on_epoch(self, module, epoch):
        self.epochs_seen.append(epoch)
        if not self.freeze_first_epoch:
            return None
        module.body.requires_grad_(epoch > 0)
        return "only the head trains" if epoch == 0 else ("body unfrozen" if epoch == 1 else None)

    def lr_scales(self, module):
        return {"head.weight": self.head_scale, "head.bias": self.head_scale} if self.head_scale != 1.0 else None


class TwoPhaseTask(LinearTask):
    """Two optimizers, as a GAN has: one trains ``body``, the other ``head``, each on its own loss."""

    losses = ("mse", "mse_head")
    phases = {"body": ("mse",), "head": ("mse_head",)}

    def units(self, batch):
        return {**super().units(batch), "mse_head": torch.tensor(float(len(batch["x"])))}

    def build(self, backbone, data):
        class TwoHeads(Regressor):
            def forward(self, batch, phase=None):
                out = super().forward(batch)
                return {**out, "mse_head": out["mse"]}
        return TwoHeads()

    def phase_parameters(self, module, phase):
        return [(n, p) for n, p in module.named_parameters() if n.startswith(phase + ".")]


def recipe(run_dir: Path, **trainer) -> Recipe:
    settings = {"lr": 0.05, "optimizer": "sgd", "momentum": 0.0, "warmup": 0, "schedule": "constant", "batch_size": 8,
                "epochs": 2, "eval_every": 4, "log_every": 2, "save_every": 100, "progress": False, "tensorboard": False,
                "precision": "fp32", "fast_dropout": False, **trainer}
    return Recipe.model_validate({"run_dir": str(run_dir), "trainer": settings})


def run(tmp_path, task=None, data=None, resume_from=None, max_time=None, **trainer):
    tmp_path.mkdir(parents=True, exist_ok=True)
    task = task or LinearTask()
    data = data or regression_data()
    r = recipe(tmp_path, **trainer)
    if max_time is not None:  # TrainerConfig.max_time: set directly until recipe.py declares the field
        if "max_time" in type(r.trainer).model_fields:
            r.trainer.max_time = max_time
        else:
            object.__setattr__(r.trainer, "max_time", max_time)
    torch.manual_seed(0)
    module = task.build(None, data)
    if resume_from is not None:
        checkpoint.load_module(resume_from, module)
    metrics = fit(task, module, data, r, tmp_path, World(), resume_from=resume_from)
    return metrics, module


def records(run_dir: Path, split: str | None = None) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if split is None or r["split"] == split]


def test_fit_uses_the_task_interface_notes_and_learning_rate_groups(tmp_path, capsys):
    task = LinearTask()
    metrics, module = run(tmp_path, task)
    assert task.epochs_seen == [0, 1]
    notes = records(tmp_path, "epoch")
    assert [(n["epoch"], n["message"]) for n in notes] == [(0, "epoch 0: only the head trains"), (1, "epoch 1: body unfrozen")]
    err = capsys.readouterr().err
    assert "epoch 1: body unfrozen" in err
    assert "model saved to" not in err  # the CLI says it, once
    train = records(tmp_path, "train")
    assert all(r["lr"] == pytest.approx(0.05) and r["lr_head"] == pytest.approx(0.5) for r in train)
    assert train[-1]["loss"] < train[0]["loss"]
    assert (tmp_path / "model" / "model.safetensors").is_file() and "sign_accuracy" in metrics
    assert "warning" not in metrics


def test_frozen_phase_does_not_move_and_lr_is_the_base_rate(tmp_path):
    """Epoch 0 freezes ``body``: after one epoch's worth of steps it has not moved; the head has."""
    torch.manual_seed(0)
    start = Regressor().state_dict()
    _, module = run(tmp_path, LinearTask(), epochs=1)
    torch.testing.assert_close(module.body.weight.detach(), start["body.weight"])
    assert not torch.equal(module.head.weight.detach(), start["head.weight"])


def test_two_phases_have_two_optimizers(tmp_path):
    run(tmp_path, TwoPhaseTask(freeze_first_epoch=False, head_scale=1.0), max_steps=4)
    state = checkpoint.load_state(checkpoint.latest_checkpoint(tmp_path))
    assert set(state["optimizers"]) == {"body", "head"}
    last = records(tmp_path, "train")[-1]
    assert {"grad_norm_body", "grad_norm_head", "lr"} <= set(last)


def test_a_chance_level_run_warns_once_and_returns_the_warning(tmp_path, capsys):
    metrics, _ = run(tmp_path, LinearTask(freeze_first_epoch=False), lr=1e-9)  # learns nothing
    assert "trainer.lr" in metrics["warning"] and "trainer.epochs" in metrics["warning"] and "bigger model" in metrics["warning"]
    assert [r["message"] for r in records(tmp_path, "warning")] == [metrics["warning"]]
    assert capsys.readouterr().err.count(metrics["warning"]) == 1


def test_ties_of_the_monitored_value_go_to_the_lower_validation_loss(tmp_path):
    """Accuracy saturated at 1.0 from the first evaluation: best/ and model/ are the lowest-loss evaluation, not the first."""
    run(tmp_path, LinearTask(monitor=("always_accuracy", "max"), freeze_first_epoch=False), lr=0.02, epochs=3)
    validation = [r for r in records(tmp_path, "validation") if r["step"] > 0]
    assert all(r["always_accuracy"] == 1.0 for r in validation)
    lowest = min(validation, key=lambda r: r["loss"])
    assert lowest["step"] > validation[0]["step"]  # the loss kept falling after accuracy saturated
    assert json.loads((tmp_path / "best" / "metrics.json").read_text())["step"] == lowest["step"]
    weights = safetensors.torch.load_file(str(tmp_path / "model" / "model.safetensors"))
    best = safetensors.torch.load_file(str(tmp_path / "best" / "model" / "model.safetensors"))
    assert all(torch.equal(weights[k], best[k]) for k in weights)


def test_ties_when_the_monitor_is_the_loss_change_nothing(tmp_path):
    run(tmp_path, LinearTask(monitor=("loss", "min"), freeze_first_epoch=False), lr=0.02, epochs=3)
    validation = [r for r in records(tmp_path, "validation") if r["step"] > 0]
    best = min(validation, key=lambda r: (r["loss"], r["step"]))
    assert json.loads((tmp_path / "best" / "metrics.json").read_text())["step"] == best["step"]


class SlowRegressor(Regressor):
    def forward(self, batch, phase=None):
        import time

        if self.training:
            time.sleep(0.05)
        return super().forward(batch, phase)


def test_max_time_stops_cleanly_with_a_checkpoint_and_the_best_model(tmp_path, capsys):
    task = LinearTask(freeze_first_epoch=False)
    task.build = lambda backbone, data: SlowRegressor()
    run(tmp_path, task, max_time=0.6, max_steps=1000, eval_every=1000, save_every=1000)
    latest = checkpoint.latest_checkpoint(tmp_path)
    steps = checkpoint.load_state(latest)["progress"]["step"]
    assert 3 <= steps < 100  # stopped by the clock, long before max_steps
    assert (tmp_path / "model" / "model.safetensors").is_file() and (tmp_path / "best").is_dir()
    assert records(tmp_path, "validation")[-1]["step"] == steps  # evaluated at the stop, like the last step
    assert "trainer.max_time=0.6s" in capsys.readouterr().err

    # resumed with the same limit: the time is already spent (elapsed time counts from before)
    run(tmp_path, task, resume_from=latest, max_time=0.6, max_steps=1000, eval_every=1000, save_every=1000)
    assert checkpoint.load_state(checkpoint.latest_checkpoint(tmp_path))["progress"]["step"] == steps
    # a larger budget continues the run
    run(tmp_path, task, resume_from=checkpoint.latest_checkpoint(tmp_path), max_time=1.2, max_steps=1000, eval_every=1000,
        save_every=1000)
    assert checkpoint.load_state(checkpoint.latest_checkpoint(tmp_path))["progress"]["step"] > steps


class FailingRegressor(Regressor):
    calls = 0

    def forward(self, batch, phase=None):
        if self.training:
            FailingRegressor.calls += 1
            if FailingRegressor.calls == 3:
                raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().forward(batch, phase)


def test_a_runtime_error_in_a_step_names_the_step(tmp_path):
    task = LinearTask(freeze_first_epoch=False)
    FailingRegressor.calls = 0
    task.build = lambda backbone, data: FailingRegressor()
    with pytest.raises(StepFailed) as info:
        run(tmp_path, task)
    assert info.value.step == 3
    assert isinstance(info.value.__cause__, RuntimeError) and "out of memory" in str(info.value.__cause__)
    assert str(info.value).startswith("step 3: CUDA out of memory")
    # run.py's current reader (walking the frames to fit's local ``progress``) still finds it
    progress = next(frame.f_locals.get("progress") for frame, _ in traceback.walk_tb(info.value.__traceback__)
                    if frame.f_code.co_name == "fit")
    assert progress.step + 1 == 3


def test_trainer_step_is_the_step_fit_runs(tmp_path):
    """The exposed step (what benchmarks/profile_step.py profiles) trains like fit: same weights after 4 steps."""
    data = regression_data()
    _, fitted = run(tmp_path / "fit", LinearTask(freeze_first_epoch=False), data=data, max_steps=4, eval_every=100)
    task = LinearTask(freeze_first_epoch=False)
    torch.manual_seed(0)
    module = task.build(None, data)
    r = recipe(tmp_path / "step", max_steps=4)
    trainer = Trainer(task, module, r, World(), total_steps=4)
    trainer.start_epoch(0)
    from pretune.trainer import data as batching

    order = batching.batch_order(len(data.train), 8, r.seed, 0)
    for step, indices in enumerate(order[:4]):
        trainer.step([task.collate(data.train[indices], [])], step)
    for name, value in fitted.state_dict().items():
        torch.testing.assert_close(module.state_dict()[name], value, rtol=0, atol=0)
