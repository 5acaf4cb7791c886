"""Fully sharded training (``trainer.distributed: fsdp``): PyTorch's FSDP2 and its sharded checkpoints.

Under DDP every rank holds the whole model, its gradients and the optimizer state (for AdamW, 4x
the weights in fp32).  :func:`shard` applies :func:`torch.distributed.fsdp.fully_shard` to each
block of the model (a transformer layer, a CNN stage) and then to the whole module: every
parameter becomes a :class:`~torch.distributed.tensor.DTensor` of which each rank keeps
``1/world`` (so do its gradient and optimizer state); a block's full weights exist only while it
runs.  The module keeps its class, parameter names and ``requires_grad`` flags, so strategies
(freezing, gradual unfreezing, LoRA) and the one training loop work unchanged.

Checkpoints of a sharded run are written with :mod:`torch.distributed.checkpoint` (DCP): each
rank writes its own shard of the weights and optimizer state into ``dcp/``; DCP records the
global shapes, so a run resumes on any number of processes (re-sharding on load), or in one
process without torchrun.  The user-facing ``model/`` stays one standard Hugging Face folder:
the full weights are gathered on rank 0 into a copy of the module whose parameters live on the
``meta`` device (no memory) except while a folder is written (:class:`Gathered`).
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from pretune.errors import CheckpointError

DCP_DIR = "dcp"  # in a checkpoint folder: the sharded weights and optimizer state


def blocks(module: nn.Module) -> list[nn.Module]:
    """The repeated blocks to shard one by one: the instances of a Hugging Face model's
    ``_no_split_modules`` classes (``BertLayer``, ``GPT2Block``, ``WhisperEncoderLayer``...), else the
    children of the largest ``ModuleList`` / ``Sequential`` (a CNN's stages).  A block holding a
    parameter shared with the rest of the model (BERT's word embeddings, tied to the MLM decoder) is
    left to the enclosing module: a tied parameter must live in one sharded group."""
    names = set()
    for sub in module.modules():
        names.update(getattr(sub, "_no_split_modules", None) or ())
    found = [sub for sub in module.modules() if type(sub).__name__ in names]
    if not found:
        lists = [sub for sub in module.modules() if isinstance(sub, (nn.ModuleList, nn.Sequential))
                 and sum(1 for child in sub.children() if any(True for _ in child.parameters())) >= 2]
        if lists:
            largest = max(lists, key=lambda sub: sum(p.numel() for p in sub.parameters()))
            found = [child for child in largest.children() if any(True for _ in child.parameters())]
    found = [sub for sub in found if not any(other in found for other in _ancestors(module, sub))]  # outermost only
    return [sub for sub in found if not _shares(module, sub)]


def _shares(module: nn.Module, sub: nn.Module) -> bool:
    """Whether a parameter of ``sub`` is also used by ``module`` outside ``sub`` (tied weights)."""
    def uses(m: nn.Module) -> dict[int, int]:
        counts: dict[int, int] = {}
        for _, param in m.named_parameters(remove_duplicate=False):
            counts[id(param)] = counts.get(id(param), 0) + 1
        return counts

    inside, everywhere = uses(sub), uses(module)
    return any(everywhere[key] != count for key, count in inside.items())


def _ancestors(root: nn.Module, target: nn.Module) -> list[nn.Module]:
    for name, sub in root.named_modules():
        if sub is target:
            parts = name.split(".") if name else []
            return [root.get_submodule(".".join(parts[:i])) for i in range(len(parts))]
    return []


def shard(module: nn.Module, precision: str, activation_checkpointing: bool = False) -> int:
    """Shard ``module`` in place over the default process group; returns the number of blocks sharded
    on their own.  bf16 / fp16 runs gather weights in that precision (half the traffic) and reduce
    gradients in fp32; autocast still decides each operation's precision, as without sharding."""
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    policy = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32 if low is not None else None)
    found = blocks(module)
    if activation_checkpointing:
        checkpoint_blocks(found)
    for block in found:
        fully_shard(block, mp_policy=policy)
    fully_shard(module, mp_policy=policy)
    return len(found)


def checkpoint_blocks(found: list[nn.Module]) -> None:
    """Recompute each block's activations in the backward pass instead of keeping them (less memory, ~1/3 more compute)."""
    from torch.distributed._composable import checkpoint  # composes with fully_shard (a module hook, not a wrapper class)

    for block in found:
        checkpoint(block)


def is_sharded(module: nn.Module) -> bool:
    return isinstance(module, FSDPModule)


def local_bytes(tensors: Iterator[torch.Tensor]) -> int:
    """Bytes this rank stores for ``tensors`` (a DTensor's local shard only)."""
    total = 0
    for t in tensors:
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> Iterator[torch.Tensor]:
    for state in optimizer.state.values():
        yield from (v for v in state.values() if isinstance(v, torch.Tensor))


@contextlib.contextmanager
def unsharded(module: nn.Module) -> Iterator[nn.Module]:
    """Every sharded group's full weights in place, for read-only use outside the module's own forward
    (a k-NN probe calling ``module.backbone``); a collective: every rank enters it."""
    groups = [sub for sub in module.modules() if isinstance(sub, FSDPModule)]
    for group in groups:
        group.unshard()
    try:
        yield module
    finally:
        for group in groups:
            group.reshard()


class Gathered:
    """Rank 0's plain copy of a sharded module, for writing Hugging Face folders.

    Built before sharding: a deep copy whose parameters are then moved to the ``meta`` device (no
    memory; buffers and configuration stay).  :meth:`full` gathers the full weights (a collective: every
    rank calls it) and, on rank 0, yields the copy holding them; other ranks get ``None``."""

    def __init__(self, module: nn.Module, main: bool):
        self.copy = None
        if main:
            self.copy = copy.deepcopy(module)
            self._ties = _tie_groups(self.copy)
            self._to_meta()

    def _to_meta(self) -> None:
        for sub in self.copy.modules():
            for name, param in list(sub.named_parameters(recurse=False)):
                setattr(sub, name, nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=param.requires_grad))
        _tie(self.copy, self._ties)

    @contextlib.contextmanager
    def full(self, module: nn.Module) -> Iterator[nn.Module | None]:
        state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.copy is None:
            yield None
            return
        self.copy.load_state_dict(state, strict=True, assign=True)
        _tie(self.copy, self._ties)
        try:
            yield self.copy
        finally:
            del state
            self._to_meta()


def _tie_groups(module: nn.Module) -> list[list[str]]:
    """Names of parameters that are one tensor (tied embeddings), grouped."""
    by_id: dict[int, list[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(param), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]


def _tie(module: nn.Module, groups: list[list[str]]) -> None:
    for names in groups:
        first = module.get_parameter(names[0])
        for name in names[1:]:
            owner, _, attr = name.rpartition(".")
            setattr(module.get_submodule(owner), attr, first)


# ---- sharded checkpoints ---------------------------------------------------------------------------------------------

def save(folder: Path, module: nn.Module, optimizers: dict[str, torch.optim.Optimizer]) -> None:
    """Every rank writes its shard of the weights and of each optimizer's state into ``folder`` (a collective)."""
    state = {"model": get_model_state_dict(module),
             "optim": {name: get_optimizer_state_dict(module, optimizer) for name, optimizer in optimizers.items()}}
    dcp.save(state, checkpoint_id=str(folder), no_dist=not process_group())


def has_shards(checkpoint: Path) -> bool:
    return (checkpoint / DCP_DIR / ".metadata").is_file()


def load_model(checkpoint: Path, module: nn.Module) -> None:
    """The weights of a sharded checkpoint into ``module`` (sharded or not, any number of processes)."""
    folder = checkpoint / DCP_DIR
    state = {"model": get_model_state_dict(module)}
    try:
        dcp.load(state, checkpoint_id=str(folder), no_dist=not process_group())
        set_model_state_dict(module, state["model"])
    except Exception as exc:
        raise CheckpointError(f"{folder}: cannot be loaded into the model built from the recipe "
                              f"({type(exc).__name__}: {' '.join(str(exc).split())[:300]})") from None


def load_optimizers(checkpoint: Path, module: nn.Module, optimizers: dict[str, torch.optim.Optimizer]) -> None:
    """Each optimizer's state from a sharded checkpoint, re-sharded to this run's processes.

    DCP loads into a template of the right shapes and shards.  Adam's state exists only for parameters
    that have had a gradient; the template is made for every parameter (each unfrozen for the moment),
    and the parameters without saved state get none back, exactly as in the run that saved it."""
    folder = checkpoint / DCP_DIR
    saved = set(dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata)
    frozen = [p for p in module.parameters() if not p.requires_grad]
    for param in frozen:
        param.requires_grad_(True)
    try:
        templates = {name: get_optimizer_state_dict(module, optimizer) for name, optimizer in optimizers.items()}
    finally:
        for param in frozen:
            param.requires_grad_(False)
    state = {"optim": templates}
    try:
        dcp.load(state, checkpoint_id=str(folder), planner=dcp.DefaultLoadPlanner(allow_partial_load=True), no_dist=not process_group())
    except Exception as exc:
        raise CheckpointError(f"{folder}: its optimizer state cannot be loaded ({type(exc).__name__}: "
                              f"{' '.join(str(exc).split())[:300]})") from None
    for name, optimizer in optimizers.items():
        loaded = state["optim"][name]
        kept = {fqn: values for fqn, values in loaded["state"].items()
                if any(key.startswith(f"optim.{name}.state.{fqn}.") for key in saved)}
        set_optimizer_state_dict(module, optimizer, {"state": kept, "param_groups": loaded["param_groups"]})


def process_group() -> bool:
    return dist.is_available() and dist.is_initialized()


def check(task: Any, strategy: Any) -> str | None:
    """Why this task / strategy cannot train sharded (one line), or None."""
    name = getattr(strategy, "name", None)
    if name in ("linear-probe", "setfit"):
        return (f"strategy {name} fits its head outside the optimizer on cached or encoded features; a sharded "
                f"model has no full head to fit into: use trainer.distributed=ddp (the frozen backbone needs no sharding)")
    if len(task.optimizer_phases()) > 1:
        return ("a task with several optimizer phases (GAN: two backward passes per step over different parameters) is not "
                "supported with trainer.distributed=fsdp (not verified against one process); GAN models fit one device: "
                "use trainer.distributed=ddp")
    return None
