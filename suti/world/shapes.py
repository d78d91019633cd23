"""Subject sprites: each class drawn from PIL primitives, with pattern, outline and accessory.

A sprite is an RGBA square of side ``C`` (4x the output size, for supersampling) in which the
subject's body fills the box ``[0.5 - w/2, 0.5 + w/2] x [0.31, 0.93]`` (``w`` depends on the
proportions); the space above holds hats and crowns. Sprites are cached at 2x the output
size, so a scene costs one resize, one rotation and one paste.

Each class is a function ``(box, part) -> Shape``: the silhouette pieces (filled with the body
colour, or a shade of it, some carrying the surface pattern), the details drawn on top
(eyes, seams, ribbons...) and the anchors where accessories go.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageChops, ImageDraw

from suti.errors import InvalidValueError
from suti.world.spec import ASPECTS, COLORS

OUTLINE = (28, 28, 32)


@dataclass
class Shape:
    """Drawing recipe of one subject.

    ``sil``: ``(method, xy, colour token, patterned, extra kwargs)`` silhouette pieces;
    ``details``: ``(method, xy, kwargs)`` drawn after pattern and outline;
    ``anchors``: ``top=(x, y, w)`` (hats), ``eyes=(x, y, dx, r)``, ``neck=(x, y, w)``.
    Colour tokens: ``body``, ``shade``, ``light``, ``dark``, ``white``, ``black``, ``gold``,
    ``accent`` (a colour that contrasts with the body) or an RGB tuple.
    """

    sil: list
    details: list
    anchors: dict


def _eyes(x: float, y: float, dx: float, r: float, smile: float | None = None) -> list:
    """White eyes with black pupils, optionally a smile of width ``smile``."""
    ops = []
    for ex in (x - dx, x + dx):
        ops.append(("ellipse", (ex - r, y - r, ex + r, y + r), {"fill": "white"}))
        p = r * 0.55
        ops.append(("ellipse", (ex - p, y - p * 0.6, ex + p, y + p * 1.4), {"fill": "black"}))
    if smile:
        ops.append(("arc", (x - smile, y, x + smile, y + 2.2 * r + smile * 0.6), {
            "start": 20, "end": 160, "fill": "dark", "width": "lw"}))
    return ops


def _star(box, part) -> Shape:
    x0, y0, x1, y1 = box
    n, inner = {"five": (5, 0.48), "six": (6, 0.56), "four": (4, 0.42)}[part]
    pts = []
    for k in range(2 * n):
        a = -math.pi / 2 + k * math.pi / n
        rad = 1.0 if k % 2 == 0 else inner
        pts.append((rad * math.cos(a), rad * math.sin(a)))
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    sx, sy = (x1 - x0) / (max(xs) - min(xs)), (y1 - y0) / (max(ys) - min(ys))
    pts = [(x0 + (px - min(xs)) * sx, y0 + (py - min(ys)) * sy) for px, py in pts]
    cx, cy = (x0 + x1) / 2, y0 + (0 - min(ys)) * sy
    w, h = x1 - x0, y1 - y0
    return Shape(
        sil=[("polygon", pts, "body", True, {})],
        details=_eyes(cx, cy - 0.04 * h, 0.1 * w, 0.06 * w, smile=0.07 * w),
        anchors={"top": (cx, y0 + 0.1 * h, 0.3 * w), "eyes": (cx, cy - 0.04 * h, 0.1 * w, 0.06 * w),
                 "neck": (cx, cy + 0.2 * h, 0.3 * w)})


def _ball(box, part) -> Shape:
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    det = []
    if part == "shine":
        det.append(("ellipse", (x0 + 0.17 * w, y0 + 0.13 * h, x0 + 0.4 * w, y0 + 0.3 * h),
                    {"fill": (250, 250, 250)}))
    elif part == "seam":
        det.append(("arc", (x0 - 0.55 * w, y0 + 0.05 * h, x0 + 0.35 * w, y1 - 0.05 * h),
                    {"start": -60, "end": 60, "fill": "white", "width": "lw2"}))
        det.append(("arc", (x1 - 0.35 * w, y0 + 0.05 * h, x1 + 0.55 * w, y1 - 0.05 * h),
                    {"start": 120, "end": 240, "fill": "white", "width": "lw2"}))
    else:  # emblem: a small star in the middle
        r = 0.2 * w
        pts = [(cx + (r if k % 2 == 0 else r * 0.45) * math.cos(-math.pi / 2 + k * math.pi / 5),
                cy + (r if k % 2 == 0 else r * 0.45) * math.sin(-math.pi / 2 + k * math.pi / 5))
               for k in range(10)]
        det.append(("polygon", pts, {"fill": "accent", "outline": "dark", "width": "lw"}))
    return Shape(
        sil=[("ellipse", (x0, y0, x1, y1), "body", True, {})], details=det,
        anchors={"top": (cx, y0 + 0.03 * h, 0.45 * w),
                 "eyes": (cx, cy - 0.15 * h, 0.15 * w, 0.08 * w),
                 "neck": (cx, cy + 0.22 * h, 0.4 * w)})


def _cube(box, part) -> Shape:
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    d = 0.24 * min(w, h)
    fx0, fy0, fx1 = x0, y0 + d, x1 - d
    top = [(fx0, fy0), (fx0 + d, y0), (x1, y0), (fx1, fy0)]
    side = [(fx1, fy0), (x1, y0), (x1, y1 - d), (fx1, y1)]
    sil = [("rectangle", (fx0, fy0, fx1, y1), "body", True, {}),
           ("polygon", top, "light", False, {}), ("polygon", side, "shade", False, {})]
    det = [("line", [(fx0, fy0), (fx1, fy0), (x1, y0)], {"fill": "dark", "width": "lw"}),
           ("line", [(fx1, fy0), (fx1, y1)], {"fill": "dark", "width": "lw"})]
    fcx = (fx0 + fx1) / 2
    if part == "ribbon":
        b, bx, by = 0.07 * w, fcx + d / 2, y0 + d / 2  # band width, bow centre
        det += [("rectangle", (fcx - b, fy0, fcx + b, y1), {"fill": "accent"}),
                ("polygon", [(fcx - b, fy0), (fcx - b + d, y0), (fcx + b + d, y0), (fcx + b, fy0)],
                 {"fill": "accent"}),
                ("ellipse", (bx - 2.2 * b, by - 2 * b, bx, by + b),
                 {"fill": "accent", "outline": "dark", "width": "lw"}),
                ("ellipse", (bx, by - 2 * b, bx + 2.2 * b, by + b),
                 {"fill": "accent", "outline": "dark", "width": "lw"})]
    elif part == "lid":
        det += [("rectangle", (fx0, fy0, fx1, fy0 + 0.16 * h), {"fill": "shade", "outline": "dark",
                                                              "width": "lw"})]
    else:  # clasp
        det += [("rectangle", (fcx - 0.09 * w, fy0 - 0.02 * h, fcx + 0.09 * w, fy0 + 0.17 * h),
                 {"fill": "gold", "outline": "dark", "width": "lw"}),
                ("ellipse", (fcx - 0.03 * w, fy0 + 0.05 * h, fcx + 0.03 * w, fy0 + 0.11 * h),
                 {"fill": "dark"})]
    return Shape(sil=sil, details=det, anchors={
        "top": (fcx + d / 2, y0 + d / 2, 0.45 * w),
        "eyes": (fcx, fy0 + 0.32 * h, 0.14 * w, 0.07 * w),
        "neck": (fcx, fy0 + 0.55 * h, 0.35 * w)})


def _cup(box, part) -> Shape:
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    bw = 0.76 * w
    cx = x0 + bw / 2
    sil = []
    if part == "saucer":
        sil.append(("ellipse", (x0 - 0.06 * w, y1 - 0.1 * h, x0 + bw + 0.06 * w, y1 + 0.05 * h),
                    "light", False, {}))
    hw = "lw4"
    if part == "square":
        sil.append(("rounded_rectangle", (x0 + 0.6 * w, y0 + 0.25 * h, x1, y0 + 0.65 * h), "body",
                    False, {"radius": 0.06 * w, "width": hw}))
    else:
        sil.append(("ellipse", (x0 + 0.55 * w, y0 + 0.22 * h, x1, y0 + 0.68 * h), "body", False,
                    {"width": hw}))
    bottom = y1 - (0.1 * h if part == "saucer" else 0.02 * h)
    sil += [("polygon", [(x0, y0 + 0.1 * h), (x0 + bw, y0 + 0.1 * h), (x0 + bw - 0.09 * w, bottom),
                         (x0 + 0.09 * w, bottom)], "body", True, {}),
            ("ellipse", (x0, y0 + 0.02 * h, x0 + bw, y0 + 0.18 * h), "light", False, {})]
    det = [("ellipse", (x0 + 0.06 * w, y0 + 0.05 * h, x0 + bw - 0.06 * w, y0 + 0.15 * h),
            {"fill": (90, 55, 30), "outline": "dark", "width": "lw"})]
    return Shape(sil=sil, details=det, anchors={
        "top": (cx, y0 + 0.1 * h, 0.6 * w), "eyes": (cx, y0 + 0.4 * h, 0.13 * w, 0.065 * w),
        "neck": (cx, y0 + 0.28 * h, 0.4 * w)})


def _robot(box, part) -> Shape:
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    cx = (x0 + x1) / 2
    hy0, hy1 = y0 + 0.14 * h, y0 + 0.4 * h
    sil = []
    if part == "antenna":
        sil += [("line", [(cx, hy0), (cx, y0 + 0.03 * h)], "shade", False, {"width": "lw2"}),
                ("ellipse", (cx - 0.05 * w, y0, cx + 0.05 * w, y0 + 0.07 * h), "accent", False, {})]
    elif part == "horns":
        for s in (-1, 1):
            tip = (cx + s * 0.22 * w, y0 + 0.02 * h)
            sil += [("line", [(cx + s * 0.12 * w, hy0), tip], "shade", False, {"width": "lw2"}),
                    ("ellipse", (tip[0] - 0.045 * w, tip[1] - 0.03 * h, tip[0] + 0.045 * w,
                                 tip[1] + 0.04 * h), "accent", False, {})]
    sil += [("rectangle", (x0, y0 + 0.47 * h, x0 + 0.13 * w, y0 + 0.72 * h), "shade", False, {}),
            ("rectangle", (x1 - 0.13 * w, y0 + 0.47 * h, x1, y0 + 0.72 * h), "shade", False, {}),
            ("rectangle", (cx - 0.26 * w, y0 + 0.8 * h, cx - 0.06 * w, y1), "shade", False, {}),
            ("rectangle", (cx + 0.06 * w, y0 + 0.8 * h, cx + 0.26 * w, y1), "shade", False, {}),
            ("rectangle", (cx - 0.08 * w, hy1 - 0.01 * h, cx + 0.08 * w, y0 + 0.46 * h), "shade",
             False, {}),
            ("rectangle", (cx - 0.36 * w, y0 + 0.44 * h, cx + 0.36 * w, y0 + 0.82 * h), "body",
             True, {})]
    head = (cx - 0.27 * w, hy0, cx + 0.27 * w, hy1)
    sil.append(("ellipse", head, "body", False, {}) if part == "roundhead" else
               ("rounded_rectangle", head, "body", False, {"radius": 0.05 * w}))
    ey = (hy0 + hy1) / 2 - 0.02 * h
    det = _eyes(cx, ey, 0.11 * w, 0.065 * w)
    det.append(("rectangle", (cx - 0.1 * w, hy1 - 0.07 * h, cx + 0.1 * w, hy1 - 0.04 * h),
                {"fill": "dark"}))
    return Shape(sil=sil, details=det, anchors={
        "top": (cx, hy0, 0.5 * w), "eyes": (cx, ey, 0.11 * w, 0.065 * w),
        "neck": (cx, y0 + 0.47 * h, 0.4 * w)})


def _teddy(box, part) -> Shape:
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    cx = (x0 + x1) / 2
    hy0, hy1 = y0 + 0.12 * h, y0 + 0.52 * h
    sil, det = [], []
    for s in (-1, 1):
        ex = cx + s * 0.2 * w
        if part == "round":
            sil.append(("ellipse", (ex - 0.1 * w, hy0 - 0.06 * h, ex + 0.1 * w, hy0 + 0.1 * h),
                        "body", False, {}))
            det.append(("ellipse", (ex - 0.05 * w, hy0 - 0.02 * h, ex + 0.05 * w, hy0 + 0.06 * h),
                        {"fill": "light"}))
        elif part == "pointy":
            sil.append(("polygon", [(ex - 0.12 * w, hy0 + 0.1 * h), (ex + s * 0.05 * w, y0),
                                    (ex + 0.12 * w, hy0 + 0.1 * h)], "body", False, {}))
        else:  # long ears
            ex = cx + s * 0.13 * w
            sil.append(("ellipse", (ex - 0.07 * w, y0 - 0.14 * h, ex + 0.07 * w, hy0 + 0.12 * h),
                        "body", False, {}))
            det.append(("ellipse", (ex - 0.03 * w, y0 - 0.09 * h, ex + 0.03 * w, hy0 + 0.02 * h),
                        {"fill": "light"}))
    for s in (-1, 1):
        sil.append(("ellipse", (cx + s * 0.43 * w - 0.11 * w, y0 + 0.52 * h, cx + s * 0.43 * w +
                                0.11 * w, y0 + 0.78 * h), "body", False, {}))
        sil.append(("ellipse", (cx + s * 0.2 * w - 0.14 * w, y1 - 0.16 * h, cx + s * 0.2 * w +
                                0.14 * w, y1), "body", False, {}))
    sil.append(("ellipse", (cx - 0.34 * w, y0 + 0.42 * h, cx + 0.34 * w, y1 - 0.04 * h), "body",
                True, {}))
    sil.append(("ellipse", (cx - 0.3 * w, hy0, cx + 0.3 * w, hy1), "body", False, {}))
    ey = hy0 + 0.15 * h
    det += [("ellipse", (cx - 0.13 * w, ey + 0.06 * h, cx + 0.13 * w, hy1 - 0.02 * h),
             {"fill": "light"}),
            ("ellipse", (cx - 0.05 * w, ey + 0.07 * h, cx + 0.05 * w, ey + 0.13 * h),
             {"fill": "black"})]
    for s in (-1, 1):
        det.append(("ellipse", (cx + s * 0.12 * w - 0.04 * w, ey - 0.035 * h,
                                cx + s * 0.12 * w + 0.04 * w, ey + 0.035 * h), {"fill": "black"}))
    return Shape(sil=sil, details=det, anchors={
        "top": (cx, hy0 + 0.02 * h, 0.45 * w), "eyes": (cx, ey, 0.12 * w, 0.06 * w),
        "neck": (cx, hy1, 0.4 * w)})


#: Class name -> geometry function.
GEOMETRY = {"star_toy": _star, "ball": _ball, "cube_box": _cube, "cup": _cup, "robot": _robot,
            "teddy": _teddy}


def _palette(body: str) -> dict:
    b = np.array(COLORS[body], float)
    accent = "yellow" if body not in ("yellow", "orange", "white") else "red"
    return {"body": tuple(int(v) for v in b),
            "shade": tuple(int(v) for v in b * 0.72),
            "light": tuple(int(v) for v in b + (255 - b) * 0.4),
            "dark": OUTLINE, "white": (250, 250, 250), "black": (15, 15, 15),
            "gold": (240, 190, 40), "accent": COLORS[accent]}


def _resolve(kw: dict, pal: dict, c: int) -> dict:
    widths = {"lw": max(2, round(c / 64)), "lw2": max(3, round(c / 40)),
              "lw4": max(5, round(c / 20))}
    out = {}
    for k, v in kw.items():
        if isinstance(v, str):
            v = widths[v] if k == "width" else pal[v]
        elif k == "width":
            v = max(1, round(v))
        elif k == "radius":
            v = round(v)
        out[k] = v
    return out


@lru_cache(maxsize=32)
def pattern_mask(pattern: str, c: int) -> Image.Image:
    """L-mode texture (255 where the pattern colour shows) covering a ``c`` x ``c`` sprite."""
    yy, xx = np.mgrid[0:c, 0:c].astype(np.float32)
    if pattern == "stripes":
        p = c / 9
        m = (yy % p) < p * 0.45
    elif pattern == "checkered":
        p = c / 10
        m = ((xx // p) + (yy // p)) % 2 == 0
    elif pattern == "dots":
        p = c / 8
        shift = ((yy // p) % 2) * p / 2
        m = ((xx + shift) % p - p / 2) ** 2 + (yy % p - p / 2) ** 2 < (0.26 * p) ** 2
    else:
        m = np.zeros((c, c), bool)
    return Image.fromarray(m.astype(np.uint8) * 255, "L")


def body_box(aspect: str, c: int) -> tuple[float, float, float, float]:
    """The body's box inside a ``c`` x ``c`` sprite for the given proportions."""
    w, h = 0.6 * c * ASPECTS[aspect], 0.62 * c
    return (c / 2 - w / 2, 0.93 * c - h, c / 2 + w / 2, 0.93 * c)


def _accessory(d: ImageDraw.ImageDraw, name: str, anchors: dict, body: str, c: int) -> None:
    lw = max(2, round(c / 64))
    if name == "hat":
        x, y, w = anchors["top"]
        w = min(max(w, 0.24 * c), 0.36 * c)
        d.rectangle((x - 0.36 * w, y - 0.28 * c, x + 0.36 * w, y), fill=(25, 25, 30),
                    outline=(110, 110, 120), width=lw)
        d.rectangle((x - 0.36 * w, y - 0.07 * c, x + 0.36 * w, y - 0.03 * c), fill=(200, 30, 40))
        d.rectangle((x - 0.62 * w, y - 0.035 * c, x + 0.62 * w, y + 0.01 * c), fill=(25, 25, 30),
                    outline=(110, 110, 120), width=lw)
    elif name == "crown":
        x, y, w = anchors["top"]
        w = min(max(w, 0.24 * c), 0.36 * c)
        hgt, xs = 0.15 * c, np.linspace(x - w / 2, x + w / 2, 7)
        pts = [(xs[0], y)] + [(px, y - hgt if k % 2 == 0 else y - 0.45 * hgt)
                              for k, px in enumerate(xs)] + [(xs[-1], y)]
        d.polygon(pts, fill=(245, 195, 35), outline=(120, 80, 10), width=lw)
        for px in xs[::2]:
            r = 0.02 * c
            d.ellipse((px - r, y - hgt - r, px + r, y - hgt + r), fill=(210, 30, 60))
    elif name == "sunglasses":
        x, y, dx, r = anchors["eyes"]
        r = max(r * 1.45, 0.045 * c)
        for ex in (x - dx, x + dx):
            d.ellipse((ex - r, y - r * 0.8, ex + r, y + r * 0.8), fill=(10, 10, 20),
                      outline=(150, 150, 160), width=lw)
        d.line([(x - dx + r, y - r * 0.3), (x + dx - r, y - r * 0.3)], fill=(150, 150, 160),
               width=lw * 2)
    elif name == "bow_tie":
        x, y, _ = anchors["neck"]
        s = 0.08 * c
        col = (40, 90, 210) if body in ("red", "pink", "orange", "purple") else (210, 30, 40)
        d.polygon([(x, y), (x - 1.6 * s, y - s), (x - 1.6 * s, y + s)], fill=col, outline=OUTLINE,
                  width=lw)
        d.polygon([(x, y), (x + 1.6 * s, y - s), (x + 1.6 * s, y + s)], fill=col, outline=OUTLINE,
                  width=lw)
        d.ellipse((x - 0.4 * s, y - 0.4 * s, x + 0.4 * s, y + 0.4 * s), fill=col, outline=OUTLINE,
                  width=lw)
    else:
        raise InvalidValueError(f"unknown accessory {name!r}")


def _dilate(mask: Image.Image, r: int) -> Image.Image:
    """Square dilation of an L mask by ``r`` pixels (separable running maximum)."""
    a = np.asarray(mask)
    out = a.copy()
    for axis in (0, 1):
        src = out.copy()
        for k in range(1, r + 1):
            for sh in (k, -k):
                np.maximum(out, np.roll(src, sh, axis=axis), out=out)
    return Image.fromarray(out, "L")


def sprite(class_name: str, body_color: str, pattern: str, pattern_color: str | None, part: str,
           aspect: str, accessory: str | None, c: int) -> Image.Image:
    """The subject drawn into a transparent ``c`` x ``c`` RGBA image."""
    box = body_box(aspect, c)
    shape = GEOMETRY[class_name](box, part)
    pal = _palette(body_color)
    img = Image.new("RGBA", (c, c), (0, 0, 0, 0))
    sil, pmask = Image.new("L", (c, c), 0), Image.new("L", (c, c), 0)
    d, ds, dp = ImageDraw.Draw(img), ImageDraw.Draw(sil), ImageDraw.Draw(pmask)
    x0, _, x1, y1 = box
    d.ellipse((x0 - 0.02 * c, y1 - 0.025 * c, x1 + 0.02 * c, y1 + 0.035 * c), fill=(0, 0, 0, 70))
    for method, xy, token, patterned, kw in shape.sil:
        kw = _resolve(kw, pal, c)
        col = pal[token] if isinstance(token, str) else token
        key = "outline" if "width" in kw and method != "line" else "fill"
        getattr(d, method)(xy, **{key: col}, **kw)
        getattr(ds, method)(xy, **{key: 255}, **kw)
        # a later non-patterned piece hides the pattern of earlier ones
        getattr(dp, method)(xy, **{key: 255 if patterned else 0}, **kw)
    if pattern != "plain":
        mask = ImageChops.multiply(pmask, pattern_mask(pattern, c))
        img.paste(COLORS[pattern_color] + (255,), (0, 0, c, c), mask)
    edge = ImageChops.subtract(_dilate(sil, max(1, round(c / 85))), sil)
    img.paste(OUTLINE + (255,), (0, 0, c, c), edge)
    for method, xy, kw in shape.details:
        getattr(d, method)(xy, **_resolve(kw, pal, c))
    if accessory:
        _accessory(d, accessory, shape.anchors, body_color, c)
    return img


@lru_cache(maxsize=2048)
def sprite_2x(class_name: str, body_color: str, pattern: str, pattern_color: str | None,
              part: str, aspect: str, accessory: str | None, size: int) -> Image.Image:
    """The sprite for output size ``size``: drawn at 4x, LANCZOS-reduced to 2x and cached
    (2x keeps the cache small while the final resize still antialiases; do not modify)."""
    big = sprite(class_name, body_color, pattern, pattern_color, part, aspect, accessory, 4 * size)
    return big.resize((2 * size, 2 * size), Image.LANCZOS)
