"""Audio: a folder or manifest of clips, as Whisper-style log-mel spectrograms float32 ``[N, n_mels, frames]``.

    calls/yes/001.wav, calls/no/002.flac, ...     labelled: one sub-folder per class (searched recursively)
    calls/001.wav, calls/002.mp3, ...             unlabelled: audio files directly in the folder
    calls.csv / calls.tsv / calls.jsonl           a manifest: column ``path`` (relative to the manifest's
                                                  folder, or absolute) and an optional ``label``
    builtin:spoken-digits                         the embedded digits 0-9 spoken by six voices in five languages

Each clip is decoded with libsndfile (``soundfile``), mixed to mono by averaging its channels,
resampled with soxr ("HQ") to ``AudioSpec.sample_rate``, then centre-cropped to
``AudioSpec.samples`` when longer or padded with silence at the end (as Whisper pads) when shorter.
:func:`log_mel` computes exactly what ``transformers.WhisperFeatureExtractor`` computes: a Hann
power STFT, a Slaney mel filterbank, ``log10``, a floor 8 (80 dB) below each clip's maximum and
``(x + 4) / 4``.

Which clips are kept:

- a file libsndfile cannot decode (or whose samples are NaN/infinite) is skipped and reported as
  ``"path (reason)"``; with ``bad_files="error"`` it raises a :class:`DataError` naming it;
- a clip shorter than ``MIN_SECONDS`` (50 ms, before padding) is skipped as "too short";
- a clip whose peak |amplitude| after cropping is below ``SILENCE_PEAK`` (1e-4, -80 dBFS) is
  skipped as "silent" (its spectrogram would be the floor everywhere), unless ``silent="keep"``;
- nothing left is a :class:`DataError` naming the source.
"""

from __future__ import annotations

import csv
import functools
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import soundfile
import soxr
import torch
from tqdm.auto import tqdm

from pretune.data.files import list_by_class, parse_json_line
from pretune.data.labelled import read_text_file
from pretune.errors import DataError, RecipeError
from pretune.heads import label_key

BUILTIN_SPOKEN_DIGITS = "builtin:spoken-digits"  # 60 Asterisk prompts: digits 0-9, six voices (builtin/SPOKEN_DIGITS_LICENSE.txt)
BUILTIN_SPOKEN_DIGITS_DIR = Path(__file__).parent / "builtin" / "spoken_digits"
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif", ".au")
MANIFEST_SUFFIXES = (".csv", ".tsv", ".jsonl")
MIN_SECONDS = 0.05  # shorter clips are skipped as "too short"
SILENCE_PEAK = 1e-4  # -80 dBFS: quieter clips are skipped as "silent"
CHUNK = 256  # clips per STFT batch in log_mel, to bound memory
PROGRESS_FROM = 200  # show a progress bar when reading at least this many files


@dataclass(frozen=True)
class AudioSpec:
    """How a clip becomes model input; saved in model folders (asdict) so predict reads clips alike."""

    sample_rate: int = 16000
    duration: float = 1.0  # seconds per clip: longer clips are centre-cropped, shorter padded with silence at the end
    n_mels: int = 80
    n_fft: int = 400  # Whisper's 25 ms window at 16 kHz
    hop: int = 160  # 10 ms

    def __post_init__(self):
        if min(self.sample_rate, self.n_mels, self.n_fft, self.hop) <= 0 or not self.duration > 0:
            raise RecipeError(f"audio settings must be positive: {self}")
        if self.frames == 0 or self.n_fft // 2 >= self.samples:
            raise RecipeError(f"audio duration {self.duration} s is too short for a {self.n_fft}-sample window "
                              f"and hop {self.hop} at {self.sample_rate} Hz")

    @property
    def frames(self) -> int:
        """Spectrogram frames: ``round(duration * sample_rate) // hop``, rounded up to an even number
        (Whisper's convolutional front end halves it)."""
        frames = round(self.duration * self.sample_rate) // self.hop
        return frames + frames % 2

    @property
    def samples(self) -> int:
        """Samples per clip, ``frames * hop``: ``round(duration * sample_rate)`` adjusted to whole frames."""
        return self.frames * self.hop


def is_audio_file(path: Path) -> bool:
    """A visible file with one of ``AUDIO_EXTENSIONS``."""
    return path.is_file() and path.suffix.lower() in AUDIO_EXTENSIONS and not path.name.startswith(".")


def list_audio(source: str | Path) -> tuple[list[Path], list[str] | None]:
    """Clip paths and their class (sub-folder name or manifest ``label``), or None when unlabelled.

    A folder is listed in sorted path order; hidden entries, other files and class folders holding
    no audio are ignored.  A manifest keeps its row order, and its files may have any suffix
    libsndfile reads (decoding decides)."""
    root = BUILTIN_SPOKEN_DIGITS_DIR if str(source) == BUILTIN_SPOKEN_DIGITS else Path(source)
    if not root.exists():
        raise DataError(f"audio source {str(source)!r} does not exist")
    if root.is_file():
        if root.suffix.lower() in MANIFEST_SUFFIXES:
            return _read_manifest(root)
        raise DataError(f"{source} is a file; give a folder of audio files (one sub-folder per class) "
                        f"or a manifest ({', '.join(MANIFEST_SUFFIXES)}) with a 'path' column")
    return list_by_class(root, is_audio_file, "audio files", AUDIO_EXTENSIONS)


def _manifest_rows(manifest: Path) -> tuple[list[tuple[int, dict]], bool]:
    """``(line number, row)`` of each non-blank row, and whether the manifest has a label column."""
    text = read_text_file(str(manifest))
    if manifest.suffix.lower() == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            rows.append((number, parse_json_line(str(manifest), number, line)))
        return rows, any("label" in row for _, row in rows)
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if manifest.suffix.lower() == ".tsv" else ",")
    try:
        columns = [name.strip() for name in reader.fieldnames or []]
        reader.fieldnames = columns
        if "path" not in columns:
            raise DataError(f"{manifest} line 1: no 'path' column (columns: {', '.join(columns) or 'none'})")
        rows = [(reader.line_num, row) for row in reader]  # DictReader skips blank lines
    except csv.Error as exc:
        raise DataError(f"{manifest} line {reader.line_num}: {exc}") from None
    return rows, "label" in columns


def _read_manifest(manifest: Path) -> tuple[list[Path], list[str] | None]:
    rows, labelled = _manifest_rows(manifest)
    if not rows:
        raise DataError(f"{manifest} has no rows")
    paths, keys = [], []
    for number, row in rows:
        value = row.get("path")
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{manifest} line {number}: column 'path' is empty or missing")
        path = Path(value.strip())
        path = path if path.is_absolute() else manifest.parent / path
        if not path.is_file():
            raise DataError(f"{manifest} line {number}: column 'path': {value.strip()} does not exist "
                            "(relative paths start from the manifest's folder)")
        paths.append(path)
        key = label_key(row.get("label"))
        if labelled and key is None:
            raise DataError(f"{manifest} line {number}: column 'label' is empty or missing")
        keys.append(key)
    return paths, keys if labelled else None


def _fit(wave: np.ndarray, samples: int) -> np.ndarray:
    """Centre-crop to ``samples``, or pad with zeros at the end."""
    if len(wave) >= samples:
        start = (len(wave) - samples) // 2
        return wave[start:start + samples]
    return np.pad(wave, (0, samples - len(wave)))


def _to_mono_rate(frames: np.ndarray, rate: int, spec: AudioSpec) -> np.ndarray:
    """float32 ``[samples, channels]`` (or ``[samples]``) at ``rate`` -> mono float32 at ``spec.sample_rate``."""
    wave = frames.mean(axis=1, dtype=np.float32) if frames.ndim == 2 else frames.astype(np.float32, copy=False)
    if rate != spec.sample_rate and len(wave):
        wave = soxr.resample(wave, rate, spec.sample_rate, quality="HQ")
    return np.ascontiguousarray(wave, dtype=np.float32)


class _Undecodable(DataError):
    """A file libsndfile refuses; ``reason`` is its explanation, for the list of skipped files."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: cannot be decoded ({reason})")
        self.reason = reason


def _decode(path: Path, spec: AudioSpec) -> tuple[np.ndarray, float]:
    """The clip mono at ``spec.sample_rate`` (not cropped) and its length in seconds."""
    try:
        frames, rate = soundfile.read(path, dtype="float32", always_2d=True)
        if not np.isfinite(frames).all():
            raise ValueError("NaN or infinite samples")
    except (soundfile.SoundFileError, RuntimeError, ValueError, OSError) as exc:
        reason = getattr(exc, "error_string", None) or " ".join(str(exc).split()) or type(exc).__name__
        raise _Undecodable(path, reason.rstrip(".")) from None
    return _to_mono_rate(frames, rate, spec), len(frames) / rate


def load_clip(path: Path, spec: AudioSpec) -> np.ndarray:
    """One clip as float32 ``[spec.samples]``: mono, resampled, centre-cropped or padded at the end."""
    return _fit(_decode(path, spec)[0], spec.samples)


def load_audio_files(paths: list[Path], spec: AudioSpec, bad_files: Literal["skip", "error"] = "skip",
                     silent: Literal["skip", "keep"] = "skip", source: str | None = None,
                     ) -> tuple[torch.Tensor, list[int], list[str]]:
    """``(waves, kept, skipped)``: float32 ``[N, spec.samples]`` of the clips kept, their positions in
    ``paths``, and ``"path (reason)"`` of the others (policy in the module docstring).  ``source``
    names the data in the error raised when nothing is kept (default: the paths' common folder)."""
    waves, kept, skipped = [], [], []
    for position, path in enumerate(tqdm(paths, desc="reading audio", unit="file", disable=len(paths) < PROGRESS_FROM)):
        try:
            wave, seconds = _decode(path, spec)
        except _Undecodable as exc:
            if bad_files == "error":
                raise DataError(f"{exc}; fix or remove it, or set data.bad_files: skip") from None
            skipped.append(f"{path} (cannot be decoded: {exc.reason})")
            continue
        if seconds < MIN_SECONDS:
            skipped.append(f"{path} (too short: {seconds * 1000:.0f} ms < {MIN_SECONDS * 1000:.0f} ms)")
            continue
        wave = _fit(wave, spec.samples)
        if silent == "skip" and np.abs(wave).max() < SILENCE_PEAK:
            skipped.append(f"{path} (silent: peak below {SILENCE_PEAK:g}, -80 dBFS)")
            continue
        waves.append(wave)
        kept.append(position)
    if not waves:
        if not paths:
            raise DataError(f"no audio files to read in {source or 'the data'}")
        source = source or os.path.commonpath([str(path) for path in paths])
        raise DataError(f"no usable audio in {source}: all {len(paths)} file(s) skipped, e.g. {skipped[0]}")
    return torch.from_numpy(np.stack(waves)), kept, skipped


@functools.lru_cache(maxsize=8)
def _mel_filters(sample_rate: int, n_fft: int, n_mels: int) -> torch.Tensor:
    """Slaney mel filterbank float32 ``[n_mels, 1 + n_fft // 2]``, 0 Hz to Nyquist (8 kHz at 16 kHz, as Whisper)."""
    from transformers.audio_utils import mel_filter_bank  # here, not at the top: 0.9 s of imports every command would pay

    filters = mel_filter_bank(num_frequency_bins=1 + n_fft // 2, num_mel_filters=n_mels, min_frequency=0.0,
                              max_frequency=sample_rate / 2, sampling_rate=sample_rate,
                              norm="slaney", mel_scale="slaney")
    return torch.from_numpy(filters.T).float()


def log_mel(waves: torch.Tensor, spec: AudioSpec) -> torch.Tensor:
    """Whisper's log-mel features float32 ``[B, n_mels, frames]`` of waves ``[B, spec.samples]``.

    ``S = |STFT(x)|^2`` (Hann window ``n_fft``, hop, centred with reflect padding, last frame dropped);
    ``L = log10(max(M S, 1e-10))`` with the Slaney mel filterbank ``M``;
    ``out = (max(L, max(L) - 8) + 4) / 4`` with ``max(L)`` over each clip
    (``WhisperFeatureExtractor._torch_extract_fbank_features``, which the test checks against)."""
    if waves.ndim != 2:
        raise ValueError(f"log_mel expects waves [B, samples], got shape {tuple(waves.shape)}")
    filters, window = _mel_filters(spec.sample_rate, spec.n_fft, spec.n_mels), torch.hann_window(spec.n_fft)
    out = []
    for chunk in waves.float().split(CHUNK):
        stft = torch.stft(chunk, spec.n_fft, spec.hop, window=window, center=True, pad_mode="reflect",
                          return_complex=True)
        power = (stft[..., :-1].abs() ** 2).contiguous()
        log_spec = torch.clamp(filters @ power, min=1e-10).log10()
        log_spec = torch.maximum(log_spec, log_spec.amax(dim=(1, 2), keepdim=True) - 8.0)
        out.append((log_spec + 4.0) / 4.0)
    return torch.cat(out) if out else torch.zeros(0, spec.n_mels, waves.shape[1] // spec.hop)


def read_audio(source: str, spec: AudioSpec, bad_files: Literal["skip", "error"] = "skip",
               silent: Literal["skip", "keep"] = "skip") -> tuple[torch.Tensor, list[str] | None, list[int], list[str]]:
    """``(features [N, n_mels, frames], class of each kept clip or None, kept positions in the listing, skipped)``."""
    paths, keys = list_audio(source)
    waves, kept, skipped = load_audio_files(paths, spec, bad_files, silent, source=str(source))
    return log_mel(waves, spec), None if keys is None else [keys[i] for i in kept], kept, skipped


def _as_float(array: np.ndarray) -> np.ndarray:
    """Samples as float32 in [-1, 1]: integer PCM is scaled as soundfile scales it (int16 / 32768, ...)."""
    if array.dtype == np.uint8:  # 8-bit PCM is unsigned
        return (array.astype(np.float32) - 128) / 128
    if np.issubdtype(array.dtype, np.signedinteger):
        return array.astype(np.float32) / 2 ** (8 * array.dtype.itemsize - 1)
    return array.astype(np.float32, copy=False)


def clips_from_arrays(arrays: list[np.ndarray], rate: int, spec: AudioSpec) -> torch.Tensor:
    """Log-mel features ``[N, n_mels, frames]`` of in-memory clips at ``rate`` Hz, each ``[samples]`` or
    ``[samples, channels]`` (soundfile's layout), read like :func:`load_clip` (no clip is skipped)."""
    waves = []
    for number, array in enumerate(arrays, 1):
        array = _as_float(np.asarray(array))
        if array.ndim not in (1, 2) or (array.ndim == 2 and array.shape[1] > array.shape[0]):
            raise DataError(f"audio array {number} has shape {array.shape}; expected [samples] or [samples, channels]")
        if not np.isfinite(array).all():
            raise DataError(f"audio array {number} holds NaN or infinite samples")
        waves.append(_fit(_to_mono_rate(array, rate, spec), spec.samples))
    return log_mel(torch.from_numpy(np.stack(waves)) if waves else torch.zeros(0, spec.samples), spec)
