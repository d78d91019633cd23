"""Serving: an HTTP service running the apprentice tuning-free beside per-subject DreamBooth experts.

>>> from serving import Settings, create_app
>>> app = create_app(Settings(model="tiny", apprentice="path/to/apprentice"))

``suti serve`` runs it with uvicorn; :mod:`serving.ray_app` wraps the same app in a Ray Serve
deployment. Endpoints: ``POST /v1/generate``, ``/v1/experts`` (jobs; their events as
Server-Sent Events at ``/v1/experts/{id}/events``, and signed webhooks), ``/v1/files/...``
(signed image URLs that expire), ``/healthz``, ``/metrics``, ``/docs`` and a web page at ``/``.
"""

from serving.settings import Settings


def create_app(settings: Settings | None = None):
    """The FastAPI app for ``settings`` (see :func:`serving.app.create_app`)."""
    from serving.app import create_app as _create_app

    return _create_app(settings)


__all__ = ["Settings", "create_app"]
