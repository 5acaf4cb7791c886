"""The audio family: Whisper's encoder sized to the clip, loaded from a Hugging Face Whisper folder."""

import pytest
import torch
import transformers
from transformers.models.whisper.modeling_whisper import sinusoids

from pretune.backbones.audio import Audio, AudioConfig, AudioEncoder, is_whisper_folder, whisper_config
from pretune.backbones.base import resolve
from pretune.errors import RecipeError


@pytest.fixture(scope="module")
def whisper_folder(tmp_path_factory):
    """A tiny random Whisper in the Hugging Face folder format, with Whisper's 1,500 positions."""
    torch.manual_seed(0)
    config = transformers.WhisperConfig(d_model=16, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=32, decoder_layers=1,
                                        decoder_attention_heads=2, decoder_ffn_dim=32, num_mel_bins=80, max_source_positions=1500,
                                        vocab_size=60, max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=1,
                                        decoder_start_token_id=1)
    model = transformers.WhisperModel(config).eval()
    folder = tmp_path_factory.mktemp("whisper")
    model.save_pretrained(folder)
    return folder, model


def reference_encoder(model: transformers.WhisperModel, mel: torch.Tensor) -> torch.Tensor:
    """Whisper's encoder computed by hand on a short clip: its own layers, its first positions."""
    encoder = model.encoder
    x = torch.nn.functional.gelu(encoder.conv2(torch.nn.functional.gelu(encoder.conv1(mel)))).permute(0, 2, 1)
    x = x + encoder.embed_positions.weight[: x.shape[1]]
    for layer in encoder.layers:
        out = layer(x, None)
        x = out[0] if isinstance(out, tuple) else out
    return encoder.layer_norm(x)


def test_a_short_clip_reads_whispers_first_positions_exactly(whisper_folder):
    folder, model = whisper_folder
    spec = {"name": "whisper", "config": {"d_model": 16, "encoder_layers": 2, "encoder_attention_heads": 2, "encoder_ffn_dim": 32,
                                          "num_mel_bins": 80}, "input_shape": [80, 100]}
    net = Audio.network(spec, str(folder)).eval()
    assert net.encoder.embed_positions.weight.shape == (50, 16)
    assert torch.equal(net.encoder.embed_positions.weight, model.encoder.embed_positions.weight[:50])
    assert torch.allclose(net.encoder.embed_positions.weight, sinusoids(1500, 16)[:50])  # rows do not depend on the table's length
    mel = torch.randn(2, 80, 100)
    with torch.no_grad():
        torch.testing.assert_close(net.frames(mel), reference_encoder(model, mel), atol=1e-5, rtol=1e-5)
        assert net(mel).shape == (2, 16)  # mean over time


def test_a_whisper_folder_is_claimed_as_an_audio_backbone(whisper_folder):
    folder, _ = whisper_folder
    assert is_whisper_folder(str(folder)) and not is_whisper_folder(str(folder.parent))
    family = resolve({"name": "audio", "path": str(folder)})  # what model=whisper-folder gives the audio recipes
    assert isinstance(family, Audio) and family.cfg.name == "whisper" and family.weights == str(folder) and family.path is None
    assert family.pretrained
    assert family.spec((80, 100))["config"]["d_model"] == 16


def test_built_in_sizes_grow_and_layer_groups_cover_the_stack():
    counts = []
    for size in ("tiny", "small", "base"):
        spec = {"name": "audio", **Audio(AudioConfig(size=size)).spec((80, 100)), "input_shape": [80, 100]}
        net = Audio.network(spec)
        counts.append(sum(p.numel() for p in net.parameters()))
        assert len(net.layer_groups()) == 1 + spec["config"]["encoder_layers"]
    assert counts == sorted(counts)


def test_mismatched_inputs_are_refused_in_one_line(whisper_folder):
    folder, _ = whisper_folder
    with pytest.raises(RecipeError, match="data.n_mels"):
        Audio(AudioConfig(name="whisper", weights=str(folder))).spec((64, 100))
    with pytest.raises(RecipeError, match="even number of frames"):
        whisper_config({"d_model": 16, "encoder_layers": 1, "encoder_attention_heads": 2, "encoder_ffn_dim": 32, "num_mel_bins": 80}, (80, 99))
    with pytest.raises(RecipeError, match="backbone.weights"):
        Audio(AudioConfig(name="whisper")).spec((80, 100))
    with pytest.raises(RecipeError, match="covers at most"):  # 40 s of clip: more positions than Whisper has
        Audio.network({"name": "whisper", "config": {"d_model": 16, "encoder_layers": 2, "encoder_attention_heads": 2,
                                                     "encoder_ffn_dim": 32, "num_mel_bins": 80}, "input_shape": [80, 4000]}, str(folder))


def test_the_encoder_module_is_whispers(whisper_folder):
    net = AudioEncoder(transformers.WhisperConfig(d_model=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32,
                                                  num_mel_bins=80, max_source_positions=25))
    assert type(net.encoder).__name__ == "WhisperEncoder"
    assert not net.encoder.embed_positions.weight.requires_grad  # fixed sinusoids, as in Whisper
