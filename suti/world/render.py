"""Scenes of the synthetic world: a subject, posed in a context, optionally edited, plus caption
(:mod:`suti.world.captions`).

Subjects and backgrounds are drawn at 4x the output size with PIL primitives and downsampled
with LANCZOS (both cached, see :mod:`suti.world.shapes` and :mod:`suti.world.backgrounds`), so
a scene costs one sprite resize + rotation + paste (+ a style filter). Measured on one CPU
core (Python 3.11, Pillow 13): at 64 px about 1300 scenes/s without edits and 600-900/s with
edits (``edit_prob`` 0.3-0.5), at 32 px about 4000/s and 1700-2400/s; a never-seen sprite
(subject x colour x accessory x size) costs ~3 ms once at 64 px.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from suti.errors import InvalidValueError
from suti.world.backgrounds import VARIANTS, background
from suti.world.captions import caption
from suti.world.shapes import sprite_2x
from suti.world.spec import Subject
from suti.world.vocab import ACCESSORIES, COLORS, CONTEXTS, STYLES, Context, check_edit, context_named

__all__ = ["EDIT_KINDS", "Pose", "apply_style", "caption", "render", "render_background",
           "sample_scene"]

#: The edits of the SuTI skills that :func:`sample_scene` can apply on top of a context.
EDIT_KINDS = ("attribute", "accessory", "style")


@dataclass(frozen=True)
class Pose:
    """Where and how the subject appears.

    ``x``, ``y``: centre of the subject's sprite in fractions of the image size (the body's
    bottom lies at ``y + 0.43 * scale``); ``scale``: sprite side over image side; ``rotation``:
    degrees counter-clockwise; ``flip``: mirror left-right.
    """

    x: float = 0.5
    y: float = 0.5
    scale: float = 0.75
    rotation: float = 0.0
    flip: bool = False

    @classmethod
    def random(cls, rng: np.random.Generator) -> Pose:
        """A random pose that keeps the subject standing on the ground and inside the frame."""
        scale = float(rng.uniform(0.58, 0.88))
        ground = float(rng.uniform(0.84, 0.96))
        return cls(x=float(rng.uniform(0.38, 0.62)), y=ground - 0.43 * scale, scale=scale,
                   rotation=float(rng.uniform(-12, 12)), flip=bool(rng.random() < 0.5))


@lru_cache(maxsize=8)
def _paper(size: int) -> Image.Image:
    """Fixed watercolour-paper texture (deterministic noise on a warm white)."""
    noise = np.random.default_rng(size).normal(0, 6, (size, size, 1))
    arr = np.clip(np.array([250, 244, 228], float) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB").filter(ImageFilter.SMOOTH)


def apply_style(img: Image.Image, style: str | None,
                subject_mask: Image.Image | None = None) -> Image.Image:
    """Restyle an RGB image.

    ``sketch``: grey pencil strokes on white (background strokes fainter when ``subject_mask``,
    an L image of the subject's pixels, is given); ``watercolor``: soft, posterised colour
    washes with darker rims on textured paper; ``pixel_art``: ~2-3 px cells and 12 colours.
    ``None`` returns ``img`` unchanged.
    """
    if style is None:
        return img
    size = img.size[0]
    if style == "sketch":
        grey = img.convert("L").filter(ImageFilter.SMOOTH)
        dark = np.asarray(grey.filter(ImageFilter.FIND_EDGES), np.float32) * 2.5
        if subject_mask is not None:
            m = np.asarray(subject_mask.filter(ImageFilter.MaxFilter(3)), np.float32) / 255
            dark *= 0.3 + 0.9 * m
        strokes = 255 - np.clip(dark, 0, 215)
        return Image.fromarray(strokes.astype(np.uint8), "L").convert("RGB")
    if style == "watercolor":
        wash = img.filter(ImageFilter.GaussianBlur(max(0.7, size / 64)))
        wash = ImageOps.posterize(ImageEnhance.Color(wash).enhance(1.3), 3)
        rims = wash.convert("L").filter(ImageFilter.FIND_EDGES).point(lambda v: min(255, v))
        arr = np.asarray(wash, np.float32) * (1 - np.asarray(rims, np.float32)[..., None] / 600)
        paper = np.asarray(_paper(size), np.float32)
        out = paper * (0.35 + 0.65 * arr / 255)  # pigment multiplies the paper
        return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8), "RGB")
    if style == "pixel_art":
        cells = size // max(2, round(size / 24))
        punchy = ImageEnhance.Color(ImageEnhance.Contrast(img).enhance(1.2)).enhance(1.4)
        small = punchy.resize((cells, cells), Image.BOX).quantize(
            12, method=Image.Quantize.MEDIANCUT)
        return small.convert("RGB").resize(img.size, Image.NEAREST)
    raise InvalidValueError(f"unknown style {style!r}; known: {', '.join(STYLES)}")


def render_background(context: str | Context, rng: np.random.Generator | None = None,
                      size: int = 64) -> Image.Image:
    """A context without any subject (a random variant drawn from ``rng``)."""
    rng = rng if rng is not None else np.random.default_rng(0)
    return background(context_named(context).name, int(rng.integers(VARIANTS)), size).copy()


def render(subject: Subject, context: str | Context, *, pose: Pose | None = None,
           color_override: str | None = None, accessory: str | None = None,
           style: str | None = None, size: int = 64,
           rng: np.random.Generator | None = None) -> Image.Image:
    """Render one RGB scene of ``subject`` in ``context``.

    Args:
        subject: who to draw.
        context: a key of :data:`~suti.world.spec.CONTEXTS` (or the :class:`Context`).
        pose: placement; random (from ``rng``) when ``None``.
        color_override: attribute edit, a key of :data:`~suti.world.spec.COLORS` replacing the
            body colour (pattern, parts and proportions stay).
        accessory: a key of :data:`~suti.world.spec.ACCESSORIES`.
        style: a key of :data:`~suti.world.spec.STYLES`.
        size: output side in pixels (>= 16).
        rng: randomness for the background variant and the pose (default: seed 0).
    """
    if size < 16:
        raise InvalidValueError(f"image size must be >= 16 px, got {size}")
    check_edit(color_override, accessory, style)
    ctx = context_named(context)
    rng = rng if rng is not None else np.random.default_rng(0)
    img = background(ctx.name, int(rng.integers(VARIANTS)), size).copy()
    pose = pose if pose is not None else Pose.random(rng)
    sp = sprite_2x(subject.class_name, color_override or subject.body_color, subject.pattern,
                   subject.pattern_color, subject.part, subject.aspect, accessory, size)
    side = max(4, int(round(pose.scale * size)))
    sp = sp.resize((side, side), Image.LANCZOS)
    if pose.flip:
        sp = sp.transpose(Image.FLIP_LEFT_RIGHT)
    if pose.rotation:
        sp = sp.rotate(pose.rotation, Image.BICUBIC, expand=True)
    at = (int(round(pose.x * size - sp.width / 2)), int(round(pose.y * size - sp.height / 2)))
    img.paste(sp, at, sp)
    mask = None
    if style == "sketch":
        mask = Image.new("L", img.size, 0)
        mask.paste(sp.getchannel("A").point(lambda v: 255 if v > 100 else 0), at)
    return apply_style(img, style, mask)


def sample_scene(subject: Subject, rng: np.random.Generator, *, size: int = 64,
                 contexts: list[str] | None = None, edit_prob: float = 0.0,
                 edit_kinds: tuple[str, ...] = EDIT_KINDS, identifier: str | None = None,
                 hires: float | None = None,
                 downsample: Image.Resampling = Image.Resampling.LANCZOS,
                 ) -> tuple[Image.Image, str, dict]:
    """Render ``subject`` in a random context and pose, with probability ``edit_prob`` also one
    random edit of ``edit_kinds`` (``attribute``, ``accessory``, ``style``).

    The world's one scene sampler: the models' training scenes
    (:mod:`suti.world.training.scenes`), the crawl, DreamBooth instance sets and the evaluations
    all draw their scenes here.

    Args:
        subject: who to draw.
        rng: all randomness; draws, in order: the high-resolution coin (only when ``hires`` is
            not ``None``), the context, the edit coin (only with ``edit_kinds``) and edit, the
            pose, the background variant.
        size: side of the returned image in pixels (>= 16).
        contexts: context names to draw from (default: all of
            :data:`~suti.world.vocab.CONTEXTS`).
        edit_prob: probability of one edit, in [0, 1].
        edit_kinds: the edit kinds to draw from.
        identifier: name the subject DreamBooth-style in the caption (:func:`caption`).
        hires: probability of rendering at ``2 * size`` and downsampling to ``size`` with
            ``downsample``, as photos of the subject are (the toy models' training scenes);
            ``None`` (default): always render at ``size``, drawing nothing.
        downsample: the resampling filter of high-resolution scenes.

    Returns ``(image, caption, meta)``: an RGB ``size`` x ``size`` PIL image, the scene's
    :func:`caption`, and ``meta`` with ``subject_id``, ``class_noun``, ``context``, ``color``
    (the colour shown), ``accessory``, ``style``, ``edit`` (the edit kind or ``None``) and
    ``pose`` (a dict of :class:`Pose`). Raises :class:`~suti.errors.InvalidValueError` for an
    unknown edit kind (when one is drawn) or a rendering size below 16 px.
    """
    if hires is not None and rng.random() < hires:
        img, text, meta = sample_scene(subject, rng, size=2 * size, contexts=contexts,
                                       edit_prob=edit_prob, edit_kinds=edit_kinds,
                                       identifier=identifier)
        return img.resize((size, size), downsample), text, meta
    names = list(contexts) if contexts else list(CONTEXTS)
    ctx = names[int(rng.integers(len(names)))]
    color = accessory = style = edit = None
    if edit_kinds and rng.random() < edit_prob:
        edit = edit_kinds[int(rng.integers(len(edit_kinds)))]
        if edit == "attribute":
            others = [c for c in COLORS if c != subject.body_color]
            color = others[int(rng.integers(len(others)))]
        elif edit == "accessory":
            accessory = list(ACCESSORIES)[int(rng.integers(len(ACCESSORIES)))]
        elif edit == "style":
            style = list(STYLES)[int(rng.integers(len(STYLES)))]
        else:
            raise InvalidValueError(f"unknown edit kind {edit!r}; known: {', '.join(EDIT_KINDS)}")
    pose = Pose.random(rng)
    img = render(subject, ctx, pose=pose, color_override=color, accessory=accessory,
                 style=style, size=size, rng=rng)
    text = caption(subject, ctx, color_override=color, accessory=accessory, style=style,
                   identifier=identifier)
    meta = {"subject_id": subject.subject_id, "class_noun": subject.class_noun, "context": ctx,
            "color": color or subject.body_color, "accessory": accessory, "style": style,
            "edit": edit, "pose": asdict(pose)}
    return img, text, meta
