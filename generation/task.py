"""One cluster's expert: fine-tune, sample the unseen prompts, filter by delta-CLIP.

This is the body of the Ray task of the generation job (:mod:`generation.job`). It is a pure
function of (cluster, demo images, job settings): it writes nothing the driver needs, and returns
the kept samples' tar members through the Ray object store, so a retried or duplicated task is
harmless and no worker's disk is ever read by the driver.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import time
import traceback
from pathlib import Path

from generation.config import ExpertJob
from suti.shards import jpeg_bytes, sample_members

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


def maybe_crash_for_tests(cluster_id: str) -> None:
    """Test hook: with SUTI_TEST_CRASH_ONCE=<dir>, the first attempt at each cluster exits hard."""
    folder = os.environ.get("SUTI_TEST_CRASH_ONCE")
    if folder:
        marker = Path(folder) / f"{cluster_id}.crashed"
        if not marker.exists():
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text("1")
            os._exit(1)  # like a kill -9 of the worker


def run_cluster(cluster: dict, demos: list, job: ExpertJob, resident=None) -> dict:
    """Train, sample and filter one cluster; return its summary *and* its accepted samples.

    Nothing is written to the worker's disk except a temporary training folder (removed), so the
    driver never depends on a worker's disk: the samples travel back through the Ray object store
    (they are small: a few JPEGs per sample).

    Args:
        cluster: a row of ``clusters.jsonl`` (cluster_id, keys, captions, prompts, class_noun).
        demos: the cluster's images (PIL, one per ``cluster["keys"]``), loaded by the driver.
        job: the job's settings (:class:`generation.config.ExpertJob`, made on the driver by
            :meth:`generation.config.GenerateConfig.expert_job`, with
            ``device``: ``"cuda"`` when the task holds a GPU, else ``"cpu"``).
        resident: a resident worker whose loaded base pipeline and scorer are used (the expert
            is trained in place and sampled from memory); ``None``: load them, save the expert
            and load it back (a plain Ray task).

    Returns:
        The cluster's summary: status ``accepted`` (at least one sample kept) or ``rejected``,
        ``kept`` sample keys, candidate count, the delta-CLIP of every candidate, timings, and
        ``members``: the webdataset tar members ``[(name, bytes)]`` of the kept samples.
    """
    device = job.device
    if device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # a task without a GPU must not pile onto cuda:0
    import torch

    cid = cluster["cluster_id"]
    torch.set_num_threads(job.threads_per_expert)
    maybe_crash_for_tests(cid)
    started = time.perf_counter()

    from experts import load_expert
    from experts.train import train_expert
    from suti import storage
    from suti.scoring import get_scorer

    seed = cluster_seed(cid, job.seed)
    workdir = Path(tempfile.mkdtemp(prefix=f"suti-expert-{cid}-"))
    try:
        config = expert_config(cluster, demos, job, workdir, seed)
        keep = job.keep_experts
        expert_dir = workdir / "expert"
        if resident is not None:
            resident.keep_base_copy(config)
            info = train_expert(config, expert_dir, overwrite=True, progress=False, pipeline=resident.pipe, save=keep)
            pipe, scorer = resident.pipe, resident.scorer
            for name in resident.trained:
                getattr(pipe, name).eval()
        else:
            from suti.sampling import resolve_dtype

            info = train_expert(config, expert_dir, overwrite=True, progress=False)
            pipe, scorer = load_expert(expert_dir, device=device, torch_dtype=resolve_dtype(job.dtype, device)), get_scorer(job.scorer)
        if keep:
            storage.upload(expert_dir, storage.join(job.output, "experts", cid))
        return sample_and_filter(cluster, demos, job, config, info, pipe, scorer, seed, device, train_seconds=info.train_seconds, started=started)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def expert_config(cluster: dict, demos: list, job: ExpertJob, workdir: Path, seed: int):
    """The cluster's resolved :class:`experts.recipe.ExpertConfig`, its demos written as the
    instance images under ``workdir/instance``."""
    from experts import resolve_config

    instance_dir = workdir / "instance"
    instance_dir.mkdir()
    for i, img in enumerate(demos):
        img.save(instance_dir / f"{i:02d}.png")
    overrides = dict(model=job.model, instance_dir=str(instance_dir), class_noun=cluster.get("class_noun") or "object", steps=job.steps, seed=seed)
    if not job.keep_experts:  # no tracker for an expert whose folder is deleted (a TensorBoard writer per expert, flushed every step)
        overrides["report_to"] = "none"
    overrides.update(job.recipe_overrides)
    return resolve_config(job.recipe_data or job.recipe, overrides)  # the driver's copy of the recipe


def sample_and_filter(cluster: dict, demos: list, job: ExpertJob, config, info, pipe, scorer, seed: int, device: str, *, train_seconds: float, started: float) -> dict:
    """Sample the cluster's unseen prompts with the trained expert ``pipe``, score them with
    delta-CLIP and pack the kept ones: the summary :func:`run_cluster` returns (``seconds``
    counted from ``started``, a ``time.perf_counter()`` value)."""
    todo = candidate_prompts(cluster, job, info, config, pipe.tokenizer)
    images = sample_candidates(pipe, [text for *_, text in todo], candidate_seeds(todo, seed), info.resolution, job, device)
    return filter_candidates(cluster, demos, job, info, todo, images, scorer, train_seconds=train_seconds, started=started)


def candidate_prompts(cluster: dict, job: ExpertJob, info, config, tokenizer) -> list[tuple]:
    """The candidates to sample: ``(prompt_index, sample_index, prompt entry, text)``, the
    cluster's first ``prompts_per_cluster`` prompts with ``{S}`` filled, ``samples_per_prompt``
    each; a prompt that the tokenizer would cut before the identifier is skipped (logged)."""
    from suti.sampling import PromptTruncatedError, check_prompt

    cid = cluster["cluster_id"]
    phrase = subject_phrase(info.identifier, info.class_noun, config.use_class_noun)
    prompts = cluster["prompts"][: job.prompts_per_cluster]
    k = job.samples_per_prompt
    todo = []
    for pi, entry in enumerate(prompts):
        template = entry["prompt"] if isinstance(entry, dict) else entry
        text = template.replace("{S}", phrase)
        try:
            check_prompt(tokenizer, text, identifier=info.identifier, what=f"cluster {cid} prompt {pi}")
        except PromptTruncatedError as exc:  # the image would lose its subject: skip the prompt
            log.warning("%s; prompt skipped", exc)
            continue
        todo += [(pi, si, entry, text) for si in range(k)]
    return todo


def candidate_seeds(todo: list[tuple], seed: int) -> list[int]:
    """The sampler seed of each candidate of :func:`candidate_prompts`: ``seed + 1000 *
    prompt_index + sample_index`` (``seed``: the cluster's, :func:`cluster_seed`)."""
    return [seed + 1000 * pi + si for pi, si, _, _ in todo]


def sample_candidates(pipe, texts: list[str], seeds: list[int], resolution: int, job: ExpertJob, device: str, *, experts: list[int] | None = None, route=None, per_call: int | None = None) -> list:
    """Sample image ``i`` of ``texts[i]`` from its own seed ``seeds[i]`` (the images of one
    call per seed, up to rounding: :func:`suti.sampling.batches`), ``sample_batch_size`` per
    pipeline call (or ``per_call``). With ``experts`` and the :class:`experts.stacked.Route` of
    stacked LoRA experts on ``pipe`` (:func:`experts.stacked.stacked_lora`), image ``i`` comes
    from expert ``experts[i]``, so that one call samples several experts."""
    from suti.sampling import batches, seeded_generators

    items = list(zip(texts, seeds, experts or [None] * len(texts)))
    images = []
    for chunk in batches(items, per_call or job.sample_batch_size):
        if route is not None:
            route.set([expert for *_, expert in chunk])
        with _sampling_precision(device):
            images += pipe([text for text, *_ in chunk], height=resolution, width=resolution, num_inference_steps=job.sample_steps, guidance_scale=job.guidance_scale,
                           generator=seeded_generators([s for _, s, _ in chunk])).images
    if route is not None:
        route.set(None)
    return images


def filter_candidates(cluster: dict, demos: list, job: ExpertJob, info, todo: list[tuple], images: list, scorer, *, train_seconds: float, started: float) -> dict:
    """Score the candidates ``images`` (one per ``todo`` entry of :func:`candidate_prompts`)
    with delta-CLIP = CLIP(y, p) - max_x CLIP(x, p), keep those above lambda (every one with
    ``no_filter``) and pack them as webdataset members: the cluster's summary."""
    cid = cluster["cluster_id"]
    candidates = [(pi, si, entry, image) for (pi, si, entry, _), image in zip(todo, images)]
    # delta-CLIP: the prompt with {S} -> the class noun
    score_texts = [_score_prompt(e, info.class_noun) for _, _, e, _ in candidates]
    deltas = delta_clip_scores(scorer, [c[3] for c in candidates], score_texts, demos) if candidates else []
    lam = job.lambda_
    members = []
    demo_bytes = [jpeg_bytes(d) for d in demos]
    kept = []
    for (pi, si, entry, image), delta, score_text in zip(candidates, deltas, score_texts):
        if job.no_filter or delta > lam:
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
                "expert": {"recipe": info.recipe, "steps": info.steps, "seed": info.seed, "model": job.model, "identifier": info.identifier, "kind": info.kind},
            }
            members += sample_members(key, jpeg_bytes(image), demo_bytes, meta)
            kept.append(key)
    if os.environ.get("SUTI_TEST_DROP_SAMPLES"):
        members = []  # test hook: a worker that "kept" its samples on its own disk
    return {
        "cluster_id": cid, "status": "accepted" if kept else "rejected", "kept": kept,
        "num_candidates": len(candidates), "delta_clip": [round(float(d), 5) for d in deltas],
        "train_seconds": train_seconds, "seconds": round(time.perf_counter() - started, 2),
        "node_id": _ray_node_id(), "expert_batch": 1, "members": members,
    }


def _sampling_precision(device: str):
    """bf16 autocast for sampling on a GPU that has it (fp16 otherwise); full precision on CPU."""
    import contextlib

    import torch

    if device != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def _ray_node_id() -> str | None:
    """The Ray node that ran the expert (recorded in the manifest; ``None`` outside Ray)."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:  # noqa: BLE001 - bookkeeping only
        return None


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
