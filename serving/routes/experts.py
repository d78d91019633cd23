"""``/v1/experts``: DreamBooth expert jobs (start, list, status, cancel or delete) and
generation with a trained expert.

Starting a job checks the form (422/400), then takes a place among the queued jobs (429), then
reads, checks and decodes the photos (400/413), stores them as PNG and queues the job row (202).
"""

import secrets
import shutil
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, File, Form, Query, UploadFile
from fastapi.responses import JSONResponse
from PIL import Image
from starlette.concurrency import run_in_threadpool

from serving.app import Runtime
from serving.dependencies import RuntimeDep, function_scoped, require_key, with_job_place
from serving.generation import forget_expert
from serving.jobs import remove_job_files
from serving.limits import ApiError, check_pixels, clean_class_noun, clean_text, read_uploads, stored_png
from serving.routes.common import IMAGES_RESPONSE, JobId, images_response, num_images_form, prompt_form, run_generation, seed_form, steps_form
from serving.settings import Settings
from serving.store import new_job_id

JobState = Literal["queued", "running", "done", "failed", "cancelled"]


def job_view(row: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """The public view of a job row (no paths, tokens or process ids)."""
    view = {
        "id": row["id"],
        "status": row["state"],
        "progress": round(float(row["progress"] or 0.0), 4),
        "phase": row["phase"],
        "error": row["error"],
        "class_noun": row["class_noun"],
        "recipe": row["recipe"],
        "steps": row["steps"],
        "attempts": row["attempts"],
        "created_at": row["created_at"],
        "started_at": row["started_at"],
        "finished_at": row["finished_at"],
    }
    if row["state"] == "done":
        from experts.expert import ExpertInfo

        try:
            info = ExpertInfo.read(settings.experts_dir / row["id"])
            view.update(identifier=info.identifier, instance_prompt=info.instance_prompt, base_model=info.base_model, train_seconds=info.train_seconds)
        except Exception:  # noqa: BLE001 - the expert folder went missing
            view["error"] = "the expert files are missing"
    return view


def job_or_404(rt: Runtime, job_id: str) -> dict[str, Any]:
    """The job row ``job_id``; 404 when there is none."""
    row = rt.store.get(job_id)
    if row is None:
        raise ApiError(404, f"no job {job_id}")
    return row


# --- starting a job --------------------------------------------------------------------------


@dataclass
class ExpertForm:
    """The checked fields of one ``POST /v1/experts`` (noun cleaned, recipe known; photos not read)."""

    images: list[UploadFile]
    class_noun: str
    recipe: str
    steps: int | None
    seed: int | None


def expert_form(settings: Settings) -> Callable[..., Awaitable[ExpertForm]]:
    """The dependency reading ``POST /v1/experts``'s form with the limits of ``settings``: 422 for
    a field out of its bounds, 400 for a blank or odd class noun or an unknown recipe."""

    async def read_expert_form(
        images: Annotated[list[UploadFile], File(description=f"{settings.min_expert_images}-{settings.max_expert_images} photos of the subject (repeat the field)")],
        class_noun: Annotated[str, Form(min_length=1, max_length=settings.max_class_noun_chars, description='e.g. "dog"')],
        recipe: Annotated[str | None, Form(description=f"recipe name (default {settings.default_recipe})")] = None,
        steps: Annotated[int | None, Form(ge=1, le=settings.max_train_steps, description="training steps (default: the recipe's)")] = None,
        seed: Annotated[int | None, Form(ge=0, le=2**31 - 1)] = None,
    ) -> ExpertForm:
        from experts.recipe import list_recipes

        noun = clean_class_noun(class_noun, settings.max_class_noun_chars)
        recipe = (recipe or settings.default_recipe).strip()
        recipes = list_recipes()
        if recipe not in recipes:  # a name only: never a path
            raise ApiError(400, f"recipe: unknown recipe {recipe!r}; recipes: {', '.join(recipes)}")
        return ExpertForm(images, noun, recipe, steps, seed)

    return read_expert_form


def save_photos(uploads_dir: Path, job_id: str, pictures: list[Image.Image], max_side: int) -> Path:
    """Store a job's photos as PNG in ``uploads_dir/job_id`` (written aside, then renamed)."""
    folder = uploads_dir / job_id
    tmp = uploads_dir / f".{job_id}.tmp"
    tmp.mkdir(parents=True)
    for i, picture in enumerate(pictures):
        (tmp / f"image_{i:02d}.png").write_bytes(stored_png(picture, max_side))
    tmp.rename(folder)
    return folder


async def queue_job(rt: Runtime, form: ExpertForm) -> JSONResponse:
    """Read, check and decode the photos of ``form`` (400 for a count outside the expert limits
    or an unreadable photo, 413 over the byte or pixel limits), store them and queue the job:
    202 with ``{"id", "status", "url"}`` and ``Location``."""
    settings = rt.settings
    datas = await read_uploads(form.images, "images", settings.min_expert_images, settings.max_expert_images, settings)
    check_pixels(datas, "images", settings.max_image_pixels, settings.max_request_pixels)  # headers only
    pictures = await run_in_threadpool(rt.decode, datas, "images")
    del datas
    job_id = new_job_id()
    folder = await run_in_threadpool(save_photos, settings.uploads_dir, job_id, pictures, settings.stored_image_side)
    try:
        row = await run_in_threadpool(
            lambda: rt.store.create(job_id, class_noun=form.class_noun, recipe=form.recipe, model=settings.model, steps=form.steps, seed=form.seed or 0, num_images=len(pictures))
        )
    except Exception:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    if rt.jobs is not None:
        rt.jobs.wake()
    url = f"/v1/experts/{job_id}"
    return JSONResponse({"id": job_id, "status": row["state"], "url": url}, status_code=202, headers={"Location": url})


# --- jobs ------------------------------------------------------------------------------------


def list_experts(
    rt: RuntimeDep,
    status: Annotated[JobState | None, Query(description="only jobs in this state")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
):
    """
    \f
    ``{"jobs": [job, ...]}``, newest first, at most ``limit``, only ``status`` when given.
    401 without the API key; 422 for an unknown state or a limit outside 1-1000.
    """
    return {"jobs": [job_view(r, rt.settings) for r in rt.store.list(status, limit)]}


def get_expert(rt: RuntimeDep, job_id: JobId):
    """
    \f
    The job's public view: status, progress, phase, error, timings; once done the expert's
    identifier and instance prompt. 401 without the API key; 422 for a malformed id; 404 for
    an unknown job.
    """
    return job_view(job_or_404(rt, job_id), rt.settings)


def delete_expert(rt: RuntimeDep, job_id: JobId):
    """A queued or running job is cancelled (its worker stopped; answers the cancelled job).
    A finished job (done, failed or cancelled) is deleted with its expert, photos and log,
    answering ``{"id", "status": "deleted", "freed_bytes"}``; it is then unknown (404).\f

    Errors: 401 without the API key; 422 for a malformed id; 404 for an unknown job (or one
    deleted meanwhile).
    """
    before = rt.jobs.cancel(job_id) if rt.jobs is not None else rt.store.cancel(job_id)
    if before is None:
        raise ApiError(404, f"no job {job_id}")
    if before["state"] in ("queued", "running"):
        return job_view(job_or_404(rt, job_id), rt.settings)
    if not rt.store.delete(job_id):  # deleted meanwhile
        raise ApiError(404, f"no job {job_id}")
    forget_expert(rt.settings.experts_dir / job_id)
    freed = remove_job_files(rt.settings, job_id)
    rt.metrics.inc("suti_jobs_deleted_total", help="Finished expert jobs deleted (API or retention).")
    return {"id": job_id, "status": "deleted", "freed_bytes": freed}


# --- generating with an expert ---------------------------------------------------------------


@dataclass
class ExpertPrompt:
    """The checked fields of one ``POST /v1/experts/{job_id}/generate`` (prompt cleaned)."""

    job_id: str
    prompt: str
    num_images: int
    steps: int | None
    guidance_scale: float | None
    seed: int | None


def expert_prompt_form(settings: Settings) -> Callable[..., Awaitable[ExpertPrompt]]:
    """The dependency reading the job id and form of ``POST /v1/experts/{job_id}/generate`` with
    the limits of ``settings``: 422 for a malformed id or a field out of its bounds, 400 for a
    prompt blank or with control characters."""

    async def read_expert_prompt(
        job_id: JobId,
        prompt: Annotated[str, prompt_form(settings, description='e.g. "a {V} {class} on the beach"')],
        num_images: Annotated[int, num_images_form(settings)] = 1,
        steps: Annotated[int | None, steps_form(settings)] = None,
        guidance_scale: Annotated[float | None, Form(ge=0, le=50, allow_inf_nan=False)] = None,
        seed: Annotated[int | None, seed_form()] = None,
    ) -> ExpertPrompt:
        prompt = clean_text(prompt, "prompt", settings.max_prompt_chars)
        return ExpertPrompt(job_id, prompt, num_images, steps, guidance_scale, seed)

    return read_expert_prompt


async def expert_work(rt: Runtime, form: ExpertPrompt):
    """The work of generating with the expert of ``form.job_id``: 404 for an unknown job, 409
    for one not done, 410 when its expert files are missing."""
    settings = rt.settings
    row = await run_in_threadpool(job_or_404, rt, form.job_id)
    if row["state"] != "done":
        detail = f" ({row['progress'] * 100:.0f}%)" if row["state"] == "running" else ""
        raise ApiError(409, f"job {form.job_id} is {row['state']}{detail}; an expert can generate once its job is done")
    folder = settings.experts_dir / form.job_id
    if not (folder / "expert.json").is_file():
        raise ApiError(410, f"job {form.job_id}: the expert files are missing")
    seed = secrets.randbelow(2**31) if form.seed is None else form.seed
    guidance_scale = settings.expert_guidance_scale if form.guidance_scale is None else form.guidance_scale
    return rt.generation.expert_work(folder, form.prompt, form.num_images, form.steps or settings.default_steps, guidance_scale, seed)


# --- the router ------------------------------------------------------------------------------


def experts_router(settings: Settings) -> APIRouter:
    """``/v1/experts`` and ``/v1/experts/{job_id}[/generate]`` with the limits of ``settings``,
    behind the API key (401 without it)."""
    router = APIRouter(prefix="/v1", dependencies=[Depends(require_key)])
    new_job = function_scoped(with_job_place(expert_form(settings)))
    expert_prompt = Depends(expert_prompt_form(settings))

    @router.post("/experts", status_code=202, summary="Start a DreamBooth expert job on 3-5 photos")
    async def create_expert(rt: RuntimeDep, form: Annotated[ExpertForm, new_job]):
        """
        \f
        Queue a DreamBooth job on the uploaded photos (202, ``Location: /v1/experts/{id}``).
        Errors: 401 without the API key; 415 for a body that is not a form; 422 for a field out
        of bounds (400 when only blank); 400 for a bad class noun, an unknown recipe, a wrong
        photo count or an unreadable photo; 413 over the byte or pixel limits; 429 when
        ``max_queued_jobs`` jobs are already waiting (before any photo is read).
        """
        return await queue_job(rt, form)

    router.add_api_route("/experts", list_experts, methods=["GET"], summary="List DreamBooth jobs, newest first")
    router.add_api_route("/experts/{job_id}", get_expert, methods=["GET"], summary="Status of a DreamBooth job")
    router.add_api_route("/experts/{job_id}", delete_expert, methods=["DELETE"], summary="Cancel a queued or running DreamBooth job; delete a finished one with its files")

    @router.post("/experts/{job_id}/generate", responses=IMAGES_RESPONSE, summary="Generate images with a trained expert")
    async def generate_expert(rt: RuntimeDep, form: Annotated[ExpertPrompt, expert_prompt]):
        """
        \f
        Images from the trained expert of the job for ``prompt`` (one PNG, or JSON with several).
        Errors: 401 without the API key; 415 for a body that is not a form; 422 for a malformed
        id or a field out of bounds (400 when only blank); 400 for a blank prompt; 404 for an
        unknown job; 409 while it is not done; 410 when its expert files are missing; 429 when
        the generation queue is full; 503 when the expert cannot load; 504 past the request
        timeout.
        """
        return images_response(rt, await run_generation(rt, await expert_work(rt, form)))

    return router
