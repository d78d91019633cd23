"""The HTTP API (FastAPI): tuning-free generation with the apprentice, DreamBooth expert jobs,
health, metrics and the web page. :func:`create_app` builds one app from :class:`Settings`."""


import hmac
import logging
import secrets
import shutil
import threading
import time
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, File, Form, Path, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

import suti
from serving.generation import Admission, DeadlineExceeded, GenerationService, ModelUnavailable, QueueFull, Result, apprentice_loaded, forget_expert, get_apprentice
from serving.jobs import JobManager, remove_job_files
from serving.limits import FORM_OVERHEAD, ApiError, BodyLimitMiddleware, check_pixels, clean_class_noun, clean_text, decode_uploads, read_uploads, stored_png
from serving.metrics import CONTENT_TYPE, Metrics, MetricsMiddleware
from serving.page import DOCS_PAGE, PAGE
from serving.settings import Settings
from serving.store import JobStore, new_job_id

log = logging.getLogger(__name__)

JOB_ID_PATTERN = r"^[0-9a-f]{32}$"
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; connect-src 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
MAX_SEED = 2**63 - 1
IMAGES_RESPONSE = {
    200: {
        "description": "One image as ``image/png``, or several as JSON ``{\"images\": [base64 PNG, ...], \"seed\": s}``.",
        "content": {
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "application/json": {"schema": {"type": "object", "properties": {"images": {"type": "array", "items": {"type": "string", "format": "byte"}}, "seed": {"type": "integer"}}}},
        },
    },
    429: {"description": "the generation queue is full (see ``Retry-After``)"},
    504: {"description": "the request did not finish within the server's timeout"},
}


def _field(loc: tuple) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header", "form")]
    name = ""
    for p in parts:
        name += f"[{p}]" if p.isdigit() else (f".{p}" if name else p)
    return name or "request"


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


class Runtime:
    """What one app holds: settings, job store and manager, generation service, metrics."""

    def __init__(self, settings: Settings):
        self.settings = settings
        for folder in (settings.data_dir, settings.experts_dir, settings.uploads_dir, settings.logs_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self.store = JobStore(settings.jobs_db)
        self.metrics = Metrics()
        self.generation = GenerationService(settings)
        self.jobs: JobManager | None = None
        self.started_at = time.time()
        self.preload_error: str | None = None
        self._start_lock = threading.Lock()
        self._saved_threads: int | None = None
        self._pending_jobs = 0  # expert uploads being checked and saved (not yet queued rows)
        self._pending_lock = threading.Lock()
        self._decoders = threading.BoundedSemaphore(settings.max_decoding)  # bounds decoded pixels held at once
        m = self.metrics
        m.gauge("suti_generate_queue_depth", "Generation requests waiting for a slot.", lambda: self.generation.waiting)
        m.gauge("suti_generate_in_flight", "Generation requests running.", lambda: self.generation.running)
        m.gauge("suti_generate_capacity", "Generation requests admitted at most (running + waiting).", lambda: self.generation.capacity)
        m.gauge("suti_jobs", "DreamBooth jobs by state.", lambda: self.store.counts(), label="state")
        m.gauge("suti_jobs_workers_running", "Job workers this server is running.", lambda: len(self.jobs.running_pids()) if self.jobs else 0)
        m.gauge("suti_apprentice_loaded", "1 once the apprentice is loaded in this process.", lambda: int(apprentice_loaded(settings.apprentice, settings.device, settings.dtype)))

    def start(self) -> None:
        """Start the job dispatcher and preload the apprentice (idempotent)."""
        with self._start_lock:
            if self.jobs is not None:
                return
            if self.generation.closed:  # the app is started again after a stop
                self.generation = GenerationService(self.settings)
            if self.settings.torch_threads:  # process-wide; restored by stop()
                import torch

                self._saved_threads = torch.get_num_threads()
                torch.set_num_threads(self.settings.torch_threads)
            self.jobs = JobManager(self.settings, self.store)
            self.jobs.start()
        if self.settings.preload:
            threading.Thread(target=self._preload, name="suti-preload", daemon=True).start()

    def stop(self) -> None:
        with self._start_lock:
            if self.jobs is not None:
                self.jobs.stop()
                self.jobs = None
        self.generation.shutdown()
        if self._saved_threads:
            import torch

            torch.set_num_threads(self._saved_threads)
            self._saved_threads = None

    def reserve_job(self) -> None:
        """Take a place among the ``max_queued_jobs`` waiting expert jobs before the upload is
        decoded; :class:`ApiError` 429 when none is free. Call :meth:`unreserve_job` after."""
        with self._pending_lock:
            queued = self.store.counts()["queued"]
            if queued + self._pending_jobs >= self.settings.max_queued_jobs:
                self.metrics.inc("suti_jobs_rejected_total", help="Expert jobs refused because the job queue was full.")
                raise ApiError(429, f"{queued} expert jobs are already queued (the limit is {self.settings.max_queued_jobs}); retry later", {"Retry-After": "60"})
            self._pending_jobs += 1

    def decode(self, datas: list[bytes], field: str) -> list:
        """:func:`serving.limits.decode_uploads` for at most ``max_decoding`` requests at once
        (each holds one full-size image at a time, then its reduced copies)."""
        with self._decoders:
            return decode_uploads(datas, field, self.settings.max_image_pixels, self.settings.stored_image_side)

    def unreserve_job(self) -> None:
        with self._pending_lock:
            self._pending_jobs -= 1

    def _preload(self) -> None:
        try:
            get_apprentice(self.settings.apprentice, self.settings.device, self.settings.dtype)
        except Exception as exc:  # noqa: BLE001 - reported by /healthz; requests will say why
            self.preload_error = f"{type(exc).__name__}: {exc}"
            log.error("could not load the apprentice %r: %s", self.settings.apprentice, exc)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The serving app for ``settings`` (default: :class:`Settings`)."""
    settings = settings or Settings()
    settings.validate()
    rt = Runtime(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        rt.start()
        try:
            yield
        finally:
            rt.stop()

    app = FastAPI(
        docs_url=None,  # Swagger UI loads its assets from a CDN: /docs is our own page (offline)
        redoc_url=None,
        title="SuTI serving",
        version=suti.__version__,
        description="Subject-driven text-to-image generation: the in-context apprentice (tuning-free, "
        "from 1-8 photos) and per-subject DreamBooth experts trained as background jobs.",
        lifespan=lifespan,
    )
    app.state.runtime = rt
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_total_bytes + FORM_OVERHEAD)
    app.add_middleware(MetricsMiddleware, metrics=rt.metrics)

    # --- errors: always {"error": "..."} -----------------------------------------------------

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        media = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
        if request.method == "POST" and media not in FORM_TYPES and any(tuple(e.get("loc", ()))[:1] == ("body",) for e in errors):
            message = (
                f"{request.url.path} takes multipart/form-data fields (e.g. curl -F images=@photo.png -F 'prompt=a photo of it'), "
                f"not {media or 'a body without Content-Type'}"
            )
            return JSONResponse({"error": message}, status_code=415)
        sent = set(exc.body.keys()) if hasattr(exc.body, "keys") else set()
        messages, only_empty = [], True
        for e in errors:
            loc = tuple(e.get("loc", ()))
            if e.get("type") == "missing" and len(loc) == 2 and loc[0] == "body" and loc[1] in sent:
                messages.append(f"{_field(loc)}: must not be empty")  # sent, but blank: as clean_text says
                continue
            only_empty = False
            message = f"{_field(loc)}: {e.get('msg', 'invalid')}"
            if e.get("type") == "missing" and loc[-1] == "images" and media != "multipart/form-data":
                message += " (photos are uploaded as multipart/form-data)"
            messages.append(message)
        return JSONResponse({"error": "; ".join(messages), "detail": [{"loc": list(e.get("loc", ())), "msg": e.get("msg")} for e in errors]}, status_code=400 if only_empty else 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return JSONResponse({"error": f"internal error ({type(exc).__name__})"}, status_code=500)

    # --- security ------------------------------------------------------------------------------

    def require_key(request: Request) -> None:
        if not settings.api_key:
            return
        given = request.headers.get("x-api-key") or ""
        auth = request.headers.get("authorization") or ""
        if auth.lower().startswith("bearer "):
            given = given or auth[7:].strip()
        if not given or not hmac.compare_digest(given.encode(), settings.api_key.encode()):
            raise ApiError(401, "missing or wrong API key (send 'Authorization: Bearer KEY' or 'X-API-Key: KEY')", {"WWW-Authenticate": "Bearer"})

    # --- helpers -------------------------------------------------------------------------------

    def queue_full(exc: QueueFull) -> ApiError:
        rt.metrics.inc("suti_generate_rejected_total", help="Generation requests refused because the queue was full.")
        return ApiError(429, str(exc), {"Retry-After": str(exc.retry_after)})

    def admit() -> Admission:
        """A place in the generation queue, taken before any photo is decoded (else 429)."""
        try:
            return rt.generation.admit()
        except QueueFull as exc:
            raise queue_full(exc) from None

    async def run_generation(work, admission: Admission | None = None) -> Result:
        try:
            return await rt.generation.submit(work, admission)
        except QueueFull as exc:
            raise queue_full(exc) from None
        except DeadlineExceeded:
            rt.metrics.inc("suti_generate_timeouts_total", help="Generation requests that ran past the timeout.")
            raise ApiError(504, f"generation did not finish within {settings.request_timeout:g} s") from None
        except ModelUnavailable as exc:
            raise ApiError(503, str(exc)) from None

    def images_response(result: Result) -> Response:
        rt.metrics.inc("suti_generated_images_total", len(result.images), help="Images generated.")
        headers = {"X-Seed": str(result.seed), "X-Generation-Seconds": f"{result.seconds:.3f}"}
        if result.prompt_truncated:  # the prompt was longer than the text encoder reads
            headers["X-Prompt-Truncated"] = result.prompt_truncated
        if len(result.images) == 1:
            return Response(result.images[0], media_type="image/png", headers=headers)
        return JSONResponse({"images": result.b64(), "seed": result.seed}, headers=headers)

    def job_or_404(job_id: str) -> dict[str, Any]:
        row = rt.store.get(job_id)
        if row is None:
            raise ApiError(404, f"no job {job_id}")
        return row

    # --- /v1 ----------------------------------------------------------------------------------

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_key)])
    steps_field = Form(ge=1, le=settings.max_steps, description=f"denoising steps (default {settings.default_steps})")
    seed_field = Form(ge=0, le=MAX_SEED, description="image i uses seed + i (default: random)")
    num_field = Form(ge=1, le=settings.max_num_images, description="images to generate")
    prompt_field = Form(min_length=1, max_length=settings.max_prompt_chars)

    @v1.post("/generate", responses=IMAGES_RESPONSE, summary="Generate images of the subject of 1-8 photos (apprentice, no tuning)")
    async def generate(
        images: Annotated[list[UploadFile], File(description=f"1-{settings.max_demo_images} photos of the subject (repeat the field)")],
        prompt: Annotated[str, prompt_field],
        captions: Annotated[list[str] | None, Form(description="one caption per photo (optional; repeat the field)")] = None,
        num_images: Annotated[int, num_field] = 1,
        steps: Annotated[int | None, steps_field] = None,
        guidance_scale: Annotated[float | None, Form(ge=0, le=50, allow_inf_nan=False, description="text guidance")] = None,
        demo_guidance_scale: Annotated[float | None, Form(ge=0, le=50, allow_inf_nan=False, description="demonstration guidance")] = None,
        seed: Annotated[int | None, seed_field] = None,
    ):
        prompt = clean_text(prompt, "prompt", settings.max_prompt_chars)
        admission = admit()  # admission first: a full queue answers 429 before any photo is decoded
        try:
            datas = await read_uploads(images, "images", 1, settings.max_demo_images, settings)
            if captions:
                if len(captions) != len(datas):
                    raise ApiError(400, f"captions: {len(captions)} captions for {len(datas)} images")
                captions = [clean_text(c, f"captions[{i}]", settings.max_prompt_chars, required=False) for i, c in enumerate(captions)]
            check_pixels(datas, "images", settings.max_image_pixels, settings.max_request_pixels)  # headers only
            pictures = await run_in_threadpool(rt.decode, datas, "images")
            del datas
            seed = secrets.randbelow(2**31) if seed is None else seed
            work = rt.generation.apprentice_work(
                pictures, captions or None, prompt, num_images, steps or settings.default_steps,
                settings.apprentice_guidance_scale if guidance_scale is None else guidance_scale,
                settings.apprentice_demo_guidance_scale if demo_guidance_scale is None else demo_guidance_scale, seed,
            )
        except BaseException:
            admission.release()
            raise
        return images_response(await run_generation(work, admission))

    @v1.post("/experts", status_code=202, summary="Start a DreamBooth expert job on 3-5 photos")
    async def create_expert(
        request: Request,
        images: Annotated[list[UploadFile], File(description=f"{settings.min_expert_images}-{settings.max_expert_images} photos of the subject (repeat the field)")],
        class_noun: Annotated[str, Form(min_length=1, max_length=settings.max_class_noun_chars, description='e.g. "dog"')],
        recipe: Annotated[str | None, Form(description=f"recipe name (default {settings.default_recipe})")] = None,
        steps: Annotated[int | None, Form(ge=1, le=settings.max_train_steps, description="training steps (default: the recipe's)")] = None,
        seed: Annotated[int | None, Form(ge=0, le=2**31 - 1)] = None,
    ):
        from experts.recipe import list_recipes

        noun = clean_class_noun(class_noun, settings.max_class_noun_chars)
        recipe = (recipe or settings.default_recipe).strip()
        recipes = list_recipes()
        if recipe not in recipes:  # a name only: never a path
            raise ApiError(400, f"recipe: unknown recipe {recipe!r}; recipes: {', '.join(recipes)}")
        rt.reserve_job()  # a full job queue answers 429 before any photo is decoded
        try:
            return await _create_expert(images, noun, recipe, steps, seed)
        finally:
            rt.unreserve_job()

    async def _create_expert(images, noun: str, recipe: str, steps: int | None, seed: int | None) -> JSONResponse:
        datas = await read_uploads(images, "images", settings.min_expert_images, settings.max_expert_images, settings)
        check_pixels(datas, "images", settings.max_image_pixels, settings.max_request_pixels)  # headers only
        pictures = await run_in_threadpool(rt.decode, datas, "images")
        del datas
        job_id = new_job_id()
        folder = settings.uploads_dir / job_id

        def save() -> None:
            tmp = settings.uploads_dir / f".{job_id}.tmp"
            tmp.mkdir(parents=True)
            for i, picture in enumerate(pictures):
                (tmp / f"image_{i:02d}.png").write_bytes(stored_png(picture, settings.stored_image_side))
            tmp.rename(folder)

        await run_in_threadpool(save)
        try:
            row = await run_in_threadpool(lambda: rt.store.create(job_id, class_noun=noun, recipe=recipe, model=settings.model, steps=steps, seed=seed or 0, num_images=len(pictures)))
        except Exception:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        if rt.jobs is not None:
            rt.jobs.wake()
        url = f"/v1/experts/{job_id}"
        return JSONResponse({"id": job_id, "status": row["state"], "url": url}, status_code=202, headers={"Location": url})

    @v1.get("/experts", summary="List DreamBooth jobs, newest first")
    def list_experts(
        status: Annotated[Literal["queued", "running", "done", "failed", "cancelled"] | None, Query(description="only jobs in this state")] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ):
        return {"jobs": [job_view(r, settings) for r in rt.store.list(status, limit)]}

    JobId = Annotated[str, Path(pattern=JOB_ID_PATTERN, description="job id (32 hex digits)")]

    @v1.get("/experts/{job_id}", summary="Status of a DreamBooth job")
    def get_expert(job_id: JobId):
        return job_view(job_or_404(job_id), settings)

    @v1.delete("/experts/{job_id}", summary="Cancel a queued or running DreamBooth job; delete a finished one with its files")
    def delete_expert(job_id: JobId):
        """A queued or running job is cancelled (its worker stopped; answers the cancelled job).
        A finished job (done, failed or cancelled) is deleted with its expert, photos and log,
        answering ``{"id", "status": "deleted", "freed_bytes"}``; it is then unknown (404)."""
        before = rt.jobs.cancel(job_id) if rt.jobs is not None else rt.store.cancel(job_id)
        if before is None:
            raise ApiError(404, f"no job {job_id}")
        if before["state"] in ("queued", "running"):
            return job_view(job_or_404(job_id), settings)
        if not rt.store.delete(job_id):  # deleted meanwhile
            raise ApiError(404, f"no job {job_id}")
        forget_expert(settings.experts_dir / job_id)
        freed = remove_job_files(settings, job_id)
        rt.metrics.inc("suti_jobs_deleted_total", help="Finished expert jobs deleted (API or retention).")
        return {"id": job_id, "status": "deleted", "freed_bytes": freed}

    @v1.post("/experts/{job_id}/generate", responses=IMAGES_RESPONSE, summary="Generate images with a trained expert")
    async def generate_expert(
        job_id: JobId,
        prompt: Annotated[str, Form(min_length=1, max_length=settings.max_prompt_chars, description='e.g. "a {V} {class} on the beach"')],
        num_images: Annotated[int, num_field] = 1,
        steps: Annotated[int | None, steps_field] = None,
        guidance_scale: Annotated[float | None, Form(ge=0, le=50, allow_inf_nan=False)] = None,
        seed: Annotated[int | None, seed_field] = None,
    ):
        prompt = clean_text(prompt, "prompt", settings.max_prompt_chars)
        row = await run_in_threadpool(job_or_404, job_id)
        if row["state"] != "done":
            detail = f" ({row['progress'] * 100:.0f}%)" if row["state"] == "running" else ""
            raise ApiError(409, f"job {job_id} is {row['state']}{detail}; an expert can generate once its job is done")
        folder = settings.experts_dir / job_id
        if not (folder / "expert.json").is_file():
            raise ApiError(410, f"job {job_id}: the expert files are missing")
        seed = secrets.randbelow(2**31) if seed is None else seed
        work = rt.generation.expert_work(folder, prompt, num_images, steps or settings.default_steps, settings.expert_guidance_scale if guidance_scale is None else guidance_scale, seed)
        return images_response(await run_generation(work))

    app.include_router(v1)

    # --- health, metrics, page ---------------------------------------------------------------

    @app.get("/healthz", summary="Liveness and what is loaded")
    def healthz():
        return {
            "status": "ok",
            "version": suti.__version__,
            "model": settings.model,
            "apprentice": settings.apprentice,
            "apprentice_loaded": apprentice_loaded(settings.apprentice, settings.device, settings.dtype),
            "apprentice_error": rt.preload_error,
            "jobs_backend": rt.jobs.backend if rt.jobs else None,
            "generation": {"running": rt.generation.running, "waiting": rt.generation.waiting, "capacity": rt.generation.capacity},
            "uptime_s": round(time.time() - rt.started_at, 1),
        }

    @app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse, dependencies=[Depends(require_key)])
    def metrics():
        return PlainTextResponse(rt.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page():
        return HTMLResponse(PAGE, headers=PAGE_HEADERS)

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    def docs():
        """The API reference, drawn from ``/openapi.json`` by a self-contained page (no CDN)."""
        return HTMLResponse(DOCS_PAGE, headers=PAGE_HEADERS)

    return app
