"""The expert generation job (SuTI Algorithm 1) on Ray: one expert per cluster -> shards.

Nothing assumes a shared filesystem. Paths are local paths or storage URIs (``s3://``, ``gs://``,
``file://``; :mod:`suti.storage`), made absolute on the driver. The driver reads the crawl and
hands each task its cluster's images; the task (:func:`mining.expert_task.run_cluster`) returns
its kept samples through the Ray object store; only the driver writes under ``OUTPUT``.

Exactly once, whatever crashes:

* each cluster runs as one Ray task, retried by Ray when its worker or node dies
  (``max_retries``) and on the named transient errors only (``retry_exceptions``); or, with
  ``resident_workers``, on a pool of :class:`mining.expert_task.ResidentExpertWorker` actors
  (one per GPU or CPU slot) that keep the base model and scorer loaded; a dead actor is replaced
  and its cluster run again. Work lost with a worker or node is never recorded as failed: it is
  retried, or left for the next run;
* the driver checks an accepted cluster's samples (every kept key has its members), stages them
  as one object ``OUTPUT/staging/<cluster_id>.tar``, reads the staged keys back, and only then
  records the cluster in ``OUTPUT/manifest/<cluster_id>.json`` (one object per finished cluster:
  object stores have no append). An accepted cluster whose samples are missing is run again
  (up to ``max_retries`` times), then recorded as ``failed`` with the reason - never as done
  with 0 samples;
* samples are packed into ``shard-NNNNNN.tar`` with a fixed number per shard
  (:class:`mining.shards.ShardPacker`); a shard is written as a whole object and never
  rewritten, and the keys already in shards are read back from them at start;
* a rerun of the same command skips the recorded clusters, re-packs staged samples not yet in
  a shard, runs again an accepted cluster whose samples are neither in shards nor staged, and
  otherwise does nothing. An older job's ``manifest.jsonl`` is still read.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field

from tqdm import tqdm

from mining.shards import ShardPacker, existing_shards, group_samples, read_tar, shard_keys, write_tar_atomic
from suti import storage
from suti.errors import InputError, MissingInputError

log = logging.getLogger(__name__)

#: One JSON object per finished cluster: ``OUTPUT/manifest/<cluster_id>.json``.
MANIFEST_DIR = "manifest"
#: The manifest of earlier versions (one line per cluster, local appends); still read.
LEGACY_MANIFEST = "manifest.jsonl"
STAGING_DIR = "staging"
JOB_FILE = "job.json"
SUMMARY_FILE = "summary.json"
#: Environment variables passed to every Ray worker (``runtime_env``), by prefix.
WORKER_ENV_PREFIXES = ("SUTI_", "HF_", "HUGGINGFACE_", "TRANSFORMERS_", "AWS_", "GOOGLE_", "TOKENIZERS_", "OMP_NUM_THREADS")
_CLUSTER_ID = re.compile(r"^[A-Za-z0-9_-]+$")


MAX_EXPERT_BATCH_SIZE = 256  # LoRA experts a resident worker trains in one U-Net pass (also its actor's thread count)


class SamplesMissingError(RuntimeError):
    """An accepted cluster's samples did not reach the driver or could not be read back."""


@dataclass
class GenerateConfig:
    """Settings of one generation job (the identity part is recorded in ``OUTPUT/job.json``).

    ``clusters``, ``crawl`` and ``output`` are local paths or storage URIs. ``scorer`` ``None``
    follows the model (:func:`suti.scoring.model_scorer`). ``gpus_per_expert`` ``None``: 1 on a
    cluster with GPUs, else 0 (fractions pack several experts on one GPU).
    """

    clusters: str
    crawl: str
    output: str
    model: str = "toy"
    recipe: str = "suti-expert"
    steps: int | None = None
    recipe_overrides: dict = field(default_factory=dict)
    lambda_: float = 0.02
    samples_per_prompt: int = 1
    prompts_per_cluster: int | None = 4
    sample_steps: int = 25
    guidance_scale: float = 7.5
    sample_batch_size: int = 4  # candidates per pipeline call (not part of the job's identity: images do not depend on it)
    scorer: str | None = None
    samples_per_shard: int = 64
    max_clusters: int | None = None
    keep_experts: bool = False
    no_filter: bool = False
    seed: int = 0
    ray_address: str | None = None
    gpus_per_expert: float | None = None
    cpus_per_expert: float = 1.0
    max_workers: int | None = None
    max_retries: int = 2
    retry_failed: bool = False
    threads_per_expert: int = 1
    resident_workers: bool = False
    expert_batch_size: int = 1  # LoRA experts a resident worker trains together (not part of the job's identity: samples equal up to float rounding)
    dtype: str | None = None  # sampling dtype: fp32, fp16, bf16 (None: fp16 on CUDA, fp32 on CPU)
    recipe_data: dict | None = None  # the recipe as loaded on the driver (resolved()): workers never read the driver's disk for it

    def __post_init__(self) -> None:
        """Refuse bad settings at once, before anything is written (InputError naming the flag):
        the sampler's, as every sampler does, and the job's counts, sizes and thresholds."""
        import math

        from suti.errors import InvalidValueError
        from suti.sampling import check_sampler_args, resolve_dtype

        for flag, value in (("--clusters", self.clusters), ("--crawl", self.crawl), ("--output", self.output)):
            if not str(value).strip():
                raise InvalidValueError(f"{flag} must name a file, folder or URI, got an empty string")
        positive = {"--samples-per-shard": self.samples_per_shard, "--max-clusters": self.max_clusters, "--max-workers": self.max_workers,
                    "--prompts-per-cluster": self.prompts_per_cluster, "--threads-per-expert": self.threads_per_expert, "--expert-batch-size": self.expert_batch_size}
        for flag, value in positive.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise InvalidValueError(f"{flag} must be a whole number >= 1, got {value!r}")
        if self.expert_batch_size > MAX_EXPERT_BATCH_SIZE:
            raise InvalidValueError(f"--expert-batch-size must be at most {MAX_EXPERT_BATCH_SIZE} (experts in one U-Net pass), got {self.expert_batch_size}")
        if self.expert_batch_size > 1 and not self.resident_workers:
            raise InvalidValueError(f"--expert-batch-size {self.expert_batch_size} needs --resident-workers (a plain task trains one expert)")
        if self.max_workers is not None and 1 <= self.max_workers < self.expert_batch_size:
            raise InvalidValueError(f"--max-workers {self.max_workers} (experts in flight) is below --expert-batch-size {self.expert_batch_size}: no batch could fill; "
                                    f"use --max-workers {self.expert_batch_size} or more")
        if not isinstance(self.max_retries, int) or self.max_retries < 0:
            raise InvalidValueError(f"--max-retries must be a whole number >= 0, got {self.max_retries!r}")
        for flag, value in (("--lambda", self.lambda_), ("--gpus-per-expert", self.gpus_per_expert), ("--cpus-per-expert", self.cpus_per_expert)):
            if value is not None and not math.isfinite(float(value)):
                raise InvalidValueError(f"{flag} must be a finite number, got {value} (--no-filter keeps every sample)")

        flags = {"steps": "--sample-steps", "num_images": "--samples-per-prompt", "guidance_scale": "--guidance-scale", "seed": "--seed", "sample_batch_size": "--sample-batch-size"}
        check_sampler_args(steps=self.sample_steps, num_images=self.samples_per_prompt, guidance_scale=self.guidance_scale, seed=self.seed, sample_batch_size=self.sample_batch_size, flags=flags)
        resolve_dtype(self.dtype)

    def job_dict(self) -> dict:
        """The settings a task needs (``lambda`` spelled as in the paper)."""
        d = dataclasses.asdict(self)
        d["lambda"] = d.pop("lambda_")
        return d

    def resolved(self) -> "GenerateConfig":
        """A copy with absolute paths/URIs and the scorer chosen and checked.

        Raises:
            InputError: a model that cannot be loaded (:func:`suti.models.check_model`), expert
                settings the recipe refuses (``--steps 0``), a toy scorer with a real model, an
                unknown scorer, a negative GPU count, a missing crawl, or a URI whose
                filesystem package is missing.
        """
        from suti.scoring import check_scorer_for_model, model_scorer

        if self.gpus_per_expert is not None and self.gpus_per_expert < 0:
            raise InputError(f"--gpus-per-expert must be >= 0, got {self.gpus_per_expert}")
        if self.cpus_per_expert <= 0:
            raise InputError(f"--cpus-per-expert must be > 0, got {self.cpus_per_expert}")
        from experts import resolve_config
        from experts.recipe import load_recipe
        from suti.models import check_model, hub_offline, portable_model

        check_model(self.model)  # on the driver: not a job whose every expert fails to load it
        # the experts' settings (--steps, --lora-rank, the recipe), checked as each task will
        recipe_data = load_recipe(self.recipe)  # a name, a local YAML or a URI, read once here and shipped in the job
        expert = resolve_config(recipe_data, {"model": self.model, "instance_dir": ".", "class_noun": "object", "steps": self.steps, **self.recipe_overrides})
        if self.expert_batch_size > 1:
            from experts.batched import check_batchable

            check_batchable([expert])  # LoRA, no text encoder training, no accumulation: before job.json
        scorer = check_scorer_for_model(self.scorer or model_scorer(self.model), self.model)
        out = dataclasses.replace(self, clusters=storage.resolve(self.clusters), crawl=storage.resolve(self.crawl), output=storage.resolve(self.output), scorer=scorer,
                                  model=portable_model(self.model), recipe=storage.absolute_if_local(self.recipe), recipe_data=recipe_data)  # workers have other working directories
        for uri in (out.clusters, out.crawl, out.output):
            storage.filesystem(uri)  # a missing s3fs/gcsfs exits 2 here, before anything is written
        storage.require_bucket(out.output)  # a missing bucket: one line, before job.json
        from mining.crawl import check_crawl

        check_crawl(out.crawl)  # a folder, shard file, manifest or pattern, as `suti mine` reads
        if hub_offline() and not scorer.startswith("toy-"):
            from suti.scoring import get_scorer

            get_scorer(scorer)  # offline, weights that are not cached fail here (exit 2), not in every task minutes later
        return out


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


def read_manifest(output: str) -> dict[str, dict]:
    """Finished clusters by id: ``OUTPUT/manifest/*.json``, plus an older job's
    ``manifest.jsonl`` (a torn last line of a killed driver is ignored)."""
    output = storage.resolve(output)
    done: dict[str, dict] = {}
    legacy = storage.join(output, LEGACY_MANIFEST)
    if storage.isfile(legacy):
        for line in storage.read_text(legacy).splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                log.warning("%s: ignoring a torn line (interrupted write)", legacy)
                continue
            done[row["cluster_id"]] = row
    folder = storage.join(output, MANIFEST_DIR)
    names = [n for n in storage.listdir(folder) if n.endswith(".json") and not n.startswith(".")]
    if names:
        fs, _ = storage.filesystem(folder)
        paths = [storage.filesystem(storage.join(folder, n))[1] for n in names]
        for data in fs.cat(paths).values():  # concurrent GETs on object stores
            row = json.loads(data)
            done[row["cluster_id"]] = row
    return done


def write_manifest_row(output: str, row: dict) -> None:
    """Record a finished cluster: one object ``OUTPUT/manifest/<cluster_id>.json``, written
    atomically (an object store has no append)."""
    storage.write_text(storage.join(output, MANIFEST_DIR, f"{row['cluster_id']}.json"), json.dumps(row))


def _staged(output: str, cluster_id: str) -> str:
    return storage.join(output, STAGING_DIR, f"{cluster_id}.tar")


def _field_order(field_name: str) -> tuple:
    if field_name == "target.jpg":
        return (0, 0)
    if field_name.startswith("demo_"):
        return (1, int(field_name.split(".")[0].split("_")[1]))
    return (2, 0)


def _pack(packer: ShardPacker, samples: dict[str, dict[str, bytes]]) -> None:
    for key in sorted(samples):
        packer.add(key, [(f"{key}.{f}", data) for f, data in sorted(samples[key].items(), key=lambda x: _field_order(x[0]))])


def check_samples(summary: dict) -> dict[str, dict[str, bytes]]:
    """The samples of an accepted task result, checked: ``{key: {field: bytes}}``.

    Raises:
        SamplesMissingError: an accepted cluster with no kept key, or a kept key without its
            ``target.jpg`` and ``json`` members (the samples did not come back).
    """
    samples = group_samples(summary.get("members") or [])
    if summary["status"] != "accepted":
        return {}
    kept = summary.get("kept") or []
    if not kept:
        raise SamplesMissingError(f"cluster {summary['cluster_id']}: accepted with no kept sample")
    missing = [k for k in kept if not {"target.jpg", "json"} <= set(samples.get(k, {}))]
    if missing:
        raise SamplesMissingError(f"cluster {summary['cluster_id']}: accepted, but {len(missing)} of its {len(kept)} samples did not reach the driver ({', '.join(missing[:3])})")
    return {k: samples[k] for k in kept}


def _stage(output: str, summary: dict, samples: dict) -> None:
    """Write an accepted cluster's samples as one object and read their keys back."""
    uri = _staged(output, summary["cluster_id"])
    write_tar_atomic(uri, [(f"{k}.{f}", d) for k in sorted(samples) for f, d in sorted(samples[k].items(), key=lambda x: _field_order(x[0]))])
    if shard_keys(uri) != sorted(summary["kept"]):
        raise SamplesMissingError(f"cluster {summary['cluster_id']}: the staged samples at {uri} cannot be read back")


def _cleanup_staging(output: str, packer: ShardPacker, done: dict[str, dict]) -> None:
    staged = {n[: -len(".tar")] for n in storage.listdir(storage.join(output, STAGING_DIR)) if n.endswith(".tar")}
    for cid in sorted(staged & set(done)):
        if all(k in packer.written for k in done[cid].get("kept", [])):
            storage.remove(_staged(output, cid))


def _check_job(output: str, config: GenerateConfig) -> None:
    """A rerun must use the same settings as the job it continues."""
    path = storage.join(output, JOB_FILE)
    current = {k: v for k, v in config.job_dict().items() if k in _IDENTITY_KEYS}
    if storage.isfile(path):
        saved = json.loads(storage.read_text(path))
        diff = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
        if diff:
            raise InputError(f"{output}: an earlier job with other settings wrote here ({', '.join(f'{k}: {a!r} -> {b!r}' for k, (a, b) in diff.items())}); use another --output")
    else:
        storage.write_text(path, json.dumps(current, indent=2))


_IDENTITY_KEYS = ("model", "recipe", "steps", "recipe_overrides", "lambda", "samples_per_prompt", "prompts_per_cluster", "sample_steps", "guidance_scale", "scorer", "samples_per_shard", "seed", "no_filter")


def _histogram(values: list[float], bins: int = 10) -> str:
    if not values:
        return "  (no candidates)"
    lo, hi = min(values), max(values)
    width = (hi - lo) / bins or 1.0
    counts = [0] * bins
    for v in values:
        counts[min(int((v - lo) / width), bins - 1)] += 1
    top = max(counts)
    return "\n".join(f"  [{lo + i * width:+.3f}, {lo + (i + 1) * width:+.3f}) {'#' * max(1 if c else 0, round(30 * c / top))} {c}" for i, c in enumerate(counts))


def run_generation(config: GenerateConfig, progress: bool = True) -> dict:
    """Run (or continue) a generation job; returns the final summary (also ``OUTPUT/summary.json``).

    Raises:
        InputError: malformed clusters file, an output folder of another job, a scorer that does
            not fit the model, or a URI whose filesystem package is missing.
    """
    config = config.resolved()
    output = config.output
    clusters = read_clusters(config.clusters, config.max_clusters)
    if not clusters:
        raise InputError(f"{config.clusters}: no clusters to generate from (did `suti mine` keep none?)")
    _check_job(output, config)
    packer = ShardPacker(output, config.samples_per_shard)
    done = read_manifest(output)
    if config.retry_failed:
        done = {cid: row for cid, row in done.items() if row["status"] != "failed"}

    # Re-pack staged samples a killed driver left unpacked; an accepted cluster whose samples are
    # neither in shards nor staged (lost by an older version) is not done: it runs again.
    for cid in sorted(done):
        row = done[cid]
        if row["status"] != "accepted":
            continue
        missing = [k for k in row.get("kept", []) if k not in packer.written]
        if row.get("kept") and not missing:
            continue
        try:
            samples = group_samples(read_tar(_staged(output, cid)))
        except MissingInputError:
            samples = {}
        if not row.get("kept") or set(missing) - set(samples):
            log.warning("cluster %s: recorded as accepted but its samples are lost; running it again", cid)
            del done[cid]
            continue
        _pack(packer, {k: samples[k] for k in missing})

    todo = [row for row in clusters if row["cluster_id"] not in done]
    total = len(clusters)
    log.info("generation: %d clusters, %d finished earlier, %d to run", total, total - len(todo), len(todo))
    expert_started = time.perf_counter()
    unfinished, finish_times, slots = _run_tasks(config, todo, packer, done, progress) if todo else ([], [], 0)
    expert_seconds = time.perf_counter() - expert_started
    packer.flush()
    _cleanup_staging(output, packer, done)

    # The summary describes the whole output, as the manifest and the shards do (a rerun with a
    # smaller --max-clusters must not shrink the counts); ran_now/unfinished and the timings
    # describe the last run that trained experts (a rerun with nothing to do keeps them).
    recorded = read_manifest(output)
    statuses = [row["status"] for row in recorded.values()]
    deltas = [d for row in recorded.values() for d in row.get("delta_clip", [])]
    previous = _read_summary(output)
    timing = {"expert_seconds": round(expert_seconds, 2), "steady_experts_per_hour": steady_rate(finish_times, slots)}
    if not todo and previous:
        timing = {k: previous.get(k, v) for k, v in timing.items()}
    summary = {
        "clusters": len(set(recorded) | {r["cluster_id"] for r in clusters}),
        "accepted": statuses.count("accepted"),
        "rejected": statuses.count("rejected"),
        "failed": statuses.count("failed"),
        "samples": len(packer.written),
        "shards": len(existing_shards(output)),
        "ran_now": len(todo),
        "unfinished": len(unfinished),
        **timing,
    }
    storage.write_text(storage.join(output, SUMMARY_FILE), json.dumps(summary, indent=2))
    print(f"generation: {summary['accepted']} accepted, {summary['rejected']} rejected, {summary['failed']} failed of {summary['clusters']} clusters; {summary['samples']} samples in {summary['shards']} shards")
    if unfinished:
        print(f"{len(unfinished)} cluster(s) unfinished: their workers kept dying; run the same command again")
    rule = "--no-filter: every candidate kept" if config.no_filter else f"lambda = {config.lambda_}"
    print(f"delta-CLIP of all candidates ({rule}):\n{_histogram(deltas)}")
    return summary


def _read_summary(output: str) -> dict | None:
    """The job's previous ``summary.json`` (``None`` when absent or unreadable)."""
    try:
        return json.loads(storage.read_text(storage.join(output, SUMMARY_FILE)))
    except (MissingInputError, ValueError):
        return None


def worker_env() -> dict[str, str]:
    """The driver's environment the workers need (``runtime_env["env_vars"]``): model caches and
    hub settings (``SUTI_*``, ``HF_*``), object-store credentials (``AWS_*``, ``GOOGLE_*``), and
    ``PYTHONPATH`` with absolute entries."""
    env = {k: v for k, v in os.environ.items() if k.startswith(WORKER_ENV_PREFIXES)}
    if os.environ.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.pathsep.join(os.path.abspath(p) for p in os.environ["PYTHONPATH"].split(os.pathsep) if p)
    return env


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
    if config.resident_workers:  # each worker holds expert_batch_size experts
        experts = max(1, fit) * config.expert_batch_size
        return max(1, min(experts, config.max_workers)) if config.max_workers else experts
    if config.max_workers:
        return max(1, min(fit, config.max_workers)) if fit else 1
    return max(1, fit) + 1


def _load_demos(config: GenerateConfig, rows: list[dict]) -> dict[str, list | str]:
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


class _Tasks:
    """One Ray task per expert (loads the model, saves the expert and loads it back)."""

    def __init__(self, task, job: dict):
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


class _ActorPool:
    """Resident expert workers (:class:`mining.expert_task.ResidentExpertWorker` actors), each
    holding up to ``expert_batch_size`` experts (a threaded actor that trains them together).
    Actors are started up to the current limit and get work only once ready (an actor that
    cannot be placed never holds a cluster); a dead actor is dropped, and a new one is started in
    its place when the cluster has room (the caller runs its clusters again). Work goes to the
    ready actor that holds the most experts, so that batches fill.
    """

    def __init__(self, config: GenerateConfig, gpus: float, job: dict):
        import ray

        from mining.expert_task import ResidentExpertWorker

        self.per_actor = config.expert_batch_size
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
        return [a for a in self.ready if self._load(a) < self.per_actor]

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
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)


def _lost_work_errors() -> tuple[type[BaseException], ...]:
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


def _run_tasks(config: GenerateConfig, todo: list[dict], packer: ShardPacker, done: dict[str, dict], progress: bool) -> tuple[list[str], list[float], int]:
    """Run the clusters of ``todo``; returns the ids left unfinished (their workers kept dying),
    the finish time of each recorded cluster (``time.perf_counter()``) and the most experts that
    were in flight at once."""
    import ray

    from mining.expert_task import failure_summary, run_cluster

    init_ray(config.ray_address)
    gpus = gpus_per_expert(config, ray.cluster_resources().get("GPU", 0))
    job = config.job_dict()
    job["device"] = "cuda" if gpus > 0 else "cpu"
    if config.resident_workers:
        submit = _ActorPool(config, gpus, job)
    else:
        task = ray.remote(run_cluster).options(
            num_cpus=config.cpus_per_expert, num_gpus=gpus, max_retries=config.max_retries, retry_exceptions=_transient_errors(),
            runtime_env={"env_vars": worker_env()},
        )
        submit = _Tasks(task, job)
    output = config.output
    pending = collections.deque(todo)
    demos: dict[str, list | str] = {}
    attempts: collections.Counter = collections.Counter()
    in_flight: dict = {}
    unfinished: list[str] = []
    started = time.perf_counter()
    finished = accepted = 0
    finish_times: list[float] = []
    slots = 0
    bar = tqdm(total=len(todo), desc="experts", unit="cluster", disable=not progress)

    def record(row: dict, summary: dict) -> None:
        nonlocal finished, accepted
        write_manifest_row(output, summary)
        done[row["cluster_id"]] = summary
        finish_times.append(time.perf_counter())
        finished += 1
        accepted += summary["status"] == "accepted"
        elapsed = time.perf_counter() - started
        rate = finished / elapsed * 3600
        eta = (len(todo) - finished) / (finished / elapsed)
        bar.update(1)
        bar.set_postfix(accept=f"{accepted / finished:.0%}", experts_per_h=f"{rate:.0f}", eta=f"{eta:.0f}s")
        log.info("cluster %s: %s (%d/%d, acceptance %.0f%%, %.0f experts/hour, ETA %.0f s)", row["cluster_id"], summary["status"], finished, len(todo), 100 * accepted / finished, rate, eta)

    while pending or in_flight:
        limit = experts_in_flight(config, gpus, ray.cluster_resources())
        if pending:
            submit.grow(limit)
        while pending and len(in_flight) < limit and submit.available():
            row = pending.popleft()
            cid = row["cluster_id"]
            if cid not in demos:  # read the crawl for the next few clusters at once
                chunk = [row] + [r for r in list(pending)[: max(limit, 16)] if r["cluster_id"] not in demos]
                demos.update(_load_demos(config, chunk))
            images = demos.pop(cid)
            if isinstance(images, str):
                record(row, {"cluster_id": cid, "status": "failed", "error": images, "attempts": 0})
                continue
            in_flight[submit(row, images)] = (row, images)
            slots = max(slots, len(in_flight))
        waitables = list(in_flight) + submit.starting_refs()
        if not waitables:
            continue
        ready, _ = ray.wait(waitables, num_returns=1, timeout=10.0)
        for ref in ready:
            if submit.started(ref):  # a resident worker is ready (or failed to start)
                continue
            row, images = in_flight.pop(ref)
            cid = row["cluster_id"]
            attempts[cid] += 1
            lost = False
            try:
                try:
                    summary = ray.get(ref)
                except _lost_work_errors():
                    lost = True
                    raise
                finally:
                    submit.release(ref, lost)
                samples = check_samples(summary)
                summary.pop("members", None)
                if samples:
                    _stage(output, summary, samples)
            except SamplesMissingError as exc:
                if attempts[cid] <= config.max_retries:
                    log.warning("%s; running it again (attempt %d)", exc, attempts[cid] + 1)
                    demos[cid] = images
                    pending.appendleft(row)  # resubmitted within the current limit
                    continue
                summary = failure_summary(cid, exc, attempts[cid])
                log.warning("cluster %s failed: %s", cid, summary["error"])
            except _lost_work_errors() as exc:  # a worker or node died: not the cluster's fault
                if attempts[cid] <= config.max_retries:
                    log.warning("cluster %s: its worker was lost (%s); running it again", cid, type(exc).__name__)
                    demos[cid] = images
                    pending.appendleft(row)  # resubmitted within the current (maybe smaller) limit
                else:  # left unrecorded: the same command runs it again
                    unfinished.append(cid)
                    log.warning("cluster %s: its workers kept dying (%s); left for a rerun", cid, exc)
                continue
            except Exception as exc:  # Ray's retries exhausted: record the failure, keep going
                cause = getattr(exc, "cause", None) or exc
                summary = failure_summary(cid, cause, config.max_retries + 1)
                log.warning("cluster %s failed: %s", cid, summary["error"])
            record(row, summary)
            if summary["status"] == "accepted":
                _pack(packer, samples)
    bar.close()
    return unfinished, finish_times, slots


def _transient_errors() -> list[type[BaseException]]:
    """The errors worth retrying: out of memory (GPU or host) and lost connections."""
    errors: list[type[BaseException]] = [MemoryError, ConnectionError, TimeoutError]
    try:
        import torch

        errors.append(torch.cuda.OutOfMemoryError)
    except (ImportError, AttributeError):
        pass
    return errors
