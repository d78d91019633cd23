"""The HTTP API (FastAPI): tuning-free generation with the apprentice, DreamBooth expert jobs,
health, metrics and the web page. :func:`create_app` builds one app from :class:`Settings`.

The app's state is one :class:`Runtime` on ``app.state.runtime``; the routes live in
:mod:`serving.routes`, reach the runtime, the API key and admission through
:mod:`serving.dependencies`, and answer errors as :mod:`serving.errors` says."""


import logging
import threading
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI

import suti
from serving.errors import install_error_handlers
from serving.generation import GenerationService, apprentice_loaded, get_apprentice
from serving.jobs import JobManager
from serving.limits import FORM_OVERHEAD, ApiError, BodyLimitMiddleware, decode_uploads
from serving.metrics import Metrics, MetricsMiddleware
from serving.settings import Settings
from serving.events import Event
from serving.signing import load_secret, signed_url
from serving.store import JobStore
from serving.webhooks import WebhookSender

log = logging.getLogger(__name__)


class Runtime:
    """What one app holds: settings, job store and manager, generation service, metrics."""

    def __init__(self, settings: Settings):
        self.settings = settings
        for folder in (settings.data_dir, settings.experts_dir, settings.uploads_dir, settings.logs_dir, settings.results_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self.store = JobStore(settings.jobs_db)
        self.secret = load_secret(settings.webhook_secret, settings.data_dir)  # webhooks and image URLs
        self.webhooks: WebhookSender | None = None
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
        m.gauge("suti_webhooks_waiting", "Webhook deliveries waiting (due or backing off).", lambda: self.webhooks.waiting if self.webhooks else 0)
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
            self.webhooks = WebhookSender(self.settings, self.store, self.secret, self.render_event, self.metrics)
            self.webhooks.start()
        if self.settings.preload:
            threading.Thread(target=self._preload, name="suti-preload", daemon=True).start()

    def stop(self) -> None:
        """Stop the job dispatcher and the generation pool; restore torch's thread count."""
        with self._start_lock:
            if self.jobs is not None:
                self.jobs.stop()
                self.jobs = None
            if self.webhooks is not None:
                self.webhooks.stop()
                self.webhooks = None
        self.generation.shutdown()
        if self._saved_threads:
            import torch

            torch.set_num_threads(self._saved_threads)
            self._saved_threads = None

    def file_url(self, path: str, expires: int, base_url: str | None) -> str:
        """The signed URL of ``path`` (relative to the data folder) until Unix second ``expires``,
        absolute under ``public_url`` (else ``base_url``; relative when both are None)."""
        return signed_url(self.secret, path, expires, self.settings.public_url or base_url or "")

    def render_event(self, event: Event, base_url: str | None = None) -> Event:
        """``event`` as clients see it: a validation image becomes ``{"url", "expires_at"}``
        (a signed URL valid ``url_ttl_s`` from now)."""
        if event.type != "validation" or "image" not in event.data:
            return event
        expires = int(time.time() + self.settings.url_ttl_s)
        data = {"url": self.file_url(event.data["image"], expires, base_url), "expires_at": expires}
        return Event(event.id, event.job_id, event.type, event.created_at, data)

    def reserve_job(self) -> None:
        """Take a place among the ``max_queued_jobs`` waiting expert jobs before the upload is
        decoded; :class:`ApiError` 429 when none is free. Call :meth:`unreserve_job` after."""
        with self._pending_lock:
            queued = self.store.counts()["queued"]
            if queued + self._pending_jobs >= self.settings.max_queued_jobs:
                self.metrics.inc("suti_jobs_rejected_total", help="Expert jobs refused because the job queue was full.")
                raise ApiError(429, f"{queued + self._pending_jobs} expert jobs are already queued or uploading ({queued} queued, {self._pending_jobs} uploading; "
                                    f"the limit is {self.settings.max_queued_jobs}); retry later", {"Retry-After": "60"})
            self._pending_jobs += 1

    def decode(self, datas: list[bytes], field: str) -> list:
        """:func:`serving.limits.decode_uploads` for at most ``max_decoding`` requests at once
        (each holds one full-size image at a time, then its reduced copies)."""
        with self._decoders:
            return decode_uploads(datas, field, self.settings.max_image_pixels, self.settings.stored_image_side)

    def unreserve_job(self) -> None:
        """Give back the place :meth:`reserve_job` took."""
        with self._pending_lock:
            self._pending_jobs -= 1

    def _preload(self) -> None:
        try:
            get_apprentice(self.settings.apprentice, self.settings.device, self.settings.dtype)
        except Exception as exc:  # noqa: BLE001 - reported by /healthz; requests will say why
            self.preload_error = f"{type(exc).__name__}: {exc}"
            log.error("could not load the apprentice %r: %s", self.settings.apprentice, exc)


@asynccontextmanager
async def lifespan(app: FastAPI):
    """Start the app's :class:`Runtime` (job dispatcher, apprentice preload) and stop it after."""
    rt: Runtime = app.state.runtime
    rt.start()
    try:
        yield
    finally:
        rt.stop()


def create_app(settings: Settings | None = None) -> FastAPI:
    """The serving app for ``settings`` (default: :class:`Settings`)."""
    from serving.routes import experts_router, files_router, generation_router, operations_router  # they import Runtime from here

    settings = settings or Settings()
    settings.validate()
    rt = Runtime(settings)
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
    install_error_handlers(app)
    app.include_router(generation_router(settings))
    app.include_router(experts_router(settings))
    app.include_router(files_router())
    app.include_router(operations_router())
    return app
