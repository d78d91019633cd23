"""``suti serve``: the HTTP API, DreamBooth job workers and the web page on one port."""

from __future__ import annotations

import logging
import os

from suti import checks
from suti.cli_format import HelpFormatter
from suti.sampling import MAX_STEPS
from suti.errors import InputError

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    """Add ``serve`` to the top-level parser."""
    p = subparsers.add_parser(
        "serve",
        help="serve the apprentice and DreamBooth experts over HTTP (API, metrics, web page)",
        formatter_class=HelpFormatter,
        description="Serve POST /v1/generate (apprentice), /v1/experts (DreamBooth jobs, their events as Server-Sent Events, signed webhooks), /healthz, /metrics, "
        "the API reference at /docs (from /openapi.json, works offline) and a web page at /. With no arguments: the toy model and toy apprentice on "
        "http://127.0.0.1:8000.",
    )
    p.add_argument("--model", default="toy", help="base model of DreamBooth experts: preset, local diffusers folder or hub id")
    p.add_argument("--apprentice", default="toy", help='apprentice folder, or "toy"')
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes the server to the network)")
    p.add_argument("--port", type=checks.whole(1, 65535), default=8000)
    p.add_argument("--data-dir", help="jobs, uploads and experts (default: $SUTI_DATA_DIR or <suti cache>/serving)")
    p.add_argument("--db", help="SQLite job table (default: DATA_DIR/jobs.sqlite)")
    p.add_argument("--api-key-env", metavar="VAR", help="require the API key held in this environment variable on /v1 and /metrics")
    p.add_argument("--webhook-secret-env", metavar="VAR", help="sign webhooks and image URLs with the secret in this environment variable (default: DATA_DIR/webhook_secret, made on the first start)")
    p.add_argument("--public-url", help="base of the absolute URLs in webhooks, e.g. https://suti.example.com (default: where each job's POST came in)")
    p.add_argument("--webhook-attempts", type=checks.whole(1, 100), default=5, help="POSTs of one webhook event at most (then it is logged and dropped)")
    p.add_argument("--webhook-timeout", type=checks.real(0.0, 3600.0, lo_open=True), default=10.0, help="seconds one webhook POST may take")
    p.add_argument("--max-concurrency", type=checks.whole(1, 1024), default=1, help="generations running at once")
    p.add_argument("--max-queue", type=checks.whole(0, 100_000), default=8, help="generations waiting beyond those; more are answered 429")
    p.add_argument("--timeout", type=checks.real(0.0, 86_400.0, lo_open=True), default=120.0, help="seconds a generation request may take (then 504)")
    p.add_argument("--job-workers", type=checks.whole(1, 1024), default=1, help="DreamBooth jobs training at once")
    p.add_argument("--ray-address", help='run DreamBooth jobs as Ray tasks on this cluster ("auto", "ray://host:10001", "local")')
    p.add_argument("--ray-job-gpus", type=checks.real(0.0, 64.0), default=0.0, help="GPUs per Ray training task")
    p.add_argument("--recipe", default="suti-expert", help="default recipe of DreamBooth jobs")
    p.add_argument("--max-train-steps", type=checks.whole(1, 10_000_000), default=2000, help="most training steps a job may ask for")
    p.add_argument("--max-queued-jobs", type=checks.whole(1, 100_000), default=16, help="DreamBooth jobs waiting to run; more are answered 429")
    p.add_argument("--max-job-attempts", type=checks.whole(1, 100), default=3, help="runs of a job whose worker died (kill -9, out of memory) before it fails")
    p.add_argument("--upload-retention-hours", type=checks.real(0.0, 1e6), default=0.0, help="keep uploaded photos this long after their job finished")
    p.add_argument("--job-retention-days", type=checks.real(0.0, 1e5), default=30.0, help="delete finished jobs (expert, photos, log) this long after they finished; 0 keeps them")
    p.add_argument("--max-steps", type=checks.whole(1, MAX_STEPS), default=100, help="most denoising steps a request may ask for")
    p.add_argument("--default-steps", type=checks.whole(1, MAX_STEPS), default=25, help="denoising steps when a request gives none")
    p.add_argument("--max-upload-mb", type=checks.real(0.0, 1e6, lo_open=True), default=10.0, help="largest uploaded file")
    p.add_argument("--max-total-upload-mb", type=checks.real(0.0, 1e6, lo_open=True), default=50.0, help="largest total upload of one request")
    p.add_argument("--max-image-pixels", type=checks.whole(1, 2**40), default=36_000_000, help="largest image (width x height), read from its header before decoding")
    p.add_argument("--max-request-pixels", type=checks.whole(1, 2**40), default=64_000_000, help="most pixels of all images of one request together (then 413)")
    p.add_argument("--threads", type=checks.whole(1, 1024), help="torch threads per process (server and job workers)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="sampling dtype of the apprentice and experts (default: fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--no-preload", action="store_true", help="load the apprentice on the first request instead of at start-up")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=_serve, local_paths=("data_dir", "db", "apprentice"))


def settings_from_args(args):
    """The :class:`serving.settings.Settings` of parsed ``suti serve`` arguments."""
    from serving.settings import MIB, Settings
    from suti.models import portable_model
    from suti.storage import absolute_if_local

    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env, "")
        if not api_key:
            raise InputError(f"--api-key-env {args.api_key_env}: the environment variable is not set or empty")
    webhook_secret = None
    if args.webhook_secret_env:
        webhook_secret = os.environ.get(args.webhook_secret_env, "")
        if not webhook_secret:
            raise InputError(f"--webhook-secret-env {args.webhook_secret_env}: the environment variable is not set or empty")
    if args.public_url is not None and not args.public_url.startswith(("http://", "https://")):
        raise InputError(f"--public-url must start with http:// or https:// (got {args.public_url!r})")
    for flag, value in (("--upload-retention-hours", args.upload_retention_hours), ("--job-retention-days", args.job_retention_days)):
        if not value >= 0:
            raise InputError(f"{flag} must be >= 0 (got {value})")
    if not 0 < args.port < 65536:
        raise InputError(f"--port must be between 1 and 65535 (got {args.port})")
    kwargs = dict(
        model=portable_model(args.model),  # Ray job workers have other working directories
        apprentice=args.apprentice if args.apprentice == "toy" else absolute_if_local(args.apprentice),
        db_path=args.db,
        api_key=api_key,
        webhook_secret=webhook_secret,
        public_url=args.public_url,
        webhook_attempts=args.webhook_attempts,
        webhook_timeout=args.webhook_timeout,
        max_concurrency=args.max_concurrency,
        max_queue=args.max_queue,
        request_timeout=args.timeout,
        job_workers=args.job_workers,
        ray_address=args.ray_address,
        ray_job_gpus=args.ray_job_gpus,
        default_recipe=args.recipe,
        max_train_steps=args.max_train_steps,
        max_steps=args.max_steps,
        default_steps=args.default_steps,
        max_file_bytes=int(args.max_upload_mb * MIB),
        max_total_bytes=int(args.max_total_upload_mb * MIB),
        max_image_pixels=args.max_image_pixels,
        max_request_pixels=args.max_request_pixels,
        max_queued_jobs=args.max_queued_jobs,
        max_job_attempts=args.max_job_attempts,
        upload_retention_s=args.upload_retention_hours * 3600.0,
        job_retention_s=args.job_retention_days * 86400.0 if args.job_retention_days else None,
        torch_threads=args.threads,
        preload=not args.no_preload,
        dtype=args.dtype,
    )
    if args.data_dir:
        kwargs["data_dir"] = args.data_dir
    settings = Settings(**kwargs)
    settings.validate()
    return settings


def check_models(settings) -> None:
    """Fail fast, with the reason, when the base model or the apprentice cannot be found."""
    from pathlib import Path

    from experts.recipe import list_recipes
    from suti.models import list_presets

    if settings.default_recipe not in list_recipes():
        raise InputError(f"--recipe {settings.default_recipe!r}: unknown; recipes: {', '.join(list_recipes())}")
    model = settings.model
    if model not in list_presets() and Path(model).expanduser().exists() and not (Path(model).expanduser() / "model_index.json").is_file():
        raise InputError(f"--model {model}: not a diffusers pipeline folder (no model_index.json)")
    if settings.apprentice == "toy":
        import importlib.util

        if importlib.util.find_spec("apprentice.toy") is None:
            raise InputError("--apprentice toy: the toy apprentice is not available in this installation; pass --apprentice FOLDER")
    elif not (Path(settings.apprentice).expanduser() / "model_index.json").is_file():
        raise InputError(f"--apprentice {settings.apprentice}: not an apprentice folder (no model_index.json)")


def _serve(args) -> int:
    import uvicorn

    from serving.app import create_app

    settings = settings_from_args(args)
    check_models(settings)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not settings.api_key:
        log.warning("binding %s without --api-key-env: anyone who can reach this port can use the API", args.host)
    app = create_app(settings)
    log.info("serving on http://%s:%d (data in %s, jobs on %s)", args.host, args.port, settings.data_dir, "ray " + settings.ray_address if settings.ray_address else "local processes")
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=args.log_level == "debug", timeout_graceful_shutdown=10)
    return 0
