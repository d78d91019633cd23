"""Image sets drawn from the world: DreamBooth instance sets and pretraining streams."""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from suti.errors import InputError
from suti.images import save_image_atomic
from suti.world.render import EDIT_KINDS, sample_scene
from suti.world.spec import World


def _subject(world: World, subject_id: str):
    try:
        return world.subject(subject_id)
    except KeyError:
        raise InputError(f"unknown subject {subject_id!r}; the world has "
                         f"{', '.join(s.subject_id for s in world.subjects[:5])}...") from None


def subject_images(world: World, subject_id: str, n: int, seed: int = 0,
                   size: int = 64) -> list[Image.Image]:
    """``n`` reference photos of one subject (random contexts and poses, no edits).

    The same ``(subject_id, seed)`` always gives the same images, whatever else the world holds.
    """
    subject = _subject(world, subject_id)
    rng = np.random.default_rng([seed, zlib.crc32(subject_id.encode()), 11])
    return [sample_scene(subject, rng, size=size)[0] for _ in range(n)]


def dataset_iter(world: World, split: str = "train", seed: int = 0, size: int = 64, *,
                 n: int | None = None, edit_prob: float = 0.5,
                 edit_kinds: tuple[str, ...] = EDIT_KINDS,
                 identifier: str | None = None) -> Iterator[tuple[Image.Image, str, dict]]:
    """Yield ``(image, caption, meta)`` scenes of random subjects of ``split`` for pretraining.

    Each scene has a random context and pose, and with probability ``edit_prob`` one edit
    (attribute, accessory or style). Endless when ``n`` is ``None``. Deterministic by seed.
    """
    subjects = world.split(split)
    if not subjects:
        raise InputError(f"split {split!r} of the world has no subjects")
    rng = np.random.default_rng([seed, 13])
    count = 0
    while n is None or count < n:
        subject = subjects[int(rng.integers(len(subjects)))]
        yield sample_scene(subject, rng, size=size, edit_prob=edit_prob, edit_kinds=edit_kinds,
                           identifier=identifier)
        count += 1


def export_subject(world: World, subject_id: str, out_dir: str | Path, n: int = 4,
                   seed: int = 0, size: int = 64) -> list[Path]:
    """Write ``n`` PNG photos of a subject to ``out_dir`` (a DreamBooth instance folder).

    Files are ``{subject_id}_{i:02d}.png``; returns their paths. Raises :class:`InputError` for
    an unknown subject, ``n < 1`` or a non-empty ``out_dir``.
    """
    if n < 1:
        raise InputError(f"number of images must be >= 1, got {n}")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"output folder {out} exists and is not empty")
    images = subject_images(world, subject_id, n, seed, size)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(images):
        path = out / f"{subject_id}_{i:02d}.png"
        save_image_atomic(img, path, "PNG")
        paths.append(path)
    return paths
