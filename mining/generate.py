"""The expert generation job (SuTI Algorithm 1) on Ray: one expert per cluster -> shards.

Exactly once, whatever crashes:

* each cluster runs as one Ray task (:func:`mining.expert_task.run_cluster`), retried by Ray
  when its worker dies (``max_retries``) and on the named transient errors only
  (``retry_exceptions``); the task is idempotent and stages its result under
  ``OUTPUT/staging/<cluster_id>.{tar,json}`` atomically;
* the driver appends each finished cluster (accepted, rejected or failed) to
  ``OUTPUT/manifest.jsonl`` and packs staged samples into ``shard-NNNNNN.tar`` with a fixed number
  of samples per shard (:class:`mining.shards.ShardPacker`); shards are written atomically and
  the keys already in shards are read back from them at start;
* a rerun of the same command skips the clusters in the manifest, adopts clusters a killed
  driver left staged, re-packs staged samples not yet in a shard, and otherwise does nothing.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from mining.shards import ShardPacker, group_samples, read_tar
from suti.errors import InputError

log = logging.getLogger(__name__)

MANIFEST = "manifest.jsonl"
JOB_FILE = "job.json"


@dataclass
class GenerateConfig:
    """Settings of one generation job (recorded in ``OUTPUT/job.json``)."""

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
    scorer: str = "toy-clip"
    samples_per_shard: int = 64
    max_clusters: int | None = None
    keep_experts: bool = False
    no_filter: bool = False
    seed: int = 0
    ray_address: str | None = None
    gpus_per_expert: float = 0.0
    cpus_per_expert: float = 1.0
    max_workers: int | None = None
    max_retries: int = 2
    retry_failed: bool = False
    threads_per_expert: int = 1
    dtype: str | None = None  # sampling dtype: fp32, fp16, bf16 (None: fp16 on CUDA, fp32 on CPU)

    def __post_init__(self) -> None:
        """Refuse bad sampler settings at once, as every sampler does (InputError naming the flag)."""
        from suti.sampling import check_sampler_args, resolve_dtype

        flags = {"steps": "--sample-steps", "num_images": "--samples-per-prompt", "guidance_scale": "--guidance-scale", "seed": "--seed"}
        check_sampler_args(steps=self.sample_steps, num_images=self.samples_per_prompt, guidance_scale=self.guidance_scale, seed=self.seed, flags=flags)
        resolve_dtype(self.dtype)

    def job_dict(self) -> dict:
        """The settings a task needs (``lambda`` spelled as in the paper)."""
        d = dataclasses.asdict(self)
        d["lambda"] = d.pop("lambda_")
        return d


def read_clusters(path: str | Path, limit: int | None = None) -> list[dict]:
    """Rows of ``clusters.jsonl`` (a malformed line is an error naming its line number)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such clusters file")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{n}: malformed JSON ({exc.msg})") from None
        missing = [k for k in ("cluster_id", "keys", "prompts") if k not in row]
        if missing:
            raise InputError(f"{path}:{n}: missing field(s) {', '.join(missing)}")
        rows.append(row)
    ids = [r["cluster_id"] for r in rows]
    if len(set(ids)) != len(ids):
        raise InputError(f"{path}: duplicate cluster_id values")
    return rows[:limit] if limit else rows


def read_manifest(output: Path) -> dict[str, dict]:
    """Finished clusters by id; a torn last line (killed driver) is ignored."""
    path = output / MANIFEST
    done: dict[str, dict] = {}
    if not path.is_file():
        return done
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s: ignoring a torn line (interrupted write)", path)
            continue
        done[row["cluster_id"]] = row
    return done


def _append_manifest(output: Path, row: dict) -> None:
    with open(output / MANIFEST, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _pack_staged(packer: ShardPacker, staging: Path, cluster_id: str) -> list[Path]:
    """Feed a cluster's staged samples to the packer; remove the staging tar once all are packed."""
    tar = staging / f"{cluster_id}.tar"
    if not tar.is_file():
        return []
    written = []
    samples = group_samples(read_tar(tar))
    for key in sorted(samples):
        members = [(f"{key}.{f}", data) for f, data in sorted(samples[key].items(), key=lambda x: _field_order(x[0]))]
        written += packer.add(key, members)
    return written


def _field_order(field_name: str) -> tuple:
    if field_name == "target.jpg":
        return (0, 0)
    if field_name.startswith("demo_"):
        return (1, int(field_name.split(".")[0].split("_")[1]))
    return (2, 0)


def _cleanup_packed(packer: ShardPacker, staging: Path, done: dict[str, dict]) -> None:
    for cid, row in done.items():
        tar = staging / f"{cid}.tar"
        if tar.is_file() and all(k in packer.written for k in row.get("kept", [])):
            tar.unlink()


def _check_job(output: Path, config: GenerateConfig) -> None:
    """A rerun must use the same settings as the job it continues."""
    path = output / JOB_FILE
    current = {k: v for k, v in config.job_dict().items() if k in _IDENTITY_KEYS}
    if path.is_file():
        saved = json.loads(path.read_text())
        diff = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
        if diff:
            raise InputError(f"{output}: an earlier job with other settings wrote here ({', '.join(f'{k}: {a!r} -> {b!r}' for k, (a, b) in diff.items())}); use another --output")
    else:
        output.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(current, indent=2))
        os.replace(tmp, path)


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
    """Run (or continue) a generation job; returns the final summary.

    Raises:
        InputError: malformed clusters file, or an output folder of another job.
    """
    import ray

    from mining.expert_task import failure_summary, run_cluster

    output = Path(config.output)
    clusters = read_clusters(config.clusters, config.max_clusters)
    _check_job(output, config)
    staging = output / "staging"
    staging.mkdir(parents=True, exist_ok=True)
    packer = ShardPacker(output, config.samples_per_shard)
    done = read_manifest(output)
    if config.retry_failed:
        done = {cid: row for cid, row in done.items() if row["status"] != "failed"}

    # Adopt clusters a killed driver left staged but unrecorded, then re-pack staged samples.
    for row in clusters:
        cid = row["cluster_id"]
        summary_path = staging / f"{cid}.json"
        if cid not in done and summary_path.is_file():
            summary = json.loads(summary_path.read_text())
            _append_manifest(output, summary)
            done[cid] = summary
    for cid in sorted(done):
        _pack_staged(packer, staging, cid)

    todo = [row for row in clusters if row["cluster_id"] not in done]
    total = len(clusters)
    log.info("generation: %d clusters, %d finished earlier, %d to run", total, total - len(todo), len(todo))
    if todo:
        _run_tasks(config, todo, staging, output, packer, done, progress, run_cluster, failure_summary)
    packer.flush()
    _cleanup_packed(packer, staging, done)

    statuses = [done[r["cluster_id"]]["status"] for r in clusters if r["cluster_id"] in done]
    deltas = [d for r in clusters if r["cluster_id"] in done for d in done[r["cluster_id"]].get("delta_clip", [])]
    summary = {
        "clusters": total,
        "accepted": statuses.count("accepted"),
        "rejected": statuses.count("rejected"),
        "failed": statuses.count("failed"),
        "samples": len(packer.written),
        "shards": len(list(output.glob("shard-*.tar"))),
        "ran_now": len(todo),
    }
    (output / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"generation: {summary['accepted']} accepted, {summary['rejected']} rejected, {summary['failed']} failed of {total} clusters; {summary['samples']} samples in {summary['shards']} shards")
    print(f"delta-CLIP of all candidates (lambda = {config.lambda_}):\n{_histogram(deltas)}")
    return summary


def _run_tasks(config, todo, staging, output, packer, done, progress, run_cluster, failure_summary) -> None:
    import ray

    from suti.models import default_device

    from suti.raytools import init_ray

    if config.ray_address:
        init_ray(config.ray_address)
    else:
        init_ray(None, num_cpus=os.cpu_count(), num_gpus=None)
    gpus = config.gpus_per_expert if config.gpus_per_expert else (1 if default_device() == "cuda" and not config.ray_address else 0)
    transient = _transient_errors()
    task = ray.remote(run_cluster).options(
        num_cpus=config.cpus_per_expert, num_gpus=gpus, max_retries=config.max_retries, retry_exceptions=transient,
    )
    job = config.job_dict()
    max_in_flight = config.max_workers or max(1, int(ray.available_resources().get("CPU", 1) // max(config.cpus_per_expert, 1e-3)))
    pending = list(todo)
    in_flight: dict = {}
    started = time.perf_counter()
    finished = accepted = 0
    bar = tqdm(total=len(todo), desc="experts", unit="cluster", disable=not progress)
    while pending or in_flight:
        while pending and len(in_flight) < max_in_flight:
            row = pending.pop(0)
            in_flight[task.remote(row, config.crawl, job, str(staging))] = row
        ready, _ = ray.wait(list(in_flight), num_returns=1)
        for ref in ready:
            row = in_flight.pop(ref)
            try:
                summary = ray.get(ref)
            except Exception as exc:  # retries exhausted: record the failure, keep going
                cause = getattr(exc, "cause", None) or exc
                summary = failure_summary(row["cluster_id"], cause, config.max_retries + 1)
                log.warning("cluster %s failed: %s", row["cluster_id"], summary["error"])
            _append_manifest(output, summary)
            done[row["cluster_id"]] = summary
            _pack_staged(packer, staging, row["cluster_id"])
            finished += 1
            accepted += summary["status"] == "accepted"
            elapsed = time.perf_counter() - started
            rate = finished / elapsed * 3600
            eta = (len(todo) - finished) / (finished / elapsed) if finished else float("nan")
            bar.update(1)
            bar.set_postfix(accept=f"{accepted / finished:.0%}", experts_per_h=f"{rate:.0f}", eta=f"{eta:.0f}s")
            log.info("cluster %s: %s (%d/%d, acceptance %.0f%%, %.0f experts/hour, ETA %.0f s)", row["cluster_id"], summary["status"], finished, len(todo), 100 * accepted / finished, rate, eta)
    bar.close()


def _transient_errors() -> list[type[BaseException]]:
    """The errors worth retrying: out of memory (GPU or host) and lost connections."""
    errors: list[type[BaseException]] = [MemoryError, ConnectionError, TimeoutError]
    try:
        import torch

        errors.append(torch.cuda.OutOfMemoryError)
    except (ImportError, AttributeError):
        pass
    return errors
