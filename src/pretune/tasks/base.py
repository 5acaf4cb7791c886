"""The ``Task`` interface: what the one training loop knows about any objective or task head.

A task turns a batch into summed losses and metrics.  It *receives* its data and backbone from
:func:`pretune.run.train` (the composition root); it does not build them.  Every capability the
loop may use is declared here with a default, so a task overrides only what it has:

=================  ===============================================================================
``Config``         its pydantic recipe section (``task: {name: mlm, mask_prob: 0.15}``)
``data_kind``      ``"corpus"`` (unlabelled text / arrays) or ``"labelled"``: which reader feeds it
``modalities``     the backbone modalities it accepts (``"text"``, ``"array"``)
``family``         text corpora: the tokenizer and packing the objective wants (``encoder``/``decoder``)
``pairs``          text corpora: read ``[CLS] A [SEP] B [SEP]`` sentence pairs (next-sentence prediction)
``losses``         keys of ``forward``'s output that add up to the training loss
``phases``         one optimizer per phase: ``{"discriminator": ("d_real", "d_fake"), ...}`` (GAN);
                   by default one phase, ``{"main": losses}``; ``phase_parameters`` says what each trains
``perplexity``     loss keys also reported as perplexity
``monitor``        ``(metric, "max" | "min")`` that picks the best checkpoint, or None
``stretch``        whether ``trainer.min_steps`` may lengthen the run (not SetFit's: its pair count is its schedule)
``unit``           what throughput counts: ``"tok"`` (tokens) or ``"ex"`` (examples)
``label_names``    class names by id (fine-tuning), saved with the run so every rank and a resume agree
``head``           the head kind (:mod:`pretune.heads`) of a fine-tuning task; it parses the labels
``build``          ``build(backbone, data) -> nn.Module``; ``module(batch)`` returns **summed** values
``collate``        rows -> tensors (masking, views, corruption from each example's own seed)
``units``          how many units each summed value counts (masked tokens, examples...)
``tokens`` / ``flops``  throughput and model FLOPs of a batch
``save``           write ``model/`` (a standard Hugging Face folder, or a pretune vision folder)
``prepare``        after ``build``: e.g. encode the data once with a frozen backbone (cached features)
``probe``          extra validation metrics (k-NN accuracy, sample images)
``wants_logits``   whether ``score`` needs every validation batch's ``logits`` and ``labels``
``score``          metrics over the whole validation set (F1, confusion matrix...)
``on_epoch``       called at the start of every epoch; returns a note to log when what trains changed
``on_step``        called before every optimizer step, likewise (a continued model's new head trains alone first)
``warmup_steps``   steps after which the model is the starting point of comparisons (the head warm-up): evaluated then
``refit``          before every validation (and before saving a model no validation picked): fit the
                   parts of the model that are fitted rather than trained (SetFit's head); returns a note
``param_groups``   per-parameter learning-rate multipliers (LLRD, the head's own lr)
=================  ===============================================================================

The loop divides every summed value by its unit count over the whole accumulation window and all
ranks, so gradient accumulation and DDP give the gradient of one large batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from pretune.heads import Head
from pretune.recipe import Section


class Task:
    Config: ClassVar[type[Section]]
    data_kind: ClassVar[str] = "corpus"
    modalities: ClassVar[tuple[str, ...]] = ("text",)
    family: ClassVar[str] = "encoder"
    pairs: bool = False
    losses: tuple[str, ...] = ()
    phases: dict[str, tuple[str, ...]] | None = None
    perplexity: tuple[str, ...] = ()
    monitor: tuple[str, str] | None = None
    stretch: bool = True
    unit: str = "tok"
    label_names: list[str] | None = None
    head: Head | None = None
    wants_logits: bool = False
    start: Any = None  # text pretraining continued from a checkpoint: what it lacked and keeps (backbones/start.py)
    warmup_steps: int = 0
    head_only: bool | None = None  # set by the head warm-up (tasks/common.py: warm_head): only the new head trains now
    head_lr_scale: float = 1.0  # trainer.head_lr / trainer.lr: the new layers' learning rate

    def __init__(self, cfg: Any, seed: int = 0):
        self.cfg, self.seed = cfg, seed

    # -- required --------------------------------------------------------------------------------
    def build(self, backbone: Any, data: Any) -> nn.Module:
        raise NotImplementedError

    def collate(self, rows: Any, seeds: list[int]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def units(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def save(self, module: nn.Module, path: Path, data: Any) -> None:
        raise NotImplementedError

    # -- optional, with defaults -------------------------------------------------------------------
    def optimizer_phases(self) -> dict[str, tuple[str, ...]]:
        """The loss keys each optimizer steps on; one optimizer over everything unless ``phases`` says more."""
        return self.phases or {"main": tuple(self.losses)}

    def phase_parameters(self, module: nn.Module, phase: str) -> Any:
        """The named parameters the optimizer of ``phase`` trains (all of them with one phase)."""
        return module.named_parameters()

    def tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """Throughput units in a batch (tokens, or examples for ``unit = "ex"``)."""
        return len(next(iter(batch.values())))

    def flops(self, module: nn.Module, batch: dict[str, torch.Tensor]) -> float:
        """Model FLOPs of one training step on ``batch`` (0 when unknown: MFU is then not reported)."""
        return 0.0

    def prepare(self, module: nn.Module, data: Any, device: torch.device, precision: str) -> Any:
        """Called once after ``build`` (and after a resume has loaded the weights); returns the data to train on."""
        return data

    def probe(self, module: nn.Module, data: Any, *, device: torch.device, precision: str, step: int,
              out_dir: Path | None) -> dict[str, float]:
        """Extra validation metrics computed outside the validation batches."""
        return {}

    def score(self, logits: list[torch.Tensor], labels: list[torch.Tensor]) -> dict[str, Any]:
        """Metrics over the whole validation set (with ``wants_logits = True``)."""
        return {}

    def lengths(self, train: Any) -> list[int] | None:
        """A cheap size per training example for length-grouped batches (``trainer.group_by_length``), or
        ``None`` when batches are not padded (packed blocks, images, cached features)."""
        return None

    def on_epoch(self, module: nn.Module, epoch: int) -> str | None:
        """Start of ``epoch``; a returned note (e.g. "unfroze layer 3") is logged and means what trains changed."""
        return None

    def on_step(self, module: nn.Module, step: int) -> str | None:
        """Before optimizer step ``step + 1``; a returned note is logged and means what trains changed."""
        return None

    def refit(self, module: nn.Module, device: torch.device, precision: str) -> str | None:
        """Fit what is fitted rather than trained, from the model as it is now; a returned note is logged."""
        return None

    def lr_scales(self, module: nn.Module) -> dict[str, float] | None:
        """Learning-rate multiplier per parameter name (None: every parameter at ``trainer.lr``)."""
        return None
