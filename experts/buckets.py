"""Aspect-ratio buckets of expert training (``--aspect-ratio-buckets``), as kohya's trainers,
SimpleTuner and diffusers' newest DreamBooth scripts (``train_dreambooth_lora_flux2.py``'s
``--use_aspect_ratio_buckets`` / ``--aspect_ratio_buckets``) bucket photos.

Each photo trains at the bucket whose aspect ratio is nearest its own (diffusers'
``find_nearest_bucket``: the least ``|h * bucket_w - w * bucket_h|``); it is resized to cover the
bucket (the smaller scale that makes both sides at least the bucket's) and cropped to it (centre,
or a random crop per step with ``--random-crop``). The buckets are either

- ``auto``: diffusers' ladder (``generate_aspect_ratio_buckets``) of aspect ratios 1:1, 4:5, 5:4,
  2:3, 3:2, 3:4, 4:3, 9:16, 16:9, 1:2, 2:1, each at about ``resolution ** 2`` pixels, every side a
  multiple of :data:`BUCKET_MULTIPLE`; or
- an explicit list ``"H,W;H,W;..."`` (pixels, diffusers' format), each side a multiple of
  :data:`BUCKET_MULTIPLE`.

Unlike diffusers' on-the-fly ladder, the ladder is not shrunk for small photos: a photo smaller
than its bucket is upscaled with a warning, as without buckets.
"""

from __future__ import annotations

import logging
import re

from PIL import Image

from suti.errors import InputError

log = logging.getLogger(__name__)

#: Every bucket side is a multiple of this many pixels (kohya's ``bucket_reso_steps`` default):
#: SD 1.x/2.x latents (1/8) pass three 2x down-samplings, SDXL's two, FLUX packs 2x2 patches.
BUCKET_MULTIPLE = 64

#: (width, height) ratios of the ``auto`` ladder (diffusers' ``_DEFAULT_BUCKET_ASPECT_RATIOS``).
ASPECT_RATIOS = ((1, 1), (4, 5), (5, 4), (2, 3), (3, 2), (3, 4), (4, 3), (9, 16), (16, 9), (1, 2), (2, 1))

#: The resize filters of ``--image-interpolation-mode`` (diffusers' names, lower case, of the
#: ``torchvision.transforms.InterpolationMode`` values that PIL has) -> PIL's resampling filter.
INTERPOLATION_MODES = {
    "lanczos": Image.Resampling.LANCZOS,
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "nearest": Image.Resampling.NEAREST,
}


def resample_filter(mode: str) -> Image.Resampling:
    """PIL's filter of an ``--image-interpolation-mode`` name.

    Raises:
        InputError: an unknown name (the known ones listed).
    """
    if mode not in INTERPOLATION_MODES:
        raise InputError(f"--image-interpolation-mode: unknown filter {mode!r} ({', '.join(INTERPOLATION_MODES)})")
    return INTERPOLATION_MODES[mode]


def bucket_ladder(resolution: int, multiple: int = BUCKET_MULTIPLE) -> list[tuple[int, int]]:
    """The ``auto`` buckets, ``[(height, width)]`` in pixels: each of :data:`ASPECT_RATIOS` at
    about ``resolution ** 2`` pixels, sides rounded to ``multiple`` (at least ``multiple``),
    duplicates dropped (diffusers' ``generate_aspect_ratio_buckets``). The first is square."""
    buckets: list[tuple[int, int]] = []
    for rw, rh in ASPECT_RATIOS:
        aspect = rw / rh
        h = (resolution * resolution / aspect) ** 0.5
        size = (max(multiple, round(h / multiple) * multiple), max(multiple, round(h * aspect / multiple) * multiple))
        if size not in buckets:
            buckets.append(size)
    return buckets


def parse_buckets(text: str, flag: str = "--aspect-ratio-buckets") -> list[tuple[int, int]]:
    """``"H,W;H,W"`` (diffusers' ``--aspect_ratio_buckets`` format) -> ``[(H, W)]``.

    Raises:
        InputError: a malformed pair, or a side that is not a positive multiple of
            :data:`BUCKET_MULTIPLE` (named with ``flag``).
    """
    buckets = []
    for pair in text.strip().split(";"):
        match = re.fullmatch(r"\s*(\d+)\s*,\s*(\d+)\s*", pair)
        if not match:
            raise InputError(f"{flag}: {pair.strip()!r} is not a bucket HEIGHT,WIDTH (e.g. \"512,512;576,448;448,576\")")
        size = (int(match.group(1)), int(match.group(2)))
        if min(size) < BUCKET_MULTIPLE or any(side % BUCKET_MULTIPLE for side in size) or max(size) > 8192:
            raise InputError(f"{flag}: bucket {size[0]},{size[1]}: each side must be a multiple of {BUCKET_MULTIPLE} from {BUCKET_MULTIPLE} to 8192 px")
        if size not in buckets:
            buckets.append(size)
    return buckets


def training_buckets(spec: str | None, resolution: int) -> list[tuple[int, int]]:
    """The buckets of a run: ``[(R, R)]`` without bucketing (``spec`` ``None``), the ``auto``
    ladder at ``resolution`` (:func:`bucket_ladder`), or an explicit list (:func:`parse_buckets`).

    Raises:
        InputError: a malformed list, or ``auto`` at a resolution below ``2 * BUCKET_MULTIPLE``
            (every bucket would be the same square).
    """
    if spec is None:
        return [(resolution, resolution)]
    if spec == "auto":
        if resolution < 2 * BUCKET_MULTIPLE:
            raise InputError(f"--aspect-ratio-buckets needs --resolution of at least {2 * BUCKET_MULTIPLE} "
                             f"(bucket sides are multiples of {BUCKET_MULTIPLE} px); got {resolution}")
        return bucket_ladder(resolution)
    return parse_buckets(spec)


def nearest_bucket(height: int, width: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket of a ``height`` x ``width`` photo: the least ``|height * bw - width * bh|``
    (diffusers' ``find_nearest_bucket``; a tie goes to the later bucket, as there)."""
    best, best_metric = buckets[0], float("inf")
    for bh, bw in buckets:
        metric = abs(height * bw - width * bh)
        if metric <= best_metric:
            best, best_metric = (bh, bw), metric
    return best


def cover(img: Image.Image, size: tuple[int, int], resample: Image.Resampling, *, name: str | None = None) -> Image.Image:
    """``img`` resized (aspect kept) to the smallest size covering ``size = (height, width)``:
    ``round(side * max(bh / h, bw / w))`` (diffusers' bucket ``train_transform``). An upscale
    is warned about, naming the file."""
    bh, bw = size
    scale = max(bh / img.height, bw / img.width)
    new = (max(bw, round(img.width * scale)), max(bh, round(img.height * scale)))  # PIL: (width, height)
    if scale > 1 and name is not None:
        log.warning("%s: %dx%d is smaller than its bucket %dx%d (width x height); upscaling", name, img.width, img.height, bw, bh)
    return img if new == img.size else img.resize(new, resample)


def center_crop_box(height: int, width: int, size: tuple[int, int]) -> tuple[int, int]:
    """``(top, left)`` of the centre ``size`` crop of a ``height`` x ``width`` image
    (``torchvision.transforms.CenterCrop``: ``int(round((H - h) / 2))``)."""
    return int(round((height - size[0]) / 2.0)), int(round((width - size[1]) / 2.0))
