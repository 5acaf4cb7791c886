"""Out of memory in a step and a full disk during a save end with one line (exit 7) naming what
to change; the last checkpoint stays intact and loadable."""

import errno

import pytest
import torch

from pretune.cli import main
from pretune.errors import ResourceError
from pretune.trainer import checkpoint
from tests.reliability.harness import assert_latest_is_loadable
from tests.reliability.test_numerical import VECTORS


def fail_forward_at(monkeypatch, step: int, error: Exception) -> None:
    """Raise ``error`` from the model's forward pass in training step ``step`` of in-process runs."""
    import pretune.run as run

    build_task = run.build_task

    def build_failing_task(recipe):
        task = build_task(recipe)
        build = task.build

        def build_failing(*args, **kwargs):
            module = build(*args, **kwargs)
            calls = [0]

            def hook(mod, inputs):
                calls[0] += mod.training
                if mod.training and calls[0] == step:
                    raise error

            module.register_forward_pre_hook(hook)
            return module

        task.build = build_failing
        return task

    monkeypatch.setattr(run, "build_task", build_failing_task)


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: "
                                                "you tried to allocate 9663676416 bytes. Error code 12 (Cannot allocate memory)"
                                                " out of memory")])
def test_out_of_memory_names_step_batch_size_and_a_remedy(tmp_path, monkeypatch, capsys, error):
    fail_forward_at(monkeypatch, 5, error)
    run_dir = tmp_path / "run"
    code = main(["pretrain", *VECTORS, f"run_dir={run_dir}", "trainer.save_every=2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == ResourceError.exit_code == 7
    assert "Traceback" not in "\n".join(err)
    line = err[-1]
    assert line.startswith("pretune: error: out of memory at step 5 with trainer.batch_size=64")
    assert "trainer.batch_size=32 trainer.accumulate=2" in line and "step-00000004 is intact" in line
    assert assert_latest_is_loadable(run_dir).name == "step-00000004"


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0: "
                                                "PytorchStreamWriter failed writing file data/0: file write failed")])
def test_disk_full_during_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys, error):
    real_save = torch.save

    def save(obj, path, *args, **kwargs):
        if "step-00000004" in str(path):
            real_save(obj, path, *args, **kwargs)  # a partly written file, then the disk is full
            raise error
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", save)
    run_dir = tmp_path / "run"
    code = main(["pretrain", *VECTORS, f"run_dir={run_dir}", "trainer.save_every=2", "trainer.keep_last=1"])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 7, line
    assert line.startswith("pretune: error: disk full while saving") and "step-00000004" in line
    assert "step-00000002 is intact" in line and "--resume" in line
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-00000002"]  # nothing half-written is left
    assert assert_latest_is_loadable(run_dir).name == "step-00000002"
    monkeypatch.setattr(checkpoint.torch, "save", real_save)  # space freed: the run resumes
    assert main(["pretrain", str(run_dir), "--resume"]) == 0
    assert checkpoint.load_state(checkpoint.latest_checkpoint(run_dir))["progress"]["step"] == 10


def test_other_save_failures_are_one_line_too(tmp_path, monkeypatch, capsys):
    def save(obj, path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(checkpoint.torch, "save", save)
    code = main(["pretrain", *VECTORS, f"run_dir={tmp_path / 'run'}", "trainer.save_every=2"])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 5 and line.startswith("pretune: error: cannot save") and "Permission denied" in line
