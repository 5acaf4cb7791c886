"""GAN pretraining (DCGAN, Radford et al. 2016): the discriminator's trunk becomes the backbone.

Two phases per step, each with its own optimizer (the trainer runs one optimizer per entry of
``phases``), on the same batch of real images and noise vectors:

1. discriminator: ``softplus(-D(x)) + softplus(D(G(z)))``  = ``-log D(x) - log(1 - D(G(z)))``,
   with ``G(z)`` detached;
2. generator, against the just-updated discriminator: the non-saturating loss
   ``softplus(-D(G(z)))`` = ``-log D(G(z))`` (Goodfellow et al. 2014, section 3).

``D`` is the backbone (any image backbone; the recipe uses the built-in CNN with leaky ReLU)
plus a linear real/fake logit.  The generator maps ``latent_dim`` Gaussian noise to an image in
``[0, 1]`` through transposed convolutions.  At every evaluation a grid of samples from fixed
noise is written to ``RUN/samples/step-N.png`` (and ``model/samples.png``).
"""

from __future__ import annotations

import math
from pathlib import Path
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
from pretune.tasks.autoencoder import ConvDecoder
from pretune.tasks.vision import ArrayTask, MonitorConfig


class GANConfig(Section):
    name: Literal["gan"] = "gan"
    latent_dim: int = Field(64, ge=1)
    generator_width: int = Field(128, ge=8)  # channels of the generator's first feature maps
    samples: int = Field(64, ge=1)  # images in each sample grid
    monitor: MonitorConfig = MonitorConfig()


class GANModel(nn.Module):
    def __init__(self, backbone: nn.Module, cfg: GANConfig):
        super().__init__()
        if len(backbone.input_shape) != 3:
            raise RecipeError("recipe key 'task.name': gan generates images; the data are vectors")
        self.backbone = backbone  # the discriminator's trunk
        self.critic = nn.Linear(backbone.num_features, 1)
        self.generator = ConvDecoder(cfg.latent_dim, backbone.input_shape, cfg.generator_width)
        self.latent_dim = cfg.latent_dim

    def discriminate(self, images: torch.Tensor) -> torch.Tensor:
        return self.critic(self.backbone(images)).float().squeeze(1)

    def phase_parameters(self, phase: str) -> list[tuple[str, nn.Parameter]]:
        names = ("generator.",) if phase == "generator" else ("backbone.", "critic.")
        return [(n, p) for n, p in self.named_parameters() if n.startswith(names)]

    def forward(self, batch: dict[str, torch.Tensor], phase: str | None = None) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if phase in ("discriminator", None):
            with torch.no_grad():
                fake = self.generator(batch["z"])
            real_logits, fake_logits = self.discriminate(batch["x"]), self.discriminate(fake)
            out["d_real"], out["d_fake"] = F.softplus(-real_logits).sum(), F.softplus(fake_logits).sum()
            out["d_correct"] = (real_logits > 0).sum() + (fake_logits < 0).sum()
        if phase in ("generator", None):
            out["g"] = F.softplus(-self.discriminate(self.generator(batch["z"]))).sum()
        return out


@TASKS.register("gan")
class GAN(ArrayTask):
    Config = GANConfig
    losses = ("d_real", "d_fake", "g")
    phases = {"discriminator": ("d_real", "d_fake"), "generator": ("g",)}

    def build(self, backbone: ArrayFamily, data: RunData) -> GANModel:
        return GANModel(backbone.build(data), self.cfg)

    def phase_parameters(self, module: GANModel, phase: str) -> list[tuple[str, nn.Parameter]]:
        return module.phase_parameters(phase)

    def collate(self, rows: dict[str, torch.Tensor], seeds: list[int]) -> dict[str, torch.Tensor]:
        z = torch.stack([torch.randn(self.cfg.latent_dim, generator=torch.Generator().manual_seed(s)) for s in seeds])
        return {"x": rows["x"], "z": z}

    def units(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        n = torch.tensor(float(len(batch["x"])))
        return {"d_real": n, "d_fake": n, "g": n, "d_correct": 2 * n}

    @torch.no_grad()
    def sample_grid(self, module: GANModel, path: Path) -> None:
        from torchvision.utils import save_image

        z = torch.randn(self.cfg.samples, self.cfg.latent_dim, generator=torch.Generator().manual_seed(self.seed))
        was_training = module.training
        module.eval()
        images = module.generator(z.to(next(module.parameters()).device)).float().cpu()
        module.train(was_training)
        save_image(images, path, nrow=int(math.ceil(math.sqrt(self.cfg.samples))), padding=1)

    def probe(self, module: GANModel, data: RunData, *, device, precision, step, out_dir) -> dict[str, float]:
        if out_dir is not None:
            (out_dir / "samples").mkdir(exist_ok=True)
            self.sample_grid(module, out_dir / "samples" / f"step-{step:08d}.png")
        return super().probe(module, data, device=device, precision=precision, step=step, out_dir=out_dir)

    def save(self, module: GANModel, path: Path, data: RunData) -> None:
        super().save(module, path, data)
        self.sample_grid(module, path / "samples.png")
