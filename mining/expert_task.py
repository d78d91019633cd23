"""One cluster's expert: fine-tune, sample the unseen prompts, filter by delta-CLIP.

This is the body of the Ray task of the generation job (:mod:`mining.generate`). It is a pure
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

from mining.shards import jpeg_bytes, sample_members

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


def run_cluster(cluster: dict, demos: list, job: dict, resident: "ResidentExpertWorker | None" = None) -> dict:
    """Train, sample and filter one cluster; return its summary *and* its accepted samples.

    Nothing is written to the worker's disk except a temporary training folder (removed), so the
    driver never depends on a worker's disk: the samples travel back through the Ray object store
    (they are small: a few JPEGs per sample).

    Args:
        cluster: a row of ``clusters.jsonl`` (cluster_id, keys, captions, prompts, class_noun).
        demos: the cluster's images (PIL, one per ``cluster["keys"]``), loaded by the driver.
        job: the resolved job settings (:meth:`mining.generate.GenerateConfig.job_dict`, with
            ``device``: ``"cuda"`` when the task holds a GPU, else ``"cpu"``).
        resident: a resident worker whose loaded base pipeline and scorer are used (the expert
            is trained in place and sampled from memory); ``None``: load them, save the expert
            and load it back (a plain Ray task).

    Returns:
        The cluster's summary: status ``accepted`` (at least one sample kept) or ``rejected``,
        ``kept`` sample keys, candidate count, the delta-CLIP of every candidate, timings, and
        ``members``: the webdataset tar members ``[(name, bytes)]`` of the kept samples.
    """
    device = job.get("device") or "cpu"
    if device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # a task without a GPU must not pile onto cuda:0
    import torch

    cid = cluster["cluster_id"]
    torch.set_num_threads(int(job.get("threads_per_expert", 1)))
    _maybe_crash_for_tests(cid)
    started = time.perf_counter()

    from experts import load_expert, resolve_config
    from experts.train import train_expert
    from suti import storage
    from suti.scoring import get_scorer

    seed = cluster_seed(cid, int(job["seed"]))
    workdir = Path(tempfile.mkdtemp(prefix=f"suti-expert-{cid}-"))
    try:
        instance_dir = workdir / "instance"
        instance_dir.mkdir()
        for i, img in enumerate(demos):
            img.save(instance_dir / f"{i:02d}.png")
        overrides = dict(model=job["model"], instance_dir=str(instance_dir), class_noun=cluster.get("class_noun") or "object", steps=job.get("steps"), seed=seed)
        keep = bool(job.get("keep_experts"))
        if not keep:  # no tracker for an expert whose folder is deleted (a TensorBoard writer per expert, flushed every step)
            overrides["report_to"] = "none"
        overrides.update(job.get("recipe_overrides") or {})
        config = resolve_config(job.get("recipe_data") or job["recipe"], overrides)  # the driver's copy of the recipe
        from suti.sampling import DEFAULT_SAMPLE_BATCH_SIZE, PromptTruncatedError, batches, check_prompt, resolve_dtype, seeded_generators

        expert_dir = workdir / "expert"
        if resident is not None:
            info = train_expert(config, expert_dir, overwrite=True, progress=False, pipeline=resident.pipe, save=keep)
            pipe, scorer = resident.pipe, resident.scorer
            for name in resident.trained:
                getattr(pipe, name).eval()
        else:
            info = train_expert(config, expert_dir, overwrite=True, progress=False)
            pipe, scorer = load_expert(expert_dir, device=device, torch_dtype=resolve_dtype(job.get("dtype"), device)), get_scorer(job["scorer"])
        if keep:
            storage.upload(expert_dir, storage.join(job["output"], "experts", cid))
        phrase = subject_phrase(info.identifier, info.class_noun, config.use_class_noun)
        prompts = cluster["prompts"][: job.get("prompts_per_cluster") or None]
        k = int(job["samples_per_prompt"])
        todo = []  # (prompt_index, sample_index, prompt entry, text)
        for pi, entry in enumerate(prompts):
            template = entry["prompt"] if isinstance(entry, dict) else entry
            text = template.replace("{S}", phrase)
            try:
                check_prompt(pipe.tokenizer, text, identifier=info.identifier, what=f"cluster {cid} prompt {pi}")
            except PromptTruncatedError as exc:  # the image would lose its subject: skip the prompt
                log.warning("%s; prompt skipped", exc)
                continue
            todo += [(pi, si, entry, text) for si in range(k)]
        candidates = []  # (prompt_index, sample_index, prompt entry, image)
        # sample_batch_size candidates per call, each from its own seed (suti.sampling.batches: the images of one call per seed, up to rounding)
        for chunk in batches(todo, int(job.get("sample_batch_size") or DEFAULT_SAMPLE_BATCH_SIZE)):
            generators = seeded_generators([seed + 1000 * pi + si for pi, si, _, _ in chunk])
            with _sampling_precision(device):
                images = pipe([text for *_, text in chunk], height=info.resolution, width=info.resolution, num_inference_steps=int(job["sample_steps"]), guidance_scale=float(job["guidance_scale"]), generator=generators).images
            candidates += [(pi, si, entry, image) for (pi, si, entry, _), image in zip(chunk, images)]
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
        if os.environ.get("SUTI_TEST_DROP_SAMPLES"):
            members = []  # test hook: a worker that "kept" its samples on its own disk
        return {
            "cluster_id": cid, "status": "accepted" if kept else "rejected", "kept": kept,
            "num_candidates": len(candidates), "delta_clip": [round(float(d), 5) for d in deltas],
            "train_seconds": info.train_seconds, "seconds": round(time.perf_counter() - started, 2),
            "node_id": _ray_node_id(), "members": members,
        }
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


class ResidentExpertWorker:
    """A resident expert worker (run as a Ray actor, one per GPU slot or CPU slot).

    Loads the base model and the scorer once, then trains experts back to back
    (:meth:`run`): a LoRA expert is the adapter ``default``, added, trained, sampled from memory
    and deleted; a full expert changes the weights, which are then restored from an in-memory
    copy of the base. Nothing is saved unless the job keeps experts. Samples are the same, byte
    for byte, as a plain task's (:func:`run_cluster` without ``resident``).
    """

    def __init__(self, job: dict):
        device = job.get("device") or "cpu"
        if device == "cpu":
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
        import torch

        from suti.models import load_pipeline
        from suti.scoring import get_scorer

        torch.set_num_threads(int(job.get("threads_per_expert", 1)))
        self.job = job
        self.pipe = load_pipeline(job["model"], device=device)
        self.scorer = get_scorer(job["scorer"])
        # the modules an expert may change (SDXL: also the second text encoder)
        self.trained = [n for n in ("unet", "text_encoder", "text_encoder_2") if getattr(self.pipe, n, None) is not None]
        self.base = {name: {k: v.detach().clone() for k, v in getattr(self.pipe, name).state_dict().items()} for name in self.trained}
        self.experts = 0

    def run(self, cluster: dict, demos: list) -> dict:
        """:func:`run_cluster` on the resident pipeline; the base is restored afterwards."""
        try:
            return run_cluster(cluster, demos, self.job, resident=self)
        finally:
            self.restore()
            self.experts += 1

    def restore(self) -> None:
        """Back to the base model: delete LoRA adapters, or load the base weights back."""
        for name in self.trained:
            module = getattr(self.pipe, name)
            adapters = list(getattr(module, "peft_config", None) or {})
            if adapters:
                if hasattr(module, "delete_adapters"):
                    module.delete_adapters(adapters)
                else:
                    for a in adapters:
                        module.delete_adapter(a)
            else:
                module.load_state_dict(self.base[name])
            if getattr(module, "is_gradient_checkpointing", False):
                if hasattr(module, "disable_gradient_checkpointing"):
                    module.disable_gradient_checkpointing()
                else:
                    module.gradient_checkpointing_disable()
            module.requires_grad_(False)
            module.eval()


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
