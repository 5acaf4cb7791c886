"""Exact resume under SIGKILL: a real ``python -m pretune`` process is killed mid gradient
accumulation, inside an evaluation, while writing a checkpoint, and after early stopping while
writing the final model; resuming gives final weights bit-identical to an uninterrupted run.

Default suite: 4 trials (one per kind of kill point); ``--slow``: 20 random trials, some killed
twice (the second time during the resumed run)."""

import random
import time

import pytest

from pretune.trainer import checkpoint
from tests.reliability.harness import (PRETRAIN, assert_identical, assert_latest_is_loadable, eval_steps, finetune_args,
                                       kill_and_resume, run_in_process, run_killed)


@pytest.fixture(scope="module")
def pretrain_reference(tmp_path_factory):
    return run_in_process(PRETRAIN, tmp_path_factory.mktemp("ref") / "mlm")


@pytest.fixture(scope="module")
def finetune_reference(tmp_path_factory, encoder, labelled):
    run_dir = run_in_process(finetune_args(encoder, labelled), tmp_path_factory.mktemp("ref") / "clf")
    state = checkpoint.load_state(checkpoint.latest_checkpoint(run_dir))["progress"]
    assert state["bad_evals"] >= 2, "the reference run should stop early (adjust finetune_args)"
    return run_dir


def test_kill_mid_accumulation(pretrain_reference, tmp_path):
    step = random.Random().randrange(7, 24)
    kill_and_resume(PRETRAIN, tmp_path / "run", [f"micro:{step}:0"])
    assert_identical(pretrain_reference, tmp_path / "run", f"pretrain killed in step {step} after micro-batch 0 of 2")


def test_kill_while_writing_a_checkpoint(pretrain_reference, tmp_path):
    step = random.Random().choice([6, 9, 12, 15, 18, 21])
    run_dir = tmp_path / "run"
    done = run_killed(PRETRAIN, run_dir, f"save:step-{step:08d}")
    assert done.returncode == -9
    half = list((run_dir / "checkpoints").glob(f".tmp-step-{step:08d}-*"))
    assert half and (half[0] / "state.pt").is_file(), "the kill should leave a complete-looking but unrenamed folder"
    assert assert_latest_is_loadable(run_dir).name == f"step-{step - 3:08d}"  # the half-written one is never the latest
    run_in_process(["pretrain", str(run_dir), "--resume"], run_dir)
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))
    assert_identical(pretrain_reference, run_dir, f"pretrain killed while saving step {step}")


def test_kill_during_evaluation(finetune_reference, tmp_path, encoder, labelled):
    steps = [s for s in eval_steps(finetune_reference) if s > 3]
    step = random.Random().choice(steps)
    kill_and_resume(finetune_args(encoder, labelled), tmp_path / "run", [f"eval:{step}"])
    assert_identical(finetune_reference, tmp_path / "run", f"finetune killed in the evaluation at step {step}")


def test_kill_after_early_stop_while_writing_the_final_model(finetune_reference, tmp_path, encoder, labelled):
    """The early-stopping decision survives: the resumed run does not train past the stop."""
    kill_and_resume(finetune_args(encoder, labelled), tmp_path / "run", ["save:model"])
    assert_identical(finetune_reference, tmp_path / "run", "finetune killed writing model/ after early stopping")


POINTS = ("micro", "eval", "save", "time")


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(20))
def test_random_kills(trial, pretrain_reference, finetune_reference, tmp_path, encoder, labelled):
    seed = time.time_ns() % 10**6 * 100 + trial
    rng = random.Random(seed)
    finetune = trial % 2 == 1
    reference = finetune_reference if finetune else pretrain_reference
    args = finetune_args(encoder, labelled) if finetune else PRETRAIN
    last = checkpoint.load_state(checkpoint.latest_checkpoint(reference))["progress"]["step"]
    evals = [s for s in eval_steps(reference) if s > 0]
    saves = [s for s in range(3, last, 3)]

    def point() -> str:
        kind = rng.choice(POINTS)
        if kind == "micro":
            return f"micro:{rng.randrange(1, last + 1)}:{rng.randrange(2)}"
        if kind == "eval":
            return f"eval:{rng.choice(evals)}"
        if kind == "save":
            return f"save:{rng.choice([f'step-{s:08d}' for s in saves] + (['best', 'model'] if finetune else ['model']))}"
        return f"time:{rng.uniform(0.0, 0.5):.3f}"

    points = [point()]
    if rng.random() < 0.4:  # a second kill during the resumed run, at a later point
        second = point()
        points.append(second)
    context = f"trial {trial} seed {seed} {'finetune' if finetune else 'pretrain'} kills {points}"
    try:
        kill_and_resume(args, tmp_path / "run", points)  # a second point already behind the resume: it just finishes
    except AssertionError as exc:
        raise AssertionError(f"{context}: {exc}") from None
    assert_identical(reference, tmp_path / "run", context)
