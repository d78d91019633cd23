"""Request limits: body size (ASGI middleware), uploaded images (count, bytes, pixels, validity),
prompts and class nouns. Every refusal is an :class:`ApiError` with a message naming the field."""

from __future__ import annotations

import io
import re
import warnings

from PIL import Image

from suti.errors import InputError
from suti.images import decode_image

FORM_OVERHEAD = 1024 * 1024  # multipart headers and text fields beside the files
CLASS_NOUN = re.compile(r"[\w'\- ]+")
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


class ApiError(Exception):
    """An error answered as ``{"error": message}`` with an HTTP status."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


class BodyLimitMiddleware:
    """Refuse request bodies larger than ``limit`` bytes with 413, before or while reading them."""

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > self.limit
            except ValueError:
                too_big = False
            if too_big:
                return await self._refuse(send)
        state = {"read": 0, "exceeded": False, "started": False}

        async def limited_receive():
            message = await receive()
            if message["type"] == "http.request":
                state["read"] += len(message.get("body", b""))
                if state["read"] > self.limit:
                    state["exceeded"] = True
                    raise ApiError(413, self._message())
            return message

        async def guarded_send(message):
            if state["exceeded"] and not state["started"]:
                if message["type"] == "http.response.start":  # replace whatever the app answered
                    state["started"] = True
                    await self._refuse(send)
                return
            if state["exceeded"]:
                return
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except ApiError:
            if not state["started"]:
                await self._refuse(send)

    def _message(self) -> str:
        return f"request body larger than the limit of {self.limit} bytes"

    async def _refuse(self, send) -> None:
        import json

        body = json.dumps({"error": self._message()}).encode()
        await send({"type": "http.response.start", "status": 413, "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


async def read_uploads(files, field: str, lo: int, hi: int, settings) -> list[bytes]:
    """Check the count and sizes of uploaded files and read them (at most the limit + 1 byte each)."""
    files = list(files or [])
    if not lo <= len(files) <= hi:
        raise ApiError(400, f"{field}: give {lo} to {hi} images (got {len(files)})")
    datas, total = [], 0
    for i, upload in enumerate(files):
        data = await upload.read(settings.max_file_bytes + 1)
        if len(data) > settings.max_file_bytes:
            raise ApiError(413, f"{field}[{i}]: file larger than the limit of {settings.max_file_bytes} bytes")
        total += len(data)
        if total > settings.max_total_bytes:
            raise ApiError(413, f"{field}: files larger than the total limit of {settings.max_total_bytes} bytes")
        datas.append(data)
    return datas


def header_size(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` from an image's header, without decoding its pixels; None when PIL
    cannot even open it (:func:`decode_uploads` then says why)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as probe:
                return probe.size
    except Exception:  # noqa: BLE001 - unreadable, bomb or truncated: decode_image names the reason
        return None


def check_pixels(datas: list[bytes], field: str, max_pixels: int, max_request_pixels: int) -> int:
    """Refuse uploads whose decoded size would be too large, reading only their headers.

    One image above ``max_pixels``: 400 (as :func:`suti.images.decode_image` says). All images of
    the request together above ``max_request_pixels``: 413. Returns the total pixel count.
    """
    total = 0
    for i, data in enumerate(datas):
        size = header_size(data)
        if size is None:
            continue
        width, height = size
        if width * height > max_pixels:
            raise ApiError(400, f"{field}[{i}]: {width}x{height} = {width * height} pixels exceeds the limit of {max_pixels} (possible decompression bomb)")
        total += width * height
    if total > max_request_pixels:
        raise ApiError(413, f"{field}: {len(datas)} images of {total:,} pixels in all exceed the limit of {max_request_pixels:,} pixels per request; send smaller photos")
    return total


def decode_uploads(datas: list[bytes], field: str, max_pixels: int, max_side: int | None = None) -> list[Image.Image]:
    """Validate every upload with :func:`suti.images.decode_image` (all before any is used).

    Images are decoded one at a time; with ``max_side`` each is reduced at once so that its
    shorter side is at most ``max_side`` pixels (only one full-size image is held at a time).
    """
    images = []
    for i, data in enumerate(datas):
        try:
            image = decode_image(data, f"{field}[{i}]", max_pixels=max_pixels)
        except InputError as exc:
            raise ApiError(400, str(exc)) from None
        if max_side is not None:
            image = shrink(image, max_side)
        images.append(image)
    return images


def shrink(image: Image.Image, max_side: int) -> Image.Image:
    """``image`` with its shorter side reduced to ``max_side`` (LANCZOS); unchanged if smaller."""
    if min(image.size) <= max_side:
        return image
    scale = max_side / min(image.size)
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.Resampling.LANCZOS)


def clean_text(value: str, field: str, max_chars: int, *, required: bool = True) -> str:
    """Strip a text field; refuse control characters, overlong or (if required) empty values."""
    value = (value or "").strip()
    if required and not value:
        raise ApiError(400, f"{field}: must not be empty")
    if len(value) > max_chars:
        raise ApiError(400, f"{field}: longer than {max_chars} characters (got {len(value)})")
    if CONTROL.search(value):
        raise ApiError(400, f"{field}: contains control characters")
    return value


def clean_class_noun(value: str, max_chars: int) -> str:
    value = clean_text(value, "class_noun", max_chars)
    if not CLASS_NOUN.fullmatch(value):
        raise ApiError(400, "class_noun: use letters, digits, spaces, hyphens and apostrophes only")
    return value


def stored_png(image: Image.Image, max_side: int) -> bytes:
    """A validated upload as PNG (no metadata), its shorter side reduced to ``max_side``."""
    image = shrink(image, max_side)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
