"""NT-Xent / InfoNCE against their definitions, and the global-batch gradient under DDP."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from pretune.tasks.contrastive import info_nce, nt_xent


def direct_nt_xent(z1: torch.Tensor, z2: torch.Tensor, t: float) -> torch.Tensor:
    """Chen et al. 2020, Algorithm 1, written out anchor by anchor (summed, not averaged)."""
    z = F.normalize(torch.cat([z1, z2]).double(), dim=1)
    n = len(z1)
    total = torch.zeros((), dtype=torch.double)
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        s = z @ z[i] / t
        den = sum(torch.exp(s[k]) for k in range(2 * n) if k != i)
        total = total - torch.log(torch.exp(s[j]) / den)
    return total


def test_nt_xent_known_value():
    # two examples, both views identical and orthogonal to the other example: for every anchor the
    # positive has similarity 1 and both negatives 0, so each term is log(1 + 2/e)
    e = torch.eye(2)
    loss, correct = nt_xent(e, e.clone(), temperature=1.0)
    assert loss.item() == pytest.approx(4 * math.log(1 + 2 / math.e), rel=1e-6)
    assert correct.item() == 4


@pytest.mark.parametrize("t", [0.1, 0.5, 2.0])
def test_nt_xent_matches_direct_formula(t):
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    loss, _ = nt_xent(z1, z2, t)
    assert loss.item() == pytest.approx(direct_nt_xent(z1, z2, t).item(), rel=1e-5)


def test_nt_xent_is_lower_for_aligned_views():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(8, 16, generator=g)
    aligned, _ = nt_xent(z, z + 0.01 * torch.randn(8, 16, generator=g), 0.5)
    random, _ = nt_xent(z, torch.randn(8, 16, generator=g), 0.5)
    assert aligned < random


def test_info_nce_matches_cross_entropy_definition():
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    loss, _ = info_nce(q, k, 0.05)
    qn, kn = F.normalize(q.double(), dim=1), F.normalize(k.double(), dim=1)
    expected = sum(-torch.log_softmax(qn[i] @ kn.T / 0.05, 0)[i] for i in range(5))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_grads(rank: int, world: int, port: int, inputs: torch.Tensor, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    proj = torch.nn.Linear(inputs.shape[-1], 3)
    local = inputs.chunk(world)[rank]  # [n, 2, D] views of this rank's examples
    z = proj(local.transpose(0, 1).flatten(0, 1))
    n = len(local)
    loss, _ = nt_xent(z[:n], z[n:], 0.5)
    (loss * world).backward()  # the trainer's convention: DDP then averages over ranks
    grad = proj.weight.grad.clone()
    dist.all_reduce(grad)
    out[rank] = (grad / world).tolist()
    dist.destroy_process_group()


def test_nt_xent_under_two_processes_equals_one_big_batch():
    """Negatives come from the whole global batch and gradients flow back through the gather."""
    inputs = torch.randn(8, 2, 4, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(0)
    proj = torch.nn.Linear(4, 3)
    z = proj(inputs.transpose(0, 1).flatten(0, 1))
    loss, _ = nt_xent(z[:8], z[8:], 0.5)
    loss.backward()
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank_grads, args=(2, _free_port(), inputs, out), nprocs=2, join=True)
        ddp = torch.tensor(out[0])
    torch.testing.assert_close(ddp, proj.weight.grad, rtol=1e-5, atol=1e-6)
