"""The server's secret and what it signs: webhook bodies (``X-Suti-Signature``) and image URLs
that expire (``/v1/files/...?expires=&signature=``).

The secret is :attr:`Settings.webhook_secret` (``suti serve --webhook-secret-env VAR``), else
the file ``DATA_DIR/webhook_secret`` (64 hex digits, mode 0600), made on the first start and
kept: servers sharing a data folder share it, and it survives restarts (URLs already handed out
stay valid, receivers keep verifying). Webhook signatures are HMAC-SHA256 over the exact body
bytes, ``sha256=<hex>``; URL signatures are HMAC-SHA256 over ``"url\\n" + path + "\\n" + expires``
(a different message form, so neither signature can stand in for the other).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import time
from pathlib import Path
from urllib.parse import quote

from serving.limits import ApiError

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Suti-Signature"
SECRET_FILE = "webhook_secret"
RESULT_NAME = re.compile(r"^results/([0-9a-f]{32})-([0-9]{1,12})\.png$")
VALIDATION_NAME = re.compile(r"^experts/[0-9a-f]{32}/validation/step-[0-9]{6,12}\.png$")


def load_secret(configured: str | None, data_dir: Path) -> bytes:
    """``configured`` (UTF-8), else the secret in ``data_dir/webhook_secret`` (made now if absent)."""
    if configured:
        return configured.encode()
    path = Path(data_dir) / SECRET_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        for _ in range(50):  # another server is writing it
            text = path.read_text().strip()
            if text:
                return text.encode()
            time.sleep(0.02)
        raise RuntimeError(f"{path} is empty: delete it to make a new webhook secret") from None
    with os.fdopen(fd, "w") as out:
        out.write(secrets.token_hex(32) + "\n")
    log.info("made the webhook and URL signing secret in %s (set --webhook-secret-env to choose it)", path)
    return path.read_text().strip().encode()


def sign_body(secret: bytes, body: bytes) -> str:
    """``X-Suti-Signature`` of ``body``: ``sha256=`` and the HMAC-SHA256 hex digest."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def verify_body(secret: bytes, body: bytes, header: str | None) -> bool:
    """Whether ``header`` is the signature of ``body`` (constant time), as a receiver checks it."""
    return bool(header) and hmac.compare_digest(sign_body(secret, body), header)


def _url_signature(secret: bytes, path: str, expires: int) -> str:
    return hmac.new(secret, f"url\n{path}\n{expires}".encode(), hashlib.sha256).hexdigest()


def signed_url(secret: bytes, path: str, expires: int, base_url: str = "") -> str:
    """``{base_url}/v1/files/{path}?expires=..&signature=..``: ``path`` (relative to the data
    folder) readable without the API key until Unix second ``expires``."""
    query = f"expires={expires}&signature={_url_signature(secret, path, expires)}"
    return f"{base_url.rstrip('/')}/v1/files/{quote(path)}?{query}"


def check_url(secret: bytes, path: str, expires: int, signature: str, now: float | None = None) -> None:
    """:class:`ApiError` 403 for a signature that is not the one of ``path`` and ``expires``, 410
    once ``expires`` has passed (404 for a path no URL is made for)."""
    if not (RESULT_NAME.fullmatch(path) or VALIDATION_NAME.fullmatch(path)):
        raise ApiError(404, f"no file {path}")
    if not hmac.compare_digest(_url_signature(secret, path, expires), signature or ""):
        raise ApiError(403, f"signature: not valid for {path} with expires={expires}")
    if expires < (time.time() if now is None else now):
        raise ApiError(410, f"this URL expired at {expires} (Unix seconds); ask for a new one")


def sweep_results(results_dir: Path, now: float | None = None) -> int:
    """Delete result images whose URLs have expired (their name holds the expiry); returns how many."""
    now = time.time() if now is None else now
    removed = 0
    try:
        names = os.listdir(results_dir)
    except FileNotFoundError:
        return 0
    for name in names:
        match = RESULT_NAME.fullmatch(f"results/{name}")
        if match and int(match.group(2)) < now:
            try:
                os.unlink(results_dir / name)
                removed += 1
            except FileNotFoundError:
                pass
    return removed
