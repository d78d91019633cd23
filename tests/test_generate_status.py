"""``suti generate --status OUTPUT``: a generation job you can watch, read-only and without Ray,
from its output (a local path, ``file://`` or any fsspec URI), finished or in progress."""

import dataclasses
import json
import shutil
import sys
import time
import uuid

import pytest

from conftest import exit_code
from orchestration.cli import main

JOB_NAME = f"status-test-{uuid.uuid4().hex[:8]}"  # the fixture job's Ray metrics tag (unique: counters add up per tag in one driver process)
FAST = ["--model", "tiny", "--steps", "2", "--sample-steps", "2", "--prompts-per-cluster", "1", "--samples-per-shard", "2", "--max-workers", "1", "--lambda", "-1"]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A tiny finished job: ``--max-clusters 2`` of a small world's clusters."""
    root = tmp_path_factory.mktemp("status")
    assert main(["world", "make", "--output", str(root / "crawl"), "--subjects", "3", "--noise-pages", "0", "--seed", "5", "--size", "32"]) == 0
    assert main(["mine", "--crawl", str(root / "crawl"), "--output", str(root / "mined")]) == 0
    out = root / "out"
    assert main(["generate", "--clusters", str(root / "mined" / "clusters.jsonl"), "--crawl", str(root / "crawl"), "--output", str(out), *FAST, "--max-clusters", "2",
                 "--job-name", JOB_NAME]) == 0
    return out


def _tree(folder):
    return sorted((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*"))


def _status(capsys, monkeypatch, *argv):
    """Run ``suti generate --status ...`` with Ray unimportable; ``(code, stdout, stderr)``."""
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails: the status must not need it
    capsys.readouterr()
    code = exit_code(["generate", "--status", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_status_of_a_finished_job_matches_its_manifest_and_summary_and_writes_nothing(job, capsys, monkeypatch):
    from generation.job import read_manifest

    summary = json.loads((job / "summary.json").read_text())
    rows = read_manifest(str(job))
    before = _tree(job)
    code, out, err = _status(capsys, monkeypatch, str(job))
    assert code == 0, err
    assert _tree(job) == before, "--status writes nothing"
    assert "2 of 2 finished" in out and "0 to go" in out and "ETA: done" in out, out

    from generation.status import job_status

    status = job_status(str(job))
    assert (status.accepted, status.rejected, status.failed) == (summary["accepted"], summary["rejected"], summary["failed"])
    assert status.total == summary["clusters"] == 2 and status.to_go == 0 and status.eta_seconds == 0
    assert status.samples_kept == summary["samples"] == sum(len(r["kept"]) for r in rows.values() if r["status"] == "accepted")
    assert status.shards == summary["shards"] and status.candidates == sum(r["num_candidates"] for r in rows.values())
    assert status.acceptance_rate == summary["accepted"] / 2 and status.untimed == 0
    assert all(isinstance(r["finished_at"], float) for r in rows.values()), "the driver records when each cluster finished"
    assert status.finished_last_hour == 2 and status.experts_per_hour_last_hour > 0 and status.experts_per_hour_overall > 0
    assert status.last_finished_at == max(r["finished_at"] for r in rows.values())
    assert status.first_started_at == pytest.approx(min(r["finished_at"] - r["seconds"] for r in rows.values()), abs=1e-3)
    run = json.loads((job / "run.json").read_text())
    assert run["clusters"] == 2 and run["max_clusters"] == 2 and status.run_started_at == run["started_at"] <= status.first_started_at


def test_status_json_parses_with_every_field(job, capsys, monkeypatch):
    from generation.status import JobStatus

    code, out, err = _status(capsys, monkeypatch, str(job), "--json")
    assert code == 0, err
    data = json.loads(out)
    assert set(data) == {f.name for f in dataclasses.fields(JobStatus)} | {"finished"}
    assert data["finished"] == 2 and data["to_go"] == 0 and data["output"] == str(job)


def test_status_of_a_job_in_progress(job, tmp_path, capsys, monkeypatch):
    """A copy of the job with one row gone, a failure an hour and a half ago and a row of an
    older version (no ``finished_at``: its object's time stands in), aiming at every cluster."""
    from generation.ledger import write_manifest_row
    from generation.status import job_status

    out = tmp_path / "partial"
    shutil.copytree(job, out)
    lines = [line for line in (job.parent / "mined" / "clusters.jsonl").read_text().splitlines() if line.strip()]
    lines += [json.dumps({"cluster_id": f"later{i}", "keys": [], "prompts": []}) for i in range(3)]  # a larger clusters file
    (tmp_path / "clusters.jsonl").write_text("\n".join(lines) + "\n")
    (out / "job.json").write_text(json.dumps({**json.loads((out / "job.json").read_text()), "clusters": str(tmp_path / "clusters.jsonl")}))
    clusters = [json.loads(line)["cluster_id"] for line in lines]
    run = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**run, "max_clusters": None, "clusters": len(clusters)}))
    first, second = sorted(p for p in (out / "manifest").glob("*.json"))
    second.unlink()  # not finished yet
    older = json.loads(first.read_text())
    del older["finished_at"]
    first.write_text(json.dumps(older))
    now = time.time()
    write_manifest_row(str(out), {"cluster_id": clusters[-1], "status": "failed", "error": "InputError: the cluster's images are missing", "attempts": 0,
                                  "finished_at": now - 5400})
    status = job_status(str(out), now=now)
    assert (status.accepted + status.rejected, status.failed, status.finished) == (1, 1, 2)
    assert status.failed_by_kind == {"InputError": 1} and "images are missing" in status.failed_examples["InputError"]
    assert status.total == len(clusters) and status.to_go == len(clusters) - 2
    assert status.untimed == 0 and status.finished_last_hour == 1, "the older row is timed by its object"
    # the failure finished before the latest run started: the last hour's rate is the latest run's,
    # one expert over the time since that run started (its start-up and model loads count)
    window = status.last_finished_at - min(run["started_at"], status.last_finished_at - older["seconds"])
    assert status.rate_window_seconds == pytest.approx(window, abs=1e-2)
    assert status.experts_per_hour_last_hour == pytest.approx(3600 / window, rel=1e-3)
    assert status.experts_per_hour_overall == pytest.approx(2 / ((status.last_finished_at - status.first_started_at) / 3600), abs=0.01)
    assert status.first_started_at == pytest.approx(now - 5400, abs=1e-3)
    assert status.eta_seconds == pytest.approx(status.to_go * window, rel=1e-2)  # the rate is rounded to 0.01/hour

    later = job_status(str(out), now=now + 7200)  # nothing finished in the last hour: a stalled job has no ETA
    assert later.finished_last_hour == 0 and later.experts_per_hour_last_hour == 0 and later.eta_seconds is None

    code, text, err = _status(capsys, monkeypatch, str(out))
    assert code == 0, err
    assert f"2 of {len(clusters)} finished" in text and f"{len(clusters) - 2} to go" in text and "failed 1: InputError" in text, text

    (out / "job.json").write_text(json.dumps({**json.loads((out / "job.json").read_text()), "clusters": str(tmp_path / "gone.jsonl")}))
    unknown = job_status(str(out), now=now)
    assert unknown.total is None and unknown.to_go is None and "not readable" in unknown.total_error and unknown.eta_seconds is None


@pytest.mark.parametrize("kind", ["missing", "not a job", "a file"])
def test_a_missing_or_non_job_output_exits_2_in_one_line(tmp_path, capsys, monkeypatch, kind):
    target = tmp_path / "x"
    if kind == "not a job":
        target.mkdir()
        (target / "notes.txt").write_text("hello")
    elif kind == "a file":
        target.write_text("hello")
    before = _tree(tmp_path)
    code, out, err = _status(capsys, monkeypatch, str(target))
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("suti: error: ") and str(target) in err, err
    assert _tree(tmp_path) == before


def test_a_file_or_memory_uri_gives_the_same_status(job, capsys, monkeypatch):
    import fsspec

    from generation.status import job_status

    local = job_status(str(job), now=1e10)
    via_file = job_status(f"file://{job}", now=1e10)
    assert dataclasses.replace(via_file, output=local.output) == local
    fs = fsspec.filesystem("memory")
    fs.put(str(job), "/status-job", recursive=True)
    try:
        remote = job_status("memory://status-job", now=1e10)
        assert remote.output == "memory://status-job"
        same = ("total", "accepted", "rejected", "failed", "to_go", "samples_kept", "candidates", "shards", "first_started_at", "last_finished_at", "untimed")
        assert {k: getattr(remote, k) for k in same} == {k: getattr(local, k) for k in same}
        code, out, err = _status(capsys, monkeypatch, "memory://status-job", "--json")
        assert code == 0 and json.loads(out)["finished"] == 2, err
        code, out, err = _status(capsys, monkeypatch, "memory://no-such-job")
        assert code == 2 and len(err.strip().splitlines()) == 1, err
    finally:
        fs.rm("/status-job", recursive=True)


def test_running_a_job_still_needs_its_flags_and_json_needs_status(capsys):
    assert exit_code(["generate"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--clusters, --crawl, --output" in err and "--status" in err, err
    assert exit_code(["generate", "--json"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--json goes with --status" in err, err


def _synthetic_job(root, finishes, *, run_started_at, total=100):
    """An output with ``total`` clusters in its clusters file and one accepted manifest row per
    ``(finished_at, seconds)`` of ``finishes``; the latest run started at ``run_started_at``."""
    from generation.ledger import write_manifest_row

    root.mkdir()
    (root / "clusters.jsonl").write_text("".join(json.dumps({"cluster_id": f"c{i:04d}"}) + "\n" for i in range(total)))
    (root / "job.json").write_text(json.dumps({"clusters": str(root / "clusters.jsonl")}))
    (root / "run.json").write_text(json.dumps({"started_at": run_started_at, "clusters": total, "max_clusters": None, "to_run": total}))
    for i, (finished, seconds) in enumerate(finishes):
        write_manifest_row(str(root), {"cluster_id": f"c{i:04d}", "status": "accepted", "kept": [f"c{i:04d}_0"], "num_candidates": 2,
                                       "finished_at": finished, "seconds": seconds})
    return root


T0 = 1.9e9  # Unix seconds of the synthetic jobs' start


def test_last_hour_rate_does_not_fall_while_the_next_experts_train(tmp_path):
    """Four workers, 600 s experts after 30 s of start-up: the first four finish at +600 s. Between
    finishes the rate stays the work's, start-up included (4 in 630 s); before this fix it fell
    with the time since the last finish."""
    from generation.status import job_status

    out = _synthetic_job(tmp_path / "j", [(T0 + 600, 600.0)] * 4, run_started_at=T0 - 30)
    at_finish = job_status(str(out), now=T0 + 600)
    later = job_status(str(out), now=T0 + 1100)  # the next four are half trained
    rate = 4 / 630 * 3600
    assert at_finish.experts_per_hour_last_hour == later.experts_per_hour_last_hour == pytest.approx(rate, abs=0.01)
    assert later.rate_window_seconds == 630 and later.finished_last_hour == 4
    assert later.eta_seconds == pytest.approx(96 / rate * 3600, rel=1e-3)
    stalled = job_status(str(out), now=T0 + 600 + 3601)  # nothing for an hour: stalled, no ETA
    assert stalled.experts_per_hour_last_hour == 0 and stalled.eta_seconds is None


def test_last_hour_rate_is_the_latest_runs_and_covers_one_hour_of_work(tmp_path):
    from generation.status import HOUR, Throughput, job_status

    # a run of 10 experts of 60 s, killed; rerun 4000 s after the start: 5 experts of 60 s
    first = [(T0 + 60 * (i + 1), 60.0) for i in range(10)]
    second = [(T0 + 4000 + 60 * (i + 1), 60.0) for i in range(5)]
    out = _synthetic_job(tmp_path / "j", first + second, run_started_at=T0 + 4000)
    status = job_status(str(out), now=T0 + 4300)
    assert status.experts_per_hour_last_hour == pytest.approx(60.0), "the pause before the rerun is not work"
    assert status.rate_window_seconds == 300 and status.finished_last_hour == 5
    assert status.experts_per_hour_overall == pytest.approx(15 / 4300 * 3600, rel=1e-3), "overall: the pause counts"

    steady = Throughput()  # three hours of one expert a minute: the last hour's 60, one hour of finish times held
    for i in range(180):
        steady.add(T0 + 60 * i, T0 + 60 * (i + 1))
    assert steady.rate(T0 + 180 * 60) == pytest.approx(60.0) and steady.window() == HOUR and len(steady._finishes) == 60
    assert Throughput().rate(T0) is None


def test_progress_plot_is_a_png_of_the_job(job, tmp_path, capsys, monkeypatch):
    from PIL import Image

    png = tmp_path / "progress.png"
    code, out, err = _status(capsys, monkeypatch, str(job), "--progress-plot", str(png))
    assert code == 0, err
    assert f"progress plot: {png}" in out and "2 of 2 finished" in out
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == (900, 600)
        assert len(set(image.convert("L").getdata())) > 10, "something is drawn"
    code, out, err = _status(capsys, monkeypatch, str(job), "--json", "--progress-plot", str(png))  # replaced; the JSON stays parseable
    assert code == 0 and json.loads(out)["finished"] == 2 and "progress plot" in err, err


def test_progress_plot_bins_and_an_empty_job(tmp_path):
    from PIL import Image

    from generation.progress_plot import MAX_BINS, bin_seconds, draw_progress
    from generation.status import job_status_and_rows

    assert bin_seconds(3000) == 60 and bin_seconds(4000) == 300 and bin_seconds(3 * 86400) == 7200
    assert all(span / bin_seconds(span) <= MAX_BINS for span in (1, 59 * 60, 61 * 60, 86400, 30 * 86400))
    out = _synthetic_job(tmp_path / "j", [], run_started_at=T0)
    status, rows, times = job_status_and_rows(str(out), now=T0)
    import io

    with Image.open(io.BytesIO(draw_progress(status, rows, times))) as image:
        assert image.format == "PNG"


@pytest.mark.parametrize("bad", ["no-such-folder/p.png", "p.pdf", "folder", "file.txt/p.png"])
def test_a_bad_progress_plot_path_exits_2_in_one_line_before_anything(job, tmp_path, capsys, monkeypatch, bad):
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "file.txt").write_text("keep me")
    target = tmp_path / ("folder.png" if bad == "folder" else bad)
    before = _tree(tmp_path)
    code, out, err = _status(capsys, monkeypatch, str(job), "--progress-plot", str(target))
    assert code == 2 and out == "", out
    assert len(err.strip().splitlines()) == 1 and err.startswith("suti: error: --progress-plot ") and str(target) in err, err
    assert _tree(tmp_path) == before and (tmp_path / "file.txt").read_text() == "keep me"


def test_progress_plot_needs_status(capsys):
    assert exit_code(["generate", "--progress-plot", "p.png"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--progress-plot goes with --status" in err, err


def test_status_on_the_s3_test_server_running_and_finished(job, s3_server, capsys, monkeypatch):
    """The job's output and clusters file on an S3-protocol server (moto): the status of the
    finished job, then of the same job with one cluster still running, are the manifest's counts."""
    import s3fs
    from PIL import Image

    from generation.job import read_manifest
    from generation.status import job_status

    fs = s3fs.S3FileSystem()
    uri = f"{s3_server}/jobs/run1"
    clusters = f"{s3_server}/mined/clusters.jsonl"
    fs.put(str(job.parent / "mined" / "clusters.jsonl"), clusters)
    fs.put(str(job), uri, recursive=True)
    fs.pipe(f"{uri}/job.json", json.dumps({**json.loads((job / "job.json").read_text()), "clusters": clusters}).encode())

    def check(expect_finished, expect_to_go):
        rows = read_manifest(uri)
        status = job_status(uri)
        assert status.clusters_file == clusters and status.total == 2 and status.total_error is None
        assert (status.accepted, status.rejected, status.failed) == tuple(sum(r["status"] == s for r in rows.values()) for s in ("accepted", "rejected", "failed"))
        assert status.finished == len(rows) == expect_finished and status.to_go == expect_to_go
        assert status.samples_kept == sum(len(r["kept"]) for r in rows.values() if r["status"] == "accepted")
        assert status.candidates == sum(r["num_candidates"] for r in rows.values()) and status.untimed == 0
        code, out, err = _status(capsys, monkeypatch, uri, "--json")
        assert code == 0, err
        assert {k: v for k, v in json.loads(out).items() if k not in ("now", "finished_last_hour", "experts_per_hour_last_hour", "eta_seconds")} == \
            {k: v for k, v in status.to_dict().items() if k not in ("now", "finished_last_hour", "experts_per_hour_last_hour", "eta_seconds")}
        return status

    finished = check(2, 0)
    assert finished.eta_seconds == 0 and finished.shards == json.loads((job / "summary.json").read_text())["shards"]
    plot = f"{s3_server}/plots/progress.png"
    code, out, err = _status(capsys, monkeypatch, uri, "--progress-plot", plot)
    assert code == 0 and f"2 of 2 finished" in out, err
    with fs.open(plot, "rb") as f, Image.open(f) as image:
        assert image.format == "PNG"

    fs.rm(sorted(fs.ls(f"{uri}/manifest"))[-1])  # one cluster not recorded yet: the job is running
    (fs.rm(f"{uri}/summary.json"))
    running = check(1, 1)
    code, out, err = _status(capsys, monkeypatch, uri)
    assert code == 0 and "1 of 2 finished" in out and "1 to go" in out and "ETA: done" not in out, out
    assert running.experts_per_hour_last_hour > 0

    code, out, err = _status(capsys, monkeypatch, uri, "--progress-plot", "s3://no-such-bucket-suti/p.png")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "no-such-bucket-suti" in err, err


def _metric_values(body: str, job: str) -> dict[tuple, float]:
    """``{(name, frozenset of tags other than job): value}`` of the suti_generate_* samples of ``job``."""
    import re

    out: dict[tuple, float] = {}
    for line in body.splitlines():
        m = re.match(r"^ray_(suti_generate_\w+)\{(.*)\} (\S+)$", line)
        if not m:
            continue
        tags = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
        if tags.get("job") != job:
            continue
        key = (m.group(1), frozenset((k, v) for k, v in tags.items() if k in ("status", "reason")))
        out[key] = out.get(key, 0.0) + float(m.group(3))
    return out


def _scrape(job_name: str, expected: dict, tick=lambda: None, timeout: float = 60.0) -> dict:
    """Poll the node's Prometheus endpoint until ``expected`` values of ``job_name`` appear
    (Ray exports every few seconds); calls ``tick`` before each scrape. The last values."""
    import urllib.request

    import ray

    port = ray.nodes()[0]["MetricsExportPort"]
    deadline, values = time.time() + timeout, {}
    while time.time() < deadline:
        tick()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            values = _metric_values(response.read().decode(), job_name)
        if all(values.get(k) == pytest.approx(v) for k, v in expected.items()):
            break
        time.sleep(1)
    return values


@pytest.mark.slow
def test_the_driver_exports_the_counters_as_ray_metrics(job):
    """The fixture job's driver (this process) counted its clusters through ray.util.metrics:
    the counters appear, tagged with --job-name, on the node's Prometheus endpoint; the gauges
    (which Ray drops some 20 s after their last set: the driver sets them on every loop) and
    the failure reasons are checked on JobMetrics fed the same rows and a failure."""
    import ray

    from generation.job import read_manifest
    from generation.metrics import JobMetrics

    if not ray.is_initialized():
        pytest.skip("the job's Ray was shut down by another test")
    rows = read_manifest(str(job))
    summary = json.loads((job / "summary.json").read_text())
    counters = {
        ("suti_generate_samples_kept_total", frozenset()): float(summary["samples"]),
        ("suti_generate_candidates_scored_total", frozenset()): float(sum(r["num_candidates"] for r in rows.values())),
    }
    for status in ("accepted", "rejected", "failed"):
        if summary[status]:
            counters[("suti_generate_clusters_finished_total", frozenset({("status", status)}))] = float(summary[status])
    values = _scrape(JOB_NAME, counters)
    for key, value in counters.items():
        assert values.get(key) == pytest.approx(value), (key, values)
    assert not any(name == "suti_generate_clusters_failed_total" for name, _ in values) or summary["failed"]

    name = f"{JOB_NAME}-gauges"
    metrics = JobMetrics(name, total=5, done={}, to_go=4)
    for row in rows.values():
        metrics.record(row)
    metrics.record({"cluster_id": "bad", "status": "failed", "error": "InputError: the cluster's images are missing", "finished_at": time.time()})
    finished = len(rows) + 1
    gauges = {
        ("suti_generate_clusters_failed_total", frozenset({("reason", "InputError")})): 1.0,
        ("suti_generate_clusters_finished_total", frozenset({("status", "failed")})): 1.0,
        ("suti_generate_clusters_total", frozenset()): 5.0,
        ("suti_generate_clusters_to_go", frozenset()): float(4 - finished),
        ("suti_generate_experts_in_flight", frozenset()): 1.0,
        ("suti_generate_acceptance_rate", frozenset()): summary["accepted"] / finished,
        ("suti_generate_experts_per_hour", frozenset()): metrics.throughput.rate(time.time()),
    }
    values = _scrape(name, gauges, tick=lambda: metrics.refresh(1))
    for key, value in gauges.items():
        assert values.get(key) == pytest.approx(value, rel=1e-3), (key, values)
    assert values[("suti_generate_experts_per_hour", frozenset())] > 0


def test_the_metrics_job_tag_and_an_empty_job_name(tmp_path, capsys):
    from generation.config import GenerateConfig

    assert GenerateConfig(clusters="c.jsonl", crawl="w", output="s3://bucket/jobs/run7/").metrics_job == "run7"
    assert GenerateConfig(clusters="c.jsonl", crawl="w", output=str(tmp_path / "out"), job_name="nightly").metrics_job == "nightly"
    out = tmp_path / "never"
    assert exit_code(["generate", "--clusters", "c.jsonl", "--crawl", "w", "--output", str(out), "--job-name", " "]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--job-name" in err and not out.exists(), err


def test_a_failing_metrics_exporter_turns_the_metrics_off_not_the_job(caplog):
    from generation.scheduler import Scheduler

    class Broken:
        def record(self, row):
            raise RuntimeError("exporter gone")

    scheduler = Scheduler.__new__(Scheduler)
    scheduler.metrics = Broken()
    scheduler._metrics("record", {"cluster_id": "c", "status": "accepted"})
    assert scheduler.metrics is None and "exporter gone" in caplog.text
    scheduler._metrics("refresh", 0)  # off: nothing called


def test_batched_experts_rate_counts_the_runs_start_up_and_a_rerun_keeps_the_jobs_start(tmp_path):
    """Resident workers finish a batch of experts together, each row holding only its share of
    the batch (0.4 s): the rate runs from the run's start (18 s of loads and training: 4 experts,
    about 770/h), not from the rows' own starts (23000/h). A rerun's run.json keeps the first
    run's start for the overall rate."""
    from generation.ledger import read_run, write_run
    from generation.status import job_status

    out = _synthetic_job(tmp_path / "j", [(T0 + 18 + 0.2 * i, 0.4) for i in range(4)], run_started_at=T0)
    status = job_status(str(out), now=T0 + 20)
    assert status.rate_window_seconds == pytest.approx(18.6) and status.experts_per_hour_last_hour == pytest.approx(4 / 18.6 * 3600, abs=0.01)
    write_run(str(out), T0 + 500, 100, None, 96)  # a rerun
    assert read_run(str(out))["first_started_at"] == T0 and read_run(str(out))["started_at"] == T0 + 500
    write_run(str(out), T0 + 900, 100, None, 96)
    assert read_run(str(out))["first_started_at"] == T0
