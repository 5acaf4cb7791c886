"""What a ``POST /predict`` body of ``pretune serve`` may hold, and how it becomes ``predict``'s inputs.

A body is JSON ``{"inputs": ..., "pairs": ..., "top_k": ...}`` (any content type, so ``curl -d``
works), or for image and audio models ``multipart/form-data`` with one file field per image or clip.
``inputs`` holds texts (a string or a list; a tagger also takes lists of words), vectors (a list of
numbers or a list of such lists), images (``{"image_base64": ...}`` objects, a ``data:`` URL too) or
audio clips (``{"audio_base64": ...}``: the bytes of a wav / flac / ogg / mp3 file).  Everything is
checked here, before the request joins a batch, so a bad request is refused with one line
(:func:`refuse`) and never reaches the model; images are checked with Pillow, clips with soundfile, and
written to a temporary folder, since ``predict`` reads files.
"""

from __future__ import annotations

import base64
import binascii
import concurrent.futures
import io
import json
import math
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import soundfile
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError
from starlette.exceptions import HTTPException

MAX_PIXELS = 40_000_000  # per uploaded image: a small PNG can decode to gigabytes
MAX_AUDIO_SECONDS = 600  # per uploaded clip: a model reads its first few seconds' window anyway
FILE_MODALITIES = ("image", "audio")  # models that predict from uploaded files


class PredictRequest(BaseModel):
    """The JSON body of ``POST /predict``; what ``inputs`` may hold depends on the model (see :func:`examples`)."""

    model_config = ConfigDict(extra="forbid")
    inputs: Any
    pairs: str | list[str] | None = None  # the second texts of a sentence-pair model
    top_k: Annotated[StrictInt, Field(ge=1)] | None = None  # keep the k most probable classes


@dataclass
class Job:
    """One request's inputs in the form ``predict`` takes, and where its results go."""

    inputs: list
    pairs: list[str] | None = None
    files: tempfile.TemporaryDirectory | None = None  # uploaded images / clips, removed once predicted
    done: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)

    def claim(self) -> bool:
        """Mark the job as being predicted; False (and its files removed) when its request has gone away."""
        if self.done.set_running_or_notify_cancel():
            return True
        self.close()
        return False

    def close(self) -> None:
        if self.files is not None:
            self.files.cleanup()


def refuse(status: int, message: str) -> HTTPException:
    """The HTTP error that refuses a request; the server answers ``{"error": message}`` (one line)."""
    return HTTPException(status, " ".join(message.split()))


def describe(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null", int: "a number", float: "a number"}
    return names.get(type(value), type(value).__name__)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_finite(value: Any) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        return False


def read_json(body: bytes) -> PredictRequest:
    def no_constant(name: str) -> Any:
        raise ValueError(f"{name} is not a JSON number")

    try:
        payload = json.loads(body, parse_constant=no_constant)
    except json.JSONDecodeError as exc:
        raise refuse(400, f"the body is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); "
                          'send {"inputs": [...]}') from None
    except ValueError as exc:  # not UTF-8, or NaN / Infinity
        raise refuse(400, f"the body is not valid JSON ({str(exc)[:120]})") from None
    if not isinstance(payload, dict):
        raise refuse(422, f'the body is {describe(payload)}; send a JSON object like {{"inputs": [...]}}')
    try:
        return PredictRequest.model_validate(payload)
    except ValidationError as exc:
        problems = [f"{'.'.join(map(str, e['loc'])) or 'the body'}: {e['msg']}" for e in exc.errors()[:3]]
        raise refuse(422, "; ".join(problems) + " (the fields are inputs, pairs, top_k)") from None


def read_multipart(body: bytes, content_type: str) -> tuple[list[bytes], dict[str, str]]:
    """The files (in order) and text fields of a ``multipart/form-data`` body (RFC 7578)."""
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    sections = body.split(b"--" + match.group(1).encode("latin-1")) if match else []
    if len(sections) < 3 or not sections[-1].startswith(b"--"):
        raise refuse(400, "malformed multipart/form-data body (no boundary, or no closing boundary)")
    files, fields = [], {}
    for section in sections[1:-1]:
        head, blank, data = section.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        if not blank or not data.endswith(b"\r\n"):
            raise refuse(400, "malformed multipart/form-data body (a part without headers)")
        data = data[:-2]
        disposition = next((line for line in head.decode("latin-1").split("\r\n") if line.lower().startswith("content-disposition")), "")
        name = re.search(r'\bname="([^"]*)"', disposition)
        if "filename=" in disposition:
            files.append(data)
        elif name:
            fields[name.group(1)] = data.decode("utf-8", "replace")
    return files, fields


def examples(request: PredictRequest, predictor: Any, max_inputs: int) -> tuple[list, list[str] | None, list[bytes]]:
    """``(inputs, pairs, files)`` of a request, checked against what the model reads: texts (a tagger: also
    lists of words), vectors (lists of numbers), images (``{"image_base64": ...}``) or clips (``{"audio_base64": ...}``)."""
    modality, inputs = predictor.modality, request.inputs
    if modality in FILE_MODALITIES:
        items = [inputs] if isinstance(inputs, dict) else inputs
        hint = f'{modality} models take {{"{modality}_base64": "..."}} objects (or a multipart upload)'
    elif modality == "vector":
        items = [inputs] if isinstance(inputs, list) and inputs and all(map(is_number, inputs)) else inputs
        hint = "vector models take a list of numbers or a list of such lists"
    else:
        items = [inputs] if isinstance(inputs, str) else inputs
        hint = "text models take a string or a list of strings" + (" (or lists of words)" if predictor.head.per_token else "")
    if not isinstance(items, list):
        raise refuse(422, f"inputs is {describe(inputs)}; {hint}")
    if not items:
        raise refuse(422, f"inputs is empty; {hint}")
    if len(items) > max_inputs:
        raise refuse(422, f"too many inputs ({len(items)}); at most {max_inputs} per request")
    files: list[bytes] = []
    for i, item in enumerate(items):
        if modality in FILE_MODALITIES:
            files.append(decode_base64(item, f"inputs[{i}]", hint, f"{modality}_base64"))
        elif modality == "vector":
            check_vector(item, f"inputs[{i}]", hint, predictor.meta.get("input_shape"))
        elif predictor.head.per_token:
            words = item.split() if isinstance(item, str) else item
            if not (isinstance(words, list) and all(isinstance(w, str) for w in words)):
                raise refuse(422, f"inputs[{i}] is {describe(item)}; {hint}")
            if not words:
                raise refuse(422, f"inputs[{i}] has no words to tag")
            items[i] = words
        elif not isinstance(item, str):
            raise refuse(422, f"inputs[{i}] is {describe(item)}; {hint}")
    return items, check_pairs(request, predictor, items), files


def check_vector(item: Any, where: str, hint: str, shape: list | None) -> None:
    if not (isinstance(item, list) and item and all(map(is_number, item))):
        raise refuse(422, f"{where} is {describe(item)}; {hint}")
    if not all(map(is_finite, item)):
        raise refuse(422, f"{where} holds a number too large for a float")
    if shape and len(shape) == 1 and len(item) != shape[0]:
        raise refuse(422, f"{where} has {len(item)} numbers; the model takes vectors of {shape[0]}")


def check_pairs(request: PredictRequest, predictor: Any, items: list) -> list[str] | None:
    pair_column = predictor.meta.get("text_pair") if predictor.modality == "text" else None
    pairs = [request.pairs] if isinstance(request.pairs, str) else request.pairs
    if pair_column and pairs is None:
        raise refuse(422, f"this model reads sentence pairs ({predictor.meta.get('text', 'text')}, {pair_column}); "
                          "give pairs: one second text per input")
    if not pair_column and pairs is not None:
        raise refuse(422, "pairs applies to sentence-pair models; this model reads one input at a time")
    if pairs is not None and len(pairs) != len(items):
        raise refuse(422, f"{len(items)} inputs but {len(pairs)} pairs; give one pair per input")
    return pairs


def decode_base64(item: Any, where: str, hint: str, key: str = "image_base64") -> bytes:
    if not (isinstance(item, dict) and set(item) == {key} and isinstance(item[key], str)):
        raise refuse(422, f"{where} is {describe(item)}; {hint}")
    text = item[key]
    if text.startswith("data:"):  # a data URL, as a browser's FileReader gives
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise refuse(422, f"{where}: {key} is not valid base64") from None


def save_files(blobs: list[bytes], where: str, modality: str) -> Job:
    """Uploaded images or clips, checked and written to a temporary folder for ``predict``."""
    return save_images(blobs, where) if modality == "image" else save_clips(blobs, where)


def save_clips(clips: list[bytes], where: str) -> Job:
    """Each clip checked (libsndfile decodes its header, and it is not hours long) and written to a temporary folder."""
    folder, paths = tempfile.TemporaryDirectory(prefix="pretune-serve-"), []
    try:
        for i, data in enumerate(clips):
            try:
                info = soundfile.info(io.BytesIO(data))
            except Exception as exc:  # noqa: BLE001  (libsndfile raises LibsndfileError, RuntimeError, TypeError...)
                raise refuse(422, f"{where}[{i}] is not a readable audio file ({type(exc).__name__}: {str(exc)[:120]})") from None
            if info.duration > MAX_AUDIO_SECONDS:
                raise refuse(422, f"{where}[{i}] lasts {info.duration:.0f} s; at most {MAX_AUDIO_SECONDS} s per clip")
            paths.append(Path(folder.name, f"{i}.{info.format.lower()}"))
            paths[-1].write_bytes(data)
    except BaseException:
        folder.cleanup()
        raise
    return Job([str(p) for p in paths], files=folder)


def save_images(images: list[bytes], where: str) -> Job:
    """Each image checked (it decodes, and is not huge) and written to a temporary folder for ``predict``."""
    folder, paths = tempfile.TemporaryDirectory(prefix="pretune-serve-"), []
    try:
        for i, data in enumerate(images):
            try:
                with Image.open(io.BytesIO(data)) as image:
                    width, height, kind = image.width, image.height, (image.format or "img").lower()
                    image.verify()
            except Exception as exc:  # noqa: BLE001  (Pillow raises OSError, SyntaxError, ValueError, zlib.error...)
                raise refuse(422, f"{where}[{i}] is not a readable image ({type(exc).__name__}: {str(exc)[:120]})") from None
            if width * height > MAX_PIXELS:
                raise refuse(422, f"{where}[{i}] is {width}x{height} pixels; at most {MAX_PIXELS:,} pixels per image")
            paths.append(Path(folder.name, f"{i}.{kind}"))
            paths[-1].write_bytes(data)
    except BaseException:
        folder.cleanup()
        raise
    return Job([str(p) for p in paths], files=folder)


def parse(body: bytes, content_type: str, predictor: Any, max_inputs: int) -> tuple[Job, int | None]:
    """A request body (JSON, or multipart/form-data files for image and audio models) as a job and its ``top_k``."""
    if content_type.lower().startswith("multipart/form-data"):
        if predictor.modality not in FILE_MODALITIES:
            raise refuse(415, f'multipart uploads are for image and audio models; this {predictor.modality} model takes JSON {{"inputs": [...]}}')
        files, fields = read_multipart(body, content_type)
        if not files:
            raise refuse(422, f"the multipart body holds no file; upload {'images' if predictor.modality == 'image' else 'clips'} as file fields")
        if len(files) > max_inputs:
            raise refuse(422, f"too many inputs ({len(files)}); at most {max_inputs} per request")
        top_k = fields.get("top_k")
        if top_k is not None and not (re.fullmatch(r"\s*[0-9]+\s*", top_k) and int(top_k) >= 1):
            raise refuse(422, f"top_k is {top_k!r}; give a whole number of at least 1")
        return save_files(files, "files", predictor.modality), None if top_k is None else int(top_k)
    request = read_json(body)
    items, pairs, files = examples(request, predictor, max_inputs)
    return (save_files(files, "inputs", predictor.modality) if files else Job(items, pairs)), request.top_k


def top(prediction: dict[str, Any], k: int | None) -> dict[str, Any]:
    """The prediction with only its ``k`` most probable classes, most probable first."""
    if k is None or "probabilities" not in prediction:
        return prediction
    ranked = sorted(prediction["probabilities"].items(), key=lambda item: -item[1])[:k]
    return {**prediction, "probabilities": dict(ranked)}
