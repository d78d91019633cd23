"""``suti mine``: a web crawl -> subject clusters with unseen creative prompts.

Writes, atomically (temporary file + rename), into ``--output``:

* ``clusters.jsonl``: one row per kept cluster - ``cluster_id`` (from the page URL's hash),
  ``page_url``, ``keys``, ``captions``, ``prompts`` (``{"prompt", "skill", "level"}`` with
  ``{S}`` for the subject), ``class_noun``, ``noun_support``, ``image_similarity``,
  ``min_pair_similarity``, ``text_similarity``, ``duplicates``, ``outliers``, ``skipped``,
  ``sources`` (where each image's bytes are: for ``load_crawl_images(crawl, keys,
  sources=...)``, which then reads them directly instead of scanning the crawl);
* ``dropped.jsonl``: one row per dropped page - ``page_url``, ``keys``, ``reason``, numbers;
* ``stats.json``: counts (pages, images, skipped images and samples by reason, kept/dropped
  clusters by reason), thresholds, model, crawl.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

from suti import checks, storage
from suti.errors import InputError

log = logging.getLogger(__name__)

#: Samples per webdataset shard (``suti apprentice pack-photos``; ``suti generate``'s too).
SAMPLES_PER_SHARD = checks.whole(1, 1_000_000)
#: The most prompts per cluster (``suti mine`` writes them, ``suti generate`` samples them).
MAX_PROMPTS_PER_CLUSTER = 10_000


def write_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` (a local path or storage URI) atomically
    (:func:`suti.storage.write_text`)."""
    storage.write_text(path, text)


def _jsonl(rows) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def _prompts(args, cluster, class_noun: str) -> list[dict]:
    from mining.prompts import llm_prompts, template_prompts

    if args.prompt_generator == "llm":
        return llm_prompts(cluster.cluster_id, cluster.captions, class_noun, args.llm_model,
                           args.prompts_per_cluster, args.seed)
    return template_prompts(cluster.cluster_id, cluster.captions, args.prompts_per_cluster,
                            args.seed)


def run_mine(args: argparse.Namespace) -> dict:
    """Run the whole mining job of ``args`` (see :func:`register`); returns ``stats``."""
    from mining.cluster import default_thresholds, mine_clusters
    from mining.crawl import detect_format, iter_records, local_crawl
    from mining.embed import check_embedder, embed_crawl

    start = time.time()
    for name, kind in mine_numbers().items():  # a namespace built without the parser is checked as it parses
        if getattr(args, name, None) is not None:
            kind.check(getattr(args, name), "--" + name.replace("_", "-"))
    # absolute (or URIs) on the driver, before any path reaches a Ray worker
    out, crawl = storage.resolve(args.output), storage.resolve(args.crawl)
    storage.require_bucket(out)  # before any work: a missing bucket is one line, never created
    if storage.isfile(out):
        raise InputError(f"{out}: exists and is not a folder")
    if storage.exists(storage.join(out, "clusters.jsonl")) and not args.overwrite:
        raise InputError(f"{out}: already holds clusters.jsonl (use --overwrite to replace it)")
    if args.prompt_generator == "llm" and not (args.llm_model and Path(args.llm_model).exists()):
        raise InputError(f"--llm-model {args.llm_model!r}: no such local model folder "
                         "(--prompt-generator llm needs a local text-generation model)")
    th = default_thresholds(args.model, min_images=args.min_images, max_images=args.max_images,
                            min_image_sim=args.min_image_sim, min_pair_sim=args.min_pair_sim,
                            min_text_sim=args.min_text_sim, min_noun_support=args.min_noun_support,
                            dedup=args.dedup_threshold, outlier=args.outlier_threshold)
    check_embedder(args.model)  # before the crawl is read
    sample_skips: Counter = Counter()
    use_ray = False
    with local_crawl(crawl) as (local, to_uri):
        fmt = args.crawl_format if args.crawl_format != "auto" else detect_format(local)[0]
        records = list(iter_records(local, sample_skips, fmt=fmt, on_bad_line=args.on_bad_line))
        member_skips = Counter({k.split(":", 1)[1]: v for k, v in sample_skips.items() if k.startswith("member:")})
        sample_skips = Counter({k: v for k, v in sample_skips.items() if not k.startswith("member:")})
        if member_skips or sample_skips:
            log.info("skipped: %s", ", ".join(f"{k} {v}" for k, v in sorted((sample_skips + Counter({f"{k} tar members": v for k, v in member_skips.items()})).items())))
        if not records:
            why = ", ".join(f"{k} {v}" for k, v in sorted(sample_skips.items())) or "no samples read"
            raise InputError(f"{crawl}: the crawl has no image with a page URL (skipped: {why})")
        log.info("%d images on %d pages in %s (%s)", len(records),
                 len({r.page_url for r in records}), crawl, fmt)
        use_ray = bool(args.ray or args.ray_address or len(records) > args.ray_threshold)
        if use_ray:  # Ray workers on other nodes read the crawl itself, not the driver's copy
            for r in records:
                r.path = to_uri(r.path) if r.path else r.path
        emb = embed_crawl(records, args.model, args.pretrained, use_ray=use_ray,
                          ray_threshold=args.ray_threshold, ray_address=args.ray_address,
                          batch_size=args.batch_size, min_side=args.min_side, progress=True)
        kept, dropped = mine_clusters(emb, th)
        for c in kept:  # sources name the crawl's own files (URIs), not the temporary copy
            c.sources = [dict(s, path=to_uri(s["path"])) if s else s for s in c.sources]
    rows = []
    for c in kept:
        rows.append({"cluster_id": c.cluster_id, "page_url": c.page_url, "keys": c.keys,
                     "captions": c.captions, "prompts": _prompts(args, c, c.class_noun),
                     "class_noun": c.class_noun, "noun_support": c.noun_support,
                     "image_similarity": c.image_similarity,
                     "min_pair_similarity": c.min_pair_similarity,
                     "text_similarity": c.text_similarity, "duplicates": c.duplicates,
                     "outliers": c.outliers, "skipped": c.skipped, "sources": c.sources})
    drop_rows = [{"cluster_id": c.cluster_id, "page_url": c.page_url, "keys": c.page_keys,
                  "reason": c.reason, "n_images": len(c.page_keys), "filtered_keys": c.keys,
                  "image_similarity": c.image_similarity,
                  "min_pair_similarity": c.min_pair_similarity,
                  "text_similarity": c.text_similarity, "class_noun": c.class_noun,
                  "noun_support": c.noun_support,
                  "duplicates": c.duplicates, "outliers": c.outliers, "skipped": c.skipped}
                 for c in dropped]
    stats = {
        "crawl": crawl, "crawl_format": fmt, "model": args.model,
        "pretrained": args.pretrained, "embedding": "ray" if use_ray else "in-process",
        "pages": len(kept) + len(dropped), "images": len(records),
        "usable_images": len(emb.records),
        "skipped_images": dict(sorted(emb.skipped_counts.items())),
        "skipped_samples": dict(sorted(sample_skips.items())),
        "skipped_tar_members": dict(sorted(member_skips.items())),
        "kept_clusters": len(kept), "kept_images": sum(len(c.keys) for c in kept),
        "dropped_clusters": dict(sorted(Counter(c.reason for c in dropped).items())),
        "duplicates_removed": sum(len(c.duplicates) for c in kept + dropped),
        "outliers_removed": sum(len(c.outliers) for c in kept + dropped),
        "thresholds": asdict(th), "seed": args.seed,
        "prompt_generator": args.prompt_generator, "prompts_per_cluster":
        args.prompts_per_cluster, "seconds": round(time.time() - start, 1),
    }
    storage.makedirs(out)
    write_atomic(storage.join(out, "clusters.jsonl"), _jsonl(rows))
    write_atomic(storage.join(out, "dropped.jsonl"), _jsonl(drop_rows))
    write_atomic(storage.join(out, "stats.json"), json.dumps(stats, indent=1) + "\n")
    return stats


def cmd_mine(args: argparse.Namespace) -> int:
    """``suti mine``: print a one-line summary after :func:`run_mine`."""
    stats = run_mine(args)
    skipped = sum(stats["skipped_images"].values()) + sum(stats["skipped_samples"].values())
    print(f"kept {stats['kept_clusters']} of {stats['pages']} pages as subject clusters "
          f"({stats['kept_images']} images; dropped: "
          f"{', '.join(f'{k} {v}' for k, v in stats['dropped_clusters'].items()) or 'none'}; "
          f"{skipped} images skipped) -> {storage.join(args.output, 'clusters.jsonl')}")
    return 0


def mine_numbers() -> dict:
    """The kind of every numeric option of ``suti mine`` (:mod:`suti.checks`), by its ``args``
    name: one table for the flags (``type=``) and :func:`run_mine` (a namespace built by a
    caller). Thresholds are cosines, in [-1, 1]; ``min_noun_support`` is a share."""
    cosine = checks.real(-1.0, 1.0)
    return {
        "min_images": checks.whole(2, 10_000),  # a cluster is at least a pair
        "max_images": checks.whole(2, 10_000),
        "min_image_sim": cosine,
        "min_pair_sim": cosine,
        "min_text_sim": cosine,
        "min_noun_support": checks.PROBABILITY,
        "dedup_threshold": cosine,
        "outlier_threshold": cosine,
        "min_side": checks.whole(1, 65_535),  # pixels
        "seed": checks.SEED,
        "prompts_per_cluster": checks.whole(1, MAX_PROMPTS_PER_CLUSTER),
        "batch_size": checks.whole(1, 65_536),
        "ray_threshold": checks.COUNT_OR_ZERO,  # 0: always Ray
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``suti mine`` (also used by tests to build a namespace)."""
    from mining.crawl import DEFAULT_MIN_SIDE, FORMATS
    from mining.embed import DEFAULT_BATCH_SIZE, DEFAULT_RAY_THRESHOLD
    from mining.prompts import DEFAULT_PROMPTS_PER_CLUSTER

    kind = mine_numbers()
    p.add_argument("--crawl", required=True, help="webdataset shards (folder, .tar, glob or "
                   "brace pattern), an image folder, a .jsonl or .parquet manifest, or a "
                   "`suti world make` folder; a local path or a storage URI (s3://, gs://)")
    p.add_argument("--output", required=True, help="folder for clusters.jsonl, dropped.jsonl, "
                   "stats.json (a local path or a storage URI)")
    p.add_argument("--crawl-format", choices=FORMATS, default="auto",
                   help="crawl layout (auto: detect it)")
    p.add_argument("--model", default="toy-clip", help="embedding model: a model preset (toy, "
                   "tiny, sd15-arch: the preset's own CLIP), toy-clip, a suti.scoring name, or an "
                   "open_clip architecture (ViT-B-32) with --pretrained")
    p.add_argument("--pretrained", help="open_clip pretrained tag for --model, e.g. openai")
    p.add_argument("--min-images", type=kind["min_images"], help="fewest images of a cluster (model default: 3)")
    p.add_argument("--max-images", type=kind["max_images"], help="most images of a cluster (model default: 10)")
    p.add_argument("--min-image-sim", type=kind["min_image_sim"],
                   help="mean pairwise image-image cosine a cluster needs (model default)")
    p.add_argument("--min-pair-sim", type=kind["min_pair_sim"],
                   help="image-image cosine the least similar pair of a cluster needs "
                   "(model default)")
    p.add_argument("--min-text-sim", type=kind["min_text_sim"],
                   help="mean image/alt-text cosine a cluster needs (model default)")
    p.add_argument("--min-noun-support", type=kind["min_noun_support"],
                   help="share of the informative alt texts that must name the cluster's "
                   "class noun, in [0, 1] (model default)")
    p.add_argument("--dedup-threshold", type=kind["dedup_threshold"],
                   help="image-image cosine above which an image is a near-duplicate "
                   "(model default)")
    p.add_argument("--outlier-threshold", type=kind["outlier_threshold"],
                   help="mean cosine to the rest of its page below which an image is dropped "
                   "(model default)")
    p.add_argument("--min-side", type=kind["min_side"], default=DEFAULT_MIN_SIDE,
                   help="skip images with a side below this many pixels")
    p.add_argument("--on-bad-line", choices=("error", "skip"), default="error",
                   help="a malformed manifest line stops the run (error) or is skipped, "
                   "counted and listed in a warning (skip)")
    p.add_argument("--seed", type=kind["seed"], default=0, help="seed of the prompts")
    p.add_argument("--prompts-per-cluster", type=kind["prompts_per_cluster"], default=DEFAULT_PROMPTS_PER_CLUSTER,
                   help="prompts per cluster, levels 1-3 in turn")
    p.add_argument("--prompt-generator", choices=("template", "llm"), default="template",
                   help="template: the world's vocabulary; llm: a local text-generation model")
    p.add_argument("--llm-model", help="local transformers text-generation model folder "
                   "(for --prompt-generator llm)")
    p.add_argument("--batch-size", type=kind["batch_size"], default=DEFAULT_BATCH_SIZE,
                   help="images per embedding batch")
    p.add_argument("--ray", action="store_true", help="embed with Ray Data whatever the size")
    p.add_argument("--ray-threshold", type=kind["ray_threshold"], default=DEFAULT_RAY_THRESHOLD,
                   help="embed with Ray Data above this many images")
    p.add_argument("--ray-address", help="Ray cluster address (implies --ray)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keep the description's layout; show defaults that are not None/False."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def register(subparsers) -> None:
    """Add ``suti mine`` to the top-level ``suti`` subparsers."""
    p = subparsers.add_parser("mine", help="mine subject clusters and prompts from a web crawl",
                              description=__doc__,
                              formatter_class=_Formatter)
    add_arguments(p)
    p.set_defaults(func=cmd_mine, local_paths=("llm_model",))


def register_pack_photos(sub) -> None:
    """Add ``pack-photos`` to the ``apprentice`` command group's subcommands ``sub`` (it writes
    mined clusters' photos as the apprentice's training shards; the root command line wires it)."""
    from suti.cli_format import HelpFormatter

    pack = sub.add_parser("pack-photos", help="write mined clusters' photos as training shards (reconstruction examples, no experts)", formatter_class=HelpFormatter)
    pack.add_argument("--clusters", required=True, help="clusters.jsonl of `suti mine`")
    pack.add_argument("--crawl", required=True, help="the crawl the clusters were mined from")
    pack.add_argument("--output", required=True, help="folder for shard-*.tar (a rerun adds only missing clusters)")
    pack.add_argument("--samples-per-shard", type=SAMPLES_PER_SHARD, default=256, help="photo examples per webdataset shard")
    pack.set_defaults(func=_pack_photos)


def _pack_photos(args) -> int:
    from mining.photos import pack_photos

    print(json.dumps(pack_photos(args.clusters, args.crawl, args.output, samples_per_shard=args.samples_per_shard)))
    return 0
