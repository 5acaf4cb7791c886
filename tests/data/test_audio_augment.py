import math

import pytest
import torch
from pydantic import ValidationError

from pretune.data.audio_augment import (
    FREQ_START,
    FREQ_WIDTH,
    GAIN,
    MAX_MASKS,
    N_PARAMS,
    NOISE_ON,
    SHIFT,
    TIME_START,
    TIME_WIDTH,
    AudioAugmentConfig,
    add_noise,
    apply_gain,
    augment_audio,
    clip_floor,
)
from pretune.trainer.data import example_params

OFF = dict(shift=0, gain_db=0)  # with the defaults for the rest: every op off
EVERYTHING = dict(shift=0.1, gain_db=6, noise=0.5, snr_db=(0, 20), speed=(0.8, 1.25),
                  time_masks=2, time_mask_width=0.05, freq_masks=2, freq_mask_width=3)
FLOOR, QUIET, BRIGHT = -1.0, -0.5, 1.0  # a hand-built clip: its floor is BRIGHT - 2


def only(**changes) -> AudioAugmentConfig:
    return AudioAugmentConfig(**{**OFF, **changes})


def u(seed, slot):
    return example_params(seed, N_PARAMS)[slot].double().item()


def clips(batch=5, n_mels=8, frames=40, seed=0):
    """Whisper-like features: random cells raised to the clip's floor, the last 10 frames silence (padding)."""
    generator = torch.Generator().manual_seed(seed)
    x = 3 * torch.rand(batch, n_mels, frames, generator=generator) - 1.5
    x = torch.maximum(x, clip_floor(x))
    x[:, :, -10:] = clip_floor(x)
    return x


def marked(frames_at, n_mels=8, frames=40):
    """A quiet clip with BRIGHT frames at the given positions, silence (FLOOR) after frame 35."""
    x = torch.full((1, n_mels, frames), QUIET)
    x[:, :, 35:] = FLOOR
    for t in frames_at:
        x[:, :, t] = BRIGHT
    return x


def bright_frames(x):
    return (x[0] == BRIGHT).all(dim=0).nonzero().squeeze(1).tolist()


# ---- determinism --------------------------------------------------------------------------------


def test_identity_settings_return_an_unchanged_copy():
    x = clips()
    out = augment_audio(x, range(5), only())
    assert torch.equal(out, x) and out is not x


def test_same_seeds_give_the_same_views_and_other_seeds_differ():
    x, cfg = clips(), AudioAugmentConfig(**EVERYTHING)
    first = augment_audio(x, [3, 1, 4, 1, 5], cfg)
    assert torch.equal(first, augment_audio(x, [3, 1, 4, 1, 5], cfg))
    assert not torch.equal(first, augment_audio(x, [2, 7, 1, 8, 2], cfg))


def test_a_view_does_not_depend_on_its_batch_or_position():
    x, seeds, cfg = clips(batch=6, seed=1), [10, 11, 12, 13, 14, 15], AudioAugmentConfig(**EVERYTHING)
    together = augment_audio(x, seeds, cfg)
    for i, seed in enumerate(seeds):
        assert torch.equal(augment_audio(x[i : i + 1], [seed], cfg)[0], together[i])
    order = [4, 0, 5, 2]
    assert torch.equal(augment_audio(x[order], [seeds[i] for i in order], cfg), together[order])


def test_the_input_is_not_modified_and_shape_and_dtype_are_kept():
    for dtype in (torch.float32, torch.float64):
        x = clips(seed=2).to(dtype)
        before = x.clone()
        out = augment_audio(x, range(5), AudioAugmentConfig(**{**EVERYTHING, "noise": 1.0}))
        assert torch.equal(x, before)
        assert out.shape == x.shape and out.dtype == dtype


# ---- each op ------------------------------------------------------------------------------------


def test_shift_moves_a_bright_frame_by_the_drawn_offset_and_rolls_in_silence():
    offsets = []
    for seed in range(12):
        x = marked([20])
        offset = round((2 * u(seed, SHIFT) - 1) * 0.1 / 0.01)
        out = augment_audio(x, [seed], only(shift=0.1))
        assert bright_frames(out) == [20 + offset]
        expected = torch.full_like(x, FLOOR)  # what is rolled in is silence, never the other end of the clip
        source = torch.arange(40) - offset
        inside = (source >= 0) & (source < 40)
        expected[:, :, inside] = x[:, :, source[inside]]
        assert torch.equal(out, expected)
        offsets.append(offset)
    assert min(offsets) < 0 < max(offsets) and max(map(abs, offsets)) <= 10


def test_gain_of_10_db_adds_a_quarter_above_the_floor():
    x = marked([20])
    out = apply_gain(x, torch.tensor([10.0]))
    torch.testing.assert_close(out, x + 0.25, atol=0, rtol=0)


def test_gain_follows_the_drawn_decibels():
    x = clips(batch=4, seed=3)
    out = augment_audio(x, [0, 1, 2, 3], only(gain_db=6))
    for i in range(4):
        db = 6 * (2 * u(i, GAIN) - 1)
        torch.testing.assert_close(out[i], x[i] + db / 40, atol=1e-6, rtol=0)


def test_negative_gain_stops_at_the_silence_of_1e_minus_10():
    x = torch.full((1, 4, 10), -1.5)  # a very quiet clip: its floor is power 1e-10, not 8 decades below its peak
    x[:, :, 3] = -1.0
    out = apply_gain(x, torch.tensor([-10.0]))
    assert out[0, 0, 3] == -1.25 and (out[:, :, [0, 1, 2, 4]] == -1.5).all()


def test_masks_set_exactly_the_drawn_spans_to_the_clip_mean():
    cfg = only(time_masks=3, time_mask_width=0.1, freq_masks=2, freq_mask_width=3)
    x = clips(batch=8, seed=4)
    out = augment_audio(x, range(8), cfg)
    masked_columns = 0
    for seed in range(8):
        in_time, in_freq = torch.zeros(40, dtype=torch.bool), torch.zeros(8, dtype=torch.bool)
        for start_slot, width_slot, count, most, spans in (
            (TIME_START, TIME_WIDTH, 3, 10, in_time), (FREQ_START, FREQ_WIDTH, 2, 3, in_freq)
        ):
            for k in range(count):
                width = math.floor(u(seed, width_slot + k) * (most + 1))
                start = math.floor(u(seed, start_slot + k) * (len(spans) - width + 1))
                spans[start : start + width] = True
        masked = in_time[None, :] | in_freq[:, None]
        expected = torch.where(masked, x[seed].mean(), x[seed])
        assert torch.equal(out[seed], expected)
        assert in_time.sum() <= 3 * 10 and in_freq.sum() <= 2 * 3
        masked_columns += in_time.sum().item()
    assert masked_columns > 0


def test_noise_follows_the_formula_in_power():
    x = marked([20])
    power = 10 ** (4 * x - 4)
    out = add_noise(x, torch.tensor([10.0]), torch.ones_like(x))
    expected = (torch.log10(power + power.mean() / 10) + 4) / 4
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_noise_at_high_snr_changes_little_and_at_low_snr_raises_the_quiet_cells():
    x = marked([20])  # mean power ~ 1/40: the bright cells are 16 dB above it, the quiet ones 44 dB below
    quiet_snr = augment_audio(x, [0], only(noise=1, snr_db=(60, 60)))
    assert (quiet_snr - x)[x == BRIGHT].abs().max() < 1e-6
    assert (quiet_snr - x)[x >= QUIET].abs().mean() < 0.01
    loud_snr = augment_audio(x, [0], only(noise=1, snr_db=(0, 0)))
    assert (loud_snr >= x).all()
    assert (loud_snr - x)[x == FLOOR].mean() > 1  # silence now holds noise near the clip's mean power
    assert (loud_snr - x)[x == QUIET].mean() > 0.5


def test_noise_is_added_with_its_probability():
    x = clips(batch=20, seed=5)
    out = augment_audio(x, range(20), only(noise=0.5))
    noisy = [seed for seed in range(20) if u(seed, NOISE_ON) < 0.5]
    changed = [i for i in range(20) if not torch.equal(out[i], x[i])]
    assert changed == noisy and 0 < len(noisy) < 20


def test_speed_2_halves_the_distance_between_two_marks_and_pads_with_silence():
    x = marked([10, 30])
    out = augment_audio(x, [0], only(speed=(2, 2)))
    assert bright_frames(out) == [5, 15]
    assert (out[:, :, 20:] == FLOOR).all()  # frames 20.. would come from beyond the clip's end


def test_speed_half_doubles_the_distance_and_crops():
    x = marked([10, 30])
    out = augment_audio(x, [0], only(speed=(0.5, 0.5)))
    assert bright_frames(out) == [20]  # frame 30 moves to 60, past the 40 kept
    torch.testing.assert_close(out[0, :, 21], (x[0, :, 10] + x[0, :, 11]) / 2)  # interpolated halfway


def test_speed_then_shift():
    for seed in range(6):
        offset = round((2 * u(seed, SHIFT) - 1) * 0.05 / 0.01)
        out = augment_audio(marked([10, 30]), [seed], only(speed=(2, 2), shift=0.05))
        assert bright_frames(out) == [5 + offset, 15 + offset]


# ---- config -------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [
    dict(time_masks=MAX_MASKS + 1), dict(freq_masks=MAX_MASKS + 1), dict(snr_db=(30, 10)),
    dict(speed=(1.2, 0.8)), dict(speed=(0, 1)), dict(shift=-0.1), dict(noise=1.5), dict(pitch=2),
])
def test_bad_configs_are_refused(bad):
    with pytest.raises(ValidationError):
        AudioAugmentConfig(**bad)


def test_mismatched_seeds_are_refused():
    with pytest.raises(ValueError, match="seeds"):
        augment_audio(clips(batch=3), [1, 2], AudioAugmentConfig())
