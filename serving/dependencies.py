"""FastAPI dependencies at the edge: the app's :class:`~serving.app.Runtime`, the API key and
admission (a place in the generation queue, or among the queued expert jobs).

Admission is taken once a request's form is checked and before any photo is read or decoded,
so a full queue answers 429 at once; :func:`with_generation_place` and :func:`with_job_place` wrap a form
dependency to do so, and give the place back when the route is done with it.
"""

import hmac
import inspect
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Annotated, Any, Generic, TypeVar

from fastapi import Depends, Request

from serving.app import Runtime
from serving.generation import Admission, QueueFull
from serving.limits import ApiError

F = TypeVar("F")


async def get_runtime(request: Request) -> Runtime:
    """The :class:`Runtime` of the app serving ``request`` (``app.state.runtime``)."""
    return request.app.state.runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def require_key(request: Request, rt: RuntimeDep) -> None:
    """Nothing when the app has no API key; else the request must send it as
    ``Authorization: Bearer KEY`` or ``X-API-Key: KEY`` (compared in constant time): 401 if not."""
    settings = rt.settings
    if not settings.api_key:
        return
    given = request.headers.get("x-api-key") or ""
    auth = request.headers.get("authorization") or ""
    if auth.lower().startswith("bearer "):
        given = given or auth[7:].strip()
    if not given or not hmac.compare_digest(given.encode(), settings.api_key.encode()):
        raise ApiError(401, "missing or wrong API key (send 'Authorization: Bearer KEY' or 'X-API-Key: KEY')", {"WWW-Authenticate": "Bearer"})


def queue_full(rt: Runtime, exc: QueueFull) -> ApiError:
    """The 429 (with ``Retry-After``) for a full generation queue; counts the refusal."""
    rt.metrics.inc("suti_generate_rejected_total", help="Generation requests refused because the queue was full.")
    return ApiError(429, str(exc), {"Retry-After": str(exc.retry_after)})


@dataclass
class Admitted(Generic[F]):
    """A checked form with its place in the generation queue (hand ``admission`` to the service)."""

    form: F
    admission: Admission


def with_generation_place(form: Callable[..., Any]) -> Callable[..., AsyncIterator[Admitted]]:
    """A dependency: the value of the dependency ``form``, once checked, with a place in the
    generation queue (429 with ``Retry-After`` when none is free). Unless the route handed the
    place to :meth:`GenerationService.submit`, it is freed when the route ends. Use it through
    :func:`function_scoped`."""

    async def admitted_form(fields: Annotated[Any, Depends(form)], rt: RuntimeDep) -> AsyncIterator[Admitted]:
        try:
            admission = rt.generation.admit()
        except QueueFull as exc:
            raise queue_full(rt, exc) from None
        try:
            yield Admitted(fields, admission)
        finally:
            admission.release()  # nothing once submit() owns it

    return admitted_form


def with_job_place(form: Callable[..., Any]) -> Callable[..., AsyncIterator[Any]]:
    """A dependency: the value of the dependency ``form``, once checked, with a place among the
    ``max_queued_jobs`` waiting expert jobs (429 with ``Retry-After`` when none is free), held
    until the route ends (its job row is queued by then). Use it through :func:`function_scoped`."""

    async def reserved_form(fields: Annotated[Any, Depends(form)], rt: RuntimeDep) -> AsyncIterator[Any]:
        rt.reserve_job()
        try:
            yield fields
        finally:
            rt.unreserve_job()

    return reserved_form


def function_scoped(dependency: Callable[..., Any]) -> Any:
    """``Depends(dependency)`` whose code after ``yield`` runs when the route returns, before the
    answer is sent (FastAPI >= 0.121 says so with ``scope="function"``; 0.110-0.117 always did)."""
    if "scope" in inspect.signature(Depends).parameters:
        return Depends(dependency, scope="function")
    return Depends(dependency)
