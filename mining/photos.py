"""Photo shards: the mined clusters' own photos as apprentice training data (no expert needed).

``suti generate`` makes one (demos, prompt, expert sample) example per kept expert sample, at the
cost of a DreamBooth run per cluster. A *photo sample* needs no expert: it holds a cluster's photos
(``K.demo_0.png`` ... and ``K.json``, no ``K.target.jpg``; PNG keeps the crawl's decoded pixels
exactly, with no second JPEG pass), and the training pipeline turns it into
a reconstruction example (one photo is the target, 3 of the others are the demonstrations; see
:class:`apprentice.data.ToExample`). Mining is cheap, so photo shards give the apprentice
thousands of subjects where expert shards give tens to hundreds; the two are mixed by passing both
to ``suti apprentice train --shards``.

Samples are keyed by cluster id and packed with :class:`suti.shards.ShardPacker`, so a rerun
(after a crash, or with more clusters) writes every cluster exactly once.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from tqdm import tqdm

from suti import storage
from suti.errors import InputError
from suti.shards import PHOTO_KIND

log = logging.getLogger(__name__)

def photo_key(cluster_id: str) -> str:
    """The sample key of a cluster's photo sample."""
    return f"{cluster_id}_photos"


def photo_members(cluster: dict, images: dict) -> tuple[str, list[tuple[str, bytes]]]:
    """The tar members of one cluster's photo sample: ``(key, members)``.

    Args:
        cluster: a ``clusters.jsonl`` row (``cluster_id``, ``keys``, ``captions``, ``class_noun``).
        images: crawl key -> PIL image for the cluster's keys.
    """
    from suti.shards import png_bytes, sample_members

    cid = cluster["cluster_id"]
    key = photo_key(cid)
    meta = {
        "key": key, "kind": PHOTO_KIND, "cluster_id": cid, "page_url": cluster.get("page_url"),
        "class_noun": cluster.get("class_noun"), "demo_keys": cluster["keys"],
        "demo_captions": cluster.get("captions", []),
    }
    # PNG: the decoded crawl pixels, with no second JPEG pass
    return key, sample_members(key, None, [png_bytes(images[k]) for k in cluster["keys"]], meta, demo_ext="png")


def pack_photos(clusters: str | Path, crawl: str | Path, output: str | Path, *, samples_per_shard: int = 256,
                min_photos: int = 2, progress: bool = True) -> dict:
    """Write one photo sample per cluster of ``clusters`` into ``output/shard-*.tar``.

    ``clusters``, ``crawl`` and ``output`` are local paths or storage URIs (``s3://``, ``gs://``;
    :mod:`suti.storage`); shards are written atomically (see :class:`suti.shards.ShardPacker`).

    Clusters with fewer than ``min_photos`` usable photos are skipped (a reconstruction example
    needs a target and at least one demonstration). Idempotent: clusters already in ``output``'s
    shards are not written again. Returns counts, also written to ``output/summary.json``.

    Raises:
        InputError: ``crawl`` does not exist, ``clusters`` is missing or malformed (names the
            file and line), or a URI's filesystem package is not installed (names the extra).
    """
    from mining.crawl import check_clusters_match_crawl, load_crawl_images
    from mining.cluster import read_clusters
    from suti.shards import ShardPacker, existing_shards

    crawl, out = storage.resolve(crawl), storage.resolve(output)
    storage.filesystem(out)  # a missing filesystem package fails here, before any work
    from mining.crawl import check_crawl

    check_crawl(crawl)
    if min_photos < 2:
        raise InputError(f"min_photos must be at least 2 (a target and a demonstration), got {min_photos}")
    rows = read_clusters(clusters)
    if rows:
        check_clusters_match_crawl(clusters, crawl, rows[0])  # the crawl the clusters came from
    packer = ShardPacker(out, samples_per_shard)
    written = skipped = 0
    already = len(packer.written)
    todo = [row for row in rows if photo_key(row["cluster_id"]) not in packer.written]
    bar = tqdm(total=len(todo), desc="photo shards", unit="cluster", disable=not progress)
    for start in range(0, len(todo), samples_per_shard):
        # one crawl read per chunk of clusters (a crawl without byte offsets is scanned, not
        # re-scanned per cluster), and at most a shard's worth of decoded images in memory
        chunk = todo[start:start + samples_per_shard]
        keys = [k for row in chunk for k in row["keys"]]
        sources = [s for row in chunk for s in (row.get("sources") or [None] * len(row["keys"]))]
        images = load_crawl_images(crawl, keys, sources=sources, strict=False)
        for row in chunk:
            usable = [k for k in row["keys"] if k in images]
            if len(usable) < min_photos:
                skipped += 1
            else:
                captions = dict(zip(row["keys"], row.get("captions") or [""] * len(row["keys"])))
                key, members = photo_members({**row, "keys": usable, "captions": [captions.get(k, "") for k in usable]}, images)
                packer.add(key, members)
                written += 1
            bar.update(1)
    bar.close()
    packer.flush()
    summary = {"clusters": len(rows), "written": written, "already_present": already, "skipped_too_few_photos": skipped,
               "samples": len(packer.written), "shards": len(existing_shards(out))}
    storage.write_text(storage.join(out, "summary.json"), json.dumps(summary, indent=2))
    log.info("photo shards: %s", summary)
    return summary
