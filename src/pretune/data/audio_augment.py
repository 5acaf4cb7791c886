"""Augmented views of audio clips given as Whisper log-mel features ``x [B, n_mels, frames]``.

Whisper's feature of a clip with mel power P is ``f = (max(log10 max(P, 1e-10), L) + 4) / 4`` with
``L = max log10 P - 8``: power is ``P = 10 ** (4 f - 4)`` and silence sits at the clip's *floor*
``max(max f - 2, -1.5)``.  The ops, in the order they are applied:

    speed   y[t] = x[s t]   s ~ U(speed); linear interpolation; past the clip's end: the floor
            (a time stretch without pitch change; Ko et al. 2015, "Audio Augmentation for Speech
            Recognition", perturb the speed of the waveform instead)
    shift   y[t] = x[t - k] k = round(U(-shift, shift) / frame_seconds) frames; rolled-in frames: the floor
    gain    y = x + g / 40  g ~ U(-gain_db, gain_db) dB, i.e. P <- P 10^(g / 10)
    noise   P <- P + mean(P) 10^(-snr / 10) E   snr ~ U(snr_db) dB, E ~ Exponential(1) per cell
    masks   SpecAugment (Park et al. 2019, "SpecAugment: A Simple Data Augmentation Method for
            Automatic Speech Recognition"): ``time_masks`` spans of t ~ U{0..T} frames and
            ``freq_masks`` spans of f ~ U{0..F} mel bins, start uniform with the span inside the
            clip; masked cells take the clip's mean feature (SpecAugment's zero after normalisation).

Speed and shift run as one resampling of the time axis (output frame t shows input frame
(t - k) s).  Speed, shift, gain and noise transform the audio, so each ends by re-applying Whisper's
floor to its output (``refloor``): the result is what Whisper would compute from the transformed
audio, as far as features floored at silence allow (e.g. a stretch that crops away the loudest
frame raises the floor).  Masks act on the features and are not refloored.

E is the power of one FFT bin of white Gaussian noise (chi-square with 2 degrees of freedom, halved);
with Whisper's area-normalised (Slaney) mel filters white noise has the same mean power in every
mel bin, and a mel bin averages several FFT bins, so real noise is less spread than E.  Noise is
added over the whole clip, zero padding included, and ``mean(P)`` is taken over the whole clip too.

Randomness follows :mod:`pretune.data.augment`: every choice for an example is a uniform of
``example_params(seed, N_PARAMS)`` in a fixed slot, drawn whether its op is on or not, and the noise
field comes from a generator seeded with ``mix(seed, NOISE_SALT)``.  So a view depends only on the
example's seed, its clip and the config, never on its batch.
"""

from __future__ import annotations

import math
from typing import Annotated, Sequence

import torch
from pydantic import Field, field_validator
from torch import Tensor

from pretune.recipe import Probability, Section
from pretune.trainer.data import example_params, mix

MAX_MASKS = 8  # of each kind: the slots are fixed, so an example's draws do not depend on the config
# slots of example_params: one uniform in [0, 1) per random choice; the masks have MAX_MASKS slots each
SHIFT, GAIN, NOISE_ON, SNR, SPEED = range(5)
TIME_START, TIME_WIDTH, FREQ_START, FREQ_WIDTH = (5 + k * MAX_MASKS for k in range(4))
N_PARAMS = 5 + 4 * MAX_MASKS
NOISE_SALT = 0x4E4F4953  # "NOIS": salts the seed of an example's noise field

LN10 = math.log(10)
SILENCE = -1.5  # the feature of power <= 1e-10: (log10(1e-10) + 4) / 4
DYNAMIC_RANGE = 2.0  # Whisper keeps 8 decades of power below the loudest cell: 8 / 4 in feature units

Speed = Annotated[float, Field(gt=0)]


class AudioAugmentConfig(Section):
    """Augmentation of log-mel clips.  Defaults: a small shift and gain; noise, speed and masks off."""

    shift: float = Field(0.1, ge=0)  # seconds: roll in time by U(-shift, shift), the floor rolled in
    gain_db: float = Field(6.0, ge=0)  # loudness change ~ U(-gain_db, gain_db) dB
    noise: Probability = 0.0  # probability of adding noise
    snr_db: tuple[float, float] = (10.0, 30.0)  # signal-to-noise ratio of the noise, uniform in dB
    speed: tuple[Speed, Speed] = (1.0, 1.0)  # time stretch factor, uniform (2 plays twice as fast)
    time_masks: int = Field(0, ge=0, le=MAX_MASKS)  # SpecAugment: number of time masks
    time_mask_width: float = Field(0.1, ge=0)  # seconds: each time mask's width ~ U[0, width]
    freq_masks: int = Field(0, ge=0, le=MAX_MASKS)  # number of frequency masks
    freq_mask_width: int = Field(10, ge=0)  # mel bins: each frequency mask's width ~ U[0, width]

    @field_validator("snr_db", "speed")
    @classmethod
    def _ordered(cls, value: tuple[float, float]) -> tuple[float, float]:
        if value[0] > value[1]:
            raise ValueError(f"a range (low, high) needs low <= high, got {value}")
        return value


def augment_audio(x: Tensor, seeds: Sequence[int], cfg: AudioAugmentConfig, frame_seconds: float = 0.01) -> Tensor:
    """x [B, n_mels, frames] Whisper log-mel features -> augmented features of the same shape and dtype.

    One frame is ``frame_seconds`` (Whisper: hop 160 at 16 kHz).  Works on any device; the
    parameters and noise fields are drawn on the CPU.  The input is never modified.
    """
    if x.dim() != 3 or not x.is_floating_point():
        raise ValueError(f"augment_audio needs float features [B, n_mels, frames], got {tuple(x.shape)} {x.dtype}")
    if len(seeds) != len(x):
        raise ValueError(f"{len(x)} clips but {len(seeds)} seeds")
    if frame_seconds <= 0:
        raise ValueError(f"frame_seconds must be positive, got {frame_seconds}")
    batch, n_mels, frames = x.shape
    params = torch.stack([example_params(seed, N_PARAMS) for seed in seeds]) if len(seeds) else torch.empty(0, N_PARAMS)
    p = params.double()  # integer choices (offsets, widths) are rounded from exact float64 products

    def uniform(slot: int, low: float, high: float) -> Tensor:
        return (low + (high - low) * p[:, slot]).to(x.device)

    out = x
    if cfg.speed != (1.0, 1.0) or cfg.shift > 0:  # speed then shift, as one resampling of the time axis
        offset = torch.round(uniform(SHIFT, -cfg.shift, cfg.shift) / frame_seconds)
        stretched = torch.arange(frames, dtype=torch.float64, device=x.device) - offset[:, None]  # t - k
        source = torch.where(stretched <= frames - 1, stretched * uniform(SPEED, *cfg.speed)[:, None], -1)  # -1: floor
        out = resample_time(out, source)
    if cfg.gain_db > 0:
        out = apply_gain(out, uniform(GAIN, -cfg.gain_db, cfg.gain_db))
    if cfg.noise > 0:
        rows = (params[:, NOISE_ON] < cfg.noise).nonzero().squeeze(1)
        if len(rows):
            field = torch.stack([noise_field(seeds[row], n_mels, frames) for row in rows.tolist()]).to(x.device)
            noisy = add_noise(out[rows], uniform(SNR, *cfg.snr_db)[rows.to(x.device)], field)
            out = out.index_copy(0, rows.to(x.device), noisy)
    if cfg.time_masks or cfg.freq_masks:
        time_width = round(cfg.time_mask_width / frame_seconds)
        in_time = span_mask(p[:, TIME_START:], p[:, TIME_WIDTH:], cfg.time_masks, time_width, frames)
        in_freq = span_mask(p[:, FREQ_START:], p[:, FREQ_WIDTH:], cfg.freq_masks, cfg.freq_mask_width, n_mels)
        masked = (in_time[:, None, :] | in_freq[:, :, None]).to(x.device)
        out = torch.where(masked, out.mean(dim=(1, 2), keepdim=True), out)
    return out if out is not x else x.clone()


def clip_floor(x: Tensor) -> Tensor:
    """Whisper's floor of each clip [B, 1, 1]: 8 decades of power below its loudest cell, at least 1e-10."""
    return (x.amax(dim=(1, 2), keepdim=True) - DYNAMIC_RANGE).clamp(min=SILENCE)


def refloor(x: Tensor) -> Tensor:
    """Raise every cell below its clip's floor to it, as Whisper does when it computes the features."""
    return torch.maximum(x, clip_floor(x))


def resample_time(x: Tensor, source: Tensor) -> Tensor:
    """y[b, :, t] = x[b, :, source[b, t]], interpolated linearly; the clip's floor where the source is
    outside [0, frames - 1].  ``source`` [B, frames] holds frame positions: ``t s`` stretches, ``t - k`` shifts.
    """
    frames = x.shape[-1]
    inside = ((source >= 0) & (source <= frames - 1))[:, None, :]
    position = source.clamp(0, frames - 1)
    left = position.floor().long()
    weight = (position - left).to(x.dtype)[:, None, :]
    right = (left + 1).clamp(max=frames - 1)

    def at(index: Tensor) -> Tensor:
        return x.gather(2, index[:, None, :].expand_as(x))

    y = torch.lerp(at(left), at(right), weight)
    return refloor(torch.where(inside, y, clip_floor(x)))


def apply_gain(x: Tensor, db: Tensor) -> Tensor:
    """P <- P 10^(db / 10) per clip: + db / 40 in feature units, then Whisper's floor."""
    return refloor(x + (db / 40).to(x.dtype).view(-1, 1, 1))


def noise_field(seed: int, n_mels: int, frames: int) -> Tensor:
    """An example's Exponential(1) noise field [n_mels, frames] from a generator seeded with
    ``mix(seed, NOISE_SALT)``, by inversion: -log(1 - u), five times faster than ``exponential_`` on the CPU.
    """
    generator = torch.Generator().manual_seed(mix(int(seed), NOISE_SALT))
    return -torch.log1p(-torch.rand(n_mels, frames, generator=generator))


def add_noise(x: Tensor, snr_db: Tensor, field: Tensor) -> Tensor:
    """P <- P + mean(P) 10^(-snr_db / 10) field, per clip in mel power; then back to features and Whisper's floor."""
    work = torch.promote_types(x.dtype, torch.float32)  # 10^(4 f - 4) overflows half precision
    power = torch.exp(LN10 * (4 * x.to(work) - 4))  # as 10 ** (4 x - 4), five times faster
    level = power.mean(dim=(1, 2), keepdim=True) * 10 ** (-snr_db.to(work).view(-1, 1, 1) / 10)
    noisy = (torch.log10(power + level * field.to(work)) + 4) / 4
    return refloor(noisy).to(x.dtype)


def span_mask(start_u: Tensor, width_u: Tensor, count: int, max_width: int, size: int) -> Tensor:
    """[B, size] bool: ``count`` spans per example, SpecAugment's width w ~ U{0..max_width} (capped at
    ``size``) and start ~ U{0..size - w}, from the uniforms in the first ``count`` columns of start_u and width_u."""
    width = torch.floor(width_u[:, :count] * (max_width + 1)).clamp(max=size)
    start = torch.floor(start_u[:, :count] * (size - width + 1))
    position = torch.arange(size, dtype=torch.float64)[None, None, :]
    inside = (position >= start[..., None]) & (position < (start + width)[..., None])
    return inside.any(dim=1)
