"""Serving settings: one dataclass shared by ``suti serve``, :func:`serving.create_app` and Ray Serve."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from suti.sampling import DEFAULT_DEMO_GUIDANCE_SCALE

MIB = 1024 * 1024


def default_data_dir() -> Path:
    """``$SUTI_DATA_DIR``, else ``<suti cache>/serving``."""
    if os.environ.get("SUTI_DATA_DIR"):
        return Path(os.environ["SUTI_DATA_DIR"])
    from suti.models import cache_dir

    return cache_dir() / "serving"


@dataclass
class Settings:
    """Everything that configures one serving app (models, limits, jobs, security)."""

    # models
    model: str = "toy"  # base model of the DreamBooth experts (preset, folder or hub id)
    apprentice: str = "toy"  # apprentice folder or "toy"
    device: str | None = None  # None: cuda when visible, else cpu
    dtype: str | None = None  # sampling dtype: fp32, fp16, bf16 (None: fp16 on cuda, fp32 on cpu)
    torch_threads: int | None = None  # torch intra-op threads in the server and job workers
    preload: bool = True  # load the apprentice in the background at start-up
    expert_cache: int = 2  # trained experts kept loaded (LRU)
    # storage
    data_dir: Path = field(default_factory=default_data_dir)
    db_path: Path | None = None  # None: DATA_DIR/jobs.sqlite
    # generation: concurrency, queue, timeout
    max_concurrency: int = 1  # generations running at once
    max_queue: int = 8  # generations waiting beyond those; more answer 429
    request_timeout: float = 120.0  # seconds from arrival to answer; then 504
    default_steps: int = 25
    max_steps: int = 100
    apprentice_guidance_scale: float | None = None  # None: 5.0 (text CFG), 3.5 on a FLUX apprentice (distilled guidance)
    apprentice_demo_guidance_scale: float = DEFAULT_DEMO_GUIDANCE_SCALE
    expert_guidance_scale: float | None = None  # None: 7.5 (CFG), 3.5 on a FLUX --model (distilled guidance)
    max_num_images: int = 4
    # expert jobs
    job_workers: int = 1  # training jobs running at once
    ray_address: str | None = None  # run jobs as Ray tasks on this cluster ("auto", "ray://...", "local")
    ray_job_gpus: float = 0.0  # GPUs per Ray training task
    default_recipe: str = "suti-expert"
    max_train_steps: int = 2000
    job_stale_seconds: float = 60.0  # a running job whose owner stopped heart-beating is re-run
    max_queued_jobs: int = 16  # expert jobs waiting to run; more answer 429
    max_job_attempts: int = 3  # runs of a job whose worker died (kill -9, OOM, server crash) before it fails
    upload_retention_s: float = 0.0  # uploaded photos are deleted this long after their job finished
    job_retention_s: float | None = 30 * 86400.0  # finished jobs (row, expert, log) are deleted this long after; None: kept
    # limits and security
    max_file_bytes: int = 10 * MIB
    max_total_bytes: int = 50 * MIB
    max_image_pixels: int = 36_000_000  # one image (width x height), read from its header before decoding
    max_request_pixels: int = 64_000_000  # all images of one request together; more answer 413
    max_decoding: int = 2  # requests decoding photos at once (others wait); bounds the memory decoding takes
    max_demo_images: int = 8
    min_expert_images: int = 3
    max_expert_images: int = 5
    max_prompt_chars: int = 300
    max_class_noun_chars: int = 40
    stored_image_side: int = 1024  # uploaded photos are stored as PNG, shorter side at most this
    api_key: str | None = None  # required on /v1/* and /metrics when set
    # events, webhooks and signed URLs (docs/serving.md)
    webhook_secret: str | None = None  # signs webhooks and URLs; None: DATA_DIR/webhook_secret (made once)
    public_url: str | None = None  # base of absolute URLs in webhooks (None: where the job's POST came in)
    webhook_attempts: int = 5  # POSTs of one event at most (the first and its retries)
    webhook_timeout: float = 10.0  # seconds per POST
    webhook_backoff_s: float = 1.0  # first retry after this, then doubling (at most 60 s)
    webhook_queue: int = 1000  # deliveries waiting at most; more are dropped (logged)
    webhook_threads: int = 2  # deliveries in flight at once
    url_ttl_s: float = 86400.0  # validation image URLs in events expire after this
    max_url_expires_s: int = 7 * 86400  # the most ?expires= seconds an image URL may ask for
    event_keepalive_s: float = 15.0  # an SSE comment after this long without an event

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir).expanduser()
        if self.db_path is not None:
            self.db_path = Path(self.db_path).expanduser()

    @property
    def jobs_db(self) -> Path:
        return self.db_path or self.data_dir / "jobs.sqlite"

    @property
    def experts_dir(self) -> Path:
        return self.data_dir / "experts"

    @property
    def uploads_dir(self) -> Path:
        return self.data_dir / "uploads"

    @property
    def logs_dir(self) -> Path:
        return self.data_dir / "logs"

    @property
    def results_dir(self) -> Path:
        """Images answered as URLs (``?expires=``), deleted once expired."""
        return self.data_dir / "results"

    def with_(self, **changes) -> "Settings":
        """A copy with some fields changed."""
        return replace(self, **changes)

    def resolve_guidance(self) -> None:
        """Unset guidance scales take the family's: FLUX's distilled 3.5 for a FLUX ``model``
        (experts) or FLUX apprentice, else 7.5 for experts and 5.0 for the apprentice."""
        from suti.models import model_family

        if self.expert_guidance_scale is None:
            self.expert_guidance_scale = model_family(self.model).training_defaults.get("guidance_scale", 7.5)
        if self.apprentice_guidance_scale is None:
            from apprentice.sample import apprentice_class  # an unreadable folder: the U-Net class (refused where it loads, a 503)

            flux = self.apprentice != "toy" and apprentice_class(Path(self.apprentice)).__name__ == "FluxApprenticePipeline"
            self.apprentice_guidance_scale = 3.5 if flux else 5.0

    def validate(self) -> None:
        """Raise :class:`suti.errors.InputError` on unusable values; fill in the guidance defaults
        of the model's family (:meth:`resolve_guidance`)."""
        from suti.errors import InputError

        self.resolve_guidance()

        for name in ("max_concurrency", "job_workers", "max_steps", "default_steps", "max_num_images", "max_train_steps", "max_queued_jobs", "max_job_attempts", "max_image_pixels", "max_request_pixels", "max_decoding",
                     "webhook_attempts", "webhook_queue", "webhook_threads", "max_url_expires_s"):
            if getattr(self, name) < 1:
                raise InputError(f"{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)})")
        if self.max_queue < 0:
            raise InputError(f"max-queue must be >= 0 (got {self.max_queue})")
        for name in ("upload_retention_s", "job_retention_s"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise InputError(f"{name.replace('_', '-')} must be >= 0 seconds (got {value})")
        for name in ("webhook_timeout", "webhook_backoff_s", "url_ttl_s", "event_keepalive_s"):
            if not getattr(self, name) > 0:
                raise InputError(f"{name.replace('_', '-')} must be positive (got {getattr(self, name)})")
        if self.public_url is not None and not self.public_url.startswith(("http://", "https://")):
            raise InputError(f"public-url must start with http:// or https:// (got {self.public_url!r})")
        if self.request_timeout <= 0:
            raise InputError(f"timeout must be positive (got {self.request_timeout})")
        if not 1 <= self.min_expert_images <= self.max_expert_images:
            raise InputError("expert image limits must satisfy 1 <= min <= max")
        from suti.models import check_model

        check_model(self.model)  # a misspelt model: exit 2 at start-up, not a healthy server whose jobs all fail
        if self.dtype is not None:
            from suti.sampling import resolve_dtype

            resolve_dtype(self.dtype)
        if not 1 <= self.max_demo_images <= 8:
            raise InputError("max-demo-images must be between 1 and 8 (the apprentice's limit)")
