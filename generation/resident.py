"""A resident expert worker: a Ray actor that keeps the base model and the scorer loaded and
trains experts back to back, one at a time or in batches of LoRA experts (``--resident-workers``,
``--expert-batch-size``). Its samples equal a plain task's (:func:`generation.task.run_cluster`).
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

from generation.config import ExpertJob
from generation.task import candidate_prompts, expert_config, filter_candidates, maybe_crash_for_tests, sample_candidates, candidate_seeds, cluster_seed, run_cluster
from suti.denoisers import denoiser_module

log = logging.getLogger(__name__)

BATCH_WAIT_S = 1.0  # how long a resident worker waits to fill a batch of experts (--expert-batch-size)


class ResidentExpertWorker:
    """A resident expert worker (run as a Ray actor, one per GPU slot or CPU slot).

    Loads the base model and the scorer once, then trains experts back to back
    (:meth:`run`): a LoRA expert is the adapter ``default``, added, trained, sampled from memory
    and deleted; a full expert changes the weights, which are then restored from an in-memory
    copy of the base (kept only for full fine-tuning). Nothing is saved unless the job keeps
    experts. Samples are the same, byte for byte, as a plain task's (:func:`run_cluster`
    without ``resident``).

    With ``job.expert_batch_size`` K > 1 (LoRA experts), the worker runs as a threaded
    actor (``max_concurrency=K``): concurrent :meth:`run` calls are gathered, up to K or for at
    most :data:`BATCH_WAIT_S` seconds, and trained together (:meth:`run_batch`). Their samples
    then equal one-at-a-time experts' up to float rounding, not byte for byte.
    """

    def __init__(self, job: ExpertJob):
        device = job.device
        if device == "cpu":
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
        import torch

        from suti.models import load_pipeline
        from suti.scoring import get_scorer

        torch.set_num_threads(job.threads_per_expert)
        self.job = job
        self.pipe = load_pipeline(job.model, device=device)
        self.scorer = get_scorer(job.scorer)
        self.batch_size = job.expert_batch_size or self._experts_that_fit()
        # the modules an expert may change (SDXL: also the second text encoder)
        self.trained = [n for n in ("unet", "transformer", "text_encoder", "text_encoder_2") if getattr(self.pipe, n, None) is not None]
        self.base: dict = {}  # the base weights, copied before the first full fine-tuning expert (keep_base_copy)
        self.experts = 0  # experts trained so far
        self._queue: list = []
        self._ready = threading.Condition()
        self._batcher: threading.Thread | None = None

    def capacity(self) -> int:
        """The experts this worker trains together (``--expert-batch-size``, or what fits)."""
        return self.batch_size

    def _experts_that_fit(self) -> int:
        """``--expert-batch-size`` left to the worker: on a GPU, as many stacked LoRA experts
        as its free memory holds after the base and the scorer, at the memory one expert's
        training step measures here (:func:`experts.stacked.measure_bytes_per_expert`); 1 on a
        CPU (no gain there beyond what a sweep shows) or for experts that cannot stack."""
        import torch

        from experts import resolve_config
        from experts.batched import check_batchable
        from experts.stacked import experts_that_fit, measure_bytes_per_expert
        from suti.errors import InputError

        if not self.job.device.startswith("cuda"):
            return 1
        config = resolve_config(self.job.recipe_data or self.job.recipe, {"model": self.job.model, "instance_dir": ".", "class_noun": "object", "steps": self.job.steps, **self.job.recipe_overrides})
        try:
            check_batchable([config])
        except InputError:
            return 1
        per_expert = measure_bytes_per_expert(self.pipe, config, self.job.device)
        free = torch.cuda.mem_get_info()[0]
        k = experts_that_fit(free, per_expert)
        log.info("resident worker: %.2f GiB per expert, %.1f GiB free: %d experts per batch", per_expert / 2**30, free / 2**30, k)
        return k

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

    def run_batch(self, clusters: list[dict], demos: list[list], *, timings: dict | None = None, on_step=None) -> list:
        """Train the clusters' LoRA experts together (:func:`experts.batched.train_lora_experts`),
        then sample and filter each from its own adapter.

        Returns one entry per cluster: its summary (as :func:`run_cluster`'s; ``train_seconds``
        is the batch's training time over its size), or the exception that cluster raised. When
        the batch itself fails (a bad cluster among good ones), its clusters run one at a time,
        so that only the bad one fails.

        ``timings`` (benchmarks): a dict that gets the seconds of each phase added: the training
        steps' ``data``, ``forward``, ``backward``, ``optimizer`` (device synchronised), then
        ``sampling`` and ``scoring``; with it, one cluster also trains on the stacked path.
        ``on_step``: called after every training step (``torch.profiler.profile.step``).
        """
        if len(clusters) == 1 and timings is None and on_step is None:
            return [self._run_one(clusters[0], demos[0])]
        from experts.batched import train_lora_experts
        from experts.stacked import stacked_lora
        from suti import storage

        device = self.job.device
        started = time.perf_counter()
        for cluster in clusters:
            maybe_crash_for_tests(cluster["cluster_id"])
        keep = self.job.keep_experts
        workdirs: list[Path] = []
        try:
            try:
                configs, seeds = [], []
                for cluster, images in zip(clusters, demos):
                    seeds.append(cluster_seed(cluster["cluster_id"], self.job.seed))
                    workdirs.append(Path(tempfile.mkdtemp(prefix=f"suti-expert-{cluster['cluster_id']}-")))
                    configs.append(expert_config(cluster, images, self.job, workdirs[-1], seeds[-1]))
                adapters = [f"expert_{i}" for i in range(len(clusters))]
                infos = train_lora_experts(self.pipe, configs, adapters, outputs=[w / "expert" for w in workdirs] if keep else None, compile=self.job.compile,
                                           timings=timings, on_step=on_step)
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
                    storage.upload(workdir / "expert", storage.join(self.job.output, "experts", cluster["cluster_id"]))
            # every expert's candidates in shared pipeline calls, each image from its own adapter
            todos = [candidate_prompts(c, self.job, info, config, self.pipe.tokenizer) for c, info, config in zip(clusters, infos, configs)]
            texts = [text for todo in todos for *_, text in todo]
            seeds_of = [s for todo, seed in zip(todos, seeds) for s in candidate_seeds(todo, seed)]
            owners = [k for k, todo in enumerate(todos) for _ in todo]
            per_call = self.job.sample_batch_size * len(clusters)
            sampling_started = time.perf_counter()
            with stacked_lora(denoiser_module(self.pipe), adapters, write_back=False) as stack:
                images = sample_candidates(self.pipe, texts, seeds_of, infos[0].resolution, self.job, device, experts=owners, route=stack.route, per_call=per_call)
            scoring_started = time.perf_counter()
            if timings is not None:
                timings["sampling"] = timings.get("sampling", 0.0) + scoring_started - sampling_started
            share = (time.perf_counter() - started) / len(clusters)  # training and sampling, per expert
            results, at = [], 0
            for cluster, images_of, info, todo in zip(clusters, demos, infos, todos):
                try:
                    summary = filter_candidates(cluster, images_of, self.job, info, todo, images[at : at + len(todo)], self.scorer, train_seconds=info.train_seconds, started=time.perf_counter() - share)
                    results.append({**summary, "expert_batch": len(clusters)})  # the experts trained together (the manifest records it)
                except Exception as exc:  # noqa: BLE001 - this cluster's own error
                    results.append(exc)
                at += len(todo)
            if timings is not None:
                timings["scoring"] = timings.get("scoring", 0.0) + time.perf_counter() - scoring_started
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
