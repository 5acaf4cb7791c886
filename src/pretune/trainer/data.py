"""Batches whose content is a pure function of (seed, epoch, position).

The order of examples in an epoch is a seeded permutation; every example also gets its own seed
(for masking, augmentation, corruption) derived from (seed, epoch, index).  So a run resumed at
any step sees exactly the batches the uninterrupted run would have seen, and the same global
batch split over 2 ranks (or 4 accumulation steps) holds exactly the same examples.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, Dataset

EVAL_EPOCH = -1  # examples are seeded with this epoch during evaluation: same masks every time
REPLAY = 0x5245504C  # salts the seed of the replayed general rows' order
GROUPS = 0x47525053  # salts the seed of the length-grouped batches' order
GROUP_WINDOW = 50  # global batches per length-sorted window (transformers' LengthGroupedSampler's "megabatches")


def example_params(seed: int, n: int) -> torch.Tensor:
    """``n`` uniforms in [0, 1) (float32) from a generator seeded with the example's seed: one fixed slot per
    random choice of an augmentation, so an example's view depends on its seed alone."""
    return torch.rand(n, generator=torch.Generator().manual_seed(int(seed)))


def mix(*values: int) -> int:
    """A 63-bit seed from several integers (splitmix64 steps), stable across runs and machines."""
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (state ^ (value & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        state = (state ^ (state >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        state ^= state >> 29
    return state & 0x7FFFFFFFFFFFFFFF


def batch_order(n: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1, shuffle: bool = True,
                replay: tuple[int, float] | None = None, lengths: list[int] | None = None) -> list[list[int]]:
    """This rank's micro-batches (lists of example indices) for one epoch.

    The tail that does not fill a whole global batch (``batch_size * world``) is dropped, so all
    ranks run the same number of steps.  ``replay = (general, share)``: the last ``general`` of the
    ``n`` rows are general text, and every micro-batch holds exactly ``round(share * batch_size)`` of
    them (:func:`replay_rows`) beside the domain rows, which alone define the epoch.  ``lengths``
    (one size per example): each global batch holds examples of similar length (:func:`group_by_length`).
    """
    if replay is not None and replay[0] > 0 and replay[1] > 0:
        general, share = replay
        k = replay_rows(share, batch_size)
        domain = batch_order(n - general, batch_size - k, seed, epoch, rank, world, shuffle)
        stream = torch.randperm(general, generator=torch.Generator().manual_seed(mix(seed, epoch, REPLAY))).tolist()
        return [rows + [n - general + stream[((i * world + rank) * k + j) % general] for j in range(k)]
                for i, rows in enumerate(domain)]
    if shuffle:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(mix(seed, epoch))).tolist()
    else:
        order = list(range(n))
    global_batch = batch_size * world
    order = order[: n // global_batch * global_batch]
    if lengths is not None and shuffle:
        order = group_by_length(order, lengths, global_batch, seed, epoch)
    mine = order[rank::world]
    return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]


def group_by_length(order: list[int], lengths: list[int], global_batch: int, seed: int, epoch: int) -> list[int]:
    """The epoch's shuffled ``order`` rearranged so each run of ``global_batch`` examples has similar lengths.

    Padding to a batch's longest row then wastes little.  The order is cut into windows of
    ``GROUP_WINDOW`` global batches; each window is sorted by length (stable, so ties keep the
    shuffled order) and cut into global batches; then all the epoch's batches are shuffled (seeded by
    ``(seed, epoch)``).  So batches stay random in content and in order, each epoch trains on exactly
    the examples the ungrouped order would, nothing but the ``order`` is read (no pass over the data
    before step 1), and the result is a pure function of ``(seed, epoch)``: resume stays exact.
    """
    window = GROUP_WINDOW * global_batch
    batches = []
    for start in range(0, len(order), window):
        part = sorted(order[start : start + window], key=lengths.__getitem__)
        batches += [part[i : i + global_batch] for i in range(0, len(part), global_batch)]
    shuffled = torch.randperm(len(batches), generator=torch.Generator().manual_seed(mix(seed, epoch, GROUPS))).tolist()
    return [index for b in shuffled for index in batches[b]]


def replay_rows(share: float, batch_size: int) -> int:
    """General rows per micro-batch for a replay ``share``: ``round(share * batch_size)``, at least 1 and at most
    ``batch_size - 1``.  (The general rows of global micro-batch ``g`` are items ``g*k .. g*k+k-1`` of a seeded
    permutation of the general set, cycled: every rank and every resume draws the same ones.)"""
    return min(max(1, round(share * batch_size)), batch_size - 1)


def eval_order(n: int, batch_size: int, rank: int = 0, world: int = 1, limit: int | None = None) -> list[list[int]]:
    """Sequential batches over the whole evaluation set (nothing dropped), dealt out to ranks."""
    batches = [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
    if limit is not None:
        batches = batches[:limit]
    return batches[rank::world]


class Batches(Dataset):
    """Item ``i`` is the collated micro-batch ``batches[i]``; collation runs in loader workers."""

    def __init__(self, dataset: Any, task: Any, batches: list[list[int]], seed: int, epoch: int):
        self.dataset, self.task, self.batches, self.seed, self.epoch = dataset, task, batches, seed, epoch

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        indices = self.batches[i]
        rows = self.dataset[indices]
        seeds = [mix(self.seed, self.epoch, index) for index in indices]
        return self.task.collate(rows, seeds)


def loader(dataset: Any, task: Any, batches: list[list[int]], seed: int, epoch: int, workers: int, pin: bool) -> DataLoader:
    return DataLoader(
        Batches(dataset, task, batches, seed, epoch), batch_size=None, shuffle=False,
        num_workers=workers, pin_memory=pin, persistent_workers=False,
        prefetch_factor=4 if workers else None,
    )


def windows(batches: Iterator[dict[str, torch.Tensor]], size: int) -> Iterator[list[dict[str, torch.Tensor]]]:
    """Group micro-batches into accumulation windows; an incomplete last window is dropped."""
    window: list[dict[str, torch.Tensor]] = []
    for batch in batches:
        window.append(batch)
        if len(window) == size:
            yield window
            window = []
