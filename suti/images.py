"""Image I/O and validation shared by every stage (experts, mining, apprentice, serving).

Every image a user hands us goes through :func:`load_image`: it names the file in every error,
refuses empty, truncated, non-image and decompression-bomb files, honours EXIF orientation and
converts grayscale, palette, RGBA, CMYK and 16-bit images to 8-bit RGB.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from suti.errors import InputError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
# Files allowed beside instance images (captions, metadata); they are not images.
SIDECAR_EXTENSIONS = (".txt", ".json", ".yaml", ".yml", ".md", ".caption")
# Above this many pixels an image is treated as a decompression bomb (about 8k x 8k).
MAX_IMAGE_PIXELS = 64_000_000


def _to_rgb(img: Image.Image, name: str = "image") -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (alpha composited on white), each in its intended range:
    16-bit modes span 0-65535; a float image (mode ``F``) spans 0-1 when its values lie there,
    else 0-255 or 0-65535; a 32-bit integer image (mode ``I``) 0-255 or 0-65535.

    Raises:
        InputError: a float or integer image whose values fit none of those ranges (negative,
            NaN, above 65535), or a mode that has no RGB conversion (``LAB``, ``HSV``...), naming it.
    """
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = _intended_max(arr, img.mode, name)
        arr = np.clip(arr / hi * 255.0, 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, mode="L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    try:
        return img.convert("RGB")
    except ValueError as exc:
        raise InputError(f"{name}: images of mode {img.mode} cannot be read as RGB ({exc}); save it as RGB") from None


def _intended_max(arr: np.ndarray, mode: str, name: str) -> float:
    """The value that means white in a 16-bit, 32-bit integer or float image."""
    if mode.startswith("I;16"):
        return 65535.0
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0 or hi > 65535:
        raise InputError(f"{name}: a mode-{mode} image with values from {lo:g} to {hi:g} fits no image range (0-1, 0-255 or 0-65535)")
    if mode == "F" and hi <= 1.0:
        return 1.0
    return 255.0 if hi <= 255 else 65535.0


def decode_image(data: bytes, name: str, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode and validate image bytes; ``name`` (a path or form field) appears in errors.

    Returns an 8-bit RGB image with EXIF orientation applied. Raises :class:`InputError` for
    empty, non-image, truncated or oversized (decompression bomb) data.
    """
    if len(data) == 0:
        raise InputError(f"{name}: the file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as probe:
                width, height = probe.size
                if width * height > max_pixels:
                    raise InputError(
                        f"{name}: {width}x{height} = {width * height} pixels exceeds the limit of "
                        f"{max_pixels} (possible decompression bomb)"
                    )
                probe.verify()
            img = Image.open(io.BytesIO(data))
            img.load()
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputError(f"{name}: rejected as a decompression bomb ({exc})") from None
    except UnidentifiedImageError:
        raise InputError(f"{name}: not a readable image (unknown or corrupt format)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"{name}: corrupt or truncated image ({exc})") from None
    if img.width < 1 or img.height < 1:
        raise InputError(f"{name}: image has no pixels")
    img = ImageOps.exif_transpose(img)
    return _to_rgb(img, name)


def load_image(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Load and validate one image file as 8-bit RGB (see :func:`decode_image`)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such image file")
    return decode_image(path.read_bytes(), str(path), max_pixels=max_pixels)


def list_image_files(folder: str | Path) -> list[Path]:
    """Return the image files of a folder, sorted by name.

    Hidden files, sub-folders and caption/metadata sidecars are skipped; any other file is treated
    as an image (and so fails validation later if it is not one). Raises :class:`InputError` if
    the folder is missing, holds no image, or holds a broken link (a photo the user meant but
    that cannot be read: never dropped without a word).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder of images")
    files = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_symlink() and not path.exists():
            raise InputError(f"{path}: a broken link (to {os.readlink(path)}); remove it or restore its target")
        if not path.is_file():
            continue
        if path.suffix.lower() in SIDECAR_EXTENSIONS:
            continue
        files.append(path)
    if not files:
        raise InputError(f"{folder}: the folder contains no images")
    return files


def load_image_folder(folder: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> list[Image.Image]:
    """Validate and load every image of a folder; the first bad file stops with its name."""
    return [load_image(path, max_pixels=max_pixels) for path in list_image_files(folder)]


#: What :func:`fit_square` has already warned about: (name, resolution), name ``None`` for unnamed images.
_UPSCALE_WARNED: set[tuple] = set()


def fit_square(img: Image.Image, resolution: int, *, name: str | None = None) -> Image.Image:
    """Centre-crop to a square and resize to ``resolution`` px (bicubic).

    An image smaller than ``resolution`` is upscaled with a warning: once for each named file
    (``name``: the path, as the experts' photo loaders pass it), and once in all for unnamed
    images (training shards, demonstrations, of any sizes), per process (each data-loader worker
    and rank is one), so a data stream of small images logs one line rather than one per image.
    """
    side = min(img.size)
    if side < resolution:
        key = (name, resolution)
        if key not in _UPSCALE_WARNED:
            if len(_UPSCALE_WARNED) > 10_000:  # bounded: a stream of many named files
                _UPSCALE_WARNED.clear()
            _UPSCALE_WARNED.add(key)
            if name is None:
                log.warning("images smaller than the resolution %d (this one %dx%d) are upscaled (said once)", resolution, *img.size)
            else:
                log.warning("%s: %dx%d is smaller than the resolution %d; upscaling", name, *img.size, resolution)
    left = (img.width - side) // 2
    top = (img.height - side) // 2
    img = img.crop((left, top, left + side, top + side))
    if side != resolution:
        img = img.resize((resolution, resolution), Image.Resampling.BICUBIC)
    return img


def to_tensor(img: Image.Image):
    """PIL RGB -> float tensor (3, H, W) in [-1, 1]."""
    import torch

    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0  # (H, W, 3)
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def to_pil(x) -> Image.Image:
    """Float tensor (3, H, W) in [-1, 1] -> PIL RGB."""
    arr = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr, mode="RGB")


def image_bytes(image: Image.Image, format: str = "PNG", **params) -> bytes:
    """Encode ``image`` (``PNG``, ``JPEG``, ``WEBP``...) to bytes."""
    buf = io.BytesIO()
    image.save(buf, format=format, **params)
    return buf.getvalue()


def save_image_atomic(image: Image.Image, path: str | Path, format: str | None = None, **params) -> Path:
    """Write ``image`` to ``path`` atomically: encode in memory, then a temporary file and a
    rename (:func:`suti.storage.write_bytes`), so a killed run or a full disk never leaves a
    cut-short image under the final name. ``format`` defaults to the one of the extension.
    ``path`` may be an object-store URI. Returns ``path``.
    """
    from suti import storage

    fmt = format or Image.registered_extensions().get(Path(str(path)).suffix.lower())
    if fmt is None:
        raise InputError(f"{path}: unknown image file extension (use .png, .jpg or .webp)")
    storage.write_bytes(path, image_bytes(image, fmt, **params))
    return Path(path) if "://" not in str(path) else path


def load_cached_image(path: str | Path) -> Image.Image | None:
    """A previously generated output image, or ``None`` (with a warning naming it) when it is
    missing or does not decode: a cut-short file from an older, non-atomic run, a full disk or
    a killed process. The caller regenerates ``None``s."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return decode_image(path.read_bytes(), str(path))
    except (InputError, OSError) as exc:
        log.warning("%s: cached output does not decode (%s); regenerating it", path, exc)
        return None
