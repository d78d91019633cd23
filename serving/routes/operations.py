"""Operations: ``/healthz``, ``/metrics``, the web page at ``/`` and the API reference at ``/docs``."""

import time

from fastapi import APIRouter, Depends
from fastapi.responses import HTMLResponse, PlainTextResponse

import suti
from serving.dependencies import RuntimeDep, require_key
from serving.generation import apprentice_loaded
from serving.metrics import CONTENT_TYPE
from serving.page import DOCS_PAGE, PAGE

PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; connect-src 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def healthz(rt: RuntimeDep):
    """
    \f
    Liveness, open without the API key: version, models, whether the apprentice is loaded
    (or why it could not be), the jobs backend, the generation queue and the uptime.
    """
    settings = rt.settings
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


def metrics(rt: RuntimeDep):
    """
    \f
    The Prometheus metrics of this process (text format); 401 without the API key.
    """
    return PlainTextResponse(rt.metrics.render(), media_type=CONTENT_TYPE)


def page():
    """The web page (self-contained; strict Content-Security-Policy)."""
    return HTMLResponse(PAGE, headers=PAGE_HEADERS)


def docs():
    """The API reference, drawn from ``/openapi.json`` by a self-contained page (no CDN)."""
    return HTMLResponse(DOCS_PAGE, headers=PAGE_HEADERS)


def operations_router() -> APIRouter:
    """``/healthz`` (open), ``/metrics`` (behind the API key), ``/`` and ``/docs`` (open; not in
    the OpenAPI schema)."""
    router = APIRouter()
    router.add_api_route("/healthz", healthz, methods=["GET"], summary="Liveness and what is loaded")
    router.add_api_route("/metrics", metrics, methods=["GET"], summary="Prometheus metrics", response_class=PlainTextResponse, dependencies=[Depends(require_key)])
    router.add_api_route("/", page, methods=["GET"], response_class=HTMLResponse, include_in_schema=False)
    router.add_api_route("/docs", docs, methods=["GET"], response_class=HTMLResponse, include_in_schema=False)
    return router
