"""Two gloo processes never wait for each other silently: a rank with no validation batch still joins the
evaluation's collective, ranks that read different data stop together with one line, and a rank that
never reaches the start barrier is named (``monitored_barrier``) instead of a hang."""

import os
import queue
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from pretune.errors import DistributedError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, port: int, run_dir: str, case: str, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist

    import pretune.trainer.loop as loop
    from pretune.trainer import distributed
    from test_loop import LinearTask, recipe, regression_data  # noqa: E402  (same folder)

    loop.measure_peak = lambda dtype, device: 1e12
    world = None
    try:
        if case == "missing" and rank == 1:  # joins the process group, never reaches the start barrier
            dist.init_process_group("gloo")
            results.put((rank, "absent", ""))
            time.sleep(4)
            return
        if case == "missing":
            os.environ["PRETUNE_BARRIER_TIMEOUT"] = "2"
        world = distributed.init(timeout_s=60)
        data = regression_data(n_train=64 + (8 * rank if case == "different-data" else 0),
                               n_validation=4 if case == "small-validation" else 32)
        task = LinearTask(freeze_first_epoch=False)
        torch.manual_seed(0)
        module = task.build(None, data)
        metrics = loop.fit(task, module, data, recipe(run_dir, max_steps=4, eval_every=2), Path(run_dir), world)
        results.put((rank, "ok", {k: v for k, v in metrics.items() if isinstance(v, float)}))
    except Exception as exc:  # noqa: BLE001 - reported to the test
        results.put((rank, type(exc).__name__, str(exc)))
    finally:
        if world is not None:
            distributed.shutdown(world)


def run_two(tmp_path, case: str, limit: float = 120.0) -> dict[int, tuple[str, object]]:
    context = mp.get_context("spawn")
    results = context.Queue()
    port = free_port()
    processes = [context.Process(target=worker, args=(rank, port, str(tmp_path), case, results)) for rank in (0, 1)]
    for p in processes:
        p.start()
    found = {}
    deadline = time.monotonic() + limit
    try:
        while len(found) < 2:
            rank, status, detail = results.get(timeout=max(0.1, deadline - time.monotonic()))
            found[rank] = (status, detail)
    except queue.Empty:
        pytest.fail(f"{case}: the ranks hung (results so far: {found})")
    finally:
        for p in processes:
            p.join(timeout=20)
            if p.is_alive():
                p.kill()
    return found


def test_a_rank_without_validation_batches_still_joins_the_evaluation(tmp_path):
    """4 validation examples, batch size 8, 2 ranks: rank 1 has no batch.  It used to skip the evaluation's
    all-reduce and meet rank 0 in a different one (both ranks then waited in a gloo all-reduce)."""
    found = run_two(tmp_path, "small-validation")
    assert found[0][0] == found[1][0] == "ok", found
    assert found[0][1] == found[1][1] and "loss" in found[0][1]


def test_ranks_that_read_different_data_stop_together_in_one_line(tmp_path):
    found = run_two(tmp_path, "different-data")
    assert found[0][0] == found[1][0] == DistributedError.__name__, found
    assert "training examples (rank 0: 64, rank 1: 72)" in found[0][1]


def test_a_rank_that_never_arrives_is_named(tmp_path):
    found = run_two(tmp_path, "missing")
    status, message = found[0]
    assert status == DistributedError.__name__, found
    assert message.startswith("rank 0: rank 1 did not reach the start of the run within 2 s")
    assert "PRETUNE_BARRIER_TIMEOUT=2" in message
