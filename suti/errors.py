"""Errors that suti raises for bad input or unusable models.

Every error a user can cause derives from :class:`SutiError`; the CLI turns it into a one-line
message and exit code 2 (see :mod:`orchestration.cli`).
"""


class SutiError(Exception):
    """Base class of every error suti raises on purpose."""

    exit_code = 2


class InputError(SutiError):
    """A file, folder or argument given by the user is unusable (names the culprit)."""


class ModelLoadError(SutiError):
    """A model preset, hub id or local folder could not be loaded."""


class OutputExistsError(InputError, FileExistsError):
    """An output folder that must be new or empty is not; nothing was written to it."""


class MissingInputError(InputError, FileNotFoundError):
    """A file or folder the user named is missing or is not what it should be."""


class InvalidValueError(InputError, ValueError):
    """A value the user gave (an option, an argument of a library call) is out of range or
    unknown; also a ``ValueError`` for Python callers."""
