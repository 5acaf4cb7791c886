"""A pickle that runs code when unpickled: it writes a marker file.  Used to show pretune never unpickles it."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch


class WritesFile:
    """``pickle.loads`` of this object calls ``exec``, which creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('code ran')",)


def plant(path: Path, marker: Path) -> Path:
    """Write a torch-format pickle at ``path`` whose loading (unrestricted) writes ``marker``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {"weight": torch.zeros(2)}, "payload": WritesFile(marker)}, path)
    return path


def plant_plain(path: Path, marker: Path) -> Path:
    """The same payload as a plain (non-zip) pickle file."""
    path.write_bytes(pickle.dumps(WritesFile(marker)))
    return path
