"""BEST-RQ (masked spectrogram modelling): the quantiser, the span masks, the loss and where gradients flow."""

import math

import pytest
import torch
import torch.nn.functional as F
import transformers

from pretune.backbones.arrays import ArrayBackbone
from pretune.backbones.audio import AudioEncoder
from pretune.tasks.masked_audio import (MaskedAudio, MaskedAudioConfig, MaskedAudioModel, RandomProjectionQuantizer, sound_lengths,
                                        span_mask, stack_frames)


def quantizer(features=8, dim=4, size=16, seed=0):
    return RandomProjectionQuantizer(features, dim, size, seed, torch.zeros(features), torch.ones(features))


def test_the_quantiser_is_frozen_deterministic_and_picks_the_nearest_unit_codeword():
    q = quantizer()
    assert list(q.parameters()) == []  # buffers only: nothing trains, the targets never drift
    x = torch.randn(5, 7, 8)
    codes = q(x)
    assert codes.shape == (5, 7) and torch.equal(codes, quantizer()(x))  # same seed, same targets
    assert not torch.equal(codes, quantizer(seed=1)(x))
    projected = F.normalize(x @ q.projection, dim=-1)  # brute force: l2 distance between unit vectors
    distances = torch.cdist(projected.reshape(-1, 4), F.normalize(q.codebook, dim=1))
    assert torch.equal(codes.flatten(), distances.argmin(dim=1))


def test_the_quantiser_normalises_with_the_training_statistics():
    mean, std = torch.full((8,), 3.0), torch.full((8,), 2.0)
    q = RandomProjectionQuantizer(8, 4, 16, 0, mean, std)
    x = torch.randn(4, 8)
    assert torch.equal(q(x * 2 + 3), quantizer()(x))


def test_stacking_puts_two_consecutive_frames_side_by_side():
    mel = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)  # [B, M, T]
    stacked = stack_frames(mel)
    assert stacked.shape == (2, 2, 6)
    assert torch.equal(stacked[0, 1], torch.cat([mel[0, :, 2], mel[0, :, 3]]))


@pytest.mark.parametrize("length", [100, 37])
def test_span_masks_have_the_configured_spans_inside_the_sound(length):
    cfg = MaskedAudioConfig(mask_prob=0.4, mask_span=0.1)  # 10-frame spans
    spans = max(1, round(0.4 * length / 10))
    for seed in range(20):
        mask = span_mask(100, length, seed, cfg, frame_seconds=0.01)
        assert mask.dtype == torch.bool and not mask[length:].any()  # never in the padding
        assert 10 <= int(mask.sum()) <= spans * 10  # spans may overlap: at most mask_prob of the sound
        assert torch.equal(mask, span_mask(100, length, seed, cfg, frame_seconds=0.01))
    shares = torch.stack([span_mask(100, 100, s, cfg, 0.01) for s in range(400)]).float().mean()
    expected = 1 - (1 - 10 / 91) ** 4 * 1.0  # a frame in the middle is missed by each of 4 uniform spans w.p. 1 - 10/91
    assert abs(float(shares) - 0.4) < 0.1 and float(shares) <= 0.4
    assert abs(float(shares) - expected) < 0.08


def test_sound_length_stops_at_the_padding():
    mel = torch.full((2, 4, 10), -0.5)
    mel[0, :, :6] = torch.rand(4, 6)  # sound then silence at the clip's floor
    mel[1] = torch.rand(4, 10)
    assert sound_lengths(mel).tolist() == [6, 10]


def encoder(frames=20, mels=8):
    config = transformers.WhisperConfig(d_model=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32, num_mel_bins=mels,
                                        max_source_positions=frames // 2)
    spec = {"family": "audio", "name": "audio", "input_shape": [mels, frames], "audio": {"hop": 160, "sample_rate": 16000}}
    return ArrayBackbone(spec, AudioEncoder(config))


def task_and_model(codebook=32):
    torch.manual_seed(0)
    cfg = MaskedAudioConfig(codebook_size=codebook, codebook_dim=4, mask_span=0.04, noise_std=0.1)
    task = MaskedAudio(cfg, seed=0)
    task.frame_seconds = 0.01
    model = MaskedAudioModel(encoder(), cfg, torch.zeros(16), torch.ones(16))
    return task, model


def test_collate_replaces_masked_frames_with_noise_and_keeps_the_clean_target():
    task, _ = task_and_model()
    x = torch.randn(3, 8, 20)
    batch = task.collate({"x": x}, [5, 6, 7])
    assert torch.equal(batch["clean"], x) and batch["mask"].shape == (3, 10)
    changed = (batch["x"] != x).any(dim=1)  # input frames replaced
    assert torch.equal(batch["mask"], changed.view(3, 10, 2).any(dim=2))  # an encoder frame is masked iff one of its two is
    noise = batch["x"].transpose(1, 2)[changed]
    assert 0.05 < float(noise.std()) < 0.2  # N(0, 0.1^2)
    again = task.collate({"x": x[1:2]}, [6])  # an example's mask depends on its seed only, not on its batch
    assert torch.equal(again["x"][0], batch["x"][1])


def test_the_loss_starts_near_log_codebook_and_counts_only_masked_frames():
    task, model = task_and_model(codebook=32)
    batch = task.collate({"x": torch.randn(4, 8, 20)}, [0, 1, 2, 3])
    out = model(batch)
    units = task.units(batch)["masked_audio"]
    assert float(units) == float(batch["mask"].sum())
    assert abs(float(out["masked_audio"].detach() / units) - math.log(32)) < 0.7  # an untrained head: about uniform over the codes


def test_gradients_reach_the_encoder_and_head_only_through_masked_frames():
    task, model = task_and_model()
    batch = task.collate({"x": torch.randn(2, 8, 20)}, [0, 1])
    hidden = {}

    def keep(module, inputs, output):
        output.retain_grad()
        hidden["h"] = output

    model.backbone.net.encoder.layer_norm.register_forward_hook(keep)
    model(batch)["masked_audio"].backward()
    grad = hidden["h"].grad  # d loss / d encoder output, per frame
    assert grad[batch["mask"]].abs().sum() > 0
    assert torch.equal(grad[~batch["mask"]], torch.zeros_like(grad[~batch["mask"]]))  # unmasked frames carry no loss
    assert model.head.weight.grad is not None and model.backbone.net.encoder.conv1.weight.grad.abs().sum() > 0


def test_a_few_steps_learn_to_predict_the_codes():
    task, model = task_and_model(codebook=16)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(16, 8, 20, generator=generator).cumsum(dim=2) / 4  # smooth, learnable spectrogram-like rows
    batch = task.collate({"x": x}, list(range(16)))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        optimizer.zero_grad()
        loss = model(batch)["masked_audio"] / task.units(batch)["masked_audio"]
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]
