"""Procedural backgrounds, one drawing function per context of :data:`suti.world.spec.CONTEXTS`.

Each function draws a ``s`` x ``s`` RGB scene (``s`` = 4x the output size) from a numpy
generator; :func:`background` draws it for one of :data:`VARIANTS` variants, downsamples it with
LANCZOS and caches the result. The ground (where subjects stand) lies below ~60% of the height.
"""

from __future__ import annotations

import zlib
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from suti.errors import InvalidValueError
from suti.world.spec import CONTEXTS

#: Distinct renderings (layouts of waves, trees, buildings...) per context.
VARIANTS = 6


def _grad(s: int, bands: list[tuple[float, float, tuple, tuple]]) -> Image.Image:
    """Vertical gradients: ``(y0, y1, top_rgb, bottom_rgb)`` bands in fractions of ``s``."""
    arr = np.zeros((s, s, 3), np.float32)
    for y0, y1, top, bot in bands:
        a, b = int(round(y0 * s)), int(round(y1 * s))
        t = np.linspace(0, 1, max(b - a, 1), dtype=np.float32)[:, None]
        arr[a:b] = (np.array(top, np.float32) * (1 - t) + np.array(bot, np.float32) * t)[:, None, :]
    return Image.fromarray(arr.astype(np.uint8), "RGB")


def _jitter(rng: np.random.Generator, rgb: tuple, amount: int) -> tuple:
    return tuple(int(np.clip(v + rng.integers(-amount, amount + 1), 0, 255)) for v in rgb)


def _beach(s, rng):
    horizon = rng.uniform(0.4, 0.5)
    img = _grad(s, [(0, horizon, (110, 175, 240), (195, 228, 250)),
                    (horizon, horizon + 0.1, (25, 100, 175), (60, 150, 200)),
                    (horizon + 0.1, 1, (240, 215, 155), (215, 185, 125))])
    d = ImageDraw.Draw(img)
    sx, r = rng.uniform(0.1, 0.9) * s, 0.07 * s
    d.ellipse((sx - r, 0.08 * s, sx + r, 0.08 * s + 2 * r), fill=(255, 230, 90))
    wy = (horizon + 0.1) * s
    d.line([(0, wy), (s, wy)], fill=(245, 245, 240), width=max(2, s // 60))
    for _ in range(12):
        x, y = rng.uniform(0, s), rng.uniform(wy + 0.03 * s, s)
        q = rng.uniform(0.005, 0.012) * s
        d.ellipse((x - q, y - q / 2, x + q, y + q / 2), fill=(200, 165, 110))
    return img


def _snow(s, rng):
    horizon = rng.uniform(0.45, 0.55)
    img = _grad(s, [(0, horizon, (160, 180, 210), (215, 225, 240)),
                    (horizon, 1, (250, 252, 255), (222, 230, 244))])
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 7))):
        x, h = rng.uniform(0, s), rng.uniform(0.12, 0.25) * s
        y = horizon * s + 0.02 * s
        d.polygon([(x, y - h), (x - 0.35 * h, y), (x + 0.35 * h, y)], fill=(30, 85, 60))
        d.polygon([(x, y - h), (x - 0.12 * h, y - 0.6 * h), (x + 0.12 * h, y - 0.6 * h)],
                  fill=(245, 248, 252))
    for _ in range(3):
        x, w = rng.uniform(0, s), rng.uniform(0.3, 0.6) * s
        y = rng.uniform(horizon + 0.08, 0.9) * s
        d.ellipse((x - w, y - 0.04 * s, x + w, y + 0.04 * s), fill=(232, 238, 250))
    for _ in range(40):
        x, y, q = rng.uniform(0, s), rng.uniform(0, s), s / 120
        d.ellipse((x - q, y - q, x + q, y + q), fill=(255, 255, 255))
    return img


def _jungle(s, rng):
    img = _grad(s, [(0, 0.78, (25, 70, 35), (40, 100, 45)), (0.78, 1, (80, 65, 35), (60, 48, 25))])
    d = ImageDraw.Draw(img)
    for _ in range(3):
        x = rng.uniform(0, s)
        d.rectangle((x, 0, x + 0.05 * s, 0.8 * s), fill=(85, 60, 35))
    for _ in range(45):
        x, y = rng.uniform(-0.05, 1.05) * s, rng.uniform(-0.05, 0.85) * s
        length, width = rng.uniform(0.08, 0.18) * s, rng.uniform(0.03, 0.06) * s
        a = rng.uniform(0, np.pi)
        ux, uy = np.cos(a), np.sin(a)
        pts = [(x - ux * length, y - uy * length), (x - uy * width, y + ux * width),
               (x + ux * length, y + uy * length), (x + uy * width, y - ux * width)]
        d.polygon(pts, fill=_jitter(rng, (50, 140, 55), 35))
    return img


def _city(s, rng):
    img = _grad(s, [(0, 0.7, (140, 185, 230), (200, 220, 240)),
                    (0.7, 1, (170, 170, 170), (140, 140, 145))])
    d = ImageDraw.Draw(img)
    x = -rng.uniform(0, 0.1) * s
    while x < s:
        w, h = rng.uniform(0.14, 0.26) * s, rng.uniform(0.3, 0.62) * s
        col = _jitter(rng, (125, 125, 135), 30)
        d.rectangle((x, 0.7 * s - h, x + w, 0.7 * s), fill=col, outline=(70, 70, 80),
                    width=max(1, s // 120))
        win = (250, 230, 140) if rng.random() < 0.5 else (170, 200, 230)
        for wy in np.arange(0.7 * s - h + 0.04 * s, 0.7 * s - 0.06 * s, 0.07 * s):
            for wx in np.arange(x + 0.03 * s, x + w - 0.04 * s, 0.06 * s):
                d.rectangle((wx, wy, wx + 0.03 * s, wy + 0.035 * s), fill=win)
        x += w + rng.uniform(0, 0.04) * s
    for y in np.arange(0.76, 1.0, 0.08):
        d.line([(0, y * s), (s, y * s)], fill=(120, 120, 125), width=max(1, s // 128))
    return img


def _wooden_floor(s, rng):
    wall = rng.uniform(0.35, 0.45)
    img = _grad(s, [(0, wall, (238, 228, 205), (225, 212, 188)), (wall, 1, (0, 0, 0), (0, 0, 0))])
    d = ImageDraw.Draw(img)
    d.rectangle((0, wall * s - 0.04 * s, s, wall * s), fill=(250, 248, 240))
    plank, y = 0.075 * s, wall * s
    while y < s:
        x = -rng.uniform(0, 0.5) * s
        while x < s:
            length = rng.uniform(0.4, 0.8) * s
            d.rectangle((x, y, x + length, y + plank), fill=_jitter(rng, (165, 112, 62), 18),
                        outline=(95, 60, 30), width=max(1, s // 128))
            x += length
        y += plank
    return img


def _blue_carpet(s, rng):
    wall = rng.uniform(0.3, 0.42)
    img = np.array(_grad(s, [(0, wall, (228, 228, 235), (210, 212, 222)),
                             (wall, 1, (45, 75, 170), (35, 60, 150))]), np.int16)
    a = int(wall * s)
    noise = rng.integers(-18, 19, size=(s - a, s, 1), dtype=np.int16)
    img[a:] = np.clip(img[a:] + noise, 0, 255)
    img = Image.fromarray(img.astype(np.uint8), "RGB")
    ImageDraw.Draw(img).rectangle((0, a - 0.03 * s, s, a), fill=(245, 245, 245))
    return img


def _grass(s, rng):
    horizon = rng.uniform(0.45, 0.55)
    img = _grad(s, [(0, horizon, (120, 185, 245), (185, 220, 250)),
                    (horizon, 1, (100, 180, 75), (55, 135, 45))])
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, 4))):
        x, y, w = rng.uniform(0, s), rng.uniform(0.06, 0.3) * s, rng.uniform(0.1, 0.2) * s
        for dx in (-0.6, 0, 0.6):
            d.ellipse((x + dx * w - w / 2, y - w / 3, x + dx * w + w / 2, y + w / 3),
                      fill=(250, 250, 252))
    for _ in range(70):
        x, y = rng.uniform(0, s), rng.uniform(horizon + 0.03, 1.0) * s
        h = rng.uniform(0.02, 0.05) * s
        d.line([(x, y), (x + rng.uniform(-0.3, 0.3) * h, y - h)], fill=(40, 110, 35),
               width=max(1, s // 100))
    for _ in range(6):
        x, y, q = rng.uniform(0, s), rng.uniform(horizon + 0.05, 1.0) * s, s / 80
        d.ellipse((x - q, y - q, x + q, y + q), fill=(250, 240, 90))
    return img


def _brick_wall(s, rng):
    floor = rng.uniform(0.72, 0.8)
    img = _grad(s, [(0, floor, (205, 195, 185), (205, 195, 185)),
                    (floor, 1, (135, 135, 135), (105, 105, 110))])
    d = ImageDraw.Draw(img)
    bh, bw, gap = 0.065 * s, 0.17 * s, max(1, s // 100)
    off = rng.uniform(0, bw)
    for row, y in enumerate(np.arange(0, floor * s - bh / 2, bh)):
        x = -off - (bw / 2 if row % 2 else 0)
        while x < s:
            d.rectangle((x + gap, y + gap, x + bw - gap, y + bh - gap),
                        fill=_jitter(rng, (170, 65, 45), 22))
            x += bw
    return img


DRAW = {"beach": _beach, "snow": _snow, "jungle": _jungle, "city": _city,
        "wooden_floor": _wooden_floor, "blue_carpet": _blue_carpet, "grass": _grass,
        "brick_wall": _brick_wall}
assert set(DRAW) == set(CONTEXTS)


@lru_cache(maxsize=512)
def background(context: str, variant: int, size: int) -> Image.Image:
    """Variant ``variant`` of ``context`` at ``size`` px (cached; callers must copy)."""
    if context not in DRAW:
        raise InvalidValueError(f"unknown context {context!r}; known: {', '.join(DRAW)}")
    rng = np.random.default_rng([zlib.crc32(context.encode()), int(variant)])
    big = DRAW[context](4 * size, rng)
    return big.resize((size, size), Image.LANCZOS)
