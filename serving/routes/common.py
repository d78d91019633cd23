"""What the generation routes share: form fields with the app's limits, the images response
and :func:`run_generation`, which turns the generation service's refusals into HTTP errors."""

import secrets
import time
from typing import Annotated, Any

from fastapi import Form, Path, Query
from fastapi.responses import JSONResponse, Response

from serving.app import Runtime
from serving.dependencies import queue_full
from serving.generation import Admission, DeadlineExceeded, ModelUnavailable, QueueFull, Result
from serving.limits import ApiError
from serving.settings import Settings

MAX_SEED = 2**63 - 1
JOB_ID_PATTERN = r"^[0-9a-f]{32}$"
JobId = Annotated[str, Path(pattern=JOB_ID_PATTERN, description="job id (32 hex digits)")]
IMAGES_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "One image as ``image/png``, or several as JSON ``{\"images\": [base64 PNG, ...], \"seed\": s}``; with ``?expires=``, "
        "JSON ``{\"urls\": [...], \"expires_at\": t, \"seed\": s}``: URLs that need no API key until ``expires_at`` (Unix seconds).",
        "content": {
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "application/json": {"schema": {"type": "object", "properties": {"images": {"type": "array", "items": {"type": "string", "format": "byte"}}, "urls": {"type": "array", "items": {"type": "string"}},
                                                                  "expires_at": {"type": "integer"}, "seed": {"type": "integer"}}}},
        },
    },
    429: {"description": "the generation queue is full (see ``Retry-After``)"},
    504: {"description": "the request did not finish within the server's timeout"},
}


def prompt_form(settings: Settings, description: str | None = None) -> Any:
    """The ``prompt`` field: 1 to ``max_prompt_chars`` characters."""
    return Form(min_length=1, max_length=settings.max_prompt_chars, description=description)


def steps_form(settings: Settings) -> Any:
    """The ``steps`` field: 1 to ``max_steps`` denoising steps."""
    return Form(ge=1, le=settings.max_steps, description=f"denoising steps (default {settings.default_steps})")


def num_images_form(settings: Settings) -> Any:
    """The ``num_images`` field: 1 to ``max_num_images``."""
    return Form(ge=1, le=settings.max_num_images, description="images to generate")


def seed_form() -> Any:
    """The ``seed`` field: 0 to 2**63 - 1."""
    return Form(ge=0, le=MAX_SEED, description="image i uses seed + i (default: random)")


def expires_query(settings: Settings) -> Any:
    """The ``expires`` query parameter: answer URLs valid this many seconds (1 to ``max_url_expires_s``)."""
    return Query(ge=1, le=settings.max_url_expires_s, description="answer the images as signed URLs valid this many seconds, instead of inline PNGs")


async def run_generation(rt: Runtime, work, admission: Admission | None = None) -> Result:
    """Run ``work`` on the generation service (in ``admission``'s place, else one taken now):
    429 when the queue is full, 504 past the request timeout, 503 when the model cannot load."""
    try:
        return await rt.generation.submit(work, admission)
    except QueueFull as exc:
        raise queue_full(rt, exc) from None
    except DeadlineExceeded:
        rt.metrics.inc("suti_generate_timeouts_total", help="Generation requests that ran past the timeout.")
        raise ApiError(504, f"generation did not finish within {rt.settings.request_timeout:g} s") from None
    except ModelUnavailable as exc:
        raise ApiError(503, str(exc)) from None


def images_response(rt: Runtime, result: Result, expires: int | None = None, base_url: str | None = None) -> Response:
    """One image as ``image/png``, several as JSON; ``X-Seed``, ``X-Generation-Seconds`` and,
    when the prompt was cut to what the text encoder reads, ``X-Prompt-Truncated``. With
    ``expires`` (seconds): the images are stored and answered as signed URLs (under
    ``base_url``) valid that long, JSON ``{"urls", "expires_at", "seed"}``."""
    rt.metrics.inc("suti_generated_images_total", len(result.images), help="Images generated.")
    headers = {"X-Seed": str(result.seed), "X-Generation-Seconds": f"{result.seconds:.3f}"}
    if result.prompt_truncated:  # the prompt was longer than the text encoder reads
        headers["X-Prompt-Truncated"] = result.prompt_truncated
    if expires is not None:
        expires_at = int(time.time()) + expires
        urls = []
        for png in result.images:
            name = f"results/{secrets.token_hex(16)}-{expires_at}.png"
            (rt.settings.data_dir / name).write_bytes(png)
            urls.append(rt.file_url(name, expires_at, base_url))
        return JSONResponse({"urls": urls, "expires_at": expires_at, "seed": result.seed}, headers=headers)
    if len(result.images) == 1:
        return Response(result.images[0], media_type="image/png", headers=headers)
    return JSONResponse({"images": result.b64(), "seed": result.seed}, headers=headers)
