"""Makers of bad and unusual image files for validation tests."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

from PIL import Image


def png_bomb(path: Path, width: int = 100_000, height: int = 100_000) -> Path:
    """A tiny PNG whose header claims ``width x height`` pixels (a decompression bomb)."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    # IHDR chunk: length(4) 'IHDR'(4) width(4) height(4) ... crc(4), starting at byte 8
    data[16:24] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF
    data[29:33] = struct.pack(">I", crc)
    path.write_bytes(bytes(data))
    return path


def truncated_jpeg(path: Path, size: int = 64) -> Path:
    """A JPEG cut in half."""
    buf = io.BytesIO()
    Image.effect_noise((size, size), 50).convert("RGB").save(buf, format="JPEG", quality=95)
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


def exif_rotated_jpeg(path: Path, width: int = 60, height: int = 40) -> Path:
    """A landscape JPEG whose EXIF orientation (6) says: rotate 90 degrees to display."""
    img = Image.new("RGB", (width, height), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(path, format="JPEG", exif=exif.tobytes())
    return path
