"""The generation driver's Ray metrics: the counters of ``suti generate --status``, live.

:class:`JobMetrics` exports them through :mod:`ray.util.metrics`, so they reach the Ray
dashboard's metrics view and Prometheus (which scrapes each node's metrics agent, ``ray start
--metrics-export-port``) with no code of ours on the monitoring side. Prometheus shows them with
Ray's ``ray_`` prefix (``ray_suti_generate_clusters_finished_total``). Every metric carries the
tag ``job``: ``--job-name``, else the output's last path component
(:attr:`generation.config.GenerateConfig.metrics_job`).

Counters count this driver's events (they start at 0 with each run, as Prometheus counters do
with each process: use ``rate()``/``increase()``); gauges describe the job as a whole:

========================================= ======= =========================================
name                                       kind    meaning (tags besides ``job``)
========================================= ======= =========================================
``suti_generate_clusters_finished_total``  counter clusters recorded (``status``: accepted,
                                                   rejected, failed)
``suti_generate_clusters_failed_total``    counter failed clusters (``reason``: the error kind,
                                                   as ``--status`` groups them)
``suti_generate_samples_kept_total``       counter samples kept in accepted clusters
``suti_generate_candidates_scored_total``  counter candidate images scored by delta-CLIP
``suti_generate_clusters_total``           gauge   clusters the job aims at
``suti_generate_clusters_to_go``           gauge   clusters this run has still to finish
``suti_generate_experts_in_flight``        gauge   experts submitted and not finished
``suti_generate_experts_per_hour``         gauge   experts/hour over the last hour of work
                                                   (:class:`generation.status.Throughput`)
``suti_generate_acceptance_rate``          gauge   accepted / finished clusters of the whole
                                                   output, in [0, 1]
========================================= ======= =========================================

Ray exports a process's metrics every few seconds (``metrics_report_interval_ms``, 10 s by
default), so a value set just before the driver exits may never reach Prometheus: read a
finished job's final counts with ``suti generate --status``.
"""

from __future__ import annotations

import logging
import time
from collections import Counter as Tally

from generation.status import Throughput, failure_kind

log = logging.getLogger(__name__)

#: The prefix of every metric name.
PREFIX = "suti_generate_"


class JobMetrics:
    """The driver's Ray metrics of one job (call after ``ray.init``).

    Args:
        job: the ``job`` tag.
        total: clusters the job aims at (finished earlier or not).
        done: clusters recorded before this run, by id (their manifest rows).
        to_go: clusters this run has to finish.
    """

    def __init__(self, job: str, total: int, done: dict[str, dict], to_go: int):
        from ray.util.metrics import Counter, Gauge

        self.job = job
        self.finished = Counter(PREFIX + "clusters_finished_total", description="Clusters recorded by the generation driver, by status.", tag_keys=("job", "status"))
        self.failed = Counter(PREFIX + "clusters_failed_total", description="Failed clusters, by reason (the error kind).", tag_keys=("job", "reason"))
        self.samples = Counter(PREFIX + "samples_kept_total", description="Samples kept in accepted clusters.", tag_keys=("job",))
        self.candidates = Counter(PREFIX + "candidates_scored_total", description="Candidate images scored by delta-CLIP.", tag_keys=("job",))
        self.total = Gauge(PREFIX + "clusters_total", description="Clusters the generation job aims at.", tag_keys=("job",))
        self.to_go = Gauge(PREFIX + "clusters_to_go", description="Clusters this run has still to finish.", tag_keys=("job",))
        self.in_flight = Gauge(PREFIX + "experts_in_flight", description="Experts submitted and not finished.", tag_keys=("job",))
        self.rate = Gauge(PREFIX + "experts_per_hour", description="Experts per hour over the last hour of work.", tag_keys=("job",))
        self.acceptance = Gauge(PREFIX + "acceptance_rate", description="Accepted / finished clusters of the whole output, in [0, 1].", tag_keys=("job",))
        for metric in (self.finished, self.failed, self.samples, self.candidates, self.total, self.to_go, self.in_flight, self.rate, self.acceptance):
            metric.set_default_tags({"job": job})
        self.recorded = {cid: str(row.get("status")) for cid, row in done.items()}
        self.statuses = Tally(self.recorded.values())
        self.throughput = Throughput()
        self.throughput.first_started = time.time()  # the run's start: its start-up counts as its work (as --status counts it)
        self.total.set(total)
        self.to_go_count = to_go
        self.refresh(0)

    @classmethod
    def create(cls, job: str, total: int, done: dict[str, dict], to_go: int) -> "JobMetrics | None":
        """:class:`JobMetrics`, or ``None`` (logged) when this Ray cannot export metrics."""
        try:
            return cls(job, total, done, to_go)
        except Exception as exc:  # noqa: BLE001 - metrics are an extra: the job runs without them
            log.warning("Ray metrics are off for this job (%s: %s)", type(exc).__name__, exc)
            return None

    def record(self, row: dict) -> None:
        """Count one recorded cluster (its manifest row)."""
        status = str(row.get("status"))
        self.finished.inc(1, tags={"status": status})
        if status == "failed":
            self.failed.inc(1, tags={"reason": failure_kind(row.get("error"))})
        if status == "accepted" and row.get("kept"):
            self.samples.inc(len(row["kept"]))
        if row.get("num_candidates"):
            self.candidates.inc(int(row["num_candidates"]))
        finished = row.get("finished_at")
        if isinstance(finished, (int, float)):
            seconds = row.get("seconds")
            self.throughput.add(finished - (seconds if isinstance(seconds, (int, float)) else 0.0), finished)
        previous = self.recorded.get(str(row.get("cluster_id")))
        if previous is not None:  # a failed cluster run again (--retry-failed)
            self.statuses[previous] -= 1
        self.recorded[str(row.get("cluster_id"))] = status
        self.statuses[status] += 1
        self.to_go_count = max(0, self.to_go_count - 1)

    def refresh(self, in_flight: int, now: float | None = None) -> None:
        """Set the gauges: ``in_flight`` experts, the rate at ``now`` (Unix seconds)."""
        now = time.time() if now is None else now
        self.to_go.set(self.to_go_count)
        self.in_flight.set(in_flight)
        rate = self.throughput.rate(now)
        if rate is not None:
            self.rate.set(rate)
        if self.recorded:
            self.acceptance.set(self.statuses["accepted"] / len(self.recorded))
