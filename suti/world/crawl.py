"""A synthetic web crawl of the world, for subject mining.

:func:`make_crawl` writes::

    output_dir/
      images/{key}.jpg .txt .json   img2dataset layout (json: key, url, page_url, caption;
                                    .png with image_format="png")
      crawl.jsonl                   one row per image: key, path, url, page_url, caption
      shards/crawl-00000.tar ...    webdataset shards (key.jpg, key.txt, key.json members)
      world.json                    the world, to rebuild it (see suti.world.spec.load_world)
      ground_truth.json             what each image/page really shows - NOT for the miner

*Clean* pages show several images of one subject (different contexts and poses, now and then
wearing an accessory), with alt texts ranging from DreamBench captions to casual, short, junk or
empty ones. *Noise* pages (a ``noise_pages_fraction`` of all pages) show several subjects
(``mixed``), only backgrounds (``background``), or both (``distractor``). By default only
train subjects appear, so held-out subjects stay unseen.

Everything is deterministic: the same arguments give byte-identical files.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

from suti import storage
from suti.errors import InputError
from suti.world.captions import caption
from suti.world.render import render_background, sample_scene
from suti.world.spec import CONTEXTS, Subject, make_world

HOST = "https://world.suti.invalid"
JPEG_QUALITY = 90
_BG_WORDS = {"beach": "sandy beach", "snow": "snowy landscape", "jungle": "jungle leaves",
             "city": "city street", "wooden_floor": "wooden floor", "blue_carpet": "blue carpet",
             "grass": "green meadow", "brick_wall": "red brick wall"}


def _dumps(obj) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=True)


def _junk(rng: np.random.Generator) -> str:
    n = int(rng.integers(10000))
    return [f"IMG_{n:04d}", f"DSC{n:05d}.JPG", "photo", "untitled", "image", ""][
        int(rng.integers(6))]


def alt_text(subject: Subject, meta: dict, rng: np.random.Generator) -> str:
    """A web-like alt text for a subject image: often the full caption, sometimes casual
    (``"my star toy at the beach"``), short, junk (``"IMG_0412"``) or empty."""
    full = caption(subject, meta["context"], accessory=meta["accessory"])
    ctx, noun = CONTEXTS[meta["context"]], subject.class_noun
    u = rng.random()
    if u < 0.45:
        return full
    if u < 0.65:
        options = [f"my {noun} {ctx.short}", f"{noun} {ctx.short}", f"our {subject.description()}",
                   f"look at this {noun}!", f"{subject.body_color} {noun} {ctx.phrase}"]
        return options[int(rng.integers(len(options)))]
    if u < 0.8:
        return [noun, subject.description()][int(rng.integers(2))]
    return _junk(rng)


def _background_alt(context: str, rng: np.random.Generator) -> str:
    if rng.random() < 0.7:
        return [_BG_WORDS[context], f"view of a {_BG_WORDS[context]}",
                f"{_BG_WORDS[context]} background"][int(rng.integers(3))]
    return _junk(rng)


def _page_plan(subjects: list[Subject], pages_per_subject: int, noise_fraction: float,
               rng: np.random.Generator) -> list[tuple[str, list[Subject]]]:
    """``(kind, subjects shown)`` per page, shuffled; kind is clean/mixed/background/distractor."""
    clean = [("clean", [s]) for s in subjects for _ in range(pages_per_subject)]
    if noise_fraction >= 1.0:
        n_noise, clean = len(clean), []
    else:
        n_noise = int(round(len(clean) * noise_fraction / (1.0 - noise_fraction)))
    noise = []
    for _ in range(n_noise):
        kind = ["mixed", "mixed", "background", "distractor"][int(rng.integers(4))]
        if kind == "mixed" and len(subjects) < 2:
            kind = "distractor"
        k = 0 if kind == "background" else int(rng.integers(2, 5))
        idx = rng.choice(len(subjects), size=min(k, len(subjects)), replace=False)
        noise.append((kind, [subjects[int(i)] for i in idx]))
    pages = clean + noise
    order = rng.permutation(len(pages))
    return [pages[int(i)] for i in order]


def _page_images(kind: str, subjects: list[Subject], n: int, rng: np.random.Generator,
                 size: int):
    """Yield ``(image, alt text, subject or None, meta)`` for the images of one page."""
    if kind in ("mixed", "distractor") and n < 2:
        kind = "background"
    for j in range(n):
        if kind == "clean":
            subject = subjects[0]
        elif kind == "mixed":
            pick = j if j < len(subjects) else int(rng.integers(len(subjects)))
            subject = subjects[pick]
        elif kind == "distractor":
            subject = subjects[int(rng.integers(len(subjects)))] if j % 2 == 0 else None
        else:
            subject = None
        if subject is None:
            ctx = list(CONTEXTS)[int(rng.integers(len(CONTEXTS)))]
            yield render_background(ctx, rng, size), _background_alt(ctx, rng), None, {
                "subject_id": None, "context": ctx}
        else:
            img, _, meta = sample_scene(subject, rng, size=size, edit_prob=0.12,
                                        edit_kinds=("accessory",))
            yield img, alt_text(subject, meta, rng), subject, meta


def _check_args(output_dir: Path, num_subjects: int, noise_pages_fraction: float,
                images_per_page: tuple[int, int], size: int, pages_per_subject: int,
                heldout_fraction: float, shard_size: int, image_format: str) -> None:
    if num_subjects < 1:
        raise InputError(f"number of subjects must be >= 1, got {num_subjects}")
    if not 0.0 <= noise_pages_fraction <= 1.0:
        raise InputError(f"noise pages fraction must be in [0, 1], got {noise_pages_fraction}")
    lo, hi = images_per_page
    if lo < 1 or hi < lo:
        raise InputError(f"images per page must satisfy 1 <= min <= max, got {lo}..{hi}")
    if size < 16:
        raise InputError(f"image size must be >= 16 px, got {size}")
    if pages_per_subject < 1:
        raise InputError(f"pages per subject must be >= 1, got {pages_per_subject}")
    if not 0.0 <= heldout_fraction <= 1.0:
        raise InputError(f"held-out fraction must be in [0, 1], got {heldout_fraction}")
    if shard_size < 0:
        raise InputError(f"shard size must be >= 0, got {shard_size}")
    if image_format not in ("jpg", "png"):
        raise InputError(f"image format must be jpg or png, got {image_format!r}")
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise InputError(f"output folder {output_dir} exists and is not empty")


def _close_shard(tar: tarfile.TarFile) -> None:
    """Finish a shard written under a temporary name and rename it to its final name."""
    tmp = Path(tar.name)
    tar.close()
    os.replace(tmp, tar.final_path)


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def make_crawl(output_dir: str | Path, num_subjects: int, noise_pages_fraction: float,
               seed: int, images_per_page: tuple[int, int] = (3, 8), size: int = 64, *,
               pages_per_subject: int = 1, heldout_fraction: float = 0.25,
               include_heldout: bool = False, shard_size: int = 1000,
               image_format: str = "jpg", progress: bool = False) -> dict:
    """Generate a world of ``num_subjects`` subjects and write its crawl to ``output_dir``.

    Args:
        output_dir: new or empty folder.
        num_subjects: subjects in the world (train and held-out).
        noise_pages_fraction: fraction of all pages that are noise pages, in [0, 1].
        seed: world and crawl seed; the same arguments give byte-identical files.
        images_per_page: inclusive (min, max) images on a page.
        size: image side in pixels.
        pages_per_subject: clean pages per crawled subject.
        heldout_fraction: see :func:`suti.world.spec.make_world`.
        include_heldout: also put held-out subjects in the crawl (default: train only).
        shard_size: images per webdataset tar shard; 0 writes no shards.
        image_format: ``"jpg"`` (JPEG quality 90, as crawled photos are) or ``"png"`` (lossless:
            clean images, e.g. for training data at 32 px, where JPEG artifacts are a domain of
            their own).
        progress: show a progress bar on stderr.

    Returns:
        A summary: ``output_dir``, ``pages``, ``clean_pages``, ``noise_pages``, ``images``,
        ``subjects``, ``crawled_subjects``.

    Raises:
        InputError: bad arguments or a non-empty output folder.
    """
    out = Path(output_dir)
    _check_args(out, num_subjects, noise_pages_fraction, tuple(images_per_page), size,
                pages_per_subject, heldout_fraction, shard_size, image_format)
    existed = out.exists()
    try:
        return _write_crawl(out, num_subjects, noise_pages_fraction, seed, images_per_page,
                            size, pages_per_subject, heldout_fraction, include_heldout,
                            shard_size, image_format, progress)
    except BaseException:
        # The folder was new or empty (checked above): leave it as it was, so that a rerun
        # (after freeing space, say) is not refused for a half-written crawl.
        _remove_partial(out, existed)
        raise


def _remove_partial(out: Path, existed: bool) -> None:
    """Remove what a failed :func:`make_crawl` wrote into ``out`` (new, or empty before)."""
    if not existed:
        shutil.rmtree(out, ignore_errors=True)
        return
    for child in list(out.iterdir()) if out.is_dir() else []:
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def _write_crawl(out: Path, num_subjects: int, noise_pages_fraction: float, seed: int,
                 images_per_page: tuple[int, int], size: int, pages_per_subject: int,
                 heldout_fraction: float, include_heldout: bool, shard_size: int,
                 image_format: str, progress: bool) -> dict:
    """The body of :func:`make_crawl` (arguments checked)."""
    world = make_world(num_subjects, seed, heldout_fraction)
    crawled = world.subjects if include_heldout else world.train_subjects
    rng = np.random.default_rng([seed, 7])
    plan = _page_plan(list(crawled), pages_per_subject, noise_pages_fraction, rng)
    (out / "images").mkdir(parents=True, exist_ok=True)
    world.save(out / "world.json")
    truth_images, truth_pages, page_kinds, image_meta, rows = {}, {}, {}, {}, []
    shard, shard_idx = None, 0
    lo, hi = images_per_page
    for p, (kind, subjects) in enumerate(tqdm(plan, desc="crawl pages", unit="page",
                                               disable=not progress)):
        page_url = f"{HOST}/page/{p:06d}"
        truth_pages[page_url] = subjects[0].subject_id if kind == "clean" else None
        page_kinds[page_url] = kind
        for img, alt, subject, meta in _page_images(kind, subjects, int(rng.integers(lo, hi + 1)),
                                                    rng, size):
            key = f"{len(rows):09d}"
            url = f"{HOST}/img/{key}.{image_format}"
            buf = io.BytesIO()
            if image_format == "jpg":
                img.save(buf, format="JPEG", quality=JPEG_QUALITY)
            else:
                img.save(buf, format="PNG")
            sidecar = _dumps({"key": key, "url": url, "page_url": page_url, "caption": alt})
            files = {f"{key}.{image_format}": buf.getvalue(), f"{key}.txt": alt.encode(),
                     f"{key}.json": sidecar.encode()}
            for name, data in files.items():
                storage.write_bytes(out / "images" / name, data)
            if shard_size > 0:
                if shard is None or len(rows) % shard_size == 0:
                    if shard is not None:
                        _close_shard(shard)
                    (out / "shards").mkdir(exist_ok=True)
                    final = out / "shards" / f"crawl-{shard_idx:05d}.tar"
                    shard = tarfile.open(final.with_name(f".{final.name}.tmp"), "w",
                                         format=tarfile.GNU_FORMAT)
                    shard.final_path = final  # renamed there when complete (_close_shard)
                    shard_idx += 1
                for name, data in files.items():
                    _tar_add(shard, name, data)
            rows.append({"key": key, "path": f"images/{key}.{image_format}", "url": url,
                         "page_url": page_url, "caption": alt})
            truth_images[key] = subject.subject_id if subject else None
            image_meta[key] = meta
    if shard is not None:
        _close_shard(shard)
    storage.write_text(out / "crawl.jsonl", "".join(_dumps(r) + "\n" for r in rows))
    subjects = {s.subject_id: dict(s.to_dict(), split=world.splits[s.subject_id],
                                   description=s.description()) for s in world.subjects}
    truth = {"seed": seed, "noise_pages_fraction": noise_pages_fraction, "size": size,
             "images_per_page": [lo, hi], "include_heldout": include_heldout,
             "images": truth_images, "pages": truth_pages, "page_kinds": page_kinds,
             "image_meta": image_meta, "subjects": subjects,
             "splits": {k: [s.subject_id for s in world.split(k)] for k in ("train", "heldout")}}
    storage.write_text(out / "ground_truth.json", json.dumps(truth, indent=1, sort_keys=True) + "\n")
    n_clean = sum(1 for k, _ in plan if k == "clean")
    return {"output_dir": str(out), "pages": len(plan), "clean_pages": n_clean,
            "noise_pages": len(plan) - n_clean, "images": len(rows),
            "subjects": len(world.subjects), "crawled_subjects": len(crawled)}


def load_ground_truth(output_dir: str | Path) -> dict:
    """Read ``ground_truth.json`` of a crawl (for evaluating a miner, never for mining)."""
    return json.loads((Path(output_dir) / "ground_truth.json").read_text())
