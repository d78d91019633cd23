"""The serving app as a Ray Serve deployment (the same FastAPI app, one per replica).

    from ray import serve
    from serving.ray_app import build_app
    serve.run(build_app(Settings(model="toy", apprentice="toy"), num_gpus=1, max_replicas=4))

or ``serve run serving.ray_app:app_builder model=toy apprentice=toy num_gpus=1 max_replicas=4``.

Each replica builds the app on start-up (models load lazily, once per replica) and runs a job
dispatcher; by default the DreamBooth jobs run as Ray tasks on the same cluster. Replicas share
the job table and experts through ``data_dir``: with replicas on several nodes it must be a shared
file system whose locks work for SQLite (else keep the replicas on one node).
"""

from __future__ import annotations

from typing import Any

from serving.settings import Settings


def build_deployment(settings: Settings | None = None, *, num_gpus: float = 0.0, min_replicas: int = 1, max_replicas: int = 1, target_ongoing_requests: float = 2.0):
    """A Ray Serve deployment class serving ``create_app(settings)`` through ``@serve.ingress``."""
    from ray import serve

    settings = settings or Settings()
    if settings.ray_address is None:
        settings = settings.with_(ray_address="auto")  # jobs as Ray tasks on the replicas' cluster

    def build_asgi_app():  # evaluated on each replica
        from serving.app import create_app

        return create_app(settings)

    @serve.deployment(
        name="suti",
        ray_actor_options={"num_gpus": num_gpus},
        autoscaling_config={"min_replicas": min_replicas, "max_replicas": max_replicas, "target_ongoing_requests": target_ongoing_requests},
        max_ongoing_requests=settings.max_concurrency + settings.max_queue + 4,
    )
    @serve.ingress(build_asgi_app)
    class SutiDeployment:
        """One replica: the FastAPI app, its model cache, generation pool and job dispatcher."""

    return SutiDeployment


def build_app(settings: Settings | None = None, **deployment_options):
    """The bound Ray Serve application (pass to ``serve.run``)."""
    return build_deployment(settings, **deployment_options).bind()


def app_builder(args: dict[str, Any]):
    """``serve run serving.ray_app:app_builder key=value ...``: Settings fields and deployment options."""
    options = {k: type_(args.pop(k)) for k, type_ in (("num_gpus", float), ("min_replicas", int), ("max_replicas", int)) if k in args}
    fields = Settings.__dataclass_fields__
    unknown = sorted(set(args) - set(fields))
    if unknown:
        raise ValueError(f"unknown settings: {', '.join(unknown)}")
    defaults, converted = Settings(), {}
    for key, value in args.items():
        default = getattr(defaults, key)
        if isinstance(value, str) and isinstance(default, bool):
            value = value.strip().lower() in ("1", "true", "yes", "on")
        elif isinstance(value, str) and isinstance(default, (int, float)):
            value = type(default)(value)
        converted[key] = value
    return build_app(Settings(**converted), **options)
