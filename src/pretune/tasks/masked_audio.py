"""Masked spectrogram modelling with a random-projection quantiser: BEST-RQ (Chiu et al. 2022,
"Self-supervised Learning with Random-projection Quantizer for Speech Recognition").

Targets come from a quantiser that is random and never trained: the clean log-mel frames are
stacked to the encoder's frame rate (Whisper's front end halves it, so two frames per target),
normalised per feature with statistics of the training data, projected by a fixed random matrix
``A`` and labelled with the nearest vector of a fixed random codebook ``C`` (both l2-normalised):

    y_t = argmin_k || normalize(c_k) - normalize(A x_t) ||

The encoder reads the spectrogram with spans of frames replaced by noise ``N(0, noise_std^2)`` and
a linear layer predicts ``y_t`` at the masked encoder frames only:

    L = sum over masked t of  -log softmax(W h_t)[y_t]

Each example gets ``max(1, round(mask_prob * length / span))`` spans of ``mask_span`` seconds at
uniform starts drawn from its own seed, within the clip's ``length``: its frames up to the last one
above its floor, since the silence a short clip is padded with would be trivially easy targets.  Spans
may overlap, as in BEST-RQ and wav2vec 2.0, so at most ``mask_prob`` of those frames are masked; an
encoder frame is masked when either of its two input frames is.  The paper masks 400 ms spans starting at 1% of frames on long utterances and uses an
8,192-word codebook of dimension 16; the defaults here suit clips of about a second.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from pretune.backbones.arrays import ArrayFamily
from pretune.data.readers import RunData
from pretune.errors import RecipeError
from pretune.recipe import Section
from pretune.registry import TASKS
from pretune.tasks.vision import ArrayTask, MonitorConfig
from pretune.trainer.data import mix

STACK = 2  # input frames per encoder frame (Whisper's second convolution has stride 2)


class MaskedAudioConfig(Section):
    name: Literal["best-rq"] = "best-rq"
    mask_prob: float = Field(0.4, gt=0, lt=1)  # at most this share of frames is masked
    mask_span: float = Field(0.2, gt=0)  # seconds per masked span
    noise_std: float = Field(0.1, ge=0)  # masked frames become N(0, noise_std^2)
    codebook_size: int = Field(1024, ge=2)
    codebook_dim: int = Field(16, ge=1)
    quantizer_seed: int = 0  # the random projection and codebook (fixed: the targets never change)
    monitor: MonitorConfig = MonitorConfig()


class RandomProjectionQuantizer(nn.Module):
    """BEST-RQ's frozen quantiser: a random projection and a random codebook, both buffers (never trained)."""

    def __init__(self, features: int, dim: int, size: int, seed: int, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        bound = (6.0 / (features + dim)) ** 0.5  # Xavier uniform, as in the paper
        self.register_buffer("projection", (torch.rand(features, dim, generator=generator) * 2 - 1) * bound)
        self.register_buffer("codebook", F.normalize(torch.randn(size, dim, generator=generator), dim=1))
        self.register_buffer("mean", mean.reshape(features).float())
        self.register_buffer("std", std.reshape(features).float().clamp_min(1e-5))

    @torch.no_grad()
    def forward(self, stacked: torch.Tensor) -> torch.Tensor:
        """Code ids ``[..., ]`` of stacked frames ``[..., features]`` (nearest codeword by cosine = by l2 of unit vectors)."""
        projected = F.normalize(((stacked.float() - self.mean) / self.std) @ self.projection, dim=-1)
        return (projected @ self.codebook.T).argmax(dim=-1)


def stack_frames(mel: torch.Tensor) -> torch.Tensor:
    """``[B, M, T]`` log-mel -> ``[B, T / 2, 2 M]``: consecutive frames side by side, one row per encoder frame."""
    batch, mels, frames = mel.shape
    return mel.transpose(1, 2).reshape(batch, frames // STACK, STACK * mels)


class MaskedAudioModel(nn.Module):
    def __init__(self, backbone: nn.Module, cfg: MaskedAudioConfig, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.backbone = backbone
        self.quantizer = RandomProjectionQuantizer(mean.numel(), cfg.codebook_dim, cfg.codebook_size, cfg.quantizer_seed, mean, std)
        self.head = nn.Linear(backbone.num_features, cfg.codebook_size)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        mask = batch["mask"]  # [B, T / 2] encoder frames whose input was masked
        targets = self.quantizer(stack_frames(batch["clean"]))[mask]
        logits = self.head(self.backbone.frames(batch["x"])[mask]).float()
        loss = F.cross_entropy(logits, targets, reduction="sum")
        return {"masked_audio": loss, "masked_audio_correct": (logits.argmax(1) == targets).sum()}


def span_mask(frames: int, length: int, seed: int, cfg: MaskedAudioConfig, frame_seconds: float) -> torch.Tensor:
    """Bool ``[frames]``: spans of ``mask_span`` seconds at uniform starts within the clip's first ``length`` frames
    (the rest is the silence a short clip was padded with), drawn from the example's seed."""
    span = max(1, min(length, round(cfg.mask_span / frame_seconds)))
    spans = max(1, round(cfg.mask_prob * length / span))
    starts = torch.randint(0, length - span + 1, (spans,), generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros(frames, dtype=torch.bool)
    for start in starts.tolist():
        mask[start:start + span] = True
    return mask


def sound_lengths(mel: torch.Tensor) -> torch.Tensor:
    """Per clip, the number of frames up to the last one above the clip's floor (what follows is padding or silence);
    at least ``STACK``."""
    floor = mel.amin(dim=(1, 2), keepdim=True)
    sounding = (mel > floor).any(dim=1)  # [B, T]
    last = torch.where(sounding, torch.arange(1, mel.shape[-1] + 1), 0).amax(dim=1)
    return last.clamp_min(STACK)


@TASKS.register("best-rq")
class MaskedAudio(ArrayTask):
    Config = MaskedAudioConfig
    losses = ("masked_audio",)

    def build(self, backbone: ArrayFamily, data: RunData) -> MaskedAudioModel:
        spec = data.arrays.audio
        if spec is None:
            raise RecipeError("recipe key 'task.name': best-rq pretrains on audio; set data.audio to a folder of clips")
        self.frame_seconds = spec["hop"] / spec["sample_rate"]
        stacked = stack_frames(data.train.x[:4096])
        std, mean = torch.std_mean(stacked.flatten(0, 1), dim=0)
        return MaskedAudioModel(backbone.build(data), self.cfg, mean, std)

    def collate(self, rows: dict[str, torch.Tensor], seeds: list[int]) -> dict[str, torch.Tensor]:
        """Masked spans replaced by noise, each example from its own seed; the clean input stays the target."""
        clean = rows["x"]
        frames = clean.shape[-1]
        masks, noisy = [], clean.clone()
        for i, (seed, length) in enumerate(zip(seeds, sound_lengths(clean).tolist())):
            mask = span_mask(frames, length, seed, self.cfg, self.frame_seconds)
            noise = torch.randn(clean.shape[1], int(mask.sum()), generator=torch.Generator().manual_seed(mix(seed, 1)))
            noisy[i][:, mask] = noise * self.cfg.noise_std
            masks.append(mask.view(frames // STACK, STACK).any(dim=1))
        return {"x": noisy, "clean": clean, "mask": torch.stack(masks)}

    def units(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        masked = batch["mask"].sum().float()
        return {"masked_audio": masked, "masked_audio_correct": masked}
