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


class OutputStorageError(SutiError):
    """The output's storage refused a write (a full disk, a read-only folder, a file where a
    folder should be): the job's problem, not its input's. Nothing half-written was recorded; the
    same command continues once the storage is fixed."""


def describe_os_error(exc: OSError) -> str:
    """One line for an ``OSError`` of the file system: the path, the system's words and what to
    do, e.g. ``/data/out: No space left on device (free space, then run the same command again)``."""
    import errno

    where = " -> ".join(str(p) for p in (exc.filename, exc.filename2) if p is not None)
    what = exc.strerror or str(exc) or type(exc).__name__
    hints = {
        errno.ENOSPC: "free space, then run the same command again",
        errno.EDQUOT: "free space, then run the same command again",
        errno.EROFS: "the file system is read-only: choose another output",
        errno.EACCES: "no permission to write there: choose another output",
        errno.EPERM: "no permission to write there: choose another output",
        errno.EEXIST: "a file stands where a folder is needed: choose another output",
        errno.ENOTDIR: "a file stands where a folder is needed: choose another output",
        errno.EISDIR: "a folder stands where a file is needed",
    }
    hint = hints.get(exc.errno)
    return f"{where + ': ' if where else ''}{what}{f' ({hint})' if hint else ''}"
