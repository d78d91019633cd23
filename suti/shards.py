"""Webdataset shards of (demos, prompt, target) samples, written atomically and exactly once.

A sample with key ``K`` is stored as tar members ``K.target.jpg``, ``K.demo_0.jpg`` ...
``K.demo_{n-1}.jpg`` and ``K.json``; plain ``webdataset.WebDataset`` reads them. Shards are
``shard-000000.tar`` ...; each is written under a temporary name and renamed (on an object store:
uploaded as one object), so a shard that exists is complete, and it is never rewritten. Folders are
local paths or storage URIs (:mod:`suti.storage`: ``s3://``, ``gs://``, ``file://`` ...). The set of sample keys already in shards is read back from the shards
themselves (the ground truth after a crash), never from a separate ledger.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import tarfile
from pathlib import Path
from typing import Iterable

from PIL import Image

from suti import storage
from suti.tar_members import split_member

SHARD_GLOB = "shard-*.tar"
#: ``kind`` field of a photo sample's json (:mod:`mining.photos`: a cluster's photos, no target;
#: expert samples have no ``kind``).
PHOTO_KIND = "photos"


def jpeg_bytes(img: Image.Image, quality: int = 95) -> bytes:
    """Encode an image as JPEG bytes (deterministic for the same pixels)."""
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def png_bytes(img: Image.Image) -> bytes:
    """Encode an image as PNG bytes (lossless)."""
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def sample_members(key: str, target: bytes | None, demos: list[bytes], meta: dict, demo_ext: str = "jpg") -> list[tuple[str, bytes]]:
    """The tar members of one sample, in webdataset naming (``key.field``): ``key.target.jpg``
    (left out when ``target`` is ``None``: a photo sample), ``key.demo_<i>.<demo_ext>`` and
    ``key.json``."""
    if "." in key:
        raise ValueError(f"sample key {key!r} must not contain a dot")
    members = [] if target is None else [(f"{key}.target.jpg", target)]
    members += [(f"{key}.demo_{i}.{demo_ext}", d) for i, d in enumerate(demos)]
    members.append((f"{key}.json", json.dumps(meta, sort_keys=True).encode()))
    return members


def tar_bytes(members: Iterable[tuple[str, bytes]]) -> bytes:
    """An uncompressed tar of (name, bytes) members, in memory (fixed mtime/mode: deterministic)."""
    buf = io.BytesIO()
    _write_tar(buf, members)
    return buf.getvalue()


def _write_tar(fileobj, members: Iterable[tuple[str, bytes]]) -> None:
    with tarfile.open(fileobj=fileobj, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))


def write_tar_atomic(path: str | os.PathLike, members: Iterable[tuple[str, bytes]]) -> None:
    """Write a tar of (name, bytes) members to ``path`` (a local path or any storage URI) so that
    it appears whole or not at all.

    Local: a hidden temporary file in the same folder, fsync, rename. Object store: the tar is
    written to a local temporary file and uploaded as one object (a PUT, or a multipart upload
    that the store commits only when complete), so a listed shard is always complete.
    """
    with storage.atomic_path(path) as tmp, open(tmp, "wb") as f:
        _write_tar(f, members)


def read_tar(path: str | os.PathLike) -> list[tuple[str, bytes]]:
    """All (name, bytes) members of a tar (a local path or a storage URI).

    Raises:
        MissingInputError: there is no such file.
    """
    with storage.open_uri(path) as f, tarfile.open(fileobj=f, mode="r:") as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]


def group_samples(members: list[tuple[str, bytes]]) -> dict[str, dict[str, bytes]]:
    """Members -> {sample key: {field: bytes}} (fields like ``target.jpg``, ``json``)."""
    out: dict[str, dict[str, bytes]] = {}
    for name, data in members:
        key, field = split_member(name)  # from the end of the name, as every suti reader does
        if key is not None:
            out.setdefault(key, {})[field] = data
    return out


def shard_keys(path: str | os.PathLike) -> list[str]:
    """Sample keys stored in one shard (a local path or a storage URI), from the member headers
    (keys split at the field at the end of the name, :func:`suti.tar_members.split_member`)."""
    with storage.open_uri(path) as f, tarfile.open(fileobj=f, mode="r:") as tar:
        keys = {split_member(m.name)[0] for m in tar.getmembers() if m.isfile()}
    return sorted(k for k in keys if k is not None)


def existing_shards(folder: str | os.PathLike) -> list:
    """Complete shards in ``folder`` (a local folder: :class:`Path` objects; an object-store
    prefix: URIs), in order. Temporary files of unfinished writes are hidden names, not listed."""
    local = storage.local_path(folder)
    if local is not None:
        return sorted(local.glob(SHARD_GLOB))
    return storage.glob(storage.join(folder, SHARD_GLOB))


class ShardPacker:
    """Packs samples into fixed-size shards, continuing after whatever a crash left behind.

    ``add`` buffers samples; every ``samples_per_shard`` of them become one shard. ``flush``
    writes the remainder as a last, smaller shard. Keys already present in complete shards are
    ignored, so feeding the same sample twice (a re-run task, a restarted driver) writes it once.
    """

    def __init__(self, folder: str | os.PathLike, samples_per_shard: int):
        from suti.errors import InvalidValueError

        if isinstance(samples_per_shard, bool) or not isinstance(samples_per_shard, int) or samples_per_shard < 1:
            raise InvalidValueError(f"--samples-per-shard must be a whole number >= 1, got {samples_per_shard!r}")
        if not str(folder).strip():
            raise InvalidValueError("--output must name a folder or URI, got an empty string")
        self.uri = storage.resolve(folder)
        local = storage.local_path(self.uri)
        self.folder = local if local is not None else self.uri
        if local is not None:
            local.mkdir(parents=True, exist_ok=True)
            for stale in local.glob(".shard-*.tar.tmp-*"):
                stale.unlink()  # a half-written shard from a killed driver
        else:
            storage.require_bucket(self.uri)  # never a traceback from a missing bucket's listing
        self.samples_per_shard = samples_per_shard
        shards = existing_shards(self.folder)
        self.written: set[str] = set()
        for shard in shards:
            self.written.update(shard_keys(shard))
        self.next_index = (int(posixpath.basename(str(shards[-1])).split(".")[0].split("-")[1]) + 1) if shards else 0
        self.buffer: dict[str, list[tuple[str, bytes]]] = {}

    def add(self, key: str, members: list[tuple[str, bytes]]) -> list:
        """Buffer one sample; returns the shards written as a result (possibly none)."""
        if key in self.written or key in self.buffer:
            return []
        self.buffer[key] = members
        written = []
        while len(self.buffer) >= self.samples_per_shard:
            written.append(self._write(sorted(self.buffer)[: self.samples_per_shard]))
        return written

    def flush(self) -> list:
        """Write all buffered samples (the last shard may be smaller)."""
        return [self._write(sorted(self.buffer))] if self.buffer else []

    def _write(self, keys: list[str]):
        name = f"shard-{self.next_index:06d}.tar"
        path = self.folder / name if isinstance(self.folder, Path) else storage.join(self.uri, name)
        write_tar_atomic(path, [m for k in keys for m in self.buffer[k]])
        if shard_keys(path) != sorted(keys):  # read back: a listed shard must hold what we wrote
            raise OSError(f"{path}: the shard read back does not hold the {len(keys)} samples written")
        for k in keys:
            self.written.add(k)
            del self.buffer[k]
        self.next_index += 1
        return path
