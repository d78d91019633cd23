"""The routers of the HTTP API, assembled by :func:`serving.app.create_app`:

- :func:`generation_router`: ``POST /v1/generate`` (the apprentice, no tuning);
- :func:`experts_router`: ``/v1/experts`` (DreamBooth jobs) and generation with an expert;
- :func:`files_router`: ``GET /v1/files/{path}`` (signed image URLs that expire);
- :func:`operations_router`: ``/healthz``, ``/metrics``, the web page and ``/docs``.

Routes reach the app's state through :data:`serving.dependencies.RuntimeDep`; auth and
admission are dependencies (:mod:`serving.dependencies`). The routers are built from the
settings because their form limits are part of the published schema. Route docstrings begin
with a form feed (``\\f``): FastAPI publishes only the text before it, so the notes stay out
of ``/openapi.json``.
"""

from serving.routes.experts import experts_router
from serving.routes.files import files_router
from serving.routes.generation import generation_router
from serving.routes.operations import operations_router

__all__ = ["experts_router", "files_router", "generation_router", "operations_router"]
