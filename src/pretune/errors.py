"""Errors a user can act on.

Every problem caused by the user's input (recipe, data files, checkpoints) is raised as a
:class:`PretuneError` whose message is one line naming the file, row or recipe key.  The CLI
prints that line and exits with the error's ``exit_code``; it never prints a traceback for them.
"""

from __future__ import annotations


class PretuneError(Exception):
    """A problem with the user's input, reported as one line."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # always one line


class RecipeError(PretuneError):
    """The recipe (YAML or a CLI override) is invalid."""

    exit_code = 3


class DataError(PretuneError):
    """A data file is missing, empty, undecodable or lacks a column."""

    exit_code = 4


class CheckpointError(PretuneError):
    """A model or run directory cannot be loaded or resumed."""

    exit_code = 5


class TrainingError(PretuneError):
    """Training cannot go on (non-finite loss, out of memory, ...); the last checkpoint is intact."""

    exit_code = 6


class ResourceError(TrainingError):
    """The machine ran out of something (memory, disk); the last checkpoint is intact."""

    exit_code = 7


class DistributedError(TrainingError):
    """Another process of a multi-process run failed or stopped answering."""

    exit_code = 8


class UnsafeFileError(CheckpointError):
    """A weights file is a pickle, which can run code when loaded; refused without ``--trust-pickle``."""

    exit_code = 9
