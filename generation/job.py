"""The expert generation job (SuTI Algorithm 1) on Ray: one expert per cluster -> shards.

:func:`run_generation` is the job: its settings (:mod:`generation.config`), the exactly-once
ledger (:mod:`generation.ledger`), the scheduling on Ray (:mod:`generation.scheduler`) and one
expert's work (:mod:`generation.task`, :mod:`generation.resident`).

Nothing assumes a shared filesystem. Paths are local paths or storage URIs (``s3://``, ``gs://``,
``file://``; :mod:`suti.storage`), made absolute on the driver. The driver reads the crawl and
hands each task its cluster's images; the task (:func:`generation.task.run_cluster`) returns
its kept samples through the Ray object store; only the driver writes under ``OUTPUT``.

Exactly once, whatever crashes:

* each cluster runs as one Ray task, retried by Ray when its worker or node dies
  (``max_retries``) and on the named transient errors only (``retry_exceptions``); or, with
  ``resident_workers``, on a pool of :class:`generation.resident.ResidentExpertWorker` actors
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
  (:class:`suti.shards.ShardPacker`); a shard is written as a whole object and never
  rewritten, and the keys already in shards are read back from them at start;
* a rerun of the same command skips the recorded clusters, re-packs staged samples not yet in
  a shard, runs again an accepted cluster whose samples are neither in shards nor staged, and
  otherwise does nothing. An older job's ``manifest.jsonl`` is still read.
"""

from __future__ import annotations

import json
import logging
import time

from generation.config import MAX_EXPERT_BATCH_SIZE, ExpertJob, GenerateConfig  # noqa: F401 (the job's public names)
from generation.ledger import (SUMMARY_FILE, SamplesMissingError, check_job, check_recorded_inputs, check_samples, cleanup_staging, read_manifest,  # noqa: F401
                               read_summary, repack_staged, write_run)
from generation.scheduler import Scheduler, experts_in_flight, gpus_per_expert, init_ray, load_demos, steady_rate  # noqa: F401
from mining.cluster import read_clusters
from mining.crawl import check_clusters_match_crawl
from suti import storage
from suti.errors import InputError
from suti.shards import ShardPacker, existing_shards

log = logging.getLogger(__name__)


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
    check_clusters_match_crawl(config.clusters, config.crawl, clusters[0])
    check_job(output, config)
    packer = ShardPacker(output, config.samples_per_shard)
    done = read_manifest(output)
    if config.retry_failed:
        done = {cid: row for cid, row in done.items() if row["status"] != "failed"}

    check_recorded_inputs(output, clusters, done)
    repack_staged(output, packer, done)

    todo = [row for row in clusters if row["cluster_id"] not in done]
    total = len(clusters)
    log.info("generation: %d clusters, %d finished earlier, %d to run", total, total - len(todo), len(todo))
    write_run(output, time.time(), total, config.max_clusters, len(todo))  # for `suti generate --status`
    expert_started = time.perf_counter()
    unfinished, finish_times, slots = Scheduler(config, todo, packer, done, progress).run() if todo else ([], [], 0)
    expert_seconds = time.perf_counter() - expert_started
    packer.flush()
    cleanup_staging(output, packer, done)

    summary, deltas = _summary(output, clusters, todo, packer, unfinished, expert_seconds, finish_times, slots)
    storage.write_text(storage.join(output, SUMMARY_FILE), json.dumps(summary, indent=2))
    print(f"generation: {summary['accepted']} accepted, {summary['rejected']} rejected, {summary['failed']} failed of {summary['clusters']} clusters; {summary['samples']} samples in {summary['shards']} shards")
    if unfinished:
        print(f"{len(unfinished)} cluster(s) unfinished: their workers kept dying; run the same command again")
    rule = "--no-filter: every candidate kept" if config.no_filter else f"lambda = {config.lambda_}"
    print(f"delta-CLIP of all candidates ({rule}):\n{_histogram(deltas)}")
    return summary


def _summary(output: str, clusters: list[dict], todo: list[dict], packer: ShardPacker, unfinished: list[str], expert_seconds: float,
             finish_times: list[float], slots: int) -> tuple[dict, list[float]]:
    """The job's ``summary.json``, and the delta-CLIP of every candidate the output holds."""
    # The summary describes the whole output, as the manifest and the shards do (a rerun with a
    # smaller --max-clusters must not shrink the counts); ran_now/unfinished and the timings
    # describe the last run that trained experts (a rerun with nothing to do keeps them).
    recorded = read_manifest(output)
    statuses = [row["status"] for row in recorded.values()]
    deltas = [d for row in recorded.values() for d in row.get("delta_clip", [])]
    previous = read_summary(output)
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
    return summary, deltas


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
