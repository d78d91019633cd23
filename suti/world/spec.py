"""The synthetic subject world: classes, subjects, contexts, edits and their language.

A *world* is a deterministic (by seed) list of :class:`Subject` objects - individual toys, cups,
boxes... each of a class (``"star toy"``, ``"cup"``...) and with identity details that tell it
apart from other subjects of its class (body colour, surface pattern, a class-specific part and
its proportions). Subjects are split into ``train`` and ``heldout`` sets, the latter never shown
to anything that learns (it measures generalisation to unseen subjects).

The edits mirror the four SuTI skills, in DreamBench language:

* re-contextualisation: one of :data:`CONTEXTS` (``"on the beach"``, ``"in the snow"``...),
* attribute edit: a colour override (``"a green [V] star toy"``),
* accessorisation: one of :data:`ACCESSORIES` (``"wearing a hat"``...),
* stylisation: one of :data:`STYLES` (``"a sketch of ..."``...).

The vocabularies (:data:`COLORS`, :data:`PATTERNS`, :data:`ASPECTS`, :data:`CLASSES`,
:data:`CONTEXTS`, :data:`ACCESSORIES`, :data:`STYLES`) live in :mod:`suti.world.vocab` and are
re-exported here; :mod:`suti.world.captions` puts them into words. Nothing here draws;
:mod:`suti.world.render` turns these descriptions into pixels.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from suti.errors import InvalidValueError
from suti.world.captions import describe
from suti.world.vocab import (
    ACCESSORIES,
    ASPECTS,
    CLASSES,
    COLORS,
    CONTEXTS,
    PATTERNS,
    STYLES,
    ClassSpec,
    Context,
)

__all__ = [
    "ACCESSORIES", "ASPECTS", "CLASSES", "COLORS", "CONTEXTS", "PATTERNS", "STYLES", "WORLD_FORMAT",
    "ClassSpec", "Context", "Subject", "World", "load_world", "make_world",
]

WORLD_FORMAT = 1


@dataclass(frozen=True)
class Subject:
    """One individual subject: a class plus the identity details that make it unique.

    Attributes:
        subject_id: stable id, e.g. ``"subject_0007"``.
        class_name: key into :data:`CLASSES`.
        class_noun: prompt noun of the class (``"star toy"``).
        body_color: key into :data:`COLORS`.
        pattern: key into :data:`PATTERNS`.
        pattern_color: colour of the pattern (``None`` when ``pattern == "plain"``).
        part: class-specific part variant, a key of ``CLASSES[class_name].parts``.
        aspect: proportions, a key of :data:`ASPECTS`.
    """

    subject_id: str
    class_name: str
    class_noun: str
    body_color: str
    pattern: str
    pattern_color: str | None
    part: str
    aspect: str

    def identity(self) -> tuple:
        """The identity attributes (everything but the id) as a hashable tuple."""
        return (self.class_name, self.body_color, self.pattern, self.pattern_color,
                self.part, self.aspect)

    def description(self, color: str | None = None, detailed: bool = False) -> str:
        """DreamBench-like noun phrase without article, e.g. ``"red checkered star toy"``
        (the grammar is :func:`suti.world.captions.describe`).

        Args:
            color: colour word to use instead of the body colour (attribute edit).
            detailed: also name proportions, part and pattern colour
                (``"slim red six-pointed star toy with yellow checks"``).
        """
        return describe(self, color, detailed)

    def to_dict(self) -> dict:
        """JSON-ready dict of all attributes (the inverse of ``Subject(**d)``)."""
        return asdict(self)


@dataclass(frozen=True)
class World:
    """A generated world: its seed, the subjects and their train/held-out split."""

    seed: int
    subjects: tuple[Subject, ...]
    splits: dict[str, str] = field(hash=False)  # subject_id -> "train" | "heldout"
    heldout_fraction: float = 0.25

    def subject(self, subject_id: str) -> Subject:
        """The subject with this id (``KeyError`` if unknown)."""
        for s in self.subjects:
            if s.subject_id == subject_id:
                return s
        raise KeyError(subject_id)

    def split(self, name: str) -> list[Subject]:
        """Subjects of a split: ``"train"``, ``"heldout"`` or ``"all"``."""
        if name == "all":
            return list(self.subjects)
        if name not in ("train", "heldout"):
            raise InvalidValueError(f"unknown split {name!r} (train, heldout or all)")
        return [s for s in self.subjects if self.splits[s.subject_id] == name]

    @property
    def train_subjects(self) -> list[Subject]:
        """Subjects anything may learn from."""
        return self.split("train")

    @property
    def heldout_subjects(self) -> list[Subject]:
        """Subjects kept unseen for evaluation."""
        return self.split("heldout")

    def to_dict(self) -> dict:
        """JSON-ready description: seed, subjects with split, and the vocabularies."""
        return {
            "format": WORLD_FORMAT,
            "seed": self.seed,
            "heldout_fraction": self.heldout_fraction,
            "subjects": [dict(s.to_dict(), split=self.splits[s.subject_id])
                         for s in self.subjects],
            "classes": {k: {"class_noun": c.class_noun, "parts": c.parts}
                        for k, c in CLASSES.items()},
            "contexts": {k: {"phrase": c.phrase, "short": c.short} for k, c in CONTEXTS.items()},
            "colors": {k: list(v) for k, v in COLORS.items()},
            "patterns": dict(PATTERNS),
            "aspects": dict(ASPECTS),
            "accessories": dict(ACCESSORIES),
            "styles": dict(STYLES),
        }

    @classmethod
    def from_dict(cls, data: dict) -> World:
        """Rebuild a world written by :meth:`to_dict`."""
        subjects, splits = [], {}
        for row in data["subjects"]:
            row = dict(row)
            splits[row["subject_id"]] = row.pop("split")
            subjects.append(Subject(**row))
        return cls(int(data["seed"]), tuple(subjects), splits,
                   float(data.get("heldout_fraction", 0.25)))

    def save(self, path: str | Path) -> None:
        """Write ``world.json`` (sorted keys, so identical worlds give identical bytes)."""
        from suti import storage

        storage.write_text(path, json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n")


def load_world(path: str | Path) -> World:
    """Load a world from ``world.json`` or from a folder containing it."""
    path = Path(path)
    if path.is_dir():
        path = path / "world.json"
    return World.from_dict(json.loads(path.read_text()))


def _contrasting(rng: np.random.Generator, body: str) -> str:
    """A pattern colour clearly different from ``body`` in brightness or hue."""
    b = np.array(COLORS[body], float)
    choices = [c for c, rgb in COLORS.items()
               if c != body and np.abs(np.array(rgb, float) - b).sum() > 200]
    return choices[int(rng.integers(len(choices)))]


def _draw_identity(rng: np.random.Generator, class_name: str) -> tuple:
    """Random identity attributes for a subject of ``class_name``."""
    colors, patterns = list(COLORS), list(PATTERNS)
    body = colors[int(rng.integers(len(colors)))]
    pattern = patterns[int(rng.integers(len(patterns)))]
    pcolor = None if pattern == "plain" else _contrasting(rng, body)
    parts = list(CLASSES[class_name].parts)
    part = parts[int(rng.integers(len(parts)))]
    aspects = list(ASPECTS)
    aspect = aspects[int(rng.integers(len(aspects)))]
    return class_name, body, pattern, pcolor, part, aspect


def make_world(num_subjects: int, seed: int, heldout_fraction: float = 0.25) -> World:
    """Generate a world of ``num_subjects`` subjects, deterministically from ``seed``.

    Classes are used in turn (a seed-dependent order) so they are balanced. Subject ``i``
    depends only on the seed and the subjects before it, so a bigger world extends a smaller
    one. Within a class, subjects differ in colour+pattern whenever the class still has unused
    combinations, and always in their full identity (colour, pattern, pattern colour, part,
    proportions). Each subject is held out with probability ``heldout_fraction`` (drawn per
    subject); with at least two subjects and ``0 < heldout_fraction < 1`` both splits are
    non-empty.
    """
    if num_subjects < 0:
        raise InvalidValueError("num_subjects must be >= 0")
    if not 0.0 <= heldout_fraction <= 1.0:
        raise InvalidValueError("heldout_fraction must be in [0, 1]")
    order = list(CLASSES)
    np.random.default_rng([seed, 0]).shuffle(order)
    max_short = len(COLORS) * len(PATTERNS)
    subjects, used_full, used_short, draws = [], set(), set(), []
    for i in range(num_subjects):
        class_name = order[i % len(order)]
        rng = np.random.default_rng([seed, 1, i])
        n_in_class = sum(1 for s in subjects if s.class_name == class_name)
        for _ in range(1000):
            ident = _draw_identity(rng, class_name)
            short = ident[:3]
            if ident in used_full or (short in used_short and n_in_class < max_short):
                continue
            break
        else:  # pragma: no cover - only for absurdly large worlds
            raise InvalidValueError(f"cannot make {num_subjects} distinct subjects")
        used_full.add(ident)
        used_short.add(ident[:3])
        subjects.append(Subject(f"subject_{i:04d}", class_name, CLASSES[class_name].class_noun,
                                *ident[1:]))
        draws.append(float(np.random.default_rng([seed, 2, i]).random()))
    held = [u < heldout_fraction for u in draws]
    if num_subjects >= 2 and 0.0 < heldout_fraction < 1.0:
        if not any(held):
            held[int(np.argmin(draws))] = True
        if all(held):
            held[int(np.argmax(draws))] = False
    splits = {s.subject_id: ("heldout" if h else "train") for s, h in zip(subjects, held)}
    return World(int(seed), tuple(subjects), splits, float(heldout_fraction))
