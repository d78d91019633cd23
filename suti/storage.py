"""Storage URIs through fsspec: every path a job reads or writes may be local or an object store.

A *URI* is a local path (``runs/job``, ``/data/crawl``), a ``file://`` URL or any protocol fsspec
knows (``s3://bucket/job``, ``gs://bucket/job``, ``memory://x``). Rules (issue: expert generation
on a cluster with no shared filesystem):

* :func:`resolve` makes a local path absolute *on the driver*, before anything reaches a Ray
  worker (a worker resolves a relative path against its raylet's working directory);
* :func:`filesystem` returns ``(fs, path)`` from :func:`fsspec.core.url_to_fs`; a protocol whose
  package is missing raises :class:`~suti.errors.InputError` naming the extra to install
  (``pip install 'suti[s3]'`` for s3fs, ``suti[gcs]`` for gcsfs), so the CLI exits 2 and never
  creates a local folder named ``s3:``;
* endpoint and credentials come from the variables s3fs/botocore read themselves
  (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION`` ...),
  so any S3-compatible store works with no suti-specific flag;
* :func:`write_bytes` is atomic everywhere: locally a temporary file, fsync and ``os.replace``;
  on an object store a single PUT (or a multipart upload committed at close), which makes the
  object visible whole or not at all.

Upstream API: https://filesystem-spec.readthedocs.io/ (``url_to_fs``, ``AbstractFileSystem``).
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

from suti.errors import InputError, MissingInputError

#: The pip extra that brings each protocol's filesystem package.
PROTOCOL_EXTRAS = {
    "s3": ("s3fs", "s3"),
    "s3a": ("s3fs", "s3"),
    "gs": ("gcsfs", "gcs"),
    "gcs": ("gcsfs", "gcs"),
    "az": ("adlfs", "azure"),
    "abfs": ("adlfs", "azure"),
    "abfss": ("adlfs", "azure"),
}


def protocol(uri: str | os.PathLike) -> str:
    """The URI's protocol: ``"file"`` for a local path, else the part before ``://``."""
    text = os.fspath(uri)
    if "://" in text:
        return text.split("://", 1)[0].lower()
    return "file"


def is_local(uri: str | os.PathLike) -> bool:
    """Whether ``uri`` names the local filesystem (a plain path or ``file://``)."""
    return protocol(uri) in ("file", "local")


def is_remote(uri: str | os.PathLike | None) -> bool:
    """Whether ``uri`` names an object store or other non-local filesystem (``s3://``, ``gs://``,
    ``memory://``...), not a local path or ``file://`` URL."""
    return bool(uri) and "://" in os.fspath(uri) and not is_local(uri)


def resolve(uri: str | os.PathLike) -> str:
    """``uri`` ready to hand to another process or node.

    A plain local path becomes absolute (``~`` expanded); a ``file://`` URL becomes its absolute
    path; any other URI is returned unchanged (trailing ``/`` removed).
    """
    text = os.fspath(uri)
    if is_local(text):
        if "://" in text:
            text = text.split("://", 1)[1]
        return os.path.abspath(os.path.expanduser(text))
    return text.rstrip("/")


def absolute_if_local(value: str | None) -> str | None:
    """``value`` made absolute when it names an existing local file or folder (a model folder, a
    recipe YAML, a checkpoint), so that a Ray worker with another working directory finds it;
    any other value (a preset or scorer name, a hub id, a URI, ``None``) is returned unchanged."""
    if value is None or "://" in str(value) or not os.path.exists(os.path.expanduser(str(value))):
        return value
    return os.path.abspath(os.path.expanduser(str(value)))


def local_path(uri: str | os.PathLike) -> Path | None:
    """The :class:`Path` of a local URI, or ``None`` for an object-store URI."""
    return Path(resolve(uri)) if is_local(uri) else None


def filesystem(uri: str | os.PathLike):
    """``(fs, path)`` for ``uri`` (:func:`fsspec.core.url_to_fs`).

    Raises:
        InputError: the protocol is unknown, or its filesystem package is not installed (the
            message names the extra to install).
    """
    import fsspec.core

    text = resolve(uri)
    proto = protocol(text)
    try:
        return fsspec.core.url_to_fs(text)
    except ImportError as exc:
        package, extra = PROTOCOL_EXTRAS.get(proto, (getattr(exc, "name", None) or f"the {proto} filesystem package", None))
        hint = f"pip install 'suti[{extra}]' (or {package})" if extra else f"install {package}"
        raise InputError(f"{text}: the {proto}:// protocol needs {package}, which is not installed; {hint}") from None
    except ValueError as exc:
        raise InputError(f"{text}: {exc}") from None


def join(uri: str | os.PathLike, *parts: str) -> str:
    """``uri`` joined with ``parts`` using ``/`` (also for object stores)."""
    base = resolve(uri)
    if is_local(base):
        return os.path.join(base, *parts)
    return posixpath.join(base, *parts)


def exists(uri: str | os.PathLike) -> bool:
    """Whether a file or folder (prefix) exists at ``uri``."""
    fs, path = filesystem(uri)
    return fs.exists(path)


def isfile(uri: str | os.PathLike) -> bool:
    """Whether ``uri`` is a file (object)."""
    fs, path = filesystem(uri)
    return fs.isfile(path)


def isdir(uri: str | os.PathLike) -> bool:
    """Whether ``uri`` is a folder (for object stores: a prefix with objects under it)."""
    fs, path = filesystem(uri)
    return fs.isdir(path)


#: Protocols whose first path component is a bucket (container) that suti never creates.
BUCKET_PROTOCOLS = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "oss", "r2")


def require_bucket(uri: str | os.PathLike) -> None:
    """Refuse an output URI whose bucket does not exist: suti never creates buckets (a typo in
    the name would silently make a new one), and a write into a missing bucket would fail late.

    Raises:
        MissingInputError: naming the bucket and the URI.
    """
    text = resolve(uri)
    if protocol(text) not in BUCKET_PROTOCOLS:
        return
    fs, path = filesystem(text)
    bucket = path.split("/", 1)[0]
    try:
        found = fs.exists(bucket)
    except Exception as exc:  # noqa: BLE001 - permissions or endpoint errors name themselves
        raise MissingInputError(f"{text}: cannot reach bucket {bucket!r} ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not found:
        raise MissingInputError(f"{text}: bucket {bucket!r} does not exist (create it first; suti never creates buckets)")


def makedirs(uri: str | os.PathLike) -> None:
    """Create a folder locally; on an object store check that the bucket exists
    (:func:`require_bucket`) and create nothing (prefixes need no creation)."""
    if not is_local(uri):
        require_bucket(uri)
        return
    fs, path = filesystem(uri)
    fs.makedirs(path, exist_ok=True)


def read_bytes(uri: str | os.PathLike) -> bytes:
    """The whole content of a file.

    Raises:
        MissingInputError: there is no such file.
    """
    fs, path = filesystem(uri)
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        raise MissingInputError(f"{resolve(uri)}: no such file") from None


def read_text(uri: str | os.PathLike) -> str:
    """The content of a UTF-8 text file (see :func:`read_bytes`)."""
    return read_bytes(uri).decode("utf-8")


def write_bytes(uri: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``uri`` atomically: readers see the old content or the new, never part.

    Local: a hidden temporary file in the same folder, fsync, ``os.replace``. Object store: one
    PUT (fsspec's ``pipe_file``), which an object store makes visible only when complete.
    """
    target = local_path(uri)
    if target is not None:
        with atomic_local_path(target) as tmp:
            tmp.write_bytes(data)
        return
    fs, path = filesystem(uri)
    fs.pipe_file(path, data)


def write_text(uri: str | os.PathLike, text: str) -> None:
    """Write UTF-8 text atomically (see :func:`write_bytes`)."""
    write_bytes(uri, text.encode("utf-8"))


def save_pretrained_atomic(model, folder: str | os.PathLike, *, last: tuple[str, ...] = ("model_index.json", "config.json"), **kwargs) -> Path:
    """``model.save_pretrained`` into a hidden temporary folder beside the files of ``folder``,
    then each entry renamed into ``folder``, the loading entry points (``last``) after the rest,
    so a killed save never leaves a folder that loads half-written weights. Other entries of
    ``folder`` (checkpoints, logs) are kept. Returns ``folder``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".save-", dir=folder))
    try:
        model.save_pretrained(str(tmp), **kwargs)
        umask_modes(tmp)
        entries = sorted(tmp.iterdir(), key=lambda p: (p.name in last, p.name))
        for entry in entries:
            dest = folder / entry.name
            if dest.is_dir() and not dest.is_symlink():
                shutil.rmtree(dest)
            os.replace(entry, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def umask_modes(path: str | os.PathLike) -> None:
    """Give ``path`` (a file, or a folder and everything under it) the modes a plain ``open`` or
    ``mkdir`` would have: ``0o666`` / ``0o777`` less the process's umask. Temporary files and
    folders (``tempfile``, safetensors' own temporary file) are created ``0o600`` / ``0o700``, so
    without this a renamed-into-place weight file or cache folder is unreadable to the other
    users and containers that share it."""
    mask = os.umask(0)
    os.umask(mask)
    root = Path(path)
    for entry in [root, *root.rglob("*")] if root.is_dir() else [root]:
        if entry.is_symlink():
            continue
        os.chmod(entry, (0o777 if entry.is_dir() else 0o666) & ~mask)


@contextlib.contextmanager
def atomic_local_path(path: str | os.PathLike):
    """For writers that need a file name (``torch.save``, ``safetensors.save_file``,
    ``tarfile``): yields a hidden temporary path beside ``path``; when the block ends without an
    error the file is fsynced and renamed to ``path`` (``os.replace``), else removed.

    >>> with atomic_local_path("out/model.safetensors") as tmp:  # doctest: +SKIP
    ...     save_file(state, str(tmp))
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        umask_modes(tmp)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_path(uri: str | os.PathLike):
    """:func:`atomic_local_path` for any URI: yields a local temporary path to write; when the
    block ends without an error it becomes ``uri`` whole (locally by rename; on an object store
    by one upload, which the store makes visible only when complete)."""
    target = local_path(uri)
    if target is not None:
        with atomic_local_path(target) as tmp:
            yield tmp
        return
    with tempfile.TemporaryDirectory(prefix="suti-upload-") as tmp:
        local = Path(tmp) / posixpath.basename(resolve(uri))
        yield local
        upload(local, uri)


def remove(uri: str | os.PathLike, missing_ok: bool = True) -> None:
    """Delete a file (object)."""
    fs, path = filesystem(uri)
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        if not missing_ok:
            raise


def listdir(uri: str | os.PathLike) -> list[str]:
    """Names (not paths) of the entries directly under a folder, sorted; ``[]`` if it is absent.
    Always a fresh listing (fsspec's listing cache is dropped first)."""
    fs, path = filesystem(uri)
    fs.invalidate_cache(path)  # another process may have written since (s3fs caches listings)
    try:
        entries = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    return sorted({posixpath.basename(e.rstrip("/")) for e in entries if e.rstrip("/") != path.rstrip("/")})


def glob(pattern: str | os.PathLike) -> list[str]:
    """URIs matching a glob pattern (``*``, ``?``, ``[..]``), sorted, with the pattern's protocol."""
    fs, path = filesystem(pattern)
    fs.invalidate_cache()  # another process may have written since (s3fs caches listings)
    found = sorted(fs.glob(path))
    if is_local(pattern):
        return found
    return [fs.unstrip_protocol(p) for p in found]


def expand(pattern: str | os.PathLike) -> list[str]:
    """URIs named by a pattern: webdataset brace ranges (``shard-{000..009}.tar``) and globs.

    A plain URI with neither is returned as itself (it need not exist yet). Sorted, deduplicated.
    """
    import braceexpand

    text = resolve(pattern)
    out: list[str] = []
    for one in braceexpand.braceexpand(text):
        if any(c in one for c in "*?["):
            out += glob(one)
        else:
            out.append(one)
    return sorted(set(out))


@contextlib.contextmanager
def open_uri(uri: str | os.PathLike, mode: str = "rb") -> Iterator:
    """An open file object for ``uri`` (fsspec's ``fs.open``); for writing prefer :func:`write_bytes`."""
    fs, path = filesystem(uri)
    try:
        f = fs.open(path, mode)
    except FileNotFoundError:
        raise MissingInputError(f"{resolve(uri)}: no such file") from None
    with f:
        yield f


@contextlib.contextmanager
def local_copy(uri: str | os.PathLike) -> Iterator[Path]:
    """A local path holding ``uri``'s content (the file itself when local; else a temporary copy,
    file or folder, removed afterwards)."""
    path = local_path(uri)
    if path is not None:
        yield path
        return
    fs, remote = filesystem(uri)
    tmp = Path(tempfile.mkdtemp(prefix="suti-copy-"))
    try:
        dest = tmp / posixpath.basename(remote.rstrip("/"))
        if fs.isdir(remote):
            fs.get(remote.rstrip("/") + "/", str(dest), recursive=True)
        else:
            fs.get_file(remote, str(dest))
        yield dest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


#: ``fs.info`` fields that change when an object's content changes, in order of preference: the
#: first one present stamps the object (S3 ``ETag``, GCS/Azure ``etag``, local and SFTP ``mtime``,
#: ``LastModified``/``last_modified``/``updated``, GCS ``generation``/``md5Hash``/``crc32c``, and
#: last the memory filesystem's ``created``, which it renews on every write).
STAMP_FIELDS = ("ETag", "etag", "mtime", "LastModified", "last_modified", "updated", "generation", "md5Hash", "crc32c", "created")


def _stamp(fs, path: str, info: dict) -> str:
    """What identifies the object's current content: its first :data:`STAMP_FIELDS` value, else
    (a filesystem that reports none) a hash of its bytes, so a changed object never keeps its key."""
    import hashlib

    for key in STAMP_FIELDS:
        if info.get(key):
            return str(info[key])
    return "sha256:" + hashlib.sha256(fs.cat_file(path)).hexdigest()


def fingerprint(uri: str | os.PathLike) -> str:
    """What identifies the current content of a file or folder URI: the sorted (relative path,
    size, stamp) of every file below it (fsspec's ``find(detail=True)``; the stamp is the
    object's ETag or modification time, :func:`_stamp`), hashed. fsspec's listing cache is
    dropped first, so an object another process changed since is seen changed.

    Raises:
        MissingInputError: nothing exists at ``uri``.
    """
    import hashlib
    import json

    fs, path = filesystem(uri)
    fs.invalidate_cache(path)  # s3fs caches listings: another writer's change must show
    try:
        found = fs.find(path, detail=True) if fs.isdir(path) else {path: fs.info(path)}
    except FileNotFoundError:
        found = {}
    if not found:
        raise MissingInputError(f"{resolve(uri)}: no such file or folder")
    rows = sorted((posixpath.relpath(p, path) if p != path else "", info.get("size"), _stamp(fs, p, info)) for p, info in found.items())
    return hashlib.sha256(json.dumps(rows, default=str).encode()).hexdigest()[:16]


def cached_copy(uri: str | os.PathLike, cache_root: str | os.PathLike) -> Path:
    """A local path for ``uri`` that lasts: ``uri`` itself when local; else a copy of the file or
    folder made once per machine under ``cache_root/<hash of uri and its fingerprint>/``, so that
    every process of a node (Ray workers, DeepSpeed ranks) reuses one download of a 1-7 GB model,
    and a changed object (another size or stamp: ETag, modification time, :func:`fingerprint`)
    is downloaded again: the cache is keyed on what is there now, never on the URI alone.
    Concurrent callers wait on a file lock; the copy is made in a temporary folder and renamed
    into place, so a killed download is never used.

    Raises:
        MissingInputError: nothing exists at ``uri``.
        InputError: the protocol's package is missing (:func:`filesystem`).
    """
    import hashlib

    from filelock import FileLock

    path = local_path(uri)
    if path is not None:
        return path
    fs, remote = filesystem(uri)
    remote = remote.rstrip("/")
    key = hashlib.sha256(f"{resolve(uri)}\n{fingerprint(uri)}".encode()).hexdigest()[:20]
    root = Path(cache_root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    entry = root / key
    dest = entry / posixpath.basename(remote)
    with FileLock(str(root / f"{key}.lock")):
        if dest.exists():
            return dest
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
        try:
            part = tmp / posixpath.basename(remote)
            if fs.isdir(remote):
                fs.get(remote + "/", str(part), recursive=True)
            else:
                fs.get_file(remote, str(part))
            shutil.rmtree(entry, ignore_errors=True)  # a leftover without its content
            umask_modes(tmp)
            os.replace(tmp, entry)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return dest


def upload(local: str | os.PathLike, uri: str | os.PathLike) -> None:
    """Copy a local file or folder to ``uri`` (a plain copy when ``uri`` is local)."""
    local = Path(local)
    dest = local_path(uri)
    if dest is not None:
        if local.resolve() == dest.resolve():
            return
        if local.is_dir():
            shutil.copytree(local, dest, dirs_exist_ok=True)
        else:
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(local, dest)
        return
    fs, path = filesystem(uri)
    if local.is_dir():
        fs.put(str(local).rstrip("/") + "/", path, recursive=True)
    else:
        fs.put_file(str(local), path)
