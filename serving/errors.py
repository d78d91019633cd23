"""Error bodies of the HTTP API: every error answers JSON ``{"error": "..."}``.

:func:`install_error_handlers` adds the handlers to an app: :class:`ApiError` (raised at the edge
with its status and headers), request validation (415 for a body that is not a form, 400 for
fields sent blank, else 422 with ``detail``), Starlette's HTTP errors (404, 405) and anything
else (500, logged, no traceback in the answer).
"""

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.limits import ApiError

log = logging.getLogger(__name__)

FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


def field_name(loc: tuple) -> str:
    """The field a validation error's ``loc`` names, as a client writes it: ``captions[1]``."""
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header", "form")]
    name = ""
    for p in parts:
        name += f"[{p}]" if p.isdigit() else (f".{p}" if name else p)
    return name or "request"


async def api_error(request: Request, exc: ApiError) -> JSONResponse:
    """An :class:`ApiError`: its status, message and headers (``Retry-After``, ``WWW-Authenticate``)."""
    return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """415 when a POST's body is not a form; 400 when the only faults are fields sent blank
    (as :func:`serving.limits.clean_text` says); else 422. Both list each fault in ``error``
    (``field: message; ...``) and in ``detail`` (``[{"loc", "msg"}]``)."""
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
            messages.append(f"{field_name(loc)}: must not be empty")  # sent, but blank: as clean_text says
            continue
        only_empty = False
        message = f"{field_name(loc)}: {e.get('msg', 'invalid')}"
        if e.get("type") == "missing" and loc[-1] == "images" and media != "multipart/form-data":
            message += " (photos are uploaded as multipart/form-data)"
        messages.append(message)
    detail = [{"loc": list(e.get("loc", ())), "msg": e.get("msg")} for e in errors]
    return JSONResponse({"error": "; ".join(messages), "detail": detail}, status_code=400 if only_empty else 422)


async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Starlette's errors (unknown path 404, wrong method 405) in the same ``{"error"}`` form."""
    return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=getattr(exc, "headers", None))


async def internal_error(request: Request, exc: Exception) -> JSONResponse:
    """500 for anything unexpected: logged with its traceback, answered with its type only."""
    log.exception("internal error on %s %s", request.method, request.url.path)
    return JSONResponse({"error": f"internal error ({type(exc).__name__})"}, status_code=500)


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error of ``app`` as ``{"error": "..."}`` (see the module's docstring)."""
    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)
