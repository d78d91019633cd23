"""The generation job knows what it was run on: a rerun on another crawl, clusters file or
sampling dtype is refused, naming what differs; each manifest row records the fingerprints of
its cluster's inputs; a storage failure of the output stops the job without charging a cluster."""

import errno
import json

import pytest

from orchestration.cli import main

FAST = ["--model", "tiny", "--steps", "2", "--sample-steps", "2", "--prompts-per-cluster", "1", "--samples-per-shard", "2", "--max-workers", "1",
        "--lambda", "-1"]


def _world(root, seed):
    assert main(["world", "make", "--output", str(root / "crawl"), "--subjects", "3", "--noise-pages", "0", "--seed", str(seed), "--size", "32"]) == 0
    assert main(["mine", "--crawl", str(root / "crawl"), "--output", str(root / "mined")]) == 0
    return root


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    return _world(tmp_path_factory.mktemp("w1"), 5), _world(tmp_path_factory.mktemp("w2"), 6)


def _args(world, out, *extra):
    return ["generate", "--clusters", str(world / "mined" / "clusters.jsonl"), "--crawl", str(world / "crawl"), "--output", str(out), *FAST, *extra]


def test_a_rerun_on_another_crawl_clusters_file_or_dtype_is_refused_naming_it(worlds, tmp_path, capsys):
    first, second = worlds
    out = tmp_path / "sh"
    assert main(_args(first, out, "--max-clusters", "1")) == 0
    job = json.loads((out / "job.json").read_text())
    assert job["crawl"] == str(first / "crawl") and job["clusters"] == str(first / "mined" / "clusters.jsonl") and job["dtype"] is None
    row = next(iter(json.loads(p.read_text()) for p in (out / "manifest").glob("*.json")))
    assert len(row["inputs"]) == 64 and len(row["images"]) == 64, "the manifest records what the cluster was made from"
    before = sorted(p.name for p in out.rglob("*"))
    capsys.readouterr()

    assert main(_args(second, out, "--max-clusters", "3")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--clusters" in err and "--crawl" in err and "another --output" in err, err
    assert main(_args(first, out, "--max-clusters", "3", "--dtype", "bf16")) == 2
    err = capsys.readouterr().err.strip()
    assert "--dtype: None -> 'bf16'" in err and "--crawl" not in err, err
    assert sorted(p.name for p in out.rglob("*")) == before, "a refused rerun writes nothing"


def test_a_changed_cluster_of_the_same_clusters_file_is_refused(worlds, tmp_path, capsys):
    from generation.ledger import check_recorded_inputs, cluster_fingerprint
    from suti.errors import InputError

    row = json.loads((worlds[0] / "mined" / "clusters.jsonl").read_text().splitlines()[0])
    done = {row["cluster_id"]: {"cluster_id": row["cluster_id"], "status": "accepted", "inputs": cluster_fingerprint(row)}}
    check_recorded_inputs("OUT", [row], done)  # the same cluster: fine
    check_recorded_inputs("OUT", [row], {row["cluster_id"]: {"cluster_id": row["cluster_id"], "status": "accepted"}})  # an older job's row
    changed = {**row, "prompts": row["prompts"][:1] + [{"prompt": "a {S} on the moon"}]}
    with pytest.raises(InputError, match=row["cluster_id"]):
        check_recorded_inputs("OUT", [changed], done)


def test_an_older_job_json_gets_the_new_identity_keys_recorded(worlds, tmp_path):
    from generation.config import GenerateConfig
    from generation.ledger import check_job

    first = worlds[0]
    config = GenerateConfig(clusters=str(first / "mined" / "clusters.jsonl"), crawl=str(first / "crawl"), output=str(tmp_path / "o"), model="tiny")
    identity = config.identity()
    (tmp_path / "o").mkdir()
    older = {k: v for k, v in identity.items() if k not in ("clusters", "crawl", "dtype")}
    (tmp_path / "o" / "job.json").write_text(json.dumps(older))
    check_job(str(tmp_path / "o"), config)
    assert json.loads((tmp_path / "o" / "job.json").read_text()) == identity


def test_a_full_output_disk_stops_the_job_without_failing_a_cluster_and_a_rerun_continues(worlds, tmp_path, capsys, monkeypatch):
    import generation.scheduler

    first = worlds[0]
    out = tmp_path / "sh"
    real = generation.scheduler.stage

    def full(output, summary, samples):
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "staging"))

    monkeypatch.setattr(generation.scheduler, "stage", full)
    assert main(_args(first, out, "--max-clusters", "2")) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and err[0].startswith("suti: error: ") and "No space left on device" in err[0] and "no cluster is marked failed" in err[0], err
    assert not list(out.glob("manifest/*.json")), "nothing recorded, nothing failed"

    monkeypatch.setattr(generation.scheduler, "stage", real)
    assert main(_args(first, out, "--max-clusters", "2")) == 0
    rows = [json.loads(p.read_text()) for p in (out / "manifest").glob("*.json")]
    assert len(rows) == 2 and all(r["status"] == "accepted" for r in rows)


@pytest.mark.parametrize("command", ["generate", "pack-photos"])
def test_clusters_of_one_crawl_with_another_crawl_are_refused_before_anything_is_written(worlds, tmp_path, capsys, command):
    """Keys such as 000000000 recur across crawls: clusters mined from one crawl, given with
    another, would pair one crawl's photos with the other's captions and prompts (exit 0 with
    wrong data). The captions the crawl holds for the first cluster must be the recorded ones."""
    first, second = worlds
    out = tmp_path / "out"
    clusters, crawl = str(first / "mined" / "clusters.jsonl"), str(second / "crawl")
    argv = (["generate", "--clusters", clusters, "--crawl", crawl, "--output", str(out), *FAST] if command == "generate"
            else ["apprentice", "pack-photos", "--clusters", clusters, "--crawl", crawl, "--output", str(out)])
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not the crawl --clusters" in err[0] and crawl in err[0] and "captioned" in err[0], err
    assert not out.exists()
