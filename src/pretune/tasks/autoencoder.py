"""(Denoising) autoencoders: reconstruct the input from the backbone's features.

The backbone is the encoder and its feature vector the bottleneck; a decoder mirrors it back to
the input (transposed convolutions for images, an MLP for vectors).  The loss is the mean squared
error per pixel (or feature) against the *clean* input: in pixel space ``[0, 1]`` for images
(the decoder ends in a sigmoid), in the backbone's standardised units for vectors.  The
denoising variant (Vincent et al. 2008) corrupts the encoder's input first:

- ``noise: gaussian``: add N(0, noise_std^2) (images are clipped back to [0, 1]);
- ``noise: mask``: set a random ``mask_prob`` share of pixels / features to zero.

After pretraining, ``model/`` holds the encoder as a backbone for fine-tuning (the decoder is
kept in the same file under ``decoder.*``).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from pretune.backbones.arrays import ArrayFamily
from pretune.data.arrays import channel_stats
from pretune.data.readers import RunData
from pretune.recipe import Section
from pretune.registry import TASKS
from pretune.tasks.vision import ArrayTask, MonitorConfig


class AutoencoderConfig(Section):
    name: Literal["autoencoder"] = "autoencoder"
    noise: Literal["none", "gaussian", "mask"] = "none"
    noise_std: float = Field(0.3, ge=0)  # gaussian: in pixel units (images) or standardised units (vectors)
    mask_prob: float = Field(0.25, ge=0, lt=1)  # mask: share of pixels / features set to zero
    decoder_width: int = Field(64, ge=4)  # channels (images) or hidden units (vectors) of the decoder
    monitor: MonitorConfig = MonitorConfig()


class ConvDecoder(nn.Sequential):
    """Features -> ``width`` maps at 1/4 resolution -> two 2x transposed convolutions -> image in [0, 1]."""

    def __init__(self, features: int, shape: tuple[int, int, int], width: int):
        channels, height, wide = shape
        self.start = (width, math.ceil(height / 4), math.ceil(wide / 4))
        self.size = (height, wide)
        super().__init__(
            nn.Linear(features, math.prod(self.start)), nn.Unflatten(1, self.start), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.ConvTranspose2d(width, width // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(width // 2), nn.ReLU(inplace=True),
            nn.ConvTranspose2d(width // 2, width // 4, 4, 2, 1, bias=False), nn.BatchNorm2d(width // 4), nn.ReLU(inplace=True),
            nn.Conv2d(width // 4, channels, 3, 1, 1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        image = super().forward(features)
        if image.shape[-2:] != self.size:
            image = F.interpolate(image, size=self.size, mode="bilinear", align_corners=False)
        return torch.sigmoid(image)


def mlp_decoder(features: int, outputs: int, width: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(features, width), nn.ReLU(inplace=True), nn.Linear(width, outputs))


def corrupt(x: torch.Tensor, seeds: list[int], cfg: AutoencoderConfig, clip: bool) -> torch.Tensor:
    """The denoising corruption of each example, drawn from the example's own seed."""
    if cfg.noise == "none":
        return x
    out = []
    for row, seed in zip(x, seeds):
        generator = torch.Generator().manual_seed(seed)
        if cfg.noise == "gaussian":
            row = row + cfg.noise_std * torch.randn(row.shape, generator=generator)
        else:
            row = row * (torch.rand(row.shape, generator=generator) >= cfg.mask_prob)
        out.append(row.clamp(0, 1) if clip else row)
    return torch.stack(out)


class AutoencoderModel(nn.Module):
    def __init__(self, backbone: nn.Module, cfg: AutoencoderConfig):
        super().__init__()
        self.backbone = backbone
        shape = backbone.input_shape
        self.images = len(shape) == 3
        self.decoder = ConvDecoder(backbone.num_features, shape, cfg.decoder_width) if self.images else \
            mlp_decoder(backbone.num_features, math.prod(shape), cfg.decoder_width)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        reconstruction = self.decoder(self.backbone(batch["x"])).float()
        target = batch["target"]
        if not self.images:  # vectors are compared in the backbone's standardised units
            target = ((target - self.backbone.mean) / self.backbone.std).flatten(1)
        return {"reconstruction": F.mse_loss(reconstruction, target.float(), reduction="sum")}


@TASKS.register("autoencoder")
class Autoencoder(ArrayTask):
    Config = AutoencoderConfig
    losses = ("reconstruction",)

    def build(self, backbone: ArrayFamily, data: RunData) -> AutoencoderModel:
        self.feature_std = channel_stats(data.train.x)[1].reshape(1, -1)  # vector noise is scaled per feature
        return AutoencoderModel(backbone.build(data), self.cfg)

    def collate(self, rows: dict[str, torch.Tensor], seeds: list[int]) -> dict[str, torch.Tensor]:
        x = rows["x"]
        noisy = corrupt(x, seeds, self.cfg, clip=x.dim() == 4)
        if x.dim() == 2 and self.cfg.noise == "gaussian":  # vector noise is in standardised units: scale by each feature's std
            noisy = x + (noisy - x) * self.feature_std
        return {"x": noisy, "target": x}

    def units(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"reconstruction": torch.tensor(float(batch["target"].numel()))}
