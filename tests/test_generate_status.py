"""``suti generate --status OUTPUT``: a generation job you can watch, read-only and without Ray,
from its output (a local path, ``file://`` or any fsspec URI), finished or in progress."""

import dataclasses
import json
import shutil
import sys
import time

import pytest

from conftest import exit_code
from orchestration.cli import main

FAST = ["--model", "tiny", "--steps", "2", "--sample-steps", "2", "--prompts-per-cluster", "1", "--samples-per-shard", "2", "--max-workers", "1", "--lambda", "-1"]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A tiny finished job: ``--max-clusters 2`` of a small world's clusters."""
    root = tmp_path_factory.mktemp("status")
    assert main(["world", "make", "--output", str(root / "crawl"), "--subjects", "3", "--noise-pages", "0", "--seed", "5", "--size", "32"]) == 0
    assert main(["mine", "--crawl", str(root / "crawl"), "--output", str(root / "mined")]) == 0
    out = root / "out"
    assert main(["generate", "--clusters", str(root / "mined" / "clusters.jsonl"), "--crawl", str(root / "crawl"), "--output", str(out), *FAST, "--max-clusters", "2"]) == 0
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
    assert status.experts_per_hour_last_hour == pytest.approx(1.0, abs=0.01), "one in the last hour"
    assert status.experts_per_hour_overall == pytest.approx(2 / ((status.last_finished_at - status.first_started_at) / 3600), abs=0.01)
    assert status.first_started_at == pytest.approx(now - 5400, abs=1e-3)
    assert status.eta_seconds == pytest.approx(status.to_go * 3600, rel=1e-3)

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
