"""Scheduling the generation job's experts on Ray: one task per cluster, or a pool of resident
workers (:class:`generation.resident.ResidentExpertWorker` actors) that keep the base loaded.

:class:`Scheduler` keeps as many experts in flight as the cluster's *current* resources allow
(read every loop, so it grows when an autoscaler adds nodes), retries work lost with a worker or
node, and hands each finished cluster to the ledger (:mod:`generation.ledger`): checked, staged,
recorded, packed. Resources are declared at launch (``num_cpus``, ``num_gpus``); each worker gets
the driver's :func:`suti.raytools.worker_env`. The driver exports the job's counters as Ray
metrics (:mod:`generation.metrics`).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import time

from tqdm import tqdm

from generation.config import ExpertJob, GenerateConfig
from generation.ledger import SamplesMissingError, check_samples, cluster_fingerprint, images_fingerprint, pack, stage, write_manifest_row
from generation.task import failure_summary
from suti.errors import OutputStorageError, describe_os_error
from suti.raytools import worker_env
from suti.shards import ShardPacker

log = logging.getLogger(__name__)


def init_ray(address: str | None) -> None:
    """Connect to ``address`` (or start a local Ray) with :func:`worker_env` as the job's
    ``runtime_env``; a no-op when Ray is already initialised."""
    from suti.raytools import init_ray as connect  # a failed start is one line with a hint

    runtime_env = {"env_vars": worker_env()}
    if address:
        connect(address, log_to_driver=False, runtime_env=runtime_env)
    else:
        connect(None, num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, runtime_env=runtime_env)


def gpus_per_expert(config: GenerateConfig, cluster_gpus: float) -> float:
    """GPUs each expert task requests: ``--gpus-per-expert``, else 1 on a cluster with GPUs, else 0."""
    if config.gpus_per_expert is None:
        return 1.0 if cluster_gpus > 0 else 0.0
    if config.gpus_per_expert == 0 and cluster_gpus > 0:
        log.warning("--gpus-per-expert 0 on a cluster with %g GPUs: experts train on CPU", cluster_gpus)
    return float(config.gpus_per_expert)


def experts_in_flight(config: GenerateConfig, gpus: float, resources: dict) -> int:
    """How many experts to keep submitted, from the cluster's *current* resources (read every
    loop, so it grows when an autoscaler adds nodes): the experts that fit, plus (for tasks) one
    queued so that an autoscaler sees demand; ``--max-workers`` caps it. Resident workers hold
    their resources while they live, so their pool is only as large as what fits (at least one,
    which an autoscaler sees as demand when nothing fits yet), and each holds
    ``--expert-batch-size`` experts."""
    fit = int(resources.get("CPU", 0) // config.cpus_per_expert)
    if gpus > 0:
        fit = min(fit, int(resources.get("GPU", 0) / gpus + 1e-9))
    if config.resident_workers:  # each worker holds expert_batch_size experts (auto: at most MAX_AUTO_EXPERTS)
        experts = max(1, fit) * worker_capacity_bound(config, gpus)
        return max(1, min(experts, config.max_workers)) if config.max_workers else experts
    if config.max_workers:
        return max(1, min(fit, config.max_workers)) if fit else 1
    return max(1, fit) + 1


def worker_capacity_bound(config: GenerateConfig, gpus: float) -> int:
    """The most experts one resident worker holds: ``--expert-batch-size``; when it is left to
    the worker (``None``), 1 for a worker without a GPU (``gpus`` 0), else
    :data:`experts.stacked.MAX_AUTO_EXPERTS` (the worker says how many fit once it started)."""
    from experts.stacked import MAX_AUTO_EXPERTS

    if config.expert_batch_size:
        return config.expert_batch_size
    return MAX_AUTO_EXPERTS if gpus > 0 else 1


def load_demos(config: GenerateConfig, rows: list[dict]) -> dict[str, list | str]:
    """Cluster id -> its images (PIL), or the reason they cannot be loaded."""
    from mining.crawl import load_crawl_images

    keys = [k for row in rows for k in row["keys"]]
    sources = [s for row in rows for s in (row.get("sources") or [None] * len(row["keys"]))]
    images = load_crawl_images(config.crawl, keys, sources=sources, strict=False)
    out: dict[str, list | str] = {}
    for row in rows:
        missing = [k for k in row["keys"] if k not in images]
        out[row["cluster_id"]] = [images[k] for k in row["keys"]] if not missing else f"InputError: {config.crawl}: {len(missing)} of the cluster's images are missing or unusable ({', '.join(missing[:3])})"
    return out


class TaskSubmitter:
    """One Ray task per expert (loads the model, saves the expert and loads it back)."""

    def __init__(self, task, job: ExpertJob):
        self.task, self.job = task, job

    def __call__(self, row: dict, images: list):
        return self.task.remote(row, images, self.job)

    def release(self, ref, lost: bool) -> None:
        pass

    def grow(self, limit: int) -> None:
        pass

    def available(self) -> bool:
        return True

    def starting_refs(self) -> list:
        return []

    def started(self, ref) -> bool:
        return False


class ActorPool:
    """Resident expert workers (:class:`generation.resident.ResidentExpertWorker` actors), each
    holding up to ``expert_batch_size`` experts (a threaded actor that trains them together).
    Actors are started up to the current limit and get work only once ready (an actor that
    cannot be placed never holds a cluster); a dead actor is dropped, and a new one is started in
    its place when the cluster has room (the caller runs its clusters again). Work goes to the
    ready actor that holds the most experts, so that batches fill.
    """

    def __init__(self, config: GenerateConfig, gpus: float, job: ExpertJob):
        import ray

        from generation.resident import ResidentExpertWorker

        self.per_actor = worker_capacity_bound(config, gpus)
        self.capacity: dict = {}  # ready actor -> the experts it holds (ResidentExpertWorker.capacity)
        self.cls = ray.remote(ResidentExpertWorker).options(num_cpus=config.cpus_per_expert, num_gpus=gpus, max_restarts=0, max_concurrency=self.per_actor,
                                                           runtime_env={"env_vars": worker_env()})
        self.job = job
        self.ready: list = []  # started actors
        self.busy: dict = {}  # ref -> actor (an actor holds as many experts as it has refs here)
        self.starting: dict = {}
        self.start_failures = 0
        self.max_start_failures = config.max_retries + 1

    def grow(self, limit: int) -> None:
        """Start actors for up to ``limit`` experts; drop never-started ones above it (the
        cluster shrank)."""
        import ray

        actors = -(-limit // self.per_actor)
        while len(self.ready) + len(self.starting) < actors:
            actor = self.cls.remote(self.job)
            self.starting[actor.__ray_ready__.remote()] = actor
        while self.starting and len(self.ready) + len(self.starting) > actors:
            _, actor = self.starting.popitem()
            ray.kill(actor, no_restart=True)

    def _load(self, actor) -> int:
        return sum(a is actor for a in self.busy.values())

    def _free(self) -> list:
        return [a for a in self.ready if self._load(a) < self.capacity.get(a, self.per_actor)]

    def available(self) -> bool:
        return bool(self._free())

    def starting_refs(self) -> list:
        return list(self.starting)

    def started(self, ref) -> bool:
        """Handle a starting actor's readiness; ``False`` if ``ref`` is not one."""
        import ray

        if ref not in self.starting:
            return False
        actor = self.starting.pop(ref)
        try:
            ray.get(ref)
        except Exception as exc:
            self.start_failures += 1
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)
            if self.start_failures >= self.max_start_failures:
                raise RuntimeError(f"resident expert workers keep failing to start: {exc}") from exc
            log.warning("a resident expert worker failed to start (%s); starting another", exc)
            return True
        self.start_failures = 0
        self.capacity[actor] = ray.get(actor.capacity.remote())
        self.ready.append(actor)
        return True

    def __call__(self, row: dict, images: list):
        actor = max(self._free(), key=self._load)
        ref = actor.run.remote(row, images)
        self.busy[ref] = actor
        return ref

    def release(self, ref, lost: bool) -> None:
        import ray

        actor = self.busy.pop(ref)
        if lost and actor in self.ready:  # dead: grow() starts another when the cluster has room
            self.ready.remove(actor)
            self.capacity.pop(actor, None)
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)


def lost_work_errors() -> tuple[type[BaseException], ...]:
    """Ray errors that mean the work was lost with a worker or node, not that the expert failed."""
    import ray.exceptions as rex

    names = ("WorkerCrashedError", "NodeDiedError", "LocalRayletDiedError", "ObjectLostError", "OwnerDiedError", "ActorDiedError", "ActorUnavailableError")
    return tuple(getattr(rex, n) for n in names if hasattr(rex, n))


def steady_rate(finish_times: list[float], slots: int) -> float | None:
    """Experts per hour once every slot has finished its first expert: with ``k = slots`` and
    ``t`` the sorted finish times (seconds), ``(n - k) / (t[n-1] - t[k-1]) * 3600``. Ray
    start-up, imports, model loading and the first expert of each slot (a resident worker's
    first batch) are left out, which a long job amortises. ``None`` when every expert was in that
    first wave (``n <= slots``: the experts of one batch finish together, so their spread is no
    rate)."""
    t = sorted(finish_times)
    n = len(t)
    k = max(1, slots)
    if n <= k:
        return None
    span = t[-1] - t[k - 1]
    return round((n - k) / span * 3600, 1) if span > 0 else None


class Scheduler:
    """Runs the clusters of one job on Ray (:meth:`run`), recording each as it finishes.

    Args:
        config: the resolved job config.
        todo: the clusters to run (rows of ``clusters.jsonl``).
        packer: the job's shard packer (accepted samples are packed as they arrive).
        done: finished clusters by id; each recorded cluster is added.
        progress: show a progress bar.
    """

    def __init__(self, config: GenerateConfig, todo: list[dict], packer: ShardPacker, done: dict[str, dict], progress: bool):
        self.config, self.todo, self.packer, self.done = config, todo, packer, done
        self.pending = collections.deque(todo)
        self.demos: dict[str, list | str] = {}
        self.inputs: dict[str, dict] = {}  # what each cluster was made from (its manifest row records it)
        self.attempts: collections.Counter = collections.Counter()
        self.in_flight: dict = {}
        self.unfinished: list[str] = []
        self.finish_times: list[float] = []
        self.slots = 0  # the most experts in flight at once
        self.finished = self.accepted = 0
        self.started = time.perf_counter()
        self.bar = tqdm(total=len(todo), desc="experts", unit="cluster", disable=not progress)
        self.metrics = None  # generation.metrics.JobMetrics once Ray is up

    def run(self) -> tuple[list[str], list[float], int]:
        """Run every cluster; returns the ids left unfinished (their workers kept dying), the
        finish time of each recorded cluster (``time.perf_counter()``) and the most experts that
        were in flight at once."""
        import ray

        init_ray(self.config.ray_address)
        self.gpus = gpus_per_expert(self.config, ray.cluster_resources().get("GPU", 0))
        self.submit = self._submitter(self.config.expert_job("cuda" if self.gpus > 0 else "cpu"))
        from generation.metrics import JobMetrics

        total = len(set(self.done) | {row["cluster_id"] for row in self.todo})
        self.metrics = JobMetrics.create(self.config.metrics_job, total, self.done, len(self.todo))
        try:
            while self.pending or self.in_flight:
                limit = experts_in_flight(self.config, self.gpus, ray.cluster_resources())
                self._submit(limit)
                waitables = list(self.in_flight) + self.submit.starting_refs()
                if not waitables:
                    continue
                ready, _ = ray.wait(waitables, num_returns=1, timeout=10.0)
                for ref in ready:
                    if not self.submit.started(ref):  # else a resident worker is ready (or failed to start)
                        self._finish(ref)
                self._metrics("refresh", len(self.in_flight))
        finally:
            self.bar.close()  # an error is printed on a line of its own
        return self.unfinished, self.finish_times, self.slots

    def _metrics(self, method: str, *args) -> None:
        """Call a :class:`generation.metrics.JobMetrics` method; a failure turns the metrics off
        (logged), never the job."""
        if self.metrics is None:
            return
        try:
            getattr(self.metrics, method)(*args)
        except Exception as exc:  # noqa: BLE001 - metrics are an extra
            log.warning("Ray metrics turned off for this job (%s: %s)", type(exc).__name__, exc)
            self.metrics = None

    def _submitter(self, job: ExpertJob):
        import ray

        if self.config.resident_workers:
            return ActorPool(self.config, self.gpus, job)
        from generation.task import run_cluster

        task = ray.remote(run_cluster).options(
            num_cpus=self.config.cpus_per_expert, num_gpus=self.gpus, max_retries=self.config.max_retries, retry_exceptions=transient_errors(),
            runtime_env={"env_vars": worker_env()},
        )
        return TaskSubmitter(task, job)

    def _submit(self, limit: int) -> None:
        """Submit pending clusters up to ``limit`` experts in flight; a cluster whose images
        cannot be loaded is recorded as failed at once."""
        if self.pending:
            self.submit.grow(limit)
        while self.pending and len(self.in_flight) < limit and self.submit.available():
            row = self.pending.popleft()
            cid = row["cluster_id"]
            if cid not in self.demos:  # read the crawl for the next few clusters at once
                chunk = [row] + [r for r in list(self.pending)[: max(limit, 16)] if r["cluster_id"] not in self.demos]
                self.demos.update(load_demos(self.config, chunk))
            images = self.demos.pop(cid)
            self.inputs[cid] = {"inputs": cluster_fingerprint(row), **({} if isinstance(images, str) else {"images": images_fingerprint(images)})}
            if isinstance(images, str):
                self._record(row, {"cluster_id": cid, "status": "failed", "error": images, "attempts": 0})
                continue
            self.in_flight[self.submit(row, images)] = (row, images)
            self.slots = max(self.slots, len(self.in_flight))

    def _retry(self, row: dict, images: list) -> bool:
        """Put a cluster back at the front of the queue if it has retries left."""
        if self.attempts[row["cluster_id"]] > self.config.max_retries:
            return False
        self.demos[row["cluster_id"]] = images
        self.pending.appendleft(row)  # resubmitted within the current (maybe smaller) limit
        return True

    def _finish(self, ref) -> None:
        """Handle one finished expert: check its samples, then stage, record and pack them;
        retry lost work; record a failure once its retries are spent. A write to the output
        that fails (a full disk, a read-only folder) stops the job: it is the storage's fault,
        not the cluster's, so nothing is recorded and a rerun continues."""
        row, images = self.in_flight.pop(ref)
        cid = row["cluster_id"]
        self.attempts[cid] += 1
        result = self._result(ref, row, images)
        if result is None:  # to be run again, now or by a rerun
            return
        summary, samples = result
        try:
            if samples:
                stage(self.config.output, summary, samples)
            self._record(row, summary)
            if summary["status"] == "accepted":
                pack(self.packer, samples)
        except SamplesMissingError as exc:
            if self._retry(row, images):
                log.warning("%s; running it again (attempt %d)", exc, self.attempts[cid] + 1)
                return
            self._record(row, failure_summary(cid, exc, self.attempts[cid]))
        except OSError as exc:
            raise OutputStorageError(f"{self.config.output}: the job's output cannot be written ({describe_os_error(exc)}); cluster {cid} was not recorded "
                                     "and no cluster is marked failed for it: fix the storage, then run the same command again") from exc

    def _result(self, ref, row: dict, images: list) -> tuple[dict, dict] | None:
        """The expert's summary and checked samples; a failure summary once its retries are
        spent; ``None`` when the cluster runs again (now, or left for a rerun)."""
        import ray

        cid = row["cluster_id"]
        lost = False
        try:
            try:
                summary = ray.get(ref)
            except lost_work_errors():
                lost = True
                raise
            finally:
                self.submit.release(ref, lost)
            samples = check_samples(summary)
            summary.pop("members", None)
            return summary, samples
        except SamplesMissingError as exc:
            if self._retry(row, images):
                log.warning("%s; running it again (attempt %d)", exc, self.attempts[cid] + 1)
                return None
            summary = failure_summary(cid, exc, self.attempts[cid])
        except lost_work_errors() as exc:  # a worker or node died: not the cluster's fault
            if self._retry(row, images):
                log.warning("cluster %s: its worker was lost (%s); running it again", cid, type(exc).__name__)
            else:  # left unrecorded: the same command runs it again
                self.unfinished.append(cid)
                log.warning("cluster %s: its workers kept dying (%s); left for a rerun", cid, exc)
            return None
        except Exception as exc:  # Ray's retries exhausted: record the failure, keep going
            cause = getattr(exc, "cause", None) or exc
            summary = failure_summary(cid, cause, self.config.max_retries + 1)
        log.warning("cluster %s failed: %s", cid, summary["error"])
        return summary, {}

    def _record(self, row: dict, summary: dict) -> None:
        """Write the cluster's manifest row (with the fingerprints of its inputs and its
        ``finished_at``) and report progress."""
        summary.update(self.inputs.get(row["cluster_id"], {}))
        summary.setdefault("finished_at", round(time.time(), 3))  # Unix seconds (the driver's clock): `suti generate --status` rates
        write_manifest_row(self.config.output, summary)
        self.done[row["cluster_id"]] = summary
        self._metrics("record", summary)
        self.finish_times.append(time.perf_counter())
        self.finished += 1
        self.accepted += summary["status"] == "accepted"
        elapsed = time.perf_counter() - self.started
        rate = self.finished / elapsed * 3600
        eta = (len(self.todo) - self.finished) / (self.finished / elapsed)
        self.bar.update(1)
        self.bar.set_postfix(accept=f"{self.accepted / self.finished:.0%}", experts_per_h=f"{rate:.0f}", eta=f"{eta:.0f}s")
        log.info("cluster %s: %s (%d/%d, acceptance %.0f%%, %.0f experts/hour, ETA %.0f s)", row["cluster_id"], summary["status"], self.finished, len(self.todo),
                 100 * self.accepted / self.finished, rate, eta)


def transient_errors() -> list[type[BaseException]]:
    """The errors worth retrying: out of memory (GPU or host) and lost connections."""
    errors: list[type[BaseException]] = [MemoryError, ConnectionError, TimeoutError]
    try:
        import torch

        errors.append(torch.cuda.OutOfMemoryError)
    except (ImportError, AttributeError):
        pass
    return errors
