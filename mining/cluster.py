"""Subject clusters from crawl embeddings: one candidate per web page, filtered by CLIP.

For every page (images sharing a ``page_url``, in crawl order) :func:`mine_clusters`

1. drops near-duplicates: an image whose image-image cosine to an earlier kept image exceeds
   ``dedup`` is left out (the first copy stays);
2. drops outliers: while more than two images remain, the image with the lowest mean cosine to
   the others is removed if that mean is below ``outlier``;
3. keeps the page as a cluster when ``min_images <= n <= max_images``, the mean pairwise
   image-image cosine is at least ``min_image_sim``, the least similar pair still reaches
   ``min_pair_sim`` (complete linkage: a page mixing two look-alike subjects fails it even when
   the mean passes), the mean cosine between each image and its own alt text (over the
   images with a non-empty alt text) is at least ``min_text_sim``, and the estimated class
   noun (:func:`mining.prompts.estimate_class_noun`) is named by at least ``min_noun_support``
   of the informative alt texts (a page of look-alike subjects or of bare backgrounds has alt
   texts that do not agree on what they show).

Every dropped page gets the first failing reason of :data:`REASONS` and its numbers.
Defaults (:data:`DEFAULT_THRESHOLDS`) depend on the embedding model: cosines of the toy CLIP of
the synthetic world and of OpenAI's CLIP live on different scales.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from mining.embed import CrawlEmbeddings
from mining.prompts import FALLBACK_NOUN, estimate_class_noun, noun_support
from suti import storage
from suti.errors import InputError

#: A cluster id names files (staging, manifest rows): letters, digits, ``_`` or ``-``.
_CLUSTER_ID = re.compile(r"^[A-Za-z0-9_-]+$")

#: Why a page is not a cluster, in the order they are checked.
REASONS = ("too_few_images", "too_many_images", "low_image_similarity", "low_pair_similarity",
           "no_alt_text", "low_text_similarity", "no_common_noun")


@dataclass(frozen=True)
class Thresholds:
    """Cluster filter settings (cosines in [-1, 1]); see the module docstring."""

    min_images: int = 3
    max_images: int = 10
    min_image_sim: float = 0.75
    min_pair_sim: float = 0.60
    min_text_sim: float = 0.22
    dedup: float = 0.97
    outlier: float = 0.60
    min_noun_support: float = 0.0

    def check(self) -> Thresholds:
        """Return self, or raise InputError for inconsistent values."""
        if self.min_images < 2 or self.max_images < self.min_images:
            raise InputError(f"need 2 <= min images <= max images, got {self.min_images}.."
                             f"{self.max_images}")
        for name in ("min_image_sim", "min_pair_sim", "min_text_sim", "dedup", "outlier"):
            if not -1.0 <= getattr(self, name) <= 1.0:
                raise InputError(f"{name.replace('_', ' ')} must be a cosine in [-1, 1], got "
                                 f"{getattr(self, name)}")
        if not 0.0 <= self.min_noun_support <= 1.0:
            raise InputError(f"min noun support must be in [0, 1], got {self.min_noun_support}")
        return self


#: Default thresholds per embedding model (``"default"`` for any other, real CLIP).
#: ``toy-clip`` is calibrated for the shipped toy CLIP on synthetic-world crawls with
#: ``python -m mining.evaluate --sweep`` (tuning seeds 1-6: 40 subjects, 20% noise pages;
#: purity 1.0, clean-page recall 0.956 there). Its cosines are low (32 px scenes, the background
#: fills most of the image): same-subject pairs ~0.2-0.8, yet different scenes of one subject
#: can exceed 0.97, hence the high ``dedup``. Outlier removal stays mild: on the world it mostly
#: turns mixed pages into impure clusters. ``default`` follows the usual CLIP ViT-B/32 scale
#: (photos of one object ~0.75+, matching captions ~0.22+) and is NOT calibrated.
DEFAULT_THRESHOLDS: dict[str, Thresholds] = {
    "toy-clip": Thresholds(min_image_sim=0.35, min_pair_sim=0.21, min_text_sim=0.10,
                           dedup=0.99, outlier=0.10, min_noun_support=0.75),
    "default": Thresholds(),
}


def default_thresholds(model: str, **overrides) -> Thresholds:
    """The model's default thresholds with the non-``None`` ``overrides`` applied, checked
    (a folder of toy CLIP weights counts as ``toy-clip``)."""
    from suti import storage
    from suti.models import list_presets
    from suti.scoring import model_scorer

    if storage.isfile(storage.join(model, "toy_clip.json")):  # a toy CLIP weights folder
        model = "toy-clip"
    elif model in list_presets():  # a model preset: its own CLIP
        model = model_scorer(model)
    base = DEFAULT_THRESHOLDS.get(model, DEFAULT_THRESHOLDS["default"])
    return replace(base, **{k: v for k, v in overrides.items() if v is not None}).check()


def cluster_id(page_url: str) -> str:
    """Stable cluster id of a page: ``"c"`` + 16 hex digits of its URL's SHA-256."""
    return "c" + hashlib.sha256(page_url.encode("utf-8")).hexdigest()[:16]


@dataclass
class Cluster:
    """A candidate cluster (one page); ``reason`` is ``None`` when it is kept.

    ``keys``/``captions`` are the images left after de-duplication and outlier removal;
    ``duplicates`` maps a dropped key to the key it duplicates; ``page_keys`` are all usable
    images of the page; ``skipped`` maps the page's unusable images to the reason;
    ``sources`` says where each of ``keys``' bytes are (:meth:`mining.crawl.Record.source`).
    """

    cluster_id: str
    page_url: str
    keys: list[str]
    captions: list[str]
    page_keys: list[str]
    duplicates: dict[str, str] = field(default_factory=dict)
    outliers: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    sources: list[dict | None] = field(default_factory=list)
    image_similarity: float | None = None
    min_pair_similarity: float | None = None
    text_similarity: float | None = None
    class_noun: str | None = None
    noun_support: float | None = None
    reason: str | None = None

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return asdict(self)


def _mean_offdiag(sim: np.ndarray) -> float:
    n = len(sim)
    return float((sim.sum() - np.trace(sim)) / (n * (n - 1))) if n > 1 else float("nan")


def _filter_page(idx: list[int], img: np.ndarray, th: Thresholds) -> tuple[list, dict, list]:
    """``(kept indices, {dup: original}, outliers)`` of one page (indices into ``img``)."""
    kept, dups = [], {}
    for i in idx:
        if kept:
            sims = img[kept] @ img[i]
            j = int(np.argmax(sims))
            if sims[j] > th.dedup:
                dups[i] = kept[j]
                continue
        kept.append(i)
    outliers = []
    while len(kept) > 2:
        sim = img[kept] @ img[kept].T
        mean_rest = (sim.sum(1) - np.diag(sim)) / (len(kept) - 1)
        worst = int(np.argmin(mean_rest))
        if mean_rest[worst] >= th.outlier:
            break
        outliers.append(kept.pop(worst))
    return kept, dups, outliers


def mine_clusters(emb: CrawlEmbeddings, th: Thresholds) -> tuple[list[Cluster], list[Cluster]]:
    """Group ``emb`` by page and filter: ``(kept clusters, dropped clusters)`` in page order
    (pages whose images were all unusable come last, dropped as ``too_few_images``)."""
    th.check()
    pages: dict[str, list[int]] = {}
    skipped: dict[str, dict[str, str]] = {}
    for i, rec in enumerate(emb.records):
        pages.setdefault(rec.page_url, []).append(i)
    for rec, reason in emb.skipped:
        pages.setdefault(rec.page_url, [])
        skipped.setdefault(rec.page_url, {})[rec.key] = reason
    img, txt = emb.image, emb.text
    kept, dropped = [], []
    for page_url, idx in pages.items():
        keep, dups, outliers = _filter_page(idx, img, th)
        recs = emb.records
        c = Cluster(cluster_id(page_url), page_url, [recs[i].key for i in keep],
                    [recs[i].caption for i in keep], [recs[i].key for i in idx],
                    {recs[d].key: recs[o].key for d, o in dups.items()},
                    [recs[i].key for i in outliers], skipped.get(page_url, {}),
                    [recs[i].source() for i in keep])
        if len(keep) >= 2:
            sim = img[keep] @ img[keep].T
            c.image_similarity = round(_mean_offdiag(sim), 4)
            c.min_pair_similarity = round(float(sim[~np.eye(len(keep), dtype=bool)].min()), 4)
        with_text = [i for i in keep if emb.has_text[i]]
        if with_text:
            c.text_similarity = round(float(np.mean(np.sum(img[with_text] * txt[with_text], 1))),
                                      4)
        c.class_noun = estimate_class_noun(c.captions)
        c.noun_support = round(noun_support(c.captions, c.class_noun), 4)
        if len(keep) < th.min_images:
            c.reason = "too_few_images"
        elif len(keep) > th.max_images:
            c.reason = "too_many_images"
        elif c.image_similarity < th.min_image_sim:
            c.reason = "low_image_similarity"
        elif c.min_pair_similarity < th.min_pair_sim:
            c.reason = "low_pair_similarity"
        elif c.text_similarity is None:
            c.reason = "no_alt_text"
        elif c.text_similarity < th.min_text_sim:
            c.reason = "low_text_similarity"
        elif c.noun_support < th.min_noun_support or (th.min_noun_support > 0
                                                      and c.class_noun == FALLBACK_NOUN):
            c.reason = "no_common_noun"
        (dropped if c.reason else kept).append(c)
    return kept, dropped


def read_clusters(path: str, limit: int | None = None) -> list[dict]:
    """Rows of ``clusters.jsonl`` (a local path or URI; a malformed line is an error naming its
    line number; a cluster id must be letters, digits, ``_`` or ``-``: it names files)."""
    path = storage.resolve(path)
    if not storage.isfile(path):
        raise InputError(f"{path}: no such clusters file")
    rows = []
    for n, line in enumerate(storage.read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{n}: malformed JSON ({exc.msg})") from None
        missing = [k for k in ("cluster_id", "keys", "prompts") if k not in row]
        if missing:
            raise InputError(f"{path}:{n}: missing field(s) {', '.join(missing)}")
        if not _CLUSTER_ID.match(str(row["cluster_id"])):
            raise InputError(f"{path}:{n}: cluster_id {row['cluster_id']!r} must be letters, digits, '_' or '-'")
        rows.append(row)
    ids = [r["cluster_id"] for r in rows]
    if len(set(ids)) != len(ids):
        raise InputError(f"{path}: duplicate cluster_id values")
    return rows[:limit] if limit else rows
