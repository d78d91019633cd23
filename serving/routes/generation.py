"""``POST /v1/generate``: images of the subject of 1-8 photos from the apprentice, no tuning.

The form is checked first (422/400), then the request takes a place in the generation queue
(429), then its photos are read (400/413), checked from their headers (400/413), decoded (400)
and the work is queued on the generation service (504/503).
"""

import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from starlette.concurrency import run_in_threadpool

from serving.app import Runtime
from serving.dependencies import Admitted, RuntimeDep, function_scoped, require_key, with_generation_place
from serving.limits import ApiError, check_pixels, clean_text, read_uploads
from serving.routes.common import IMAGES_RESPONSE, expires_query, images_response, num_images_form, prompt_form, run_generation, seed_form, steps_form
from serving.settings import Settings


@dataclass
class GenerateForm:
    """The checked fields of one ``POST /v1/generate`` (prompt cleaned; photos not read yet)."""

    images: list[UploadFile]
    prompt: str
    captions: list[str] | None
    num_images: int
    steps: int | None
    guidance_scale: float | None
    demo_guidance_scale: float | None
    seed: int | None


def generate_form(settings: Settings) -> Callable[..., Awaitable[GenerateForm]]:
    """The dependency reading ``POST /v1/generate``'s form with the limits of ``settings``:
    422 for a field out of its bounds, 400 for a prompt blank or with control characters."""

    async def read_generate_form(
        images: Annotated[list[UploadFile], File(description=f"1-{settings.max_demo_images} photos of the subject (repeat the field)")],
        prompt: Annotated[str, prompt_form(settings)],
        captions: Annotated[list[str] | None, Form(description="one caption per photo (optional; repeat the field)")] = None,
        num_images: Annotated[int, num_images_form(settings)] = 1,
        steps: Annotated[int | None, steps_form(settings)] = None,
        guidance_scale: Annotated[float | None, Form(ge=0, le=50, allow_inf_nan=False, description="text guidance")] = None,
        demo_guidance_scale: Annotated[float | None, Form(ge=0, le=50, allow_inf_nan=False, description="demonstration guidance")] = None,
        seed: Annotated[int | None, seed_form()] = None,
    ) -> GenerateForm:
        prompt = clean_text(prompt, "prompt", settings.max_prompt_chars)
        return GenerateForm(images, prompt, captions, num_images, steps, guidance_scale, demo_guidance_scale, seed)

    return read_generate_form


async def apprentice_work(rt: Runtime, form: GenerateForm):
    """The apprentice's work for ``form``: its photos read (400 for a count outside
    1-``max_demo_images``, 413 over the byte limits), its captions matched to them (400), their
    pixels checked from the headers (400 for one too large, 413 for all together) and decoded
    (400 for an unreadable photo)."""
    settings = rt.settings
    datas = await read_uploads(form.images, "images", 1, settings.max_demo_images, settings)
    captions = form.captions
    if captions:
        if len(captions) != len(datas):
            raise ApiError(400, f"captions: {len(captions)} captions for {len(datas)} images")
        captions = [clean_text(c, f"captions[{i}]", settings.max_prompt_chars, required=False) for i, c in enumerate(captions)]
    check_pixels(datas, "images", settings.max_image_pixels, settings.max_request_pixels)  # headers only
    pictures = await run_in_threadpool(rt.decode, datas, "images")
    del datas
    seed = secrets.randbelow(2**31) if form.seed is None else form.seed
    return rt.generation.apprentice_work(
        pictures, captions or None, form.prompt, form.num_images, form.steps or settings.default_steps,
        settings.apprentice_guidance_scale if form.guidance_scale is None else form.guidance_scale,
        settings.apprentice_demo_guidance_scale if form.demo_guidance_scale is None else form.demo_guidance_scale, seed,
    )


def generation_router(settings: Settings) -> APIRouter:
    """``POST /v1/generate`` with the limits of ``settings``, behind the API key."""
    router = APIRouter(prefix="/v1", dependencies=[Depends(require_key)])
    place = function_scoped(with_generation_place(generate_form(settings)))

    @router.post("/generate", responses=IMAGES_RESPONSE, summary="Generate images of the subject of 1-8 photos (apprentice, no tuning)")
    async def generate(rt: RuntimeDep, admitted: Annotated[Admitted[GenerateForm], place], request: Request,
                       expires: Annotated[int | None, expires_query(settings)] = None):
        """
        \f
        Images of the subject of the uploaded photos for ``prompt`` (one PNG, or JSON with
        several), seeded by ``seed`` (else a random one; ``X-Seed`` says which); with
        ``?expires=SECONDS``, JSON ``{"urls", "expires_at", "seed"}`` of signed URLs instead.

        Errors: 401 without the API key; 415 for a body that is not a form; 422 for a field out
        of bounds (400 when only blank); 400 for a blank prompt, a wrong photo or caption count
        or an unreadable photo; 413 over the byte or pixel limits; 429 when the generation queue
        is full (before any photo is read); 503 when the apprentice cannot load; 504 past the
        request timeout.
        """
        work = await apprentice_work(rt, admitted.form)
        return images_response(rt, await run_generation(rt, work, admitted.admission), expires, str(request.base_url))

    return router
