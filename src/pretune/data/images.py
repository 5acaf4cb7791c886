"""Images: a folder of image files, or the embedded digits, as a float tensor in [0, 1].

    photos/cat/001.jpg, photos/dog/002.png, ...   labelled: one sub-folder per class
    photos/001.jpg, photos/002.png, ...           unlabelled: image files directly in the folder
    builtin:digits                                the embedded 8x8 digits (see ``builtin/DIGITS_LICENSE.txt``)

Files are read in sorted path order with Pillow, converted to ``L`` (1 channel) or ``RGB``
(3 channels) and, when a size is given, resized with bilinear filtering.  Every file is decoded in
full (``load()``), so a truncated file fails here instead of in the middle of training; with
``bad_files: skip`` it is left out and reported by name, with ``error`` it stops the run.

Image recipes read the embedded digits at ``DIGITS_SIZE`` (16x16) unless ``data.size`` says
otherwise: at 8x8 a random resized crop keeps a few pixels of a digit, and the small CNN's stages
halve 8 pixels to 2.
"""

from __future__ import annotations

import contextlib
import gzip
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFile

from pretune.data.files import list_by_class
from pretune.errors import DataError

BUILTIN_DIGITS = "builtin:digits"
DIGITS_SIZE = 16  # the side image recipes read the 8x8 digits at when data.size is unset (upsampled, bilinear)
SIZE_SAMPLE = 256  # image headers read to tell a folder's own size
DIGITS_FILE = Path(__file__).parent / "builtin" / "digits.csv.gz"
EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}

Channels = Literal["auto", 1, 3]


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in EXTENSIONS and not path.name.startswith(".")


def list_images(folder: str) -> tuple[list[Path], list[str] | None]:
    """Image paths in sorted order and their class (sub-folder name), or None for a flat folder.

    Class folders are searched recursively; hidden entries, other files and sub-folders holding
    no image are ignored."""
    root = Path(folder)
    if not root.exists():
        raise DataError(f"image folder {folder!r} does not exist")
    if not root.is_dir():
        raise DataError(f"data.images {folder!r} is a file; give a folder of images (one sub-folder per class)")
    return list_by_class(root, _is_image, "image files", EXTENSIONS)


def _is_gray(image: Image.Image) -> bool:
    if image.mode in ("P", "PA"):  # a palette image is gray when every palette colour is
        palette = np.asarray(image.getpalette() or [], dtype=np.uint8).reshape(-1, 3)
        return bool((palette == palette[:, :1]).all())
    return image.mode in GRAY_MODES


def _decode(path: Path, size: int | tuple[int, int] | None, channels: Channels) -> np.ndarray:
    """One image as uint8 ``[H, W]`` (gray) or ``[H, W, 3]``; raises whatever Pillow raises.
    ``size``: resize to ``size x size``, or to ``(height, width)``."""
    with Image.open(path) as image:
        image.load()  # decode now: Pillow reads lazily, and a truncated file fails only here
        gray = channels == 1 or (channels == "auto" and _is_gray(image))
        if image.mode == "I" or image.mode.startswith("I;16"):  # 16-bit gray: scale to 8 bits (convert clips)
            image = Image.fromarray(np.clip(np.asarray(image, dtype=np.float64) / 257, 0, 255).round().astype(np.uint8))
        image = image.convert("L" if gray else "RGB")
        if size is not None:
            height, width = (size, size) if isinstance(size, int) else size
            image = image.resize((width, height), Image.Resampling.BILINEAR)
        return np.asarray(image)


@contextlib.contextmanager
def _strict_decoding():
    """Truncated files must fail to decode, whatever another library set globally."""
    previous, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def load_image_files(paths: list[Path], size: int | tuple[int, int] | None, channels: Channels,
                     bad_files: Literal["skip", "error"] = "skip") -> tuple[torch.Tensor, list[int], list[str]]:
    """``(x, kept, skipped)``: float32 ``[N, C, H, W]`` in [0, 1] of the files that decode, their
    positions in ``paths``, and ``"path (reason)"`` of the others.  ``channels="auto"`` gives 1
    when every image is gray, else 3.  ``size`` resizes to ``size x size`` (or ``(height, width)``);
    without it all images must have the same size."""
    arrays, kept, skipped = [], [], []
    with _strict_decoding():
        for position, path in enumerate(paths):
            try:
                arrays.append(_decode(path, size, channels))
            except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, zlib.error...
                reason = " ".join(str(exc).split()) or type(exc).__name__
                if bad_files == "error":
                    raise DataError(f"cannot decode image {path}: {reason}; fix or remove it, "
                                    "or set data.bad_files: skip") from None
                skipped.append(f"{path} ({reason})")
                continue
            kept.append(position)
            if arrays[-1].shape[:2] != arrays[0].shape[:2]:
                first, this = (f"{a.shape[1]}x{a.shape[0]}" for a in (arrays[0], arrays[-1]))
                raise DataError(f"image {path} is {this} but {paths[kept[0]]} is {first}; "
                                "set data.size to resize every image to size x size")
    if not arrays:
        raise DataError(f"none of the {len(paths)} image files could be decoded, e.g. {skipped[0]}")
    if channels == 3 or (channels == "auto" and any(a.ndim == 3 for a in arrays)):
        arrays = [a if a.ndim == 3 else np.repeat(a[:, :, None], 3, axis=2) for a in arrays]
    else:
        arrays = [a[:, :, None] for a in arrays]
    pixels = np.ascontiguousarray(np.stack(arrays).transpose(0, 3, 1, 2))  # [N, H, W, C] -> [N, C, H, W]
    return torch.from_numpy(pixels).float().div_(255), kept, skipped


def own_sizes(paths: list[Path]) -> list[str]:
    """The distinct sizes (``"28x28"``, width x height) of the first ``SIZE_SAMPLE`` images, most common
    first; Pillow reads only their headers."""
    counts: dict[str, int] = {}
    for path in paths[:SIZE_SAMPLE]:
        with Image.open(path) as image:
            name = f"{image.width}x{image.height}"
        counts[name] = counts.get(name, 0) + 1
    return sorted(counts, key=counts.get, reverse=True)


def load_digits(size: int | None = None, channels: Channels = "auto") -> tuple[torch.Tensor, list[str]]:
    """The embedded digits: float32 ``[1797, C, 8, 8]`` (or ``size x size``) in [0, 1], labels "0".."9".

    Read from the packaged ``digits.csv.gz`` (64 pixel values 0..16 then the digit, one image a
    line); bilinear resizing uses ``interpolate`` without antialiasing."""
    with gzip.open(DIGITS_FILE, "rt", encoding="ascii") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    x = torch.from_numpy(table[:, :-1] / 16).reshape(-1, 1, 8, 8)
    if size is not None and size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    if channels == 3:
        x = x.repeat(1, 3, 1, 1)
    return x.contiguous(), [str(int(label)) for label in table[:, -1]]
