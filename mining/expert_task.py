"""One cluster's expert: fine-tune, sample the unseen prompts, filter by delta-CLIP.

This is the body of the Ray task of the generation job (:mod:`mining.generate`). It is a pure
function of (cluster, demo images, job settings): it writes nothing the driver needs, and returns
the kept samples' tar members through the Ray object store, so a retried or duplicated task is
harmless and no worker's disk is ever read by the driver.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import os
import shutil
import tempfile
import threading
import time
import traceback
from pathlib import Path

from mining.shards import jpeg_bytes, sample_members

log = logging.getLogger(__name__)


BATCH_WAIT_S = 1.0  # how long a resident worker waits to fill a batch of experts (--expert-batch-size)


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

    from experts import load_expert
    from experts.train import train_expert
    from suti import storage
    from suti.scoring import get_scorer

    seed = cluster_seed(cid, int(job["seed"]))
    workdir = Path(tempfile.mkdtemp(prefix=f"suti-expert-{cid}-"))
    try:
        config = _expert_config(cluster, demos, job, workdir, seed)
        keep = bool(job.get("keep_experts"))
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
            pipe, scorer = load_expert(expert_dir, device=device, torch_dtype=resolve_dtype(job.get("dtype"), device)), get_scorer(job["scorer"])
        if keep:
            storage.upload(expert_dir, storage.join(job["output"], "experts", cid))
        return _sample_and_filter(cluster, demos, job, config, info, pipe, scorer, seed, device, train_seconds=info.train_seconds, started=started)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _expert_config(cluster: dict, demos: list, job: dict, workdir: Path, seed: int):
    """The cluster's resolved :class:`experts.recipe.ExpertConfig`, its demos written as the
    instance images under ``workdir/instance``."""
    from experts import resolve_config

    instance_dir = workdir / "instance"
    instance_dir.mkdir()
    for i, img in enumerate(demos):
        img.save(instance_dir / f"{i:02d}.png")
    overrides = dict(model=job["model"], instance_dir=str(instance_dir), class_noun=cluster.get("class_noun") or "object", steps=job.get("steps"), seed=seed)
    if not job.get("keep_experts"):  # no tracker for an expert whose folder is deleted (a TensorBoard writer per expert, flushed every step)
        overrides["report_to"] = "none"
    overrides.update(job.get("recipe_overrides") or {})
    return resolve_config(job.get("recipe_data") or job["recipe"], overrides)  # the driver's copy of the recipe


def _sample_and_filter(cluster: dict, demos: list, job: dict, config, info, pipe, scorer, seed: int, device: str, *, train_seconds: float, started: float) -> dict:
    """Sample the cluster's unseen prompts with the trained expert ``pipe``, score them with
    delta-CLIP and pack the kept ones: the summary :func:`run_cluster` returns (``seconds``
    counted from ``started``, a ``time.perf_counter()`` value)."""
    todo = _candidate_prompts(cluster, job, info, config, pipe.tokenizer)
    images = _sample_candidates(pipe, [text for *_, text in todo], candidate_seeds(todo, seed), info.resolution, job, device)
    return _filter(cluster, demos, job, info, todo, images, scorer, train_seconds=train_seconds, started=started)


def _candidate_prompts(cluster: dict, job: dict, info, config, tokenizer) -> list[tuple]:
    """The candidates to sample: ``(prompt_index, sample_index, prompt entry, text)``, the
    cluster's first ``prompts_per_cluster`` prompts with ``{S}`` filled, ``samples_per_prompt``
    each; a prompt that the tokenizer would cut before the identifier is skipped (logged)."""
    from suti.sampling import PromptTruncatedError, check_prompt

    cid = cluster["cluster_id"]
    phrase = subject_phrase(info.identifier, info.class_noun, config.use_class_noun)
    prompts = cluster["prompts"][: job.get("prompts_per_cluster") or None]
    k = int(job["samples_per_prompt"])
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
    """The sampler seed of each candidate of :func:`_candidate_prompts`: ``seed + 1000 *
    prompt_index + sample_index`` (``seed``: the cluster's, :func:`cluster_seed`)."""
    return [seed + 1000 * pi + si for pi, si, _, _ in todo]


def _sample_candidates(pipe, texts: list[str], seeds: list[int], resolution: int, job: dict, device: str, *, adapters: list[str] | None = None, route: dict | None = None, per_call: int | None = None) -> list:
    """Sample image ``i`` of ``texts[i]`` from its own seed ``seeds[i]`` (the images of one
    call per seed, up to rounding: :func:`suti.sampling.batches`), ``sample_batch_size`` per
    pipeline call (or ``per_call``). With ``adapters`` and a ``route`` of
    :func:`experts.batched.routed_adapters`, image ``i`` comes from the LoRA adapter
    ``adapters[i]``, so that one call samples several experts."""
    from suti.sampling import DEFAULT_SAMPLE_BATCH_SIZE, batches, seeded_generators

    items = list(zip(texts, seeds, adapters or [None] * len(texts)))
    images = []
    for chunk in batches(items, per_call or int(job.get("sample_batch_size") or DEFAULT_SAMPLE_BATCH_SIZE)):
        if route is not None:
            route["names"] = [adapter for *_, adapter in chunk]
        with _sampling_precision(device):
            images += pipe([text for text, *_ in chunk], height=resolution, width=resolution, num_inference_steps=int(job["sample_steps"]), guidance_scale=float(job["guidance_scale"]),
                           generator=seeded_generators([s for _, s, _ in chunk])).images
    if route is not None:
        route["names"] = None
    return images


def _filter(cluster: dict, demos: list, job: dict, info, todo: list[tuple], images: list, scorer, *, train_seconds: float, started: float) -> dict:
    """Score the candidates ``images`` (one per ``todo`` entry of :func:`_candidate_prompts`)
    with delta-CLIP = CLIP(y, p) - max_x CLIP(x, p), keep those above lambda (every one with
    ``no_filter``) and pack them as webdataset members: the cluster's summary."""
    cid = cluster["cluster_id"]
    candidates = [(pi, si, entry, image) for (pi, si, entry, _), image in zip(todo, images)]
    # delta-CLIP: the prompt with {S} -> the class noun
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
        "train_seconds": train_seconds, "seconds": round(time.perf_counter() - started, 2),
        "node_id": _ray_node_id(), "expert_batch": 1, "members": members,
    }


class ResidentExpertWorker:
    """A resident expert worker (run as a Ray actor, one per GPU slot or CPU slot).

    Loads the base model and the scorer once, then trains experts back to back
    (:meth:`run`): a LoRA expert is the adapter ``default``, added, trained, sampled from memory
    and deleted; a full expert changes the weights, which are then restored from an in-memory
    copy of the base (kept only for full fine-tuning). Nothing is saved unless the job keeps
    experts. Samples are the same, byte for byte, as a plain task's (:func:`run_cluster`
    without ``resident``).

    With ``job["expert_batch_size"]`` K > 1 (LoRA experts), the worker runs as a threaded
    actor (``max_concurrency=K``): concurrent :meth:`run` calls are gathered, up to K or for at
    most :data:`BATCH_WAIT_S` seconds, and trained together (:meth:`run_batch`). Their samples
    then equal one-at-a-time experts' up to float rounding, not byte for byte.
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
        self.batch_size = int(job.get("expert_batch_size") or 1)
        self.pipe = load_pipeline(job["model"], device=device)
        self.scorer = get_scorer(job["scorer"])
        # the modules an expert may change (SDXL: also the second text encoder)
        self.trained = [n for n in ("unet", "text_encoder", "text_encoder_2") if getattr(self.pipe, n, None) is not None]
        self.base: dict = {}  # the base weights, copied before the first full fine-tuning expert (keep_base_copy)
        self.experts = 0  # experts trained so far
        self._queue: list = []
        self._ready = threading.Condition()
        self._batcher: threading.Thread | None = None

    def run(self, cluster: dict, demos: list) -> dict:
        """:func:`run_cluster` on the resident pipeline; the base is restored afterwards. With an
        expert batch size above 1, the cluster joins the next batch (:meth:`run_batch`) and this
        call returns its own summary, or raises its own error."""
        if self.batch_size == 1:
            return self._run_one(cluster, demos)
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._ready:
            self._queue.append((cluster, demos, future))
            if self._batcher is None:
                self._batcher = threading.Thread(target=self._gather_batches, name="expert-batches", daemon=True)
                self._batcher.start()
            self._ready.notify_all()
        return future.result()

    def _gather_batches(self) -> None:
        """The batching thread: wait for work, gather up to ``batch_size`` clusters (at most
        :data:`BATCH_WAIT_S` seconds after the first), train them, hand back each result."""
        while True:
            with self._ready:
                self._ready.wait_for(lambda: self._queue)
                deadline = time.monotonic() + BATCH_WAIT_S
                while len(self._queue) < self.batch_size and (left := deadline - time.monotonic()) > 0:
                    self._ready.wait(left)
                batch, self._queue = self._queue[: self.batch_size], self._queue[self.batch_size :]
            try:
                results = self.run_batch([c for c, _, _ in batch], [d for _, d, _ in batch])
            except BaseException as exc:  # noqa: BLE001 - every waiting call gets it
                results = [exc] * len(batch)
            for (_, _, future), result in zip(batch, results):
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)

    def keep_base_copy(self, config) -> None:
        """Before an expert trains: a full fine-tuning expert (``config.lora_rank == 0``) changes
        the base weights, so the first one copies them to memory for :meth:`restore`. LoRA
        experts never change them and get no copy (on a GPU it would double the memory)."""
        if config.lora_rank <= 0 and not self.base:
            self.base = {name: {k: v.detach().clone() for k, v in getattr(self.pipe, name).state_dict().items()} for name in self.trained}

    def _run_one(self, cluster: dict, demos: list) -> dict:
        try:
            return run_cluster(cluster, demos, self.job, resident=self)
        finally:
            self.restore()
            self.experts += 1

    def run_batch(self, clusters: list[dict], demos: list[list]) -> list:
        """Train the clusters' LoRA experts together (:func:`experts.batched.train_lora_experts`),
        then sample and filter each from its own adapter.

        Returns one entry per cluster: its summary (as :func:`run_cluster`'s; ``train_seconds``
        is the batch's training time over its size), or the exception that cluster raised. When
        the batch itself fails (a bad cluster among good ones), its clusters run one at a time,
        so that only the bad one fails.
        """
        if len(clusters) == 1:
            return [self._run_one(clusters[0], demos[0])]
        from experts.batched import routed_adapters, train_lora_experts
        from suti import storage
        from suti.sampling import DEFAULT_SAMPLE_BATCH_SIZE

        device = self.job.get("device") or "cpu"
        started = time.perf_counter()
        for cluster in clusters:
            _maybe_crash_for_tests(cluster["cluster_id"])
        keep = bool(self.job.get("keep_experts"))
        workdirs: list[Path] = []
        try:
            try:
                configs, seeds = [], []
                for cluster, images in zip(clusters, demos):
                    seeds.append(cluster_seed(cluster["cluster_id"], int(self.job["seed"])))
                    workdirs.append(Path(tempfile.mkdtemp(prefix=f"suti-expert-{cluster['cluster_id']}-")))
                    configs.append(_expert_config(cluster, images, self.job, workdirs[-1], seeds[-1]))
                adapters = [f"expert_{i}" for i in range(len(clusters))]
                infos = train_lora_experts(self.pipe, configs, adapters, outputs=[w / "expert" for w in workdirs] if keep else None)
            except Exception as exc:  # noqa: BLE001
                log.warning("a batch of %d experts failed (%s); running them one at a time", len(clusters), exc)
                self.restore()
                self.experts -= len(clusters)  # _run_one counts them
                results = []
                for cluster, images in zip(clusters, demos):
                    try:
                        results.append(self._run_one(cluster, images))
                    except Exception as one:  # noqa: BLE001 - this cluster's own error
                        results.append(one)
                return results
            if keep:
                for cluster, workdir in zip(clusters, workdirs):
                    storage.upload(workdir / "expert", storage.join(self.job["output"], "experts", cluster["cluster_id"]))
            # every expert's candidates in shared pipeline calls, each image from its own adapter
            todos = [_candidate_prompts(c, self.job, info, config, self.pipe.tokenizer) for c, info, config in zip(clusters, infos, configs)]
            texts = [text for todo in todos for *_, text in todo]
            seeds_of = [s for todo, seed in zip(todos, seeds) for s in candidate_seeds(todo, seed)]
            owners = [adapter for todo, adapter in zip(todos, adapters) for _ in todo]
            per_call = int(self.job.get("sample_batch_size") or DEFAULT_SAMPLE_BATCH_SIZE) * len(clusters)
            with routed_adapters(self.pipe.unet) as route:
                images = _sample_candidates(self.pipe, texts, seeds_of, infos[0].resolution, self.job, device, adapters=owners, route=route, per_call=per_call)
            share = (time.perf_counter() - started) / len(clusters)  # training and sampling, per expert
            results, at = [], 0
            for cluster, images_of, info, todo in zip(clusters, demos, infos, todos):
                try:
                    summary = _filter(cluster, images_of, self.job, info, todo, images[at : at + len(todo)], self.scorer, train_seconds=info.train_seconds, started=time.perf_counter() - share)
                    results.append({**summary, "expert_batch": len(clusters)})  # the experts trained together (the manifest records it)
                except Exception as exc:  # noqa: BLE001 - this cluster's own error
                    results.append(exc)
                at += len(todo)
            return results
        finally:
            for workdir in workdirs:
                shutil.rmtree(workdir, ignore_errors=True)
            self.restore()
            self.experts += len(clusters)

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
            elif name in self.base:  # full fine-tuning (a LoRA job keeps no copy)
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
