"""Measure (and calibrate) mining on synthetic-world crawls against their ground truth.

This is an evaluation tool: it reads ``ground_truth.json``, which mining itself never does.

* *purity*: the share of kept clusters whose images all show one subject;
* *recall*: the share of clean subject pages that are kept.

The sweep searches ``outlier``, ``min_image_sim``, ``min_pair_sim`` and ``min_text_sim`` (dedup,
noun support and the size limits stay at the model's defaults) for the best total recall at
``--min-purity``; pick the final values with some margin from its edges, and check them on
crawls of other seeds.

Usage::

    python -m mining.evaluate W1 W2 ...           # default thresholds, per crawl + total
    python -m mining.evaluate W1 W2 ... --sweep   # grid search: best recall at purity >= 0.97

Crawls come from ``suti world make --output W --subjects 40 --noise-pages 0.2 --seed S``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, replace

from mining.cluster import Thresholds, default_thresholds, mine_clusters
from suti.cli_format import ArgumentParser


def evaluate(kept_keys: list[list[str]], kept_pages: list[str], truth: dict) -> dict:
    """Counts and rates of kept clusters (their keys and page URLs) against a ground truth."""
    images, pages = truth["images"], truth["pages"]
    pure = sum(1 for keys in kept_keys
               if len({images[k] for k in keys}) == 1 and images[keys[0]] is not None)
    clean = {p for p, s in pages.items() if s}
    kept_clean = len(set(kept_pages) & clean)
    return {"kept": len(kept_keys), "pure": pure, "clean_pages": len(clean),
            "kept_clean": kept_clean, "purity": pure / len(kept_keys) if kept_keys else 0.0,
            "recall": kept_clean / len(clean) if clean else 0.0}


def _total(results: list[dict]) -> dict:
    tot = {k: sum(r[k] for r in results) for k in ("kept", "pure", "clean_pages", "kept_clean")}
    tot["purity"] = tot["pure"] / tot["kept"] if tot["kept"] else 0.0
    tot["recall"] = tot["kept_clean"] / tot["clean_pages"] if tot["clean_pages"] else 0.0
    return tot


def _score(embs: list, truths: list[dict], th: Thresholds) -> dict:
    results = []
    for emb, truth in zip(embs, truths):
        kept, _ = mine_clusters(emb, th)
        results.append(evaluate([c.keys for c in kept], [c.page_url for c in kept], truth))
    return {"total": _total(results), "per_crawl": results}


def _sweep(embs: list, truths: list[dict], base: Thresholds, min_purity: float):
    """Grid search: ``(key, thresholds, totals)`` with the best total recall at ``min_purity``
    (ties: higher purity, then a better worst-crawl recall), or ``None``."""
    import numpy as np

    grid = np.round(np.arange(-0.1, 0.96, 0.05), 2)
    pairs = np.round(np.arange(-0.1, 0.96, 0.01), 2)
    n_clean = np.array([sum(1 for s in t["pages"].values() if s) for t in truths])
    best = None
    for out in [-1.0, *grid.tolist()]:
        # cluster once per outlier threshold; the similarity thresholds only filter afterwards
        loose = replace(base, min_image_sim=-1.0, min_pair_sim=-1.0, min_text_sim=-1.0,
                        outlier=float(out))
        rows = []
        for k, (emb, truth) in enumerate(zip(embs, truths)):
            for c in mine_clusters(emb, loose)[0]:
                if c.text_similarity is None:
                    continue
                subjects = {truth["images"][key] for key in c.keys}
                rows.append((c.image_similarity, c.min_pair_similarity, c.text_similarity,
                             len(subjects) == 1 and None not in subjects,
                             bool(truth["pages"].get(c.page_url)), k))
        if not rows:
            continue
        img_s, pair_s, txt_s, pure, clean, crawl = (np.array(col) for col in zip(*rows))
        for img in grid:
            m_img = img_s >= img
            mask = (m_img[None, None] & (pair_s[None, None] >= pairs[:, None, None])
                    & (txt_s[None, None] >= grid[None, :, None]))   # (pairs, txt, clusters)
            kept, n_pure = mask.sum(-1), (mask & pure).sum(-1)
            kept_clean = (mask & clean).sum(-1)
            purity = np.where(kept > 0, n_pure / np.maximum(kept, 1), 0.0)
            recall = kept_clean / n_clean.sum()
            ok = purity >= min_purity
            if not ok.any() or (best and recall[ok].max() < best[0][0] - 1e-9):
                continue
            for i, j in zip(*np.nonzero(ok & (recall >= recall[ok].max() - 1e-9))):
                per = np.bincount(crawl[mask[i, j] & clean], minlength=len(embs)) / n_clean
                key = (round(float(recall[i, j]), 6), float(purity[i, j]), float(per.min()))
                if best is None or key > best[0]:
                    th = replace(loose, min_image_sim=float(img), min_pair_sim=float(pairs[i]),
                                 min_text_sim=float(grid[j]))
                    best = (key, th, {"kept": int(kept[i, j]), "pure": int(n_pure[i, j]),
                                      "clean_pages": int(n_clean.sum()),
                                      "kept_clean": int(kept_clean[i, j]),
                                      "purity": float(purity[i, j]),
                                      "recall": float(recall[i, j]),
                                      "worst_crawl_recall": float(per.min())})
    return best


def main(argv: list[str] | None = None) -> int:
    """Command line, see the module docstring."""
    import torch

    from mining.crawl import iter_records
    from mining.embed import embed_crawl
    from suti.world import load_ground_truth

    p = ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("crawls", nargs="+", help="synthetic-world crawl folders")
    p.add_argument("--model", default="toy-clip")
    p.add_argument("--pretrained")
    p.add_argument("--sweep", action="store_true", help="grid-search the thresholds")
    p.add_argument("--min-purity", type=float, default=0.97, help="purity the sweep must keep")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    embs = [embed_crawl(list(iter_records(c)), args.model, args.pretrained) for c in args.crawls]
    truths = [load_ground_truth(c) for c in args.crawls]
    base = default_thresholds(args.model)
    if not args.sweep:
        res = _score(embs, truths, base)
        for crawl, r in zip(args.crawls, res["per_crawl"]):
            print(f"{crawl}: {json.dumps(r)}")
        print(f"total: {json.dumps(res['total'])}  thresholds: {json.dumps(asdict(base))}")
        return 0
    best = _sweep(embs, truths, base, args.min_purity)
    if best is None:
        print(f"no setting reaches purity {args.min_purity}")
        return 1
    print(f"best: {json.dumps(asdict(best[1]))}\n      {json.dumps(best[2])}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    from suti.cli_format import report_errors

    raise SystemExit(report_errors(main))
