"""``suti generate --status OUTPUT``: how far a generation job has come, read from its output.

Read-only and without Ray: it reads ``OUTPUT/job.json``, ``run.json``, ``summary.json`` and the
manifest (:mod:`generation.ledger`), lists the shards, and reads the job's clusters file (the
``clusters`` URI that ``job.json`` records) for the total. It works from any machine that can read
the output (a local path or any fsspec URI), while the job runs or after, and writes nothing.

Times: each manifest row of this version holds ``finished_at`` (Unix seconds, the driver's
clock) and, for an expert that ran, ``seconds`` (its duration in the task); a row of an older
version has no ``finished_at``, and the modification time of its object stands in for it (a row
of a legacy ``manifest.jsonl`` has none and is left out of the rates).

The last hour's rate (:class:`Throughput`, which the driver's Ray metrics share) is measured over
the hour of work up to the *last finish*, not up to ``now``: the time since the last expert
finished is not yet evidence of a slower job (the next ones are under way), so the rate neither
falls between finishes nor while the first experts train. It starts at the first start of the
latest run's experts (``run.json``), so the pause between a killed run and its rerun is not
counted as work. A job with nothing finished in the hour before ``now`` (the clock of the
machine that asks: a clock far off the driver's shifts it) is stalled: its rate is 0, its ETA
unknown.
"""

from __future__ import annotations

import bisect
import dataclasses
import datetime
import json
from collections import Counter
from dataclasses import dataclass, field

from generation.ledger import JOB_FILE, MANIFEST_DIR, read_manifest, read_run
from suti import storage
from suti.errors import InputError, MissingInputError

HOUR = 3600.0


@dataclass
class JobStatus:
    """Where a generation job stands (``suti generate --status``; ``--json`` prints these fields).

    Attributes:
        output: the job's output (resolved path or URI).
        clusters_file: the clusters file that ``job.json`` records (``None``: an older job).
        total: clusters the job aims at: those of its clusters file (the first ``max_clusters``
            when the latest run recorded it in ``run.json``) together with any other recorded
            cluster; ``None`` when the clusters file cannot be read (``total_error`` says why).
        total_error: why ``total`` is unknown, else ``None``.
        accepted / rejected / failed: finished clusters by status (manifest rows).
        failed_by_kind: failed clusters by error kind (the exception's type name), with
            ``failed_examples`` the first message of each kind (at most 200 characters).
        to_go: clusters of ``total`` not finished yet (``None`` when ``total`` is).
        samples_kept: samples of the accepted clusters (their ``kept`` keys); ``candidates``:
            candidate images scored by delta-CLIP in all finished clusters.
        shards: complete ``shard-*.tar`` files under the output.
        acceptance_rate: accepted / finished clusters, in [0, 1] (``None`` before any).
        sample_keep_rate: samples kept / candidates, in [0, 1] (``None`` without candidates).
        finished_last_hour: clusters that finished in the hour before ``now``.
        experts_per_hour_last_hour: experts per hour over the last hour of work
            (:class:`Throughput`: the hour up to the last finish, or the time since the latest
            run started (its workers' start-up and model loads included) when that is shorter);
            0 when nothing finished in the hour before ``now`` (stalled); ``None`` before any
            timed row.
        rate_window_seconds: the seconds ``experts_per_hour_last_hour`` is measured over.
        experts_per_hour_overall: timed finished clusters / hours from the job's start (the first
            run's, ``run.json``, or the first expert's start when earlier or unrecorded) to the last
            finish (gaps between runs count); ``None`` when that span is 0.
        eta_seconds: seconds until ``to_go`` is done at the last hour's rate: 0 when nothing is
            to go, ``None`` when unknown (no total, or nothing finished in the last hour).
        first_started_at / last_finished_at: Unix seconds of the first expert's start (its
            ``finished_at`` less its ``seconds``) and of the last finish (``None``: no timed row).
        untimed: finished clusters without a time (legacy ``manifest.jsonl`` rows).
        run_started_at: Unix seconds when the latest run started (``run.json``; ``None``: older job).
        now: Unix seconds at which the status was taken.
    """

    output: str
    clusters_file: str | None
    total: int | None
    total_error: str | None
    accepted: int
    rejected: int
    failed: int
    failed_by_kind: dict[str, int] = field(default_factory=dict)
    failed_examples: dict[str, str] = field(default_factory=dict)
    to_go: int | None = None
    samples_kept: int = 0
    candidates: int = 0
    shards: int = 0
    acceptance_rate: float | None = None
    sample_keep_rate: float | None = None
    finished_last_hour: int = 0
    experts_per_hour_last_hour: float | None = None
    rate_window_seconds: float | None = None
    experts_per_hour_overall: float | None = None
    eta_seconds: float | None = None
    first_started_at: float | None = None
    last_finished_at: float | None = None
    untimed: int = 0
    run_started_at: float | None = None
    job_started_at: float | None = None  # the first run's start (run.json first_started_at; None: older job)
    now: float = 0.0

    @property
    def finished(self) -> int:
        """Finished clusters: accepted + rejected + failed."""
        return self.accepted + self.rejected + self.failed

    def to_dict(self) -> dict:
        """The fields (and ``finished``) as a JSON-ready dict."""
        return {**dataclasses.asdict(self), "finished": self.finished}


def job_status(output: str, now: float | None = None) -> JobStatus:
    """The status of the generation job at ``output`` (local path or URI), at ``now`` (Unix
    seconds; default: the current time). Reads only.

    Raises:
        MissingInputError: nothing exists at ``output``.
        InputError: ``output`` holds no generation job (no ``job.json`` and no manifest).
    """
    return job_status_and_rows(output, now)[0]


def job_status_and_rows(output: str, now: float | None = None) -> tuple[JobStatus, dict[str, dict], dict[str, tuple[float, float]]]:
    """:func:`job_status`, with the manifest rows it read (by cluster id) and their
    :func:`row_times` (for :mod:`generation.progress_plot`: the manifest is read once)."""
    import time

    now = time.time() if now is None else now
    output = storage.resolve(output)
    if not storage.exists(output):
        raise MissingInputError(f"{output}: no such folder (no generation job output here)")
    if storage.isfile(output):
        raise InputError(f"{output}: a file, not a generation job's output folder")
    job = _read_job(output)
    rows = read_manifest(output)
    if job is None and not rows:
        raise InputError(f"{output}: not a generation job's output (no {JOB_FILE} and no {MANIFEST_DIR}/)")
    run = read_run(output) or {}
    clusters_file = (job or {}).get("clusters")
    target, total_error = _target_ids(clusters_file, run.get("max_clusters"))
    status = _counts(output, clusters_file, rows, target, total_error)
    status.now, status.run_started_at, status.job_started_at = now, run.get("started_at"), run.get("first_started_at", run.get("started_at"))
    times = row_times(output, rows)
    _rates(status, list(times.values()), now)
    return status, rows, times


def _read_job(output: str) -> dict | None:
    try:
        return json.loads(storage.read_text(storage.join(output, JOB_FILE)))
    except MissingInputError:
        return None
    except ValueError:
        raise InputError(f"{storage.join(output, JOB_FILE)}: not valid JSON") from None


def _target_ids(clusters_file: str | None, limit: int | None) -> tuple[list[str] | None, str | None]:
    """The cluster ids the job aims at (the clusters file's first ``limit``), or why unknown."""
    if not clusters_file:
        return None, f"{JOB_FILE} records no clusters file (an older job)"
    try:
        lines = [line for line in storage.read_text(clusters_file).splitlines() if line.strip()]
        ids = [str(json.loads(line)["cluster_id"]) for line in lines]
    except MissingInputError:
        return None, f"{clusters_file}: not readable from here"
    except InputError as exc:  # a protocol whose filesystem package is missing here
        return None, str(exc)
    except (ValueError, KeyError, TypeError) as exc:
        return None, f"{clusters_file}: malformed ({type(exc).__name__})"
    except OSError as exc:  # permissions, network
        return None, f"{clusters_file}: not readable from here ({exc})"
    return (ids[:limit] if limit else ids), None


def failure_kind(error: str | None) -> str:
    """The kind of a failed cluster's ``error`` (``"InputError: ..."`` -> ``"InputError"``, the
    exception's type name; ``"unknown"`` when empty)."""
    return str(error or "").split(":", 1)[0].strip() or "unknown"


def _counts(output: str, clusters_file: str | None, rows: dict[str, dict], target: list[str] | None, total_error: str | None) -> JobStatus:
    statuses = Counter(row.get("status") for row in rows.values())
    kinds: Counter = Counter()
    examples: dict[str, str] = {}
    for cid in sorted(rows):
        row = rows[cid]
        if row.get("status") == "failed":
            error = str(row.get("error") or "unknown")
            kind = failure_kind(error)
            kinds[kind] += 1
            examples.setdefault(kind, error[:200])
    total = len(set(target) | set(rows)) if target is not None else None
    finished = sum(statuses.values())
    kept = sum(len(row.get("kept") or []) for row in rows.values() if row.get("status") == "accepted")
    candidates = sum(int(row.get("num_candidates") or 0) for row in rows.values())
    shards = [n for n in storage.listdir(output) if n.startswith("shard-") and n.endswith(".tar")]
    return JobStatus(
        output=output, clusters_file=clusters_file, total=total, total_error=total_error,
        accepted=statuses["accepted"], rejected=statuses["rejected"], failed=statuses["failed"],
        failed_by_kind=dict(kinds.most_common()), failed_examples=examples,
        to_go=None if total is None else max(0, total - finished), samples_kept=kept, candidates=candidates, shards=len(shards),
        acceptance_rate=round(statuses["accepted"] / finished, 4) if finished else None,
        sample_keep_rate=round(kept / candidates, 4) if candidates else None,
    )


def row_times(output: str, rows: dict[str, dict]) -> dict[str, tuple[float, float]]:
    """``(started, finished)`` Unix seconds of each timed row, by cluster id: ``finished`` is
    ``finished_at`` (else the modification time of the row's object), ``started`` that less
    ``seconds``; untimed rows are left out."""
    untimed = [cid for cid, row in rows.items() if not isinstance(row.get("finished_at"), (int, float))]
    stamps = _object_times(output) if untimed else {}
    times = {}
    for cid, row in rows.items():
        done = row.get("finished_at")
        if not isinstance(done, (int, float)):
            done = stamps.get(cid)
        if done is None:
            continue
        seconds = row.get("seconds")
        times[cid] = (float(done) - (float(seconds) if isinstance(seconds, (int, float)) else 0.0), float(done))
    return times


def _object_times(output: str) -> dict[str, float]:
    """Modification times of the manifest objects by cluster id (what the filesystem reports)."""
    fs, path = storage.filesystem(storage.join(output, MANIFEST_DIR))
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return {}
    out = {}
    for info in entries:
        name = str(info.get("name", "")).rstrip("/").rsplit("/", 1)[-1]
        stamp = _unix_time(next((info[k] for k in ("mtime", "LastModified", "last_modified", "updated", "created") if info.get(k)), None))
        if name.endswith(".json") and stamp is not None:
            out[name[: -len(".json")]] = stamp
    return out


def _unix_time(value) -> float | None:
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, datetime.datetime):
        return (value if value.tzinfo else value.replace(tzinfo=datetime.timezone.utc)).timestamp()
    if isinstance(value, str):
        try:
            return _unix_time(datetime.datetime.fromisoformat(value.replace("Z", "+00:00")))
        except ValueError:
            return None
    return None


class Throughput:
    """Experts per hour over the last hour of work, fed one finished expert at a time.

    With ``last`` the latest finish and ``first`` the earliest start of the experts added (or an
    earlier ``first_started`` set before: a run's start), the
    rate is the number of experts that finished in ``(last - 1 h, last]`` over the window
    ``last - max(last - 1 h, first)`` seconds. Ending the window at the last finish rather than
    at ``now`` keeps the rate from falling between finishes and while the first experts train;
    :meth:`rate` is 0 once nothing has finished for an hour (a stalled job). Memory: the finish
    times of one hour.
    """

    def __init__(self) -> None:
        self.first_started: float | None = None
        self.last_finished: float | None = None
        self._finishes: list[float] = []  # sorted; only those in the hour up to last_finished

    def add(self, started: float, finished: float) -> None:
        """Count an expert that ran from ``started`` to ``finished`` (Unix seconds)."""
        self.first_started = started if self.first_started is None else min(self.first_started, started)
        self.last_finished = finished if self.last_finished is None else max(self.last_finished, finished)
        bisect.insort(self._finishes, finished)
        del self._finishes[: bisect.bisect_right(self._finishes, self.last_finished - HOUR)]

    def window(self) -> float:
        """Seconds the rate is measured over (0 before any expert)."""
        if self.last_finished is None:
            return 0.0
        return self.last_finished - max(self.last_finished - HOUR, self.first_started)

    def rate(self, now: float) -> float | None:
        """Experts per hour at ``now`` (Unix seconds): ``None`` before any expert or over an
        empty window (experts that finished as they started), 0 when none finished in the hour
        before ``now``."""
        if self.last_finished is None:
            return None
        if self.last_finished <= now - HOUR:
            return 0.0
        window = self.window()
        return round(len(self._finishes) / window * HOUR, 2) if window > 0 else None


def _rates(status: JobStatus, times: list[tuple[float, float]], now: float) -> None:
    """Fill the rates, the ETA and the times of ``status`` from the rows' ``(started, finished)``."""
    status.untimed = status.finished - len(times)
    if times:
        status.first_started_at = round(min(s for s, _ in times), 3)
        status.last_finished_at = round(max(f for _, f in times), 3)
        status.finished_last_hour = sum(now - HOUR < f <= now for _, f in times)
        latest_run = [t for t in times if status.run_started_at is not None and t[1] >= status.run_started_at]
        throughput = Throughput()
        if latest_run:  # the run's own start: its workers' start-up and model loads are its work too
            throughput.first_started = status.run_started_at
        for started, finished in sorted(latest_run or times, key=lambda t: t[1]):
            throughput.add(started, finished)
        status.experts_per_hour_last_hour = throughput.rate(now)
        status.rate_window_seconds = round(throughput.window(), 3)
        start = min(status.first_started_at, status.job_started_at) if status.job_started_at is not None else status.first_started_at
        span = status.last_finished_at - start
        status.experts_per_hour_overall = round(len(times) / span * HOUR, 2) if span > 0 else None
    if status.to_go == 0:
        status.eta_seconds = 0.0
    elif status.to_go and status.experts_per_hour_last_hour:
        status.eta_seconds = round(status.to_go / status.experts_per_hour_last_hour * HOUR, 1)


def format_status(status: JobStatus) -> str:
    """The status as a few lines of text."""
    lines = [f"job: {status.output}" + (f" (clusters: {status.clusters_file})" if status.clusters_file else "")]
    of = f" of {status.total}" if status.total is not None else ""
    to_go = f"{status.to_go} to go" if status.to_go is not None else f"to go unknown: {status.total_error}"
    lines.append(f"clusters: {status.finished}{of} finished ({status.accepted} accepted, {status.rejected} rejected, {status.failed} failed); {to_go}")
    for kind, count in status.failed_by_kind.items():
        lines.append(f"  failed {count}: {status.failed_examples.get(kind, kind)}")
    keep = f" ({_pct(status.sample_keep_rate)} of {status.candidates} candidates)" if status.candidates else ""
    lines.append(f"samples: {status.samples_kept} kept{keep} in accepted clusters; {status.shards} shards; acceptance {_pct(status.acceptance_rate)} of finished clusters")
    if status.last_finished_at is None:
        lines.append("rate: no timed expert yet")
    else:
        ago = status.now - status.last_finished_at
        lines.append(f"rate: {_num(status.experts_per_hour_last_hour)} experts/hour over the last hour of work ({status.finished_last_hour} finished in the hour before now), "
                     f"{_num(status.experts_per_hour_overall)} overall; last finished {_duration(ago)} ago"
                     + (f"; {status.untimed} untimed" if status.untimed else ""))
    if status.eta_seconds == 0:
        lines.append("ETA: done (nothing to go)")
    elif status.eta_seconds is None:
        lines.append("ETA: unknown" + (" (nothing finished in the last hour)" if status.to_go else ""))
    else:
        lines.append(f"ETA: {_duration(status.eta_seconds)} at the last hour's rate")
    return "\n".join(lines)


def _pct(rate: float | None) -> str:
    return "n/a" if rate is None else f"{100 * rate:.0f}%"


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * HOUR:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / HOUR:.1f} h"
