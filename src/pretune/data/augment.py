"""Contrastive views (SimCLR) of small images, corrupted views (SCARF-like) of vectors, and a dispatcher that
also sends spectrograms to :mod:`pretune.data.audio_augment`.

Batched in torch and seeded per example.  An image view is, in SimCLR's order (Chen et al. 2020,
"A Simple Framework for Contrastive Learning of Visual Representations", appendix A):

    view = blur(grayscale(jitter(flip(resized_crop(image)))))

Every random choice for an example comes from ``example_params(seed, N_PARAMS)``: uniforms drawn
by a generator seeded with that example's own seed, one fixed slot per parameter (``SCALE``,
``FLIP``, ...), all drawn whether an op is enabled or not.  So an example's view does not depend
on its batch, its position in it, the batch size, the process or the other settings of the
recipe, and the global torch RNG is never touched.  Two views of one example need two seeds, e.g.
``mix(seed, 0)`` and ``mix(seed, 1)`` (see :func:`pretune.trainer.data.mix`).

Only the parameter draw loops in Python; each op runs once over the batch.  Where we differ from
torchvision (which SimCLR's reference transforms use):

- crop: a sampled width or height above the image side is clamped to it, instead of
  torchvision's loop of up to 10 rejected draws (with the defaults ~14% of crops are clamped:
  full width or height, area below the sampled scale, aspect ratio nearer 1).  The crop is
  continuous (sub-pixel) and resized bilinearly without antialiasing;
- jitter: brightness, contrast, saturation, hue always in that order (torchvision shuffles it);
  the hue shift is a rotation of the chroma plane of YIQ, an approximation of an HSV hue shift;
- grayscale weights are ITU-R 601's (0.299, 0.587, 0.114); torchvision uses 0.2989 for red.
"""

from __future__ import annotations

import math
from typing import Annotated, Sequence

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import Tensor

from pretune.data.audio_augment import AudioAugmentConfig, augment_audio
from pretune.recipe import Probability, Section
from pretune.trainer.data import example_params

# slots of example_params: one uniform in [0, 1) per random choice of an image view
SCALE, RATIO, CENTRE_X, CENTRE_Y, FLIP, JITTER, BRIGHTNESS, CONTRAST, SATURATION, HUE, GRAY, BLUR, SIGMA = range(13)
N_PARAMS = 13

GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601 luma
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=torch.float64)
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)

Fraction = Annotated[float, Field(gt=0, le=1)]
Ratio = Annotated[float, Field(ge=0.1, le=10)]
Sigma = Annotated[float, Field(gt=0, le=100)]


class AugmentConfig(Section):
    """The ``task.augment:`` section.  Defaults: SimCLR's CIFAR-10 setting (colour strength 0.5, no blur)."""

    crop_scale: tuple[Fraction, Fraction] = (0.08, 1.0)  # random resized crop: area fraction
    crop_ratio: tuple[Ratio, Ratio] = (3 / 4, 4 / 3)  # aspect ratio (width / height), log-uniform
    flip: Probability = 0.5  # horizontal flip
    jitter: Probability = 0.8  # colour jitter
    brightness: float = Field(0.4, ge=0, le=1)  # factor ~ U(1 - brightness, 1 + brightness)
    contrast: float = Field(0.4, ge=0, le=1)
    saturation: float = Field(0.4, ge=0, le=1)
    hue: float = Field(0.1, ge=0, le=0.5)  # shift ~ U(-hue, hue) turns
    grayscale: Probability = 0.2
    blur: Probability = 0.0  # SimCLR: 0.5 on ImageNet, off for CIFAR-size images
    blur_sigma: tuple[Sigma, Sigma] = (0.1, 2.0)
    noise: float = Field(0.0, ge=0, le=10)  # vectors: std of added Gaussian noise (standardised units)
    mask: float = Field(0.0, ge=0, lt=1)  # vectors: fraction of features zeroed per example
    audio: AudioAugmentConfig = AudioAugmentConfig()  # audio spectrograms: shift, gain, noise, speed, SpecAugment

    @field_validator("crop_scale", "crop_ratio", "blur_sigma")
    @classmethod
    def _ordered(cls, value: tuple[float, float]) -> tuple[float, float]:
        if value[0] > value[1]:
            raise ValueError(f"a range (low, high) needs low <= high, got {value}")
        return value


def blur_kernel_size(side: int) -> int:
    """SimCLR's blur kernel: ~10% of the image side, made odd, at least 3 (224 -> 23, 32 -> 3)."""
    return max(3, int(0.1 * side) // 2 * 2 + 1)


def augment_images(images: Tensor, seeds: Sequence[int], cfg: AugmentConfig, size: int | None = None) -> Tensor:
    """images [B, C, H, W] float in [0, 1] -> views [B, C, size, size] in [0, 1] (size defaults to H).

    C is 1 or 3; one-channel images get crop, flip, brightness, contrast and blur only.  Works on
    any device; the parameters are drawn on the CPU.
    """
    if images.dim() != 4 or not images.is_floating_point() or images.shape[1] not in (1, 3):
        raise ValueError(f"augment_images needs float images [B, 1 or 3, H, W], got {tuple(images.shape)} {images.dtype}")
    if len(seeds) != len(images):
        raise ValueError(f"{len(images)} images but {len(seeds)} seeds")
    params = torch.stack([example_params(seed, N_PARAMS) for seed in seeds]) if len(seeds) else torch.empty(0, N_PARAMS)
    params = params.to(images.device)
    views = resized_crop(images, params, cfg, size or images.shape[2])

    def chosen(slot: int, probability: float) -> Tensor:  # u < 1 always holds, u < 0 never
        return (params[:, slot] < probability).view(-1, 1, 1, 1)

    if cfg.jitter > 0:
        views = torch.where(chosen(JITTER, cfg.jitter), color_jitter(views, params, cfg), views)
    if cfg.grayscale > 0 and views.shape[1] == 3:
        views = torch.where(chosen(GRAY, cfg.grayscale), grayscale(views).expand_as(views), views)
    if cfg.blur > 0:
        rows = (params[:, BLUR] < cfg.blur).nonzero().squeeze(1)
        if len(rows):
            low, high = cfg.blur_sigma
            sigma = low + (high - low) * params[rows, SIGMA]
            blurred = gaussian_blur(views[rows], sigma, blur_kernel_size(views.shape[-1]))
            views = views.index_copy(0, rows, blurred)
    return views


def resized_crop(images: Tensor, params: Tensor, cfg: AugmentConfig, size: int) -> Tensor:
    """Random resized crop and horizontal flip as one bilinear ``grid_sample`` of the batch.

    Per example: area fraction s ~ U(crop_scale), log aspect ratio log r ~ U(log crop_ratio);
    relative width w = sqrt(s r H / W) and height h = sqrt(s W / (r H)), each clamped to <= 1
    (torchvision instead redraws up to 10 times); centre uniform with the crop inside the image;
    a flip negates the x scale of the affine map from output to input coordinates.
    """
    batch, channels, height, width = images.shape
    p = params.to(images.dtype)
    low, high = cfg.crop_scale
    scale = low + (high - low) * p[:, SCALE]
    log_low, log_high = math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1])
    ratio = torch.exp(log_low + (log_high - log_low) * p[:, RATIO])
    w = torch.sqrt(scale * ratio * height / width).clamp(max=1)
    h = torch.sqrt(scale / ratio * width / height).clamp(max=1)
    theta = torch.zeros(batch, 2, 3, dtype=images.dtype, device=images.device)
    theta[:, 0, 0] = torch.where(params[:, FLIP] < cfg.flip, -w, w)
    theta[:, 0, 2] = (2 * p[:, CENTRE_X] - 1) * (1 - w)  # normalised coordinates: the image is [-1, 1]^2
    theta[:, 1, 1] = h
    theta[:, 1, 2] = (2 * p[:, CENTRE_Y] - 1) * (1 - h)
    grid = F.affine_grid(theta, [batch, channels, size, size], align_corners=False)
    views = F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return views.clamp(0, 1)


def color_jitter(images: Tensor, params: Tensor, cfg: AugmentConfig) -> Tensor:
    """torchvision's ``ColorJitter`` in a fixed order, each op clamped to [0, 1]:

        brightness  x <- b x                         b ~ U(1 - B, 1 + B)
        contrast    x <- c x + (1 - c) mean(gray(x))  per image
        saturation  x <- s x + (1 - s) gray(x)        per pixel (RGB only)
        hue         x <- YIQ^-1 R(-2 pi h) YIQ x      h ~ U(-H, H) turns (RGB only)
    """
    p = params.to(images.dtype)

    def factor(slot: int, strength: float) -> Tensor:  # ~ U(1 - strength, 1 + strength), per image
        return (1 + strength * (2 * p[:, slot] - 1)).view(-1, 1, 1, 1)

    rgb = images.shape[1] == 3
    out = images
    if cfg.brightness > 0:
        out = (factor(BRIGHTNESS, cfg.brightness) * out).clamp(0, 1)
    if cfg.contrast > 0:
        c = factor(CONTRAST, cfg.contrast)
        mean = (grayscale(out) if rgb else out).mean(dim=(1, 2, 3), keepdim=True)
        out = (c * out + (1 - c) * mean).clamp(0, 1)
    if rgb and cfg.saturation > 0:
        s = factor(SATURATION, cfg.saturation)
        out = (s * out + (1 - s) * grayscale(out)).clamp(0, 1)
    if rgb and cfg.hue > 0:
        out = rotate_hue(out, cfg.hue * (2 * p[:, HUE] - 1))
    return out


def rotate_hue(images: Tensor, turns: Tensor) -> Tensor:
    """Shift hue by ``turns`` per image: rotate the (I, Q) chroma plane of YIQ, keeping luma Y.

    Clockwise in the (I, Q) plane, so that a positive shift moves red towards green as HSV hue
    does.  Not HSV: a turn keeps luma and chroma magnitude instead of value and saturation.
    """
    angle = -2 * math.pi * turns.cpu().double()
    rotation = torch.zeros(len(turns), 3, 3, dtype=torch.float64)
    rotation[:, 0, 0] = 1
    rotation[:, 1, 1], rotation[:, 1, 2] = angle.cos(), -angle.sin()
    rotation[:, 2, 1], rotation[:, 2, 2] = angle.sin(), angle.cos()
    matrix = (_YIQ_TO_RGB @ rotation @ _RGB_TO_YIQ).to(images.device, images.dtype)
    return torch.einsum("bij,bjhw->bihw", matrix, images).clamp(0, 1)


def grayscale(images: Tensor) -> Tensor:
    """[B, 3, H, W] RGB -> [B, 1, H, W] luma with ITU-R 601 weights."""
    r, g, b = images.unbind(1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def gaussian_blur(images: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """Blur each image with its own sigma: separable depthwise convolution, reflect padding.

    Kernel weights exp(-x^2 / 2 sigma^2) for x = -(k-1)/2 .. (k-1)/2, normalised, as torchvision's.
    """
    batch, channels, height, width = images.shape
    half = (kernel_size - 1) / 2
    x = torch.linspace(-half, half, kernel_size, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-0.5 * (x / sigma.to(images.dtype)[:, None]) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(channels, 0)  # [B * C, k]
    pad = kernel_size // 2
    flat = F.pad(images.reshape(1, batch * channels, height, width), (pad, pad, pad, pad), mode="reflect")
    flat = F.conv2d(flat, kernel.view(-1, 1, 1, kernel_size), groups=batch * channels)
    flat = F.conv2d(flat, kernel.view(-1, 1, kernel_size, 1), groups=batch * channels)
    return flat.view(batch, channels, height, width)


def augment_vectors(x: Tensor, seeds: Sequence[int], cfg: AugmentConfig) -> Tensor:
    """x [B, D] -> x * keep + noise * z, z ~ N(0, 1): a corrupted view of standardised features.

    ``keep`` zeroes exactly round(mask * D) features per example, a random subset as in SCARF
    (Bahri et al. 2022), which instead replaces them with draws from the feature's marginal; a zero
    is the feature's mean in standardised units.  Each example's D uniforms (ranked to pick the
    subset) and D normals come from a generator seeded with its own seed.
    """
    if x.dim() != 2 or len(seeds) != len(x):
        raise ValueError(f"augment_vectors needs x [B, D] and B seeds, got {tuple(x.shape)} and {len(seeds)} seeds")
    if cfg.mask == 0 and cfg.noise == 0:
        return x.clone()
    batch, dim = x.shape
    uniform, normal = torch.empty(batch, dim), torch.empty(batch, dim)
    for row, seed in enumerate(seeds):
        generator = torch.Generator().manual_seed(int(seed))
        torch.rand(dim, generator=generator, out=uniform[row])
        torch.randn(dim, generator=generator, out=normal[row])
    out = x
    masked = round(cfg.mask * dim)
    if masked:
        drop = uniform.argsort(dim=1, stable=True)[:, :masked]
        out = out * torch.ones_like(x).scatter_(1, drop.to(x.device), 0)
    if cfg.noise > 0:
        out = out + cfg.noise * normal.to(x.device, x.dtype)
    return out


def augment_examples(x: Tensor, seeds: Sequence[int], cfg: AugmentConfig, size: int | None = None,
                     audio: dict | None = None) -> Tensor:
    """A view of each example, by the layout of ``x``: images ``[B, C, H, W]`` (``size``: the side of the view),
    log-mel spectrograms ``[B, M, T]`` (``audio``: the data's :class:`~pretune.data.audio.AudioSpec` as a dict,
    for the length of a frame) or vectors ``[B, D]``."""
    if x.dim() == 4:
        return augment_images(x, seeds, cfg, size)
    if x.dim() == 3:
        frame_seconds = audio["hop"] / audio["sample_rate"] if audio else 0.01
        return augment_audio(x, seeds, cfg.audio, frame_seconds)
    return augment_vectors(x, seeds, cfg)
