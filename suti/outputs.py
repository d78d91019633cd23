"""Output folders of the commands that write local files: checked before any work, and
numbered image sets that ``--overwrite`` replaces whole.

A command calls :func:`check_output_folder` first, so that an output that is a regular file, lies
under one, or sits on a read-only file system is refused in one line before a model is loaded
or anything is written.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from suti.errors import InputError, OutputExistsError


def check_output_folder(path: str | Path, flag: str = "--output") -> Path:
    """``path`` as a :class:`Path` once it can be a folder that this process may write.

    Raises:
        OutputExistsError: ``path`` or one of its parents is a regular file.
        InputError: the nearest existing folder is not writable (a read-only file system, or no
            permission), naming it.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"{flag} {path}: is a file, not a folder; choose another {flag}")
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise OutputExistsError(f"{flag} {path}: {existing} is a file, not a folder; choose another {flag}")
    if existing.exists() and not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {path}: {existing} is not writable (a read-only file system or no permission); choose another {flag}")
    return path


def numbered_images(output: str | Path, count: int, *, overwrite: bool, stem: str = "image", flag: str = "--output") -> list[Path]:
    """The paths ``OUTPUT/<stem>_000.png`` ... of ``count`` images, after
    :func:`check_output_folder`.

    Raises:
        InputError: one of them exists and ``overwrite`` is false.
    """
    output = check_output_folder(output, flag)
    paths = [output / f"{stem}_{i:03d}.png" for i in range(count)]
    clash = [p for p in paths if p.exists()]
    if clash and not overwrite:
        raise InputError(f"{clash[0]}: already exists; pass --overwrite or choose another {flag}")
    return paths


def remove_stale_images(output: str | Path, count: int, *, stem: str = "image") -> list[Path]:
    """After an ``--overwrite`` run wrote ``count`` images: remove the older run's numbered
    images beyond them (``<stem>_NNN.png`` with NNN >= count), so that the folder holds one run.
    Returns the removed paths."""
    pattern = re.compile(rf"{re.escape(stem)}_(\d+)\.png")
    removed = []
    for path in sorted(Path(output).glob(f"{stem}_*.png")):
        match = pattern.fullmatch(path.name)
        if match and int(match.group(1)) >= count:
            path.unlink()
            removed.append(path)
    return removed
