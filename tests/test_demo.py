"""``suti demo`` (the README's main job) end to end at smoke-test size: every stage runs in
order, writes its output, and a rerun skips every finished stage."""

import json

import pytest

from orchestration.cli import main


@pytest.mark.slow
def test_demo_runs_every_stage_and_a_rerun_skips_them(tmp_path, capsys):
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    try:
        _run_demo_twice(tmp_path, capsys)
    finally:
        if started and ray.is_initialized():
            ray.shutdown()  # the generation stage started a local cluster; later tests start their own


def _run_demo_twice(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--output", str(out), "--subjects", "12", "--noise-pages", "0.1", "--expert-clusters", "2",
            "--expert-steps", "4", "--apprentice-steps", "6", "--query-subjects", "1", "--query-expert-steps", "4",
            "--workers", "1"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    for stage in ("crawl", "mine", "photos", "generate", "apprentice"):
        assert f"[{stage}] suti" in printed
    assert (out / "grid.png").is_file()
    photos = json.loads((out / "photos" / "summary.json").read_text())
    clusters = (out / "mined" / "clusters.jsonl").read_text().splitlines()
    assert photos["samples"] == len(clusters) > 2, "every mined cluster gets a photo sample"
    generated = json.loads((out / "shards" / "summary.json").read_text())
    assert generated["clusters"] == 2, generated  # experts only for --expert-clusters
    training = json.loads((out / "apprentice" / "training.json").read_text())
    assert training["steps"] == 6 and len(training["config"]["shards"]) == 2
    results = json.loads((out / "results.json").read_text())
    assert {"apprentice_identity", "expert_identity", "base_identity"} <= set(results["mean"])
    assert main(argv) == 0
    again = capsys.readouterr().out
    assert all(f"[{s}] already done" in again for s in ("crawl", "mine", "photos", "generate", "apprentice"))
