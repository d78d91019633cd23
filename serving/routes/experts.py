"""``/v1/experts``: DreamBooth expert jobs (start, list, status, events, cancel or delete) and
generation with a trained expert.

Starting a job checks the form (422/400), then takes a place among the queued jobs (429), then
reads, checks and decodes the photos (400/413), stores them as PNG and queues the job row (202).
"""

import secrets
import shutil
from urllib.parse import urlsplit
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, File, Form, Header, Query, Request, UploadFile
from fastapi.responses import JSONResponse, StreamingResponse
from PIL import Image
from starlette.concurrency import run_in_threadpool

from serving.app import Runtime
from serving.dependencies import RuntimeDep, function_scoped, require_key, with_job_place
from serving.events import parse_last_event_id, sse_stream
from serving.generation import forget_expert
from serving.jobs import remove_job_files
from serving.limits import ApiError, check_pixels, clean_class_noun, clean_text, read_uploads, stored_png
from serving.routes.common import IMAGES_RESPONSE, JobId, expires_query, images_response, num_images_form, prompt_form, run_generation, seed_form, steps_form
from serving.settings import Settings
from serving.store import JobStore, new_job_id
from serving.webhooks import FILTERS

JobState = Literal["queued", "running", "done", "failed", "cancelled"]
WebhookFilter = Literal["start", "progress", "output", "completed"]
assert set(WebhookFilter.__args__) == set(FILTERS)
MAX_URL_CHARS = 2000


def job_view(row: dict[str, Any], settings: Settings, store: JobStore | None = None) -> dict[str, Any]:
    """The public view of a job row (no paths, tokens or process ids). ``queue_position``: 0
    while running, 1 for the next queued job...; None once finished (or without ``store``);
    ``step`` of ``total``: in the current ``phase`` (training steps, or class images)."""
    view = {
        "id": row["id"],
        "status": row["state"],
        "queue_position": store.queue_position(row) if store is not None else None,
        "progress": round(float(row["progress"] or 0.0), 4),
        "phase": row["phase"],
        "step": row.get("step"),
        "total": row.get("total"),
        "error": row["error"],
        "class_noun": row["class_noun"],
        "recipe": row["recipe"],
        "steps": row["steps"],
        "attempts": row["attempts"],
        "created_at": row["created_at"],
        "started_at": row["started_at"],
        "finished_at": row["finished_at"],
        "webhook_url": row.get("webhook_url"),
        "webhook_events_filter": ["completed", *[f for f in (row.get("webhook_events") or "").split(",") if f and f != "completed"]] if row.get("webhook_url") else None,
        "validation_prompt": row.get("validation_prompt"),
        "events_url": f"/v1/experts/{row['id']}/events",
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
    webhook_url: str | None = None
    webhook_events_filter: tuple[str, ...] = ()
    validation_prompt: str | None = None


def check_webhook_url(url: str) -> str:
    """``url`` when it is an absolute http(s) URL with a host (422 naming ``webhook_url`` if not)."""
    url = url.strip()
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as exc:
        raise ApiError(422, f"webhook_url: not a URL ({exc}): {url[:200]!r}") from None
    if parts.scheme not in ("http", "https"):
        raise ApiError(422, f"webhook_url: must be an http:// or https:// URL (got {url[:200]!r})")
    if not host or any(c.isspace() for c in url):
        raise ApiError(422, f"webhook_url: no host, or spaces, in {url[:200]!r}")
    return url


def expert_form(settings: Settings) -> Callable[..., Awaitable[ExpertForm]]:
    """The dependency reading ``POST /v1/experts``'s form with the limits of ``settings``: 422 for
    a field out of its bounds, 400 for a blank or odd class noun or an unknown recipe."""

    async def read_expert_form(
        images: Annotated[list[UploadFile], File(description=f"{settings.min_expert_images}-{settings.max_expert_images} photos of the subject (repeat the field)")],
        class_noun: Annotated[str, Form(min_length=1, max_length=settings.max_class_noun_chars, description='e.g. "dog"')],
        recipe: Annotated[str | None, Form(description=f"recipe name (default {settings.default_recipe})")] = None,
        steps: Annotated[int | None, Form(ge=1, le=settings.max_train_steps, description="training steps (default: the recipe's)")] = None,
        seed: Annotated[int | None, Form(ge=0, le=2**31 - 1)] = None,
        webhook_url: Annotated[str | None, Form(max_length=MAX_URL_CHARS, description="POST the job's events here (http/https; signed, see X-Suti-Signature)")] = None,
        webhook_events_filter: Annotated[list[WebhookFilter] | None, Form(description="events sent to webhook_url besides completed: start, progress, output (repeat the field)")] = None,
        validation_prompt: Annotated[str | None, Form(max_length=settings.max_prompt_chars, description='draw this prompt after the last step (e.g. "a {V} {class} on the beach"); its URL comes as a validation event')] = None,
    ) -> ExpertForm:
        from experts.recipe import list_recipes

        if webhook_url is not None:
            webhook_url = check_webhook_url(webhook_url)
        elif webhook_events_filter:
            raise ApiError(422, "webhook_events_filter: given without webhook_url")
        if validation_prompt is not None:
            validation_prompt = clean_text(validation_prompt, "validation_prompt", settings.max_prompt_chars)
        noun = clean_class_noun(class_noun, settings.max_class_noun_chars)
        recipe = (recipe or settings.default_recipe).strip()
        recipes = list_recipes()
        if recipe not in recipes:  # a name only: never a path
            raise ApiError(400, f"recipe: unknown recipe {recipe!r}; recipes: {', '.join(recipes)}")
        filters = tuple(dict.fromkeys(f for f in webhook_events_filter or () if f != "completed"))  # completed: always
        return ExpertForm(images, noun, recipe, steps, seed, webhook_url, filters, validation_prompt)

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


async def queue_job(rt: Runtime, form: ExpertForm, base_url: str | None = None) -> JSONResponse:
    """Read, check and decode the photos of ``form`` (400 for a count outside the expert limits
    or an unreadable photo, 413 over the byte or pixel limits), store them and queue the job:
    202 with ``{"id", "status", "url", "events_url", "queue_position"}`` and ``Location``.
    ``base_url``: where the client reached the server (absolute URLs in webhooks)."""
    settings = rt.settings
    datas = await read_uploads(form.images, "images", settings.min_expert_images, settings.max_expert_images, settings)
    check_pixels(datas, "images", settings.max_image_pixels, settings.max_request_pixels)  # headers only
    pictures = await run_in_threadpool(rt.decode, datas, "images")
    del datas
    job_id = new_job_id()
    folder = await run_in_threadpool(save_photos, settings.uploads_dir, job_id, pictures, settings.stored_image_side)
    try:
        row = await run_in_threadpool(
            lambda: rt.store.create(job_id, class_noun=form.class_noun, recipe=form.recipe, model=settings.model, steps=form.steps, seed=form.seed or 0, num_images=len(pictures),
                                    webhook_url=form.webhook_url, webhook_events=form.webhook_events_filter, validation_prompt=form.validation_prompt,
                                    base_url=settings.public_url or base_url)
        )
    except Exception:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    if rt.jobs is not None:
        rt.jobs.wake()
    url = f"/v1/experts/{job_id}"
    position = await run_in_threadpool(rt.store.queue_position, row)
    body = {"id": job_id, "status": row["state"], "url": url, "events_url": f"{url}/events", "queue_position": position}
    return JSONResponse(body, status_code=202, headers={"Location": url})


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
    return {"jobs": [job_view(r, rt.settings, rt.store) for r in rt.store.list(status, limit)]}


def get_expert(rt: RuntimeDep, job_id: JobId):
    """
    \f
    The job's public view: status, queue position, progress, phase, step/total, error,
    timings; once done the expert's identifier and instance prompt. 401 without the API key;
    422 for a malformed id; 404 for an unknown job.
    """
    return job_view(job_or_404(rt, job_id), rt.settings, rt.store)


def expert_events(rt: RuntimeDep, job_id: JobId, request: Request, last_event_id: Annotated[str | None, Header(description="resume after this event id")] = None):
    """The job's events as Server-Sent Events, ending after done, failed or cancelled.

    Each message has ``id`` (resume with ``Last-Event-ID``), ``event`` (queued, started,
    progress, validation, done, failed, cancelled: :mod:`serving.events`) and ``data`` (the
    event as JSON). Progress comes at most every 500 ms; a ``: keep-alive`` comment after
    ``event_keepalive_s`` without one. The stream ends when the job is deleted. Errors: 401
    without the API key; 422 for a malformed id; 404 for an unknown job.
    """
    job_or_404(rt, job_id)
    base_url = str(request.base_url)
    body = sse_stream(
        lambda after: rt.store.events(job_id, after),
        parse_last_event_id(last_event_id),
        render=lambda event: rt.render_event(event, base_url),
        gone=lambda: rt.store.get(job_id) is None,
        disconnected=request.is_disconnected,
        keepalive=rt.settings.event_keepalive_s,
    )
    return StreamingResponse(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


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
        return job_view(job_or_404(rt, job_id), rt.settings, rt.store)
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
    async def create_expert(rt: RuntimeDep, form: Annotated[ExpertForm, new_job], request: Request):
        """
        \f
        Queue a DreamBooth job on the uploaded photos (202, ``Location: /v1/experts/{id}``).
        Errors: 401 without the API key; 415 for a body that is not a form; 422 for a field out
        of bounds (400 when only blank); 400 for a bad class noun, an unknown recipe, a wrong
        photo count or an unreadable photo; 413 over the byte or pixel limits; 429 when
        ``max_queued_jobs`` jobs are already waiting (before any photo is read); 422 for a
        ``webhook_url`` that is not http(s).
        """
        return await queue_job(rt, form, str(request.base_url))

    router.add_api_route("/experts", list_experts, methods=["GET"], summary="List DreamBooth jobs, newest first")
    router.add_api_route("/experts/{job_id}", get_expert, methods=["GET"], summary="Status of a DreamBooth job")
    router.add_api_route("/experts/{job_id}/events", expert_events, methods=["GET"], summary="The job's events as Server-Sent Events (to done, failed or cancelled)",
                         response_class=StreamingResponse, responses={200: {"content": {"text/event-stream": {}}}})
    router.add_api_route("/experts/{job_id}", delete_expert, methods=["DELETE"], summary="Cancel a queued or running DreamBooth job; delete a finished one with its files")

    @router.post("/experts/{job_id}/generate", responses=IMAGES_RESPONSE, summary="Generate images with a trained expert")
    async def generate_expert(rt: RuntimeDep, form: Annotated[ExpertPrompt, expert_prompt], request: Request,
                              expires: Annotated[int | None, expires_query(settings)] = None):
        """
        \f
        Images from the trained expert of the job for ``prompt`` (one PNG, or JSON with several).
        Errors: 401 without the API key; 415 for a body that is not a form; 422 for a malformed
        id or a field out of bounds (400 when only blank); 400 for a blank prompt; 404 for an
        unknown job; 409 while it is not done; 410 when its expert files are missing; 429 when
        the generation queue is full; 503 when the expert cannot load; 504 past the request
        timeout.
        """
        return images_response(rt, await run_generation(rt, await expert_work(rt, form)), expires, str(request.base_url))

    return router
