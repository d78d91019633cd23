"""CLIP embeddings of every crawled image and alt text, in-process or as a Ray Data job.

:func:`embed_records` decodes the images in batches (skipping and counting unreadable and tiny
ones, see :func:`mining.crawl.decode_record`) and embeds them and their non-empty alt texts with
a scorer (``embed_images(list[PIL]) -> (N, D)``, ``embed_texts(list[str]) -> (N, D)``, both
L2-normalised, see :mod:`suti.scoring`). :func:`embed_records_ray` does the same work with
``ray.data.from_items(...).map_batches(_EmbedBatch, ...)``: an actor pool whose actors each hold
one scorer (one GPU per actor when the cluster has GPUs). Both run the same per-batch function,
so they give the same embeddings. :func:`embed_crawl` picks Ray above a size threshold.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mining.crawl import DEFAULT_MIN_SIDE, Record, SkipImage, decode_record
from suti.errors import InputError

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 256
#: Crawls with more images than this are embedded with Ray Data.
DEFAULT_RAY_THRESHOLD = 20_000


@dataclass
class CrawlEmbeddings:
    """Embeddings of the usable images of a crawl, in crawl order.

    ``image[i]``/``text[i]`` belong to ``records[i]``; ``text[i]`` is all zeros and
    ``has_text[i]`` False when the alt text is empty. ``skipped`` lists the unusable images
    with the reason (``unreadable``, ``too_small``).
    """

    records: list[Record]
    image: np.ndarray
    text: np.ndarray
    has_text: np.ndarray
    skipped: list[tuple[Record, str]] = field(default_factory=list)

    @property
    def skipped_counts(self) -> Counter:
        """Unusable images per reason."""
        return Counter(reason for _, reason in self.skipped)


def check_embedder(model: str) -> None:
    """Refuse at once a ``--model`` that :func:`load_scorer` could not resolve (before the crawl
    is read): not a model preset, a scorer name, a folder of toy CLIP weights or an open_clip
    architecture.

    Raises:
        InputError: naming the value and what it could have been.
    """
    from suti import storage
    from suti.models import list_presets
    from suti.scoring import SCORERS

    if model in list_presets() or model in SCORERS:
        return
    if storage.isfile(storage.join(model, "toy_clip.json")):
        return
    import open_clip

    if model not in open_clip.list_models():
        raise InputError(f"--model {model!r}: not a model preset ({', '.join(list_presets())}), a scorer ({', '.join(SCORERS)}), "
                         f"a folder of toy CLIP weights or an open_clip architecture (e.g. ViT-B-32; open_clip.list_models())")


def load_scorer(model: str, pretrained: str | None = None):
    """The text-capable scorer for ``--model``.

    ``model`` is a model preset (``toy``, ``tiny``, ``sd15-arch``: its own CLIP, see
    :func:`suti.scoring.model_scorer`), a :func:`suti.scoring.get_scorer` name (``toy-clip``,
    ``openai-clip-vit-b-32``), a folder with toy CLIP weights (``toy_clip.json`` +
    ``toy_clip.safetensors``), or an open_clip architecture (``ViT-B-32``, ``ViT-L-14``...)
    loaded with the ``pretrained`` tag or checkpoint file (default ``openai``). A folder or
    checkpoint may be a storage URI (``s3://...``): each machine downloads it once
    (:func:`suti.storage.cached_copy`), so Ray workers need no shared disk.

    Raises:
        InputError: the scorer cannot embed texts, or ``model`` is none of the above.
        ModelLoadError: the model cannot be loaded.
    """
    from suti import storage
    from suti.models import cache_dir, list_presets
    from suti.scoring import SCORERS, OpenClipScorer, get_scorer, model_scorer

    if model in list_presets():
        model = model_scorer(model)
    # a toy CLIP folder or open_clip checkpoint on object storage: one local copy per machine
    if storage.is_remote(model):
        model = str(storage.cached_copy(model, cache_dir() / "remote"))
    elif "://" in model:
        model = storage.resolve(model)
    if pretrained and "://" in pretrained:
        pretrained = str(storage.cached_copy(pretrained, cache_dir() / "remote"))
    if model in SCORERS:
        scorer = get_scorer(model)
    elif (Path(model) / "toy_clip.json").is_file():
        scorer = get_scorer("toy-clip", weights_dir=model)
    else:
        check_embedder(model)
        scorer = OpenClipScorer(model, pretrained or "openai")
    if not getattr(scorer, "supports_text", True):
        raise InputError(f"--model {model}: mining needs a CLIP-like scorer that embeds texts")
    return scorer


def _as_numpy(x) -> np.ndarray:
    """A torch tensor or array -> float32 numpy array."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def embed_batch(scorer, records: list[Record], min_side: int = DEFAULT_MIN_SIDE) -> dict:
    """Embed one batch: ``{"ok", "skip", "image", "text", "has_text"}`` arrays of length B.

    ``skip[i]`` is ``""`` for a usable image, else the reason; rows of unusable images and
    empty alt texts are zeros.
    """
    images, ok, skip = [], [], []
    for rec in records:
        try:
            images.append(decode_record(rec, min_side))
            ok.append(True)
            skip.append("")
        except SkipImage as exc:
            log.debug("skipping %s", exc)
            ok.append(False)
            skip.append(exc.reason)
    ok = np.array(ok, dtype=bool)
    has_text = np.array([bool(r.caption) for r in records], dtype=bool) & ok
    img = _as_numpy(scorer.embed_images(images)) if images else None
    dim = img.shape[1] if img is not None else None
    texts = [r.caption for r, t in zip(records, has_text) if t]
    txt = _as_numpy(scorer.embed_texts(texts)) if texts else None
    if dim is None:  # nothing usable in this batch: ask the scorer for its width
        dim = txt.shape[1] if txt is not None else _as_numpy(scorer.embed_texts(["a"])).shape[1]
    image = np.zeros((len(records), dim), np.float32)
    text = np.zeros((len(records), dim), np.float32)
    if img is not None:
        image[ok] = img
    if txt is not None:
        text[has_text] = txt
    return {"ok": ok, "skip": np.array(skip, dtype=object), "image": image, "text": text,
            "has_text": has_text}


def _collect(records: list[Record], parts: list[tuple[int, dict]]) -> CrawlEmbeddings:
    """Join per-batch results (``(start index, embed_batch output)``) into CrawlEmbeddings."""
    parts = sorted(parts, key=lambda p: p[0])
    dim = max((p["image"].shape[1] for _, p in parts), default=1)
    cat = {k: np.concatenate([p[k] for _, p in parts]) if parts else np.zeros(0)
           for k in ("ok", "skip", "has_text")}
    image = np.concatenate([p["image"] for _, p in parts]) if parts else np.zeros((0, dim))
    text = np.concatenate([p["text"] for _, p in parts]) if parts else np.zeros((0, dim))
    ok = cat["ok"].astype(bool)
    skipped = [(rec, str(reason)) for rec, reason in zip(records, cat["skip"]) if reason]
    return CrawlEmbeddings([r for r, o in zip(records, ok) if o], image[ok].astype(np.float32),
                           text[ok].astype(np.float32), cat["has_text"].astype(bool)[ok],
                           skipped)


def embed_records(records: list[Record], scorer, *, batch_size: int = DEFAULT_BATCH_SIZE,
                  min_side: int = DEFAULT_MIN_SIDE, progress: bool = False) -> CrawlEmbeddings:
    """Embed ``records`` in this process, ``batch_size`` images at a time (tqdm progress)."""
    from tqdm import tqdm

    parts = []
    with tqdm(total=len(records), desc="embed", unit="img", disable=not progress) as bar:
        for start in range(0, len(records), batch_size):
            batch = records[start:start + batch_size]
            parts.append((start, embed_batch(scorer, batch, min_side)))
            bar.update(len(batch))
    return _collect(records, parts)


class _EmbedBatch:
    """Ray Data callable class: one scorer per actor, ``embed_batch`` per batch."""

    def __init__(self, scorer_factory, min_side: int):
        self.scorer = scorer_factory()
        self.min_side = min_side

    def __call__(self, batch: dict) -> dict:
        n = len(batch["index"])
        records = [Record(str(batch["key"][i]), str(batch["caption"][i]), "", "",
                          batch["path"][i] or None,
                          None if batch["offset"][i] < 0 else int(batch["offset"][i]),
                          None if batch["size"][i] < 0 else int(batch["size"][i]),
                          batch["data"][i] if "data" in batch else None) for i in range(n)]
        out = embed_batch(self.scorer, records, self.min_side)
        return {"index": np.asarray(batch["index"]), "ok": out["ok"],
                "skip": out["skip"].astype(str), "image": out["image"], "text": out["text"],
                "has_text": out["has_text"]}


def embed_records_ray(records: list[Record], scorer_factory, *,
                      batch_size: int = DEFAULT_BATCH_SIZE, min_side: int = DEFAULT_MIN_SIDE,
                      address: str | None = None, actors: int | None = None,
                      progress: bool = False) -> CrawlEmbeddings:
    """Embed ``records`` as a Ray Data job; same result as :func:`embed_records`.

    Args:
        scorer_factory: a picklable zero-argument callable returning a scorer (run once per
            actor), e.g. ``functools.partial(load_scorer, "toy-clip")``.
        address: Ray cluster address for ``ray.init`` when Ray is not initialised yet
            (``None``: start or join a local one).
        actors: actor pool size (default: one per GPU of the cluster, else up to 4 CPU actors).
    """
    import ray

    if not ray.is_initialized():
        from suti.raytools import worker_env
        from suti.raytools import init_ray

        # the workers get the driver's model-cache settings and object-store credentials
        init_ray(address, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": worker_env()})
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    actors = actors or (gpus if gpus else max(1, min(4, int(resources.get("CPU", 1)) - 1)))
    items = [{"index": i, "key": r.key, "caption": r.caption, "path": r.path or "",
              "offset": -1 if r.offset is None else r.offset,
              "size": -1 if r.size is None else r.size} for i, r in enumerate(records)]
    if any(r.data is not None for r in records):
        for item, r in zip(items, records):
            item["data"] = r.data
    blocks = max(1, min(-(-len(items) // batch_size), 10_000))
    ds = ray.data.from_items(items, override_num_blocks=blocks).map_batches(
        _EmbedBatch, fn_constructor_kwargs={"scorer_factory": scorer_factory,
                                            "min_side": min_side},
        batch_size=batch_size, batch_format="numpy", num_gpus=1 if gpus else 0,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors))
    from tqdm import tqdm

    parts = []
    with tqdm(total=len(records), desc="embed (ray)", unit="img", disable=not progress) as bar:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            idx = np.asarray(batch["index"])
            order = np.argsort(idx)
            part = {k: np.asarray(batch[k])[order] for k in ("ok", "skip", "image", "text",
                                                             "has_text")}
            part["skip"] = np.array([str(s) for s in part["skip"]], dtype=object)
            parts.extend(_split_runs(idx[order], part))
            bar.update(len(idx))
    return _collect(records, parts)


def _split_runs(idx: np.ndarray, part: dict) -> list[tuple[int, dict]]:
    """Cut a sorted batch into runs of consecutive indices (Ray may reorder blocks)."""
    cuts = np.flatnonzero(np.diff(idx) != 1) + 1
    bounds = [0, *cuts.tolist(), len(idx)]
    return [(int(idx[a]), {k: v[a:b] for k, v in part.items()})
            for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def embed_crawl(records: list[Record], model: str = "toy-clip", pretrained: str | None = None,
                *, use_ray: bool | None = None, ray_threshold: int = DEFAULT_RAY_THRESHOLD,
                ray_address: str | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
                min_side: int = DEFAULT_MIN_SIDE, progress: bool = False) -> CrawlEmbeddings:
    """Embed a crawl with ``model``: in-process, or with Ray when ``use_ray`` is True, or when
    it is ``None`` and there are more than ``ray_threshold`` images (or ``ray_address`` is set).
    """
    from suti.models import portable_model
    from suti.scoring import SCORERS
    from suti.storage import absolute_if_local

    # a local weights folder or checkpoint, absolute: Ray workers have other working directories
    # (a preset or scorer name stays a name even beside a folder of that name, as in load_scorer)
    factory = functools.partial(load_scorer, model if model in SCORERS else portable_model(model), absolute_if_local(pretrained))
    if use_ray is None:
        use_ray = len(records) > ray_threshold or ray_address is not None
    if use_ray:
        log.info("embedding %d images with Ray Data", len(records))
        return embed_records_ray(records, factory, batch_size=batch_size, min_side=min_side,
                                 address=ray_address, progress=progress)
    return embed_records(records, factory(), batch_size=batch_size, min_side=min_side,
                         progress=progress)
