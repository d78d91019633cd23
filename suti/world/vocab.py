"""The words of the synthetic world: colours, patterns, proportions, classes, contexts,
accessories and styles, each with the wording captions use.

Pure data plus two checks (:func:`context_named`, :func:`check_edit`). :mod:`suti.world.spec`
builds subjects from these vocabularies (and re-exports them), :mod:`suti.world.captions` turns
them into words, :mod:`suti.world.render` into pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from suti.errors import InvalidValueError

#: Named colours: name -> RGB. Names are the words used in captions.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (214, 40, 40),
    "orange": (245, 130, 30),
    "yellow": (245, 205, 40),
    "green": (60, 170, 75),
    "blue": (40, 90, 210),
    "purple": (130, 60, 180),
    "pink": (240, 120, 170),
    "brown": (130, 80, 40),
    "white": (240, 240, 240),
    "black": (35, 35, 35),
    "teal": (20, 150, 150),
    "grey": (140, 140, 140),
}

#: Surface patterns: name -> adjective used in descriptions ("" for plain).
PATTERNS: dict[str, str] = {
    "plain": "",
    "stripes": "striped",
    "dots": "polka-dot",
    "checkered": "checkered",
}

#: Proportions: name -> width factor of the body (descriptions omit "regular").
ASPECTS: dict[str, float] = {"slim": 0.78, "regular": 1.0, "wide": 1.22}


@dataclass(frozen=True)
class ClassSpec:
    """A subject class: its prompt noun and the part variants its subjects can have.

    ``parts`` maps a part id to the adjective/phrase describing it (e.g. ``"six-pointed"``).
    """

    name: str
    class_noun: str
    parts: dict[str, str]


#: The subject classes, keyed by class name (``"star_toy"``...).
CLASSES: dict[str, ClassSpec] = {
    c.name: c
    for c in (
        ClassSpec("star_toy", "star toy", {"five": "five-pointed", "six": "six-pointed",
                                            "four": "four-pointed"}),
        ClassSpec("ball", "ball", {"shine": "shiny", "seam": "seamed", "emblem": "star-emblem"}),
        ClassSpec("cube_box", "cube box", {"ribbon": "ribboned", "lid": "lidded",
                                            "clasp": "clasped"}),
        ClassSpec("cup", "cup", {"round": "round-handled", "square": "square-handled",
                                 "saucer": "saucered"}),
        ClassSpec("robot", "robot", {"antenna": "antennaed", "horns": "two-antennaed",
                                     "roundhead": "round-headed"}),
        ClassSpec("teddy", "teddy bear", {"round": "round-eared", "pointy": "pointy-eared",
                                          "long": "long-eared"}),
    )
}


@dataclass(frozen=True)
class Context:
    """A background: ``phrase`` is the DreamBench wording, ``short`` a casual variant."""

    name: str
    phrase: str
    short: str


#: The backgrounds for re-contextualisation, keyed by name.
CONTEXTS: dict[str, Context] = {
    c.name: c
    for c in (
        Context("beach", "on the beach", "at the beach"),
        Context("snow", "in the snow", "in the snow"),
        Context("jungle", "in the jungle", "in the jungle"),
        Context("city", "in a city", "downtown"),
        Context("wooden_floor", "on a wooden floor", "on the floor"),
        Context("blue_carpet", "on a blue carpet", "on the carpet"),
        Context("grass", "on the grass", "in the garden"),
        Context("brick_wall", "in front of a red brick wall", "by the wall"),
    )
}

#: Accessories: name -> caption phrase.
ACCESSORIES: dict[str, str] = {
    "hat": "wearing a hat",
    "sunglasses": "wearing sunglasses",
    "bow_tie": "wearing a bow tie",
    "crown": "wearing a crown",
}

#: Styles: name -> caption prefix (followed by "a <subject> ...").
STYLES: dict[str, str] = {
    "sketch": "a sketch of",
    "watercolor": "a watercolor painting of",
    "pixel_art": "a pixel art image of",
}


#: Pattern -> noun naming the pattern after "with <colour>" in detailed descriptions.
PATTERN_NOUNS: dict[str, str] = {"stripes": "stripes", "dots": "dots", "checkered": "checks"}


def context_named(context: str | Context) -> Context:
    """The canonical :class:`Context` of a context name (or of a :class:`Context`, looked up by
    its name). Raises :class:`~suti.errors.InvalidValueError` for an unknown name."""
    name = context.name if isinstance(context, Context) else context
    if name not in CONTEXTS:
        raise InvalidValueError(f"unknown context {name!r}; known: {', '.join(CONTEXTS)}")
    return CONTEXTS[name]


def check_edit(color_override: str | None, accessory: str | None, style: str | None) -> None:
    """Check the edits of a scene: each is ``None`` or a key of :data:`COLORS`,
    :data:`ACCESSORIES`, :data:`STYLES` respectively (else
    :class:`~suti.errors.InvalidValueError`, naming the known values)."""
    if color_override is not None and color_override not in COLORS:
        raise InvalidValueError(f"unknown colour {color_override!r}; known: {', '.join(COLORS)}")
    if accessory is not None and accessory not in ACCESSORIES:
        raise InvalidValueError(f"unknown accessory {accessory!r}; known: {', '.join(ACCESSORIES)}")
    if style is not None and style not in STYLES:
        raise InvalidValueError(f"unknown style {style!r}; known: {', '.join(STYLES)}")


@lru_cache(maxsize=1)
def attribute_labels() -> dict[str, list]:
    """Every attribute of a scene and its labels, in the order models number them: ``class``,
    ``color``, ``pattern``, ``pattern_color``, ``part`` (``"class/part"``), ``aspect``,
    ``context``, ``accessory``, ``style`` (``None``: no pattern colour, accessory or style).

    The toy CLIP's attribute targets and the probe's heads both read this one list.
    """
    return {
        "class": list(CLASSES),
        "color": list(COLORS),
        "pattern": list(PATTERNS),
        "pattern_color": [None, *COLORS],
        "part": [f"{c}/{p}" for c, spec in CLASSES.items() for p in spec.parts],
        "aspect": list(ASPECTS),
        "context": list(CONTEXTS),
        "accessory": [None, *ACCESSORIES],
        "style": [None, *STYLES],
    }
