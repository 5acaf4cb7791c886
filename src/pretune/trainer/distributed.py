"""torch.distributed set-up for runs launched with ``torchrun`` (DDP; gloo on CPU, NCCL on GPU).

Outside torchrun everything here is a no-op for a world of one process.

Every rank must run the same collectives in the same order, or the run hangs (both ranks waiting in
a gloo all-reduce, each for a different one).  So the helpers here are called unconditionally by
every rank, and decisions one rank could take alone (stop early, stop for time, re-wrap the model)
go through :func:`any_rank`.  A hang is made loud: the run starts with a ``monitored_barrier`` that
names a missing rank, every :func:`barrier` is monitored too, and any collective that waits longer
than the process-group timeout fails instead of waiting forever; :func:`who_is_missing` then names
the rank that stopped answering.  Monitored barriers run on a gloo side group made at :func:`init`,
which still works when a timed-out collective has left the default group unusable.

Under ``torchrun --max-restarts K`` a worker that dies restarts the whole job;
:func:`restart_count` tells the restarted processes (``pretune.run`` then resumes from the last
checkpoint).

=============================  ========  =====================================================
environment variable           default   what
=============================  ========  =====================================================
``PRETUNE_DIST_TIMEOUT``       600       seconds any collective (and :func:`barrier`) may wait;
                                         the recipe key ``trainer.dist_timeout`` wins when set
``PRETUNE_BARRIER_TIMEOUT``    300       seconds the start barrier waits for every rank to arrive
=============================  ========  =====================================================
"""

from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from pretune.errors import DistributedError

DIST_TIMEOUT_ENV, DIST_TIMEOUT_S = "PRETUNE_DIST_TIMEOUT", 600.0
BARRIER_TIMEOUT_ENV, BARRIER_TIMEOUT_S = "PRETUNE_BARRIER_TIMEOUT", 300.0
WHO_TIMEOUT_S = 10.0  # after a failed collective: how long the live ranks wait for each other to learn who is missing

_monitor_group: Any = None  # the gloo side group of monitored barriers (made by init; the default group may be broken)
_timeout_s: float = DIST_TIMEOUT_S
_timeout_setting: str = DIST_TIMEOUT_ENV  # what set _timeout_s, for messages: the recipe key or the environment variable


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def init(timeout_s: float | None = None, barrier_timeout_s: float | None = None, group: bool = False) -> World:
    """Join the process group when launched by torchrun, pick this process's device, and check that
    every rank arrived (a monitored barrier that names a missing rank after ``barrier_timeout_s``).
    ``group``: join a process group even as torchrun's only process (FSDP shards over it).
    ``timeout_s``: the recipe's ``trainer.dist_timeout`` (None: ``PRETUNE_DIST_TIMEOUT``, else 600 s)."""
    global _monitor_group, _timeout_s, _timeout_setting
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    world = World(rank=rank, size=size, local_rank=local_rank, device=device)
    if (size > 1 or (group and "MASTER_ADDR" in os.environ)) and not dist.is_initialized():  # group: torchrun, one process
        _timeout_s = timeout_s or _seconds(DIST_TIMEOUT_ENV, DIST_TIMEOUT_S)
        _timeout_setting = "trainer.dist_timeout" if timeout_s else DIST_TIMEOUT_ENV
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=_timeout_s))
        # monitored_barrier exists only in gloo: NCCL runs get a gloo side group for it
        _monitor_group = None if backend == "gloo" else dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=_timeout_s))
        try:
            barrier(world, "the start of the run", barrier_timeout_s or _seconds(BARRIER_TIMEOUT_ENV, BARRIER_TIMEOUT_S),
                    BARRIER_TIMEOUT_ENV)
        except DistributedError:
            shutdown(world)
            raise
        if _monitor_group is None:  # gloo runs too, once every rank is here (a missing one was named above, not a store timeout)
            _monitor_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=_timeout_s))
    return world


def barrier(world: World, what: str = "a barrier", timeout_s: float | None = None, setting: str | None = None) -> None:
    """Wait for every rank; a rank that does not arrive within ``timeout_s`` (default: the process-group
    timeout) is named in one line (:class:`DistributedError`) instead of a silent wait."""
    if not world.distributed:
        return
    timeout_s, setting = timeout_s or _timeout_s, setting or _timeout_setting
    try:
        dist.monitored_barrier(group=_monitor_group, timeout=datetime.timedelta(seconds=timeout_s), wait_all_ranks=True)
    except RuntimeError as exc:  # rank 0 learns which ranks are missing; the others only that rank 0 did not answer
        text = " ".join(str(exc).split())
        who = _missing(text) or ("another rank" if world.main else "rank 0")
        if "Connection closed" in text or "Connection reset" in text:  # a process died: known at once, not after the timeout
            raise DistributedError(f"rank {world.rank}: {who} died before reaching {what} (its connection closed)") from None
        raise DistributedError(f"rank {world.rank}: {who} did not reach {what} within {timeout_s:g} s; a process of the job "
                               f"failed, hangs, or is slower than {setting}={timeout_s:g} allows ({text[:200]})") from None


def who_is_missing(world: World, timeout_s: float | None = None) -> str | None:
    """After a collective failed (timed out, or a peer closed its connection): which rank stopped answering,
    e.g. ``"rank 1"``, learnt from a monitored barrier on the gloo side group that waits ``timeout_s``
    (default: ``WHO_TIMEOUT_S``, at most the collective timeout) for the live ranks to fail too and join it.
    Rank 0 names the ranks that did not arrive (a dead one only in a world of two: gloo's "connection closed"
    says no rank); another rank learns only that rank 0 did not answer (rank 0 may be the one missing, or be
    waiting for another).  None: every rank answered, or rank 0 cannot tell."""
    if not world.distributed or _monitor_group is None:
        return None
    timeout_s = timeout_s or min(WHO_TIMEOUT_S, _timeout_s)
    try:
        dist.monitored_barrier(group=_monitor_group, timeout=datetime.timedelta(seconds=timeout_s), wait_all_ranks=True)
    except RuntimeError as exc:
        if not world.main:
            return "rank 0 (or a rank it waits for)"
        return _missing(" ".join(str(exc).split())) or ("rank 1" if world.size == 2 else None)
    return None


def timeout_setting() -> str:
    """What sets the collective timeout, with its value: ``trainer.dist_timeout=20`` or ``PRETUNE_DIST_TIMEOUT=600``."""
    return f"{_timeout_setting}={_timeout_s:g}"


def restart_count(world: World) -> int:
    """How many times ``torchrun --max-restarts`` restarted the job's workers (``TORCHELASTIC_RESTART_COUNT``;
    0 outside torchrun): the largest over the ranks, one answer for all (each node's agent counts its own)."""
    count = int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0)
    if world.distributed:
        value = torch.tensor([float(count)], device=world.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        count = int(value.item())
    return count


def _missing(text: str) -> str | None:
    """The ranks a failed ``monitored_barrier`` names (only rank 0 learns them): ``"rank 1"``, ``"ranks 1, 3"``."""
    missing = re.search(r"Ranks? ([\d, ]+) failed to pass monitoredBarrier", text)
    if missing is None:
        return None
    ranks = missing.group(1).strip().rstrip(",")
    return f"{'ranks' if ',' in ranks else 'rank'} {ranks}"


def all_reduce_sum(tensor: torch.Tensor, world: World) -> torch.Tensor:
    if world.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def means(sums: dict[str, torch.Tensor], counts: dict[str, torch.Tensor], world: World) -> dict[str, float]:
    """Each summed value over all ranks divided by its count (one all-reduce, the same on every rank)."""
    keys = sorted(sums)
    if not keys:
        return {}
    totals = all_reduce_sum(torch.stack([sums[k] for k in keys]), world)
    return dict(zip(keys, (totals / torch.stack([counts[k] for k in keys])).tolist()))


def broadcast_int(value: int, world: World) -> int:
    """Rank 0's ``value`` on every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=world.device)
    dist.broadcast(tensor, src=0)
    return int(tensor.item())


def any_rank(flag: bool, world: World) -> bool:
    """True on every rank if ``flag`` is true on any: one decision for all (stop, re-wrap...)."""
    if not world.distributed:
        return bool(flag)
    value = torch.tensor([1.0 if flag else 0.0], device=world.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def check_same(values: dict[str, int], world: World) -> None:
    """Raise on every rank (not only on one, which would leave the others waiting) if the ranks
    disagree on any of these numbers, e.g. the size of the data each of them read."""
    if not world.distributed:
        return
    local = torch.tensor(list(values.values()), dtype=torch.float64, device=world.device)
    gathered = [torch.empty_like(local) for _ in range(world.size)]
    dist.all_gather(gathered, local)
    table = torch.stack(gathered).cpu()
    for i, name in enumerate(values):
        column = [int(v) for v in table[:, i].tolist()]
        if len(set(column)) > 1:
            raise DistributedError(f"rank {world.rank}: the processes disagree on the number of {name} "
                                   f"({', '.join(f'rank {r}: {v}' for r, v in enumerate(column))}); every rank must read the same data")


def sum_dicts(local: dict[str, float], world: World) -> dict[str, float]:
    """Key-wise sums of every rank's ``local`` (a rank may hold no key at all, e.g. no evaluation batch):
    one collective on every rank whatever each holds."""
    if not world.distributed:
        return dict(local)
    gathered: list = [None] * world.size
    dist.all_gather_object(gathered, local)
    total: dict[str, float] = {}
    for part in gathered:
        for key, value in part.items():
            total[key] = total.get(key, 0.0) + value
    return total


def gather_lists(logits: list, labels: list, world: World) -> tuple[list, list]:
    """All ranks' lists of (CPU) tensors, concatenated in rank order (for whole-set metrics)."""
    if not world.distributed:
        return logits, labels
    gathered: list = [None] * world.size
    dist.all_gather_object(gathered, (logits, labels))
    return [x for g in gathered for x in g[0]], [y for g in gathered for y in g[1]]


def shutdown(world: World) -> None:
    global _monitor_group
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _monitor_group = None


def _seconds(name: str, default: float) -> float:
    value = os.environ.get(name, "").strip()
    try:
        seconds = float(value) if value else default
    except ValueError:
        raise DistributedError(f"environment variable {name}={value!r} is not a number of seconds") from None
    if seconds <= 0:
        raise DistributedError(f"environment variable {name}={value!r} must be a positive number of seconds")
    return seconds
