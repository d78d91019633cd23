"""Reading a web crawl: (image, alt text, image URL, page URL) records from four layouts.

:func:`iter_records` reads

* ``shards``: img2dataset-style webdataset tar shards - a folder of ``*.tar`` files, a glob
  (``crawl/*.tar``) or a brace pattern (``crawl-{00000..00009}.tar``); each sample has the
  members ``key.jpg`` (or ``.png``/``.webp``...), ``key.txt`` (alt text) and ``key.json``
  (``url``, ``page_url``, optionally ``caption``); keys may contain dots (the field is taken
  from the end of the member name, unlike webdataset's first-dot split);
* ``folder``: the same three files per key loose in a folder (img2dataset's ``files`` layout,
  e.g. ``suti world make``'s ``images/``);
* ``jsonl``: a manifest, one JSON object per line with ``key``, ``path`` (relative to the
  manifest or absolute), ``url``, ``page_url`` and ``caption``;
* ``parquet``: a manifest with the same columns.

A world crawl folder (``suti world make --output W``) is read through its ``shards/``, else its
``crawl.jsonl``, else its ``images/``. Records carry a *reference* to the image bytes (a file, or
a byte range of an uncompressed tar), so they are cheap to ship to Ray workers; images are
decoded and validated by :func:`decode_record`, which raises :class:`SkipImage` with a reason
(``unreadable``, ``too_small``) - such images are counted and skipped, never fatal. A malformed
manifest line (not JSON, not an object, no ``path`` or ``page_url``, a duplicate key) stops the
run with an :class:`~suti.errors.InputError` naming the file and line number, or - with
``on_bad_line="skip"`` - is skipped, counted and listed in one warning.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import tarfile
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from suti import storage
from suti.errors import InputError
from suti.images import IMAGE_EXTENSIONS, decode_image
from suti.tar_members import drop_reason, split_member

log = logging.getLogger(__name__)

FORMATS = ("auto", "shards", "folder", "jsonl", "parquet")
#: Images with a side below this many pixels are skipped as ``too_small``.
DEFAULT_MIN_SIDE = 16
_IMAGE_EXTS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)


class SkipImage(Exception):
    """An image that mining skips and counts; ``reason`` is the counter key."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class Record:
    """One crawled image: metadata plus where its bytes are.

    Exactly one of: ``data`` (inline bytes), ``path`` with ``offset``/``size`` (a byte range of
    an uncompressed tar shard), or ``path`` alone (a whole file).
    """

    key: str
    caption: str
    url: str
    page_url: str
    path: str | None = None
    offset: int | None = None
    size: int | None = None
    data: bytes | None = None

    @property
    def name(self) -> str:
        """How errors name the image: ``shard.tar:key`` or the file path."""
        if self.path and self.offset is not None:
            return f"{self.path}:{self.key}"
        return self.path or self.key

    def source(self) -> dict | None:
        """Where the bytes are, for reading them back later (:func:`load_crawl_images`):
        ``{"path", "offset", "size"}`` with an absolute path, or ``None`` for inline bytes."""
        if self.data is not None or not self.path:
            return None
        path = self.path if _is_uri(self.path) else str(Path(self.path).resolve())
        return {"path": path, "offset": self.offset, "size": self.size}

    def read_bytes(self) -> bytes:
        """The encoded image bytes (raises ``OSError`` if the file is gone). ``path`` may be a
        storage URI (``s3://...``): then the file or byte range is read through fsspec."""
        if self.data is not None:
            return self.data
        if _is_uri(self.path):
            fs, path = storage.filesystem(self.path)
            if self.offset is None:
                return fs.cat_file(path)
            return fs.cat_file(path, start=self.offset, end=self.offset + self.size)
        if self.offset is None:
            return Path(self.path).read_bytes()
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            return f.read(self.size)


def decode_record(record: Record, min_side: int = DEFAULT_MIN_SIDE) -> Image.Image:
    """Decode and validate a record's image (8-bit RGB).

    Raises:
        SkipImage: ``unreadable`` (missing, empty, corrupt, not an image, a decompression bomb)
            or ``too_small`` (a side below ``min_side`` pixels).
    """
    try:
        img = decode_image(record.read_bytes(), record.name)
    except (InputError, OSError) as exc:
        raise SkipImage("unreadable", str(exc)) from None
    if min(img.size) < min_side:
        raise SkipImage("too_small", f"{record.name}: {img.width}x{img.height} is below "
                                     f"{min_side} px")
    return img


# --------------------------------------------------------------------------- storage


def _is_uri(path) -> bool:
    """Whether ``path`` is an object-store URI (not a local path or ``file://``)."""
    return storage.is_remote(path)


@contextlib.contextmanager
def local_crawl(crawl: str | os.PathLike) -> Iterator[tuple[str, Callable[[str], str]]]:
    """``(local, to_uri)``: a local path to read the crawl ``crawl`` from, and a function that maps
    a file path under ``local`` back to its URI (for records and ``sources`` other nodes read).

    A local crawl (path or ``file://``) is used in place, made absolute (``to_uri`` is the
    identity). An object-store crawl (``s3://bucket/crawl``: a folder, a file, or a glob/brace
    pattern of shards) is copied to a temporary folder, removed afterwards.

    Raises:
        InputError: the protocol's filesystem package is missing (names the extra), or there is
            no crawl at ``crawl``.
    """
    uri = storage.resolve(crawl)
    if not _is_uri(uri):
        yield uri, lambda path: path
        return
    fs, _ = storage.filesystem(uri)
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="suti-crawl-"))
        roots: list[tuple[str, str]] = []
        if any(c in uri for c in "*?[{"):
            files = [u for u in storage.expand(uri) if storage.isfile(u)]
            if not files:
                raise InputError(f"{uri}: the shard pattern matches no file")
            for u in files:
                dest = os.path.join(tmp, os.path.basename(u.rstrip("/")))
                fs.get_file(storage.filesystem(u)[1], dest)
                roots.append((dest, u))
            local = tmp
        else:
            if not storage.exists(uri):
                raise InputError(f"{uri}: no such crawl file or folder")
            local = str(stack.enter_context(storage.local_copy(uri)))
            roots.append((local, uri))
            if os.path.isfile(local) and local.endswith((".jsonl", ".jsonl.gz", ".parquet")):
                # a manifest names its images relative to its own folder: fetch those beside the copy
                base, remote_base = os.path.dirname(local), uri.rsplit("/", 1)[0]
                relative = sorted({p for p in _manifest_paths(local) if p and not os.path.isabs(p) and "://" not in p})
                for rel in relative:
                    dest = os.path.normpath(os.path.join(base, rel))
                    if not dest.startswith(base + os.sep):
                        continue  # "../" outside the manifest's folder: left unreadable, counted as such
                    os.makedirs(os.path.dirname(dest), exist_ok=True)
                    try:
                        fs.get_file(storage.filesystem(storage.join(remote_base, rel))[1], dest)
                    except FileNotFoundError:
                        pass  # counted as unreadable by the reader, as a missing local file is
                roots.append((base, remote_base))

        def to_uri(path: str) -> str:
            full = os.path.abspath(path)
            for root, remote in roots:
                if full == root:
                    return remote
                if full.startswith(root + os.sep):
                    return storage.join(remote, *os.path.relpath(full, root).split(os.sep))
            return path

        yield local, to_uri


# --------------------------------------------------------------------------- layouts


def _expand(pattern: str) -> list[str]:
    """Shard paths of a glob and/or brace pattern, sorted, existing files only."""
    from braceexpand import braceexpand

    paths = []
    for p in braceexpand(pattern):
        paths.extend(sorted(glob.glob(p)) if glob.has_magic(p) else [p])
    return [p for p in paths if Path(p).is_file()]


def detect_format(crawl: str | Path) -> tuple[str, list[str]]:
    """``(format, paths)`` of a crawl argument (see the module docstring)."""
    s = str(crawl)
    p = Path(s)
    if p.is_file():
        if p.suffix == ".jsonl" or p.name.endswith(".jsonl.gz"):
            return "jsonl", [s]
        if p.suffix == ".parquet":
            return "parquet", [s]
        if p.name.endswith((".tar", ".tar.gz", ".tgz")):
            return "shards", [s]
        raise InputError(f"{s}: unknown crawl file type (.tar, .jsonl or .parquet)")
    if p.is_dir():
        tars = sorted(str(t) for t in p.glob("*.tar"))
        if tars:
            return "shards", tars
        if any(f.suffix.lower() in IMAGE_EXTENSIONS for f in p.iterdir()):
            return "folder", [s]
        for sub, fmt in (("shards", None), ("crawl.jsonl", "jsonl"),
                         ("crawl.parquet", "parquet"), ("images", None)):
            if (p / sub).exists():
                return (fmt, [str(p / sub)]) if fmt else detect_format(p / sub)
        raise InputError(f"{s}: no crawl there (no *.tar shards, images, crawl.jsonl or "
                         f"crawl.parquet)")
    if any(c in s for c in "*?[{"):
        paths = _expand(s)
        if paths:
            return "shards", paths
        raise InputError(f"{s}: the shard pattern matches no file")
    raise InputError(f"{s}: no such crawl file or folder")


def _iter_shards(paths: list[str], counts: Counter) -> Iterator[Record]:
    """Samples of webdataset tars (members of one key are consecutive, as webdataset needs)."""

    def finish(key, members, path):
        image = next((members[e] for e in _IMAGE_EXTS if e in members), None)
        meta = members.get("json")
        if image is None:
            counts["no_image_member"] += 1
            return None
        try:
            meta = json.loads(meta) if meta is not None else {}
            if not isinstance(meta, dict):
                raise ValueError("not an object")
        except ValueError:
            counts["bad_metadata"] += 1
            log.debug("%s:%s: unreadable json member", path, key)
            return None
        txt = members.get("txt")
        caption = txt.decode("utf-8", "replace") if txt is not None else meta.get("caption")
        if not meta.get("page_url"):
            counts["no_page_url"] += 1
            return None
        off, size, data = image
        return Record(str(meta.get("key") or key), str(caption or "").strip(),
                      str(meta.get("url") or ""), str(meta["page_url"]), path, off, size, data)

    for path in paths:
        try:
            tar = tarfile.open(path, "r:*")
        except (tarfile.TarError, OSError) as exc:
            raise InputError(f"{path}: not a readable tar shard ({exc})") from None
        seekable = path.endswith(".tar")
        key, members = None, {}
        with tar:
            try:
                for m in tar:
                    if not m.isfile():
                        continue
                    reason = drop_reason(m.name, compound=False)
                    if reason:  # not part of any sample: counted, never silently lost
                        counts[f"member:{reason}"] += 1
                        log.debug("%s: member %s skipped (%s)", path, m.name, reason)
                        continue
                    base, ext = split_member(m.name, compound=False)  # keys may contain dots (img2dataset)
                    if base != key:
                        rec = finish(key, members, path) if key is not None else None
                        if rec:
                            yield rec
                        key, members = base, {}
                    if ext in _IMAGE_EXTS:
                        data = None if seekable else tar.extractfile(m).read()
                        members[ext] = (m.offset_data if seekable else None,
                                        m.size if seekable else None, data)
                    elif ext in ("txt", "json"):
                        members[ext] = tar.extractfile(m).read()
                    else:
                        counts["member:unused_field"] += 1
            except (tarfile.TarError, OSError, EOFError) as exc:
                log.warning("%s: truncated or corrupt shard, read up to the error (%s)", path, exc)
                counts["corrupt_shard"] += 1
            if key is not None:
                rec = finish(key, members, path)
                if rec:
                    yield rec


def _iter_folder(folder: str, counts: Counter) -> Iterator[Record]:
    """``key.jpg`` + ``key.txt`` + ``key.json`` files of a folder, sorted by key."""
    for img in sorted(Path(folder).iterdir()):
        if img.suffix.lower() not in IMAGE_EXTENSIONS or img.name.startswith("."):
            continue
        side = img.with_suffix(".json")
        try:
            meta = json.loads(side.read_text()) if side.is_file() else {}
        except (ValueError, OSError):
            meta = None
        if not isinstance(meta, dict):
            counts["bad_metadata"] += 1
            continue
        if not meta.get("page_url"):
            counts["no_page_url"] += 1
            continue
        txt = img.with_suffix(".txt")
        caption = txt.read_text(errors="replace") if txt.is_file() else meta.get("caption")
        yield Record(str(meta.get("key") or img.stem), str(caption or "").strip(),
                     str(meta.get("url") or ""), str(meta["page_url"]), str(img))


def _manifest_paths(path: str) -> list[str]:
    """The ``path`` field of every row of a JSONL or parquet manifest (bad rows skipped: the
    reader reports them)."""
    out = []
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path, columns=["path"])
        except Exception:  # noqa: BLE001 - the reader says what is wrong with the file
            return []
        return [str(p) for p in table.column("path").to_pylist() if p]
    import gzip

    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and row.get("path"):
                out.append(str(row["path"]))
    return out


def check_crawl(crawl: str, flag: str = "--crawl") -> None:
    """Refuse at once a crawl argument that names nothing: a folder, a file (shards, manifest)
    or a glob/brace pattern that matches at least one file, local or at a storage URI.

    Raises:
        MissingInputError: naming the flag and the value.
    """
    from suti.errors import MissingInputError

    if any(c in crawl for c in "*?[{"):
        if not [u for u in storage.expand(crawl) if storage.isfile(u)]:
            raise MissingInputError(f"{crawl}: the shard pattern matches no file ({flag})")
    elif not storage.exists(crawl):
        raise MissingInputError(f"{crawl}: no such crawl file or folder ({flag})")


def _manifest_record(row, base: Path, seen: set) -> Record:
    """A manifest row -> Record; raises ``ValueError`` saying what is wrong with it."""
    if not isinstance(row, dict):
        raise ValueError("not a JSON object")
    path, page = row.get("path"), row.get("page_url")
    if not path:
        raise ValueError("no 'path'")
    if not page:
        raise ValueError("no 'page_url'")
    key = str(row.get("key") or Path(str(path)).stem)
    if key in seen:
        raise ValueError(f"duplicate key {key!r}")
    seen.add(key)
    full = Path(str(path))
    full = full if full.is_absolute() else base / full
    return Record(key, str(row.get("caption") or "").strip(), str(row.get("url") or ""),
                  str(page), str(full))


def _iter_manifest(path: str, fmt: str, counts: Counter, on_bad_line: str) -> Iterator[Record]:
    """Rows of a JSONL or parquet manifest; bad rows raise or are counted (``on_bad_line``)."""
    base, seen, bad = Path(path).resolve().parent, set(), []

    def rows():
        if fmt == "jsonl":
            import gzip

            opener = gzip.open if path.endswith(".gz") else open
            with opener(path, "rt", encoding="utf-8", errors="replace") as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            yield n, json.loads(line)
                        except ValueError as exc:
                            yield n, exc
            return
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
        except Exception as exc:  # pyarrow raises several types for a non-parquet file
            raise InputError(f"{path}: not a readable parquet file ({exc})") from None
        n = 0
        for batch in pf.iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                n += 1
                yield n, row

    for n, row in rows():
        try:
            if isinstance(row, Exception):
                raise ValueError(f"not JSON ({row})")
            yield _manifest_record(row, base, seen)
        except ValueError as exc:
            where = f"{path}: line {n}" if fmt == "jsonl" else f"{path}: row {n}"
            if on_bad_line == "error":
                raise InputError(f"{where}: malformed manifest entry: {exc}") from None
            counts["malformed_manifest_line"] += 1
            bad.append(n)
    if bad:
        what = "line" if fmt == "jsonl" else "row"
        log.warning("%s: skipped %d malformed manifest %ss: %s%s", path, len(bad), what,
                    ", ".join(map(str, bad[:50])), " ..." if len(bad) > 50 else "")


def iter_records(crawl: str | Path, counts: Counter | None = None, *, fmt: str = "auto",
                 on_bad_line: str = "error") -> Iterator[Record]:
    """Yield the :class:`Record` of every crawled image that has a page URL.

    Args:
        crawl: a shard folder/file/pattern, an image folder, a ``.jsonl`` or ``.parquet``
            manifest, or a ``suti world make`` output folder.
        counts: a Counter that receives skipped-sample reasons (``no_page_url``,
            ``bad_metadata``, ``no_image_member``, ``duplicate_key``,
            ``malformed_manifest_line``, ``corrupt_shard``) and, for shards, skipped tar
            members as ``member:<reason>`` (``no_extension``, ``unknown_field``,
            ``unused_field``). Shard members are grouped into samples by the extension at the
            *end* of their name (:func:`suti.tar_members.split_member`), so img2dataset keys
            with dots (``img.2024.05_ab12.png``) read like the folder layout.
        fmt: one of :data:`FORMATS` (``auto`` detects it).
        on_bad_line: ``"error"`` (InputError with the line number) or ``"skip"`` (count, warn).

    Raises:
        InputError: no crawl at ``crawl``, an unknown format, or a malformed manifest line.
    """
    if fmt not in FORMATS:
        raise InputError(f"unknown crawl format {fmt!r}; known: {', '.join(FORMATS)}")
    if on_bad_line not in ("error", "skip"):
        raise InputError(f"on_bad_line must be 'error' or 'skip', got {on_bad_line!r}")
    counts = counts if counts is not None else Counter()
    detected, paths = detect_format(crawl)
    if fmt == "auto":
        fmt = detected
    elif fmt != detected:
        if not (fmt == "folder" and Path(crawl).is_dir()):
            raise InputError(f"{crawl}: not a {fmt} crawl (it looks like {detected})")
        paths = [str(crawl)]
    if fmt in ("jsonl", "parquet"):  # duplicate keys are malformed lines there
        yield from _iter_manifest(paths[0], fmt, counts, on_bad_line)
        return
    seen = set()
    for rec in _iter_shards(paths, counts) if fmt == "shards" else _iter_folder(paths[0], counts):
        if rec.key in seen:
            counts["duplicate_key"] += 1
            continue
        seen.add(rec.key)
        yield rec


def crawl_captions(crawl: str | Path, keys) -> dict[str, str]:
    """The captions (alt texts) the crawl records for ``keys``: ``{key: caption}``, reading the
    crawl until every key was found (keys it does not hold are left out)."""
    wanted, out = {str(k) for k in keys}, {}
    with local_crawl(crawl) as (local, _):
        for rec in iter_records(local, on_bad_line="skip"):
            if rec.key in wanted:
                out[rec.key] = rec.caption
                if len(out) == len(wanted):
                    break
    return out


def check_clusters_match_crawl(clusters: str | Path, crawl: str | Path, row: dict) -> None:
    """The crawl must be the one the clusters were mined from: the captions it holds for the
    cluster ``row``'s images (the first one a command reads) must be those the clusters file
    recorded - keys such as ``000000000`` recur across crawls, so a key alone proves nothing.
    Used by ``suti generate`` and ``suti apprentice pack-photos`` before they write anything.

    Raises:
        InputError: a caption differs (naming both files, the image and both captions).
    """
    recorded = dict(zip(row["keys"], row.get("captions") or []))
    if not recorded:
        return
    found = crawl_captions(crawl, list(recorded))
    for key, caption in recorded.items():
        if key in found and str(found[key]).strip() != str(caption).strip():
            raise InputError(f"--crawl {crawl} is not the crawl --clusters {clusters} was mined from: image {key} is captioned "
                             f"{found[key]!r} there and {caption!r} in the clusters file")


def load_crawl_images(crawl: str | Path, keys, *, sources=None,
                      min_side: int = DEFAULT_MIN_SIDE, strict: bool = True
                      ) -> dict[str, Image.Image]:
    """Decode the images of ``keys`` from a crawl: ``{key: PIL RGB image}``.

    With ``sources`` (a list aligned with ``keys``, as in the ``sources`` of a
    ``clusters.jsonl`` row: :meth:`Record.source` dicts or ``None``) images are read straight
    from their file or shard byte range; the others are found by reading the crawl once, which
    stops as soon as every key was found (a whole job's keys can be asked for at once).
    ``crawl`` and the sources' paths may be storage URIs (``s3://...``; see :func:`local_crawl`).

    Raises:
        InputError: with ``strict``, when a key is not in the crawl or its image is unusable
            (without ``strict`` such keys are left out, with a warning).
    """
    keys = [str(k) for k in keys]
    wanted, out, bad = set(keys), {}, {}
    for key, src in zip(keys, sources or []):
        if src and (_is_uri(src["path"]) or Path(src["path"]).is_file()):
            try:
                out[key] = decode_record(Record(key, "", "", "", **src), min_side)
            except SkipImage as exc:
                if not _is_uri(src["path"]):
                    bad[key] = str(exc)  # a moved object-store crawl: look for the key below
    if len(out) + len(bad) < len(wanted):
        with local_crawl(crawl) as (local, _):
            for rec in iter_records(local, on_bad_line="skip"):
                if rec.key in wanted and rec.key not in out and rec.key not in bad:
                    try:
                        out[rec.key] = decode_record(rec, min_side)
                    except SkipImage as exc:
                        bad[rec.key] = str(exc)
                    if len(out) + len(bad) == len(wanted):
                        break
    missing = sorted(wanted - set(out) - set(bad))
    if missing or bad:
        msg = (f"{crawl}: {len(missing)} key(s) not in the crawl ({', '.join(missing[:5])}) and "
               f"{len(bad)} unusable ({'; '.join(list(bad.values())[:3])})")
        if strict:
            raise InputError(msg)
        log.warning("%s", msg)
    return out
