"""One cluster's expert: fine-tune, sample the unseen prompts, filter by delta-CLIP, stage.

This is the body of the Ray task of the generation job (:mod:`mining.generate`). It is
idempotent: its outputs are named by cluster id and written atomically, and a finished cluster
(``staging/<cluster_id>.json`` present) returns its saved summary without doing any work, so a
retried or duplicated task is harmless.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import traceback
from pathlib import Path

from mining.shards import jpeg_bytes, sample_members, write_tar_atomic

log = logging.getLogger(__name__)


def cluster_seed(cluster_id: str, seed: int) -> int:
    """A stable 31-bit seed for a cluster."""
    return int(hashlib.sha256(f"{seed}:{cluster_id}".encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


def sample_key(cluster_id: str, prompt_index: int, sample_index: int) -> str:
    """The sample key: unique per (cluster, prompt, sample index)."""
    return f"{cluster_id}_p{prompt_index:02d}_s{sample_index:02d}"


def subject_phrase(identifier: str, class_noun: str, use_class_noun: bool) -> str:
    """What ``{S}`` becomes in the expert's prompts: "sks star toy" (or "sks")."""
    return f"{identifier} {class_noun}" if use_class_noun else identifier


def _maybe_crash_for_tests(cluster_id: str) -> None:
    """Test hook: with SUTI_TEST_CRASH_ONCE=<dir>, the first attempt at each cluster exits hard."""
    folder = os.environ.get("SUTI_TEST_CRASH_ONCE")
    if folder:
        marker = Path(folder) / f"{cluster_id}.crashed"
        if not marker.exists():
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text("1")
            os._exit(1)  # like a kill -9 of the worker


def run_cluster(cluster: dict, crawl: str, job: dict, staging: str) -> dict:
    """Train, sample and filter one cluster; write ``staging/<cid>.tar`` and ``.json``.

    Args:
        cluster: a row of ``clusters.jsonl`` (cluster_id, keys, captions, prompts, class_noun).
        crawl: the crawl the cluster's keys refer to.
        job: the resolved job settings (see :class:`mining.generate.GenerateConfig`).
        staging: the job's staging folder.

    Returns:
        The cluster's summary: status ``accepted`` (at least one sample kept) or ``rejected``,
        candidate and kept counts, the delta-CLIP of every candidate, timings.
    """
    import torch

    cid = cluster["cluster_id"]
    staging_dir = Path(staging)
    summary_path = staging_dir / f"{cid}.json"
    if summary_path.is_file():
        return json.loads(summary_path.read_text())
    torch.set_num_threads(int(job.get("threads_per_expert", 1)))
    _maybe_crash_for_tests(cid)
    started = time.perf_counter()

    from experts import load_expert, resolve_config
    from experts.train import train_expert
    from mining.crawl import load_crawl_images
    from suti.models import default_device
    from suti.scoring import get_scorer

    images = load_crawl_images(crawl, cluster["keys"], sources=cluster.get("sources"))
    demos = [images[k] for k in cluster["keys"]]
    seed = cluster_seed(cid, int(job["seed"]))
    keep_dir = Path(job["output"]) / "experts" / cid if job.get("keep_experts") else None
    workdir = Path(tempfile.mkdtemp(prefix=f"suti-expert-{cid}-"))
    try:
        instance_dir = workdir / "instance"
        instance_dir.mkdir()
        for i, img in enumerate(demos):
            img.save(instance_dir / f"{i:02d}.png")
        overrides = dict(model=job["model"], instance_dir=str(instance_dir), class_noun=cluster.get("class_noun") or "object", steps=job.get("steps"), seed=seed)
        overrides.update(job.get("recipe_overrides") or {})
        config = resolve_config(job["recipe"], overrides)
        expert_dir = keep_dir or workdir / "expert"
        info = train_expert(config, expert_dir, overwrite=True, progress=False)
        from suti.sampling import PromptTruncatedError, check_prompt, resolve_dtype

        pipe = load_expert(expert_dir, device=default_device(), torch_dtype=resolve_dtype(job.get("dtype"), default_device()))
        phrase = subject_phrase(info.identifier, info.class_noun, config.use_class_noun)
        scorer = get_scorer(job["scorer"])
        prompts = cluster["prompts"][: job.get("prompts_per_cluster") or None]
        k = int(job["samples_per_prompt"])
        candidates = []  # (prompt_index, sample_index, prompt entry, image)
        for pi, entry in enumerate(prompts):
            template = entry["prompt"] if isinstance(entry, dict) else entry
            text = template.replace("{S}", phrase)
            try:
                check_prompt(pipe.tokenizer, text, identifier=info.identifier, what=f"cluster {cid} prompt {pi}")
            except PromptTruncatedError as exc:  # the image would lose its subject: skip the prompt
                log.warning("%s; prompt skipped", exc)
                continue
            for si in range(k):
                generator = torch.Generator().manual_seed(seed + 1000 * pi + si)
                image = pipe(text, height=info.resolution, width=info.resolution, num_inference_steps=int(job["sample_steps"]), guidance_scale=float(job["guidance_scale"]), generator=generator).images[0]
                candidates.append((pi, si, entry, image))
        # delta-CLIP = CLIP(y, p) - max_x CLIP(x, p), the prompt with {S} -> the class noun
        score_texts = [_score_prompt(e, info.class_noun) for _, _, e, _ in candidates]
        deltas = delta_clip_scores(scorer, [c[3] for c in candidates], score_texts, demos) if candidates else []
        lam = float(job["lambda"])
        members = []
        demo_bytes = [jpeg_bytes(d) for d in demos]
        kept = []
        for (pi, si, entry, image), delta, score_text in zip(candidates, deltas, score_texts):
            if job.get("no_filter") or delta > lam:
                key = sample_key(cid, pi, si)
                template = entry["prompt"] if isinstance(entry, dict) else entry
                meta = {
                    "key": key, "cluster_id": cid, "page_url": cluster.get("page_url"),
                    "prompt": score_text, "prompt_template": template,
                    "skill": entry.get("skill") if isinstance(entry, dict) else None,
                    "level": entry.get("level") if isinstance(entry, dict) else None,
                    "prompt_index": pi, "sample_index": si,
                    "demo_keys": cluster["keys"], "demo_captions": cluster.get("captions", []),
                    "delta_clip": float(delta), "lambda": lam, "class_noun": info.class_noun,
                    "expert": {"recipe": info.recipe, "steps": info.steps, "seed": info.seed, "model": job["model"], "identifier": info.identifier, "kind": info.kind},
                }
                members += sample_members(key, jpeg_bytes(image), demo_bytes, meta)
                kept.append(key)
        staging_dir.mkdir(parents=True, exist_ok=True)
        if members:
            write_tar_atomic(staging_dir / f"{cid}.tar", members)
        summary = {
            "cluster_id": cid, "status": "accepted" if kept else "rejected", "kept": kept,
            "num_candidates": len(candidates), "delta_clip": [round(float(d), 5) for d in deltas],
            "train_seconds": info.train_seconds, "seconds": round(time.perf_counter() - started, 2),
        }
        tmp = summary_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(summary))
        os.replace(tmp, summary_path)  # the cluster is done once this file exists
        return summary
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def delta_clip_scores(scorer, images: list, prompts: list[str], demos: list) -> list[float]:
    """delta-CLIP of each image y with its prompt p: CLIP(y, p) - max over demos x of CLIP(x, p)."""
    img = scorer.embed_images(images)  # (N, D)
    txt = scorer.embed_texts(prompts)  # (N, D)
    demo = scorer.embed_images(demos)  # (M, D)
    return ((img * txt).sum(-1) - (txt @ demo.T).max(-1).values).tolist()


def _score_prompt(entry, class_noun: str) -> str:
    template = entry["prompt"] if isinstance(entry, dict) else entry
    return template.replace("{S}", class_noun)


def failure_summary(cluster_id: str, exc: BaseException, attempts: int) -> dict:
    """The manifest row of a cluster whose expert kept failing."""
    return {"cluster_id": cluster_id, "status": "failed", "error": f"{type(exc).__name__}: {exc}", "traceback": "".join(traceback.format_exception(exc))[-2000:], "attempts": attempts}
