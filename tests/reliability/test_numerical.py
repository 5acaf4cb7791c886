"""Non-finite loss or gradients are caught in the step they occur: ``trainer.on_nan: stop`` ends the
run with one line naming the step (the last checkpoint intact), ``skip`` skips the optimizer step,
counts and logs it, and stops after ``trainer.max_nan_skips`` in a row."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from pretune.cli import main
from pretune.errors import TrainingError
from pretune.trainer import checkpoint

VECTORS = ["recipes/vector-autoencoder.yaml", "trainer.batch_size=64", "trainer.max_steps=10", "trainer.eval_every=100",
           "trainer.progress=false", "trainer.tensorboard=false", "trainer.precision=fp32", "trainer.log_every=1",
           "backbone.hidden=[32,8]", "task.decoder_width=32"]


def poison(monkeypatch, steps: set[int]) -> None:
    """Make the training loss NaN in the given optimizer steps (1-based; accumulate=1) of in-process runs."""
    import pretune.run as run

    build_task = run.build_task

    def build_poisoned_task(recipe):
        task = build_task(recipe)
        build = task.build

        def build_poisoned(*args, **kwargs):
            module = build(*args, **kwargs)
            calls = [0]

            def hook(mod, inputs, out):
                if not mod.training:
                    return out
                calls[0] += 1
                if calls[0] in steps:
                    return {k: v * float("nan") if k in task.losses else v for k, v in out.items()}
                return out

            module.register_forward_hook(hook)
            return module

        task.build = build_poisoned
        return task

    monkeypatch.setattr(run, "build_task", build_poisoned_task)


def records(run_dir, split):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["split"] == split]


def test_stop_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    poison(monkeypatch, {5})
    run_dir = tmp_path / "run"
    code = main(["pretrain", *VECTORS, f"run_dir={run_dir}", "trainer.save_every=2"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == TrainingError.exit_code == 6
    assert err.startswith("pretune: error: step 5: non-finite loss") and "step-00000004" in err and "trainer.on_nan" in err
    assert [p.name for p in checkpoint.checkpoints(run_dir)] == ["step-00000002", "step-00000004"]
    assert not (run_dir / "model").exists()
    last = checkpoint.latest_checkpoint(run_dir)
    assert checkpoint.load_state(last)["progress"]["step"] == 4
    assert all(torch.isfinite(t).all() for t in load_file(str(last / "module.safetensors")).values())
    assert [r["step"] for r in records(run_dir, "train")] == [1, 2, 3, 4]  # nothing of step 5 was logged as trained


def test_skip_leaves_weights_and_optimizer_untouched_counts_and_logs(tmp_path, monkeypatch):
    poison(monkeypatch, {3, 7})
    run_dir = tmp_path / "run"
    assert main(["pretrain", *VECTORS, f"run_dir={run_dir}", "trainer.save_every=1", "trainer.keep_last=100",
                 "trainer.on_nan=skip"]) == 0
    folder = run_dir / "checkpoints"
    weights = {s: load_file(str(folder / f"step-{s:08d}" / "module.safetensors")) for s in (1, 2, 3, 4, 6, 7)}
    states = {s: checkpoint.load_state(folder / f"step-{s:08d}") for s in (2, 3, 6, 7)}
    for before, skipped in ((2, 3), (6, 7)):
        assert all(torch.equal(weights[before][k], weights[skipped][k]) for k in weights[before]), f"step {skipped} changed weights"
        moments = [(a["exp_avg"], b["exp_avg"]) for a, b in zip(states[before]["optimizers"]["main"]["state"].values(),
                                                               states[skipped]["optimizers"]["main"]["state"].values())]
        assert all(torch.equal(a, b) for a, b in moments), f"step {skipped} changed the optimizer state"
    assert not all(torch.equal(weights[3][k], weights[4][k]) for k in weights[3])  # training went on after the skip
    skips = records(run_dir, "skipped")
    assert [(r["step"], r["skipped_steps"], r["in_a_row"]) for r in skips] == [(3, 1, 1), (7, 2, 1)]
    final = checkpoint.load_state(checkpoint.latest_checkpoint(run_dir))["progress"]
    assert final["step"] == 10 and final["nan_skips"] == 2 and final["nan_streak"] == 0
    assert all(torch.isfinite(t).all() for t in load_file(str(run_dir / "model" / "model.safetensors")).values())


def test_skip_stops_after_k_in_a_row(tmp_path, monkeypatch, capsys):
    poison(monkeypatch, set(range(4, 11)))
    run_dir = tmp_path / "run"
    code = main(["pretrain", *VECTORS, f"run_dir={run_dir}", "trainer.save_every=2", "trainer.on_nan=skip",
                 "trainer.max_nan_skips=3"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 6 and "step 6: 3 optimizer steps in a row skipped" in err and "max_nan_skips=3" in err
    assert [r["step"] for r in records(run_dir, "skipped")] == [4, 5, 6]


def test_a_learning_rate_that_blows_up_is_caught_in_its_step(tmp_path, capsys):
    """No patching: plain SGD with a huge learning rate and no clipping overflows the weights.  The
    step named in the error is the first whose loss or gradient norm a direct replay finds non-finite."""
    run_dir = tmp_path / "run"
    args = ["pretrain", *VECTORS, f"run_dir={run_dir}", "trainer.optimizer=sgd", "trainer.momentum=0", "trainer.lr=1e12",
            "trainer.clip=null", "trainer.warmup=0", "trainer.schedule=constant", "trainer.save_every=1", "trainer.keep_last=100"]
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 6, err
    step = int(err.split("step ")[1].split(":")[0])
    logged = records(run_dir, "train")
    assert [r["step"] for r in logged] == list(range(1, step))  # every earlier step was finite and logged
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in logged)
    assert checkpoint.latest_checkpoint(run_dir).name == f"step-{step - 1:08d}"


def test_nan_check_is_cheap():
    """The per-step check is one fused scalar test on the grad norm clipping already computed."""
    import time

    grad_norm, loss = torch.tensor(1.5), torch.tensor(2.0)
    start = time.perf_counter()
    for _ in range(2000):
        bool(torch.isfinite(grad_norm + loss))
    per_check = (time.perf_counter() - start) / 2000
    assert per_check < 1e-3  # microseconds on CPU; docs/reliability.md gives the measured figure
