import colorsys
import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from pretune.data.augment import (
    BLUR,
    BRIGHTNESS,
    CONTRAST,
    HUE,
    N_PARAMS,
    SATURATION,
    AugmentConfig,
    augment_images,
    augment_vectors,
    blur_kernel_size,
    example_params,
)

IDENTITY = dict(crop_scale=(1, 1), crop_ratio=(1, 1), flip=0, jitter=0, grayscale=0, blur=0)
NO_JITTER = dict(brightness=0, contrast=0, saturation=0, hue=0)


def only(**changes) -> AugmentConfig:
    """Every op off (views equal the input) except the given changes."""
    return AugmentConfig(**{**IDENTITY, **changes})


def images(batch=4, channels=3, side=8, seed=0, low=0.0, high=1.0):
    generator = torch.Generator().manual_seed(seed)
    return low + (high - low) * torch.rand(batch, channels, side, side, generator=generator)


def factor(seed, slot, strength):
    return 1 + strength * (2 * example_params(seed, N_PARAMS)[slot].item() - 1)


def gray(x):
    return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


# ---- crop and flip --------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3])
def test_identity_settings_reproduce_the_input(channels):
    x = images(channels=channels)
    torch.testing.assert_close(augment_images(x, [1, 2, 3, 4], only()), x, atol=1e-6, rtol=0)


def test_flip_only_mirrors_each_image():
    x = images()
    torch.testing.assert_close(augment_images(x, [1, 2, 3, 4], only(flip=1)), x.flip(-1), atol=1e-6, rtol=0)


def test_size_resizes_the_view():
    x = images(side=8)
    half = augment_images(x, [1, 2, 3, 4], only(), size=4)
    # bilinear, align_corners=False, exact halving: each output pixel is the mean of a 2x2 block
    torch.testing.assert_close(half, F.avg_pool2d(x, 2), atol=1e-6, rtol=0)
    assert augment_images(x, [1, 2, 3, 4], AugmentConfig(), size=12).shape == (4, 3, 12, 12)


def test_views_have_the_input_shape_dtype_and_range():
    for dtype in (torch.float32, torch.float64):
        x = images(batch=6).to(dtype)
        views = augment_images(x, range(6), AugmentConfig(blur=0.5))
        assert views.shape == x.shape and views.dtype == dtype
        assert views.min() >= 0 and views.max() <= 1


def ramps(batch, side):
    """Channel 0 is the x coordinate of each pixel centre in [0, 1], channel 1 the y coordinate."""
    centres = (torch.arange(side) + 0.5) / side
    x = torch.full((batch, 3, side, side), 0.5)
    x[:, 0] = centres.view(1, 1, side)
    x[:, 1] = centres.view(1, side, 1)
    return x


def crop_sizes(views):
    """Relative crop width and height read off interior samples of the coordinate ramps.

    Output columns 4 and 11 of 16 sit at normalised x = -/+ 0.4375, mapped to cx -/+ 0.4375 w in
    the input: the ramp difference is 0.4375 w, and both samples stay clear of the border.
    """
    w = (views[:, 0, 8, 11] - views[:, 0, 8, 4]).abs() / 0.4375
    h = (views[:, 1, 11, 8] - views[:, 1, 4, 8]).abs() / 0.4375
    return w, h


def test_fixed_scale_crops_a_quarter_of_the_image_anywhere_inside_it():
    seeds = list(range(200))
    views = augment_images(ramps(200, 16), seeds, only(crop_scale=(0.25, 0.25), flip=0.5))
    w, h = crop_sizes(views)
    torch.testing.assert_close(w, torch.full_like(w, 0.5), atol=1e-4, rtol=0)
    torch.testing.assert_close(h, torch.full_like(h, 0.5), atol=1e-4, rtol=0)
    centre_x = views[:, 0, :, 7:9].mean(dim=(1, 2))  # the crop centre is uniform in [0.25, 0.75]
    assert 0.25 - 1e-4 <= centre_x.min() < 0.3 and 0.7 < centre_x.max() <= 0.75 + 1e-4
    flipped = views[:, 0, 8, 11] < views[:, 0, 8, 4]
    assert 70 < flipped.sum() < 130


def test_crop_area_follows_the_sampled_scale_distribution():
    seeds = list(range(256))
    cfg = only(crop_scale=(0.08, 1), crop_ratio=(3 / 4, 4 / 3), flip=0.5)
    w, h = crop_sizes(augment_images(ramps(256, 16), seeds, cfg))
    # what the recipe promises: s ~ U(0.08, 1), log r ~ U(log 3/4, log 4/3), sides clamped to 1
    s = torch.linspace(0.08, 1, 401, dtype=torch.float64)[:, None]
    r = torch.exp(torch.linspace(math.log(3 / 4), math.log(4 / 3), 401, dtype=torch.float64))[None, :]
    expected = ((s * r).sqrt().clamp(max=1) * (s / r).sqrt().clamp(max=1)).mean().item()
    assert abs((w * h).mean().item() - expected) < 0.05
    assert (w * h).min() > 0.08 - 1e-3 and (w * h).max() <= 1 + 1e-3
    assert ((w / h) > 3 / 4 - 1e-3).all() and ((w / h) < 4 / 3 + 1e-3).all()


# ---- per-example determinism ----------------------------------------------------------------


def test_a_view_depends_only_on_its_example_and_seed():
    x = images(batch=5)
    seeds = [101, 202, 303, 404, 505]
    cfg = AugmentConfig(blur=0.5)
    rng = torch.get_rng_state()
    batch = augment_images(x, seeds, cfg)
    for i in range(5):
        alone = augment_images(x[i : i + 1], seeds[i : i + 1], cfg)[0]
        torch.testing.assert_close(alone, batch[i], atol=1e-6, rtol=0)
    order = [3, 0, 4, 1, 2]
    shuffled = augment_images(x[order], [seeds[i] for i in order], cfg)
    torch.testing.assert_close(shuffled, batch[order], atol=1e-6, rtol=0)
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is never used


def test_different_seeds_give_different_views():
    x = images(batch=1).expand(2, -1, -1, -1)
    views = augment_images(x, [7, 8], AugmentConfig())
    assert (views[0] - views[1]).abs().max() > 0.05
    assert torch.equal(example_params(7, 5), example_params(7, 5))
    assert not torch.equal(example_params(7, 5), example_params(8, 5))


# ---- colour ---------------------------------------------------------------------------------


def test_grayscale_repeats_the_601_luma_in_three_channels():
    x = images()
    views = augment_images(x, [1, 2, 3, 4], only(grayscale=1))
    torch.testing.assert_close(views, gray(x).expand_as(x), atol=1e-6, rtol=0)
    one = images(channels=1)
    torch.testing.assert_close(augment_images(one, [1, 2, 3, 4], only(grayscale=1)), one, atol=1e-6, rtol=0)


def test_brightness_scales_each_image_by_its_drawn_factor():
    x, seeds = images(), [11, 12, 13, 14]
    views = augment_images(x, seeds, only(jitter=1, **{**NO_JITTER, "brightness": 0.4}))
    for i, seed in enumerate(seeds):
        b = factor(seed, BRIGHTNESS, 0.4)
        assert 0.6 <= b <= 1.4
        torch.testing.assert_close(views[i], (b * x[i]).clamp(0, 1), atol=1e-6, rtol=0)


def test_contrast_and_saturation_blend_with_the_gray_image():
    x, seeds = images(), [21, 22, 23, 24]
    contrast = augment_images(x, seeds, only(jitter=1, **{**NO_JITTER, "contrast": 0.4}))
    saturation = augment_images(x, seeds, only(jitter=1, **{**NO_JITTER, "saturation": 0.4}))
    for i, seed in enumerate(seeds):
        c, s = factor(seed, CONTRAST, 0.4), factor(seed, SATURATION, 0.4)
        mean = gray(x[i : i + 1]).mean()
        torch.testing.assert_close(contrast[i], (c * x[i] + (1 - c) * mean).clamp(0, 1), atol=1e-6, rtol=0)
        torch.testing.assert_close(saturation[i], (s * x[i] + (1 - s) * gray(x[i : i + 1])[0]).clamp(0, 1), atol=1e-6, rtol=0)


def test_one_channel_images_get_brightness_then_contrast_only():
    x, seeds = images(channels=1), [31, 32, 33, 34]
    views = augment_images(x, seeds, only(jitter=1, grayscale=1))  # default strengths, hue included
    for i, seed in enumerate(seeds):
        b, c = factor(seed, BRIGHTNESS, 0.4), factor(seed, CONTRAST, 0.4)
        bright = (b * x[i]).clamp(0, 1)
        torch.testing.assert_close(views[i], (c * bright + (1 - c) * bright.mean()).clamp(0, 1), atol=1e-6, rtol=0)


def test_hue_keeps_luma_and_turns_like_an_hsv_hue_shift():
    # muted colours, so that neither the YIQ rotation nor HSV leaves the gamut
    x = images(batch=16, side=4, low=0.35, high=0.65)
    seeds = list(range(16))
    views = augment_images(x, seeds, only(jitter=1, **{**NO_JITTER, "hue": 0.1}))
    torch.testing.assert_close(gray(views), gray(x), atol=1e-5, rtol=0)
    errors, wrong_way = [], []
    for i, seed in enumerate(seeds):
        h = 0.1 * (2 * example_params(seed, N_PARAMS)[HUE].item() - 1)
        for reference, shift in ((errors, h), (wrong_way, -h)):
            pixels = x[i].permute(1, 2, 0).reshape(-1, 3).tolist()
            hsv = [colorsys.rgb_to_hsv(*p) for p in pixels]
            rgb = torch.tensor([colorsys.hsv_to_rgb((hh + shift) % 1, ss, vv) for hh, ss, vv in hsv])
            reference.append((views[i].permute(1, 2, 0).reshape(-1, 3) - rgb).abs().mean())
    assert sum(errors) / 16 < 0.5 * sum(wrong_way) / 16
    assert sum(errors) / 16 < 0.03


# ---- blur -----------------------------------------------------------------------------------


def naive_blur(image, sigma, k):
    """2-D Gaussian blur of one [C, H, W] image with reflect padding, by explicit shifted sums."""
    offsets = torch.arange(k, dtype=torch.float64) - (k - 1) / 2
    weights = torch.exp(-(offsets**2) / (2 * sigma**2))
    weights = weights / weights.sum()
    side = image.shape[-1]
    reflect = lambda i: -i if i < 0 else 2 * (side - 1) - i if i >= side else i  # noqa: E731
    out = torch.zeros_like(image, dtype=torch.float64)
    for a in range(k):
        for b in range(k):
            rows = [reflect(r + a - k // 2) for r in range(side)]
            cols = [reflect(c + b - k // 2) for c in range(side)]
            out += weights[a] * weights[b] * image.double()[:, rows][:, :, cols]
    return out.float()


def test_blur_kernel_is_about_a_tenth_of_the_side_and_odd():
    assert [blur_kernel_size(s) for s in (8, 32, 64, 96, 224)] == [3, 3, 7, 9, 23]


def test_blur_matches_a_naive_gaussian_and_smooths():
    x, seeds = images(batch=8, side=16), list(range(40, 48))
    views = augment_images(x, seeds, only(blur=0.5, blur_sigma=(1.0, 1.0)))
    blurred = [example_params(seed, N_PARAMS)[BLUR] < 0.5 for seed in seeds]
    assert 0 < sum(blurred) < 8
    variation = lambda image: (image.diff(dim=-1).abs().sum() + image.diff(dim=-2).abs().sum()).item()  # noqa: E731
    for i, was_blurred in enumerate(blurred):
        if not was_blurred:
            torch.testing.assert_close(views[i], x[i], atol=1e-6, rtol=0)
            continue
        torch.testing.assert_close(views[i], naive_blur(x[i], 1.0, 3), atol=1e-5, rtol=0)
        assert abs(views[i].mean() - x[i].mean()) < 0.01
        assert variation(views[i]) < 0.7 * variation(x[i])


# ---- vectors --------------------------------------------------------------------------------


def test_vector_mask_zeroes_the_given_fraction_of_features():
    x = torch.ones(400, 50)
    views = augment_vectors(x, range(400), AugmentConfig(mask=0.3))
    assert ((views == 0).sum(1) == 15).all()  # exactly round(0.3 * 50) per example
    rate = (views == 0).float().mean(0)  # and each feature about as often as the others
    assert abs(rate.mean() - 0.3) < 1e-6 and rate.min() > 0.2 and rate.max() < 0.4
    assert not torch.equal(views[0], views[1])


def test_vector_noise_has_the_given_std():
    x = torch.zeros(20, 500)
    views = augment_vectors(x, range(20), AugmentConfig(noise=0.5))
    assert abs(views.std().item() - 0.5) < 0.02 and abs(views.mean().item()) < 0.02


def test_vector_views_depend_only_on_their_seed():
    x = torch.randn(5, 30, generator=torch.Generator().manual_seed(0))
    cfg, seeds = AugmentConfig(mask=0.2, noise=0.1), [9, 8, 7, 6, 5]
    batch = augment_vectors(x, seeds, cfg)
    for i in range(5):
        torch.testing.assert_close(augment_vectors(x[i : i + 1], seeds[i : i + 1], cfg)[0], batch[i], atol=0, rtol=0)
    assert torch.equal(augment_vectors(x, seeds, AugmentConfig()), x)


# ---- config ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [{"flip": 1.5}, {"grayscale": -0.1}, {"crop_scale": (0.0, 1.0)}, {"crop_scale": (0.9, 0.2)},
     {"blur_sigma": (2.0, 0.1)}, {"hue": 0.6}, {"mask": 1.0}, {"rotate": 10}],
)
def test_config_rejects_out_of_range_values(bad):
    with pytest.raises(ValidationError):
        AugmentConfig(**bad)


def test_config_reads_yaml_lists_as_ranges():
    assert AugmentConfig(crop_scale=[0.2, 1]).crop_scale == (0.2, 1.0)
