"""``GET /v1/files/{path}``: images handed out as signed URLs that expire (results answered with
``?expires=``, validation images in job events). The signature is the credential: no API key."""

from typing import Annotated

from fastapi import APIRouter, Path, Query
from fastapi.responses import FileResponse

from serving.dependencies import RuntimeDep
from serving.limits import ApiError
from serving.signing import check_url


def get_file(
    rt: RuntimeDep,
    path: Annotated[str, Path(description="the file, as the signed URL names it")],
    expires: Annotated[int, Query(ge=0, le=2**40, description="Unix second the URL expires at")],
    signature: Annotated[str, Query(min_length=64, max_length=64, pattern=r"^[0-9a-f]{64}$")],
):
    """
    \f
    The PNG a signed URL names. Errors: 422 for a malformed ``expires`` or ``signature``; 403
    for a signature that does not match; 410 once expired; 404 for a path no URL is made for,
    or a file deleted meanwhile (its job deleted, or swept after expiry).
    """
    check_url(rt.secret, path, expires, signature)
    file = rt.settings.data_dir / path  # check_url allows only results/<hex>-<t>.png and experts/<id>/validation/step-<n>.png
    if not file.is_file():
        raise ApiError(404, f"no file {path} (deleted)")
    return FileResponse(file, media_type="image/png", headers={"Cache-Control": "private, max-age=300", "X-Content-Type-Options": "nosniff"})


def files_router() -> APIRouter:
    """``GET /v1/files/{path}`` (open: the URL's signature is checked)."""
    router = APIRouter(prefix="/v1")
    router.add_api_route("/files/{path:path}", get_file, methods=["GET"], summary="An image handed out as a signed URL (no API key; expires)",
                         response_class=FileResponse, responses={200: {"content": {"image/png": {}}}, 403: {"description": "bad signature"}, 410: {"description": "expired"}})
    return router
