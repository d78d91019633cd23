"""The expert generation job on local Ray: end to end, lambda filter, rerun, killed worker and driver."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import webdataset as wds

from conftest import exit_code
from orchestration.cli import main

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--model", "tiny", "--steps", "3", "--sample-steps", "2", "--prompts-per-cluster", "2", "--samples-per-shard", "2", "--max-workers", "2"]


@pytest.fixture(scope="module")
def mined(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    assert main(["world", "make", "--output", str(root / "crawl"), "--subjects", "6", "--noise-pages", "0.2", "--seed", "5", "--size", "32"]) == 0
    assert main(["mine", "--crawl", str(root / "crawl"), "--output", str(root / "mined")]) == 0
    rows = [json.loads(line) for line in (root / "mined" / "clusters.jsonl").read_text().splitlines()]
    assert len(rows) >= 3
    return root


def _generate(root, out, *extra, env=None):
    cmd = [sys.executable, "-m", "orchestration.cli", "generate", "--clusters", str(root / "mined" / "clusters.jsonl"), "--crawl", str(root / "crawl"), "--output", str(out), *FAST, *extra]
    return subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=900)


def _samples(out: Path) -> list[dict]:
    shards = sorted(str(p) for p in out.glob("shard-*.tar"))
    return list(wds.WebDataset(shards, shardshuffle=False).decode("pil")) if shards else []


def _manifest(out: Path) -> dict:
    from generation.job import read_manifest

    return read_manifest(str(out))


def _digest(out: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.glob("shard-*.tar")}


def test_end_to_end_lambda_filter_and_rerun(mined, tmp_path):
    out = tmp_path / "sh"
    proc = _generate(mined, out, "--max-clusters", "3", "--lambda", "-0.05")
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = _manifest(out)
    assert len(manifest) == 3 and all(r["status"] in ("accepted", "rejected", "failed") for r in manifest.values())
    samples = _samples(out)
    kept = sum(len(r.get("kept", [])) for r in manifest.values())
    assert len(samples) == kept
    for s in samples:
        meta = s["json"]
        assert {"cluster_id", "prompt", "demo_captions", "delta_clip", "expert"} <= set(meta)
        assert meta["delta_clip"] > -0.05, "no kept sample at or below lambda"
        assert {"recipe", "steps", "seed"} <= set(meta["expert"])
        assert "target.jpg" in s and "demo_0.jpg" in s
        assert sum(k.startswith("demo_") for k in s) == len(meta["demo_keys"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steady_experts_per_hour"] > 0 and summary["expert_seconds"] > 0
    before = _digest(out)
    again = _generate(mined, out, "--max-clusters", "3", "--lambda", "-0.05")
    assert again.returncode == 0
    assert '"ran_now": 0' in again.stdout
    assert _digest(out) == before
    rerun = json.loads((out / "summary.json").read_text())
    assert rerun["expert_seconds"] == summary["expert_seconds"] and rerun["steady_experts_per_hour"] == summary["steady_experts_per_hour"], "a rerun with nothing to do keeps the timings"
    fewer = _generate(mined, out, "--max-clusters", "1", "--lambda", "-0.05")
    assert fewer.returncode == 0, fewer.stderr[-2000:]
    whole = json.loads((out / "summary.json").read_text())  # the summary describes the output, as the manifest and shards do
    assert whole["clusters"] == 3 and whole["accepted"] + whole["rejected"] + whole["failed"] == 3
    assert whole["samples"] == kept and whole["accepted"] == sum(r["status"] == "accepted" for r in manifest.values())


@pytest.mark.parametrize("flag, value, message", [
    ("--samples-per-shard", "0", "--samples-per-shard: must be a whole number from 1 to 1000000, got 0"),  # refused while parsing (suti.checks kinds)
    ("--max-clusters", "-1", "--max-clusters: must be a whole number from 1 to 2147483647, got -1"),
    ("--max-workers", "0", "--max-workers: must be a whole number from 1 to 1000000, got 0"),
    ("--prompts-per-cluster", "-2", "--prompts-per-cluster: must be a whole number from 0 to 10000, got -2"),
    ("--max-retries", "-1", "--max-retries: must be a whole number from 0 to 100, got -1"),
    ("--gpus-per-expert", "nan", "--gpus-per-expert: must be a finite number in [0, 1024], got nan"),
    ("--gpus-per-expert", "inf", "--gpus-per-expert: must be a finite number in [0, 1024], got inf"),
    ("--cpus-per-expert", "inf", "--cpus-per-expert: must be a finite number in (0, 1024], got inf"),
    ("--cpus-per-expert", "0", "--cpus-per-expert: must be a finite number in (0, 1024], got 0"),
    ("--lambda", "nan", "--lambda: must be a finite number in [-2, 2], got nan"),
    ("--output", "", "--output must name a file, folder or URI, got an empty string"),  # refused by GenerateConfig
])
def test_bad_job_settings_exit_2_in_one_line_before_anything_is_written(mined, tmp_path, capsys, flag, value, message):
    out = tmp_path / "o"
    args = {"--clusters": str(mined / "mined" / "clusters.jsonl"), "--crawl": str(mined / "crawl"), "--output": str(out)}
    args[flag] = value
    argv = ["generate", *[x for kv in args.items() for x in kv]]
    cwd = os.getcwd()
    os.chdir(tmp_path)  # an empty --output must not fill the working directory either
    try:
        assert exit_code(argv) == 2
    finally:
        os.chdir(cwd)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and err.startswith(("suti: error: ", "suti generate: error: argument "))
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_samples_per_shard_zero_is_refused_by_the_packer_and_pack_photos(mined, tmp_path, capsys):
    from suti.shards import ShardPacker
    from suti.errors import InvalidValueError

    with pytest.raises(InvalidValueError, match="--samples-per-shard must be a whole number >= 1, got 0"):
        ShardPacker(tmp_path / "s", 0)
    code = exit_code(["apprentice", "pack-photos", "--clusters", str(mined / "mined" / "clusters.jsonl"), "--crawl", str(mined / "crawl"), "--output", str(tmp_path / "ph"), "--samples-per-shard", "0"])
    assert code == 2 and "--samples-per-shard: must be a whole number from 1 to 1000000, got 0" in capsys.readouterr().err
    assert not (tmp_path / "ph").exists() or not list((tmp_path / "ph").iterdir())


@pytest.mark.parametrize("form", ["shards/*.tar", "shards/crawl-00000.tar", "crawl.jsonl"])
def test_generate_accepts_every_crawl_form_that_mine_reads(mined, form):
    """``--crawl`` as a shard pattern, one shard or a manifest is checked as `suti mine` reads it."""
    from generation.job import GenerateConfig

    crawl = mined / "crawl"
    assert (crawl / "crawl.jsonl").is_file() and (crawl / "shards" / "crawl-00000.tar").is_file()
    config = GenerateConfig(clusters=str(mined / "mined" / "clusters.jsonl"), crawl=str(crawl / form), output=str(mined / "unused"), model="tiny").resolved()
    assert config.crawl == str(crawl / form)
    from suti.errors import MissingInputError

    with pytest.raises(MissingInputError, match="the shard pattern matches no file"):
        GenerateConfig(clusters="c", crawl=str(crawl / "nothing-*.tar"), output=str(mined / "unused"), model="tiny").resolved()


def test_steady_rate_leaves_out_each_slots_first_expert():
    from generation.job import steady_rate

    # one slot: the first finish (start-up + first expert) at 100 s, then one every 10 s
    assert steady_rate([100.0, 110.0, 120.0, 130.0], 1) == pytest.approx(3 / 30 * 3600)
    # two slots: both first experts (at 100 and 101 s) are left out; finish order does not matter
    assert steady_rate([121.0, 101.0, 100.0, 111.0, 120.0], 2) == pytest.approx(3 / 20 * 3600)
    # every expert in the first wave (one batch, or more slots than experts): no steady rate
    assert steady_rate([10.0, 20.0], 4) is None and steady_rate([30.0, 30.001, 30.002], 3) is None
    assert steady_rate([10.0], 1) is None and steady_rate([], 1) is None


@pytest.mark.parametrize("extra", [[], ["--resident-workers", "--lora-rank", "4", "--expert-batch-size", "2"]], ids=["task", "resident-batch"])
def test_killed_worker_is_retried(mined, tmp_path, extra):
    """A worker process that dies (a task, or a resident worker holding a batch of two experts)
    loses its clusters, which run again; every sample is written once."""
    out = tmp_path / "sh"
    proc = _generate(mined, out, "--max-clusters", "2", "--lambda", "-1", *extra, env={"SUTI_TEST_CRASH_ONCE": str(tmp_path / "crashes")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((tmp_path / "crashes").glob("*.crashed"))) == 2, "every cluster's first attempt died"
    manifest = _manifest(out)
    assert len(manifest) == 2 and all(r["status"] == "accepted" for r in manifest.values())
    keys = [s["__key__"] for s in _samples(out)]
    assert len(keys) == len(set(keys)) == 2 * 2  # 2 clusters x 2 prompts x 1 sample


@pytest.mark.parametrize("extra", [["--max-workers", "1"], ["--resident-workers", "--lora-rank", "4", "--expert-batch-size", "2", "--max-workers", "2"]], ids=["task", "stacked-batch"])
def test_killed_driver_then_rerun_loses_nothing_and_writes_nothing_twice(mined, tmp_path, extra):
    """kill -9 of the driver (with its workers) midway, then a rerun: every cluster once, no
    sample lost or written twice - one expert per task, or stacked batches of two. The manifest is
    polled every 0.1 s: two workers' batches of two finish close together, and a slower poll has
    seen all four clusters done before the kill."""
    out = tmp_path / "sh"
    cmd = [sys.executable, "-m", "orchestration.cli", "generate", "--clusters", str(mined / "mined" / "clusters.jsonl"), "--crawl", str(mined / "crawl"), "--output", str(out), *FAST, "--lambda", "-1", *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline:
        if len(list((out / "manifest").glob("*.json"))) >= 1:
            break
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    total = len((mined / "mined" / "clusters.jsonl").read_text().splitlines())
    assert len(_manifest(out)) < total, "the driver was killed midway"
    rerun = _generate(mined, out, "--lambda", "-1", *extra)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    manifest = _manifest(out)
    assert len(manifest) == total
    keys = [s["__key__"] for s in _samples(out)]
    assert len(keys) == len(set(keys)), "no sample written twice"
    assert len(keys) == sum(len(r.get("kept", [])) for r in manifest.values()), "no sample lost"


def test_malformed_clusters_file_names_the_line(tmp_path, capsys):
    bad = tmp_path / "clusters.jsonl"
    bad.write_text('{"cluster_id": "a", "keys": [], "prompts": []}\nnot json\n')
    assert main(["generate", "--clusters", str(bad), "--crawl", str(tmp_path), "--output", str(tmp_path / "o")]) == 2
    assert "clusters.jsonl:2" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[]], ids=["full"])  # LoRA experts: the GPU suite's dry run checks resident = per-task samples and scores byte for byte (CI time)
def test_resident_workers_write_the_same_shards_byte_for_byte(mined, tmp_path, extra):
    per_task = _generate(mined, tmp_path / "task", "--max-clusters", "3", "--lambda", "-1", "--max-workers", "1", *extra)
    assert per_task.returncode == 0, per_task.stderr[-3000:]
    resident = _generate(mined, tmp_path / "resident", "--max-clusters", "3", "--lambda", "-1", "--max-workers", "1", "--resident-workers", *extra)
    assert resident.returncode == 0, resident.stderr[-3000:]
    assert _digest(tmp_path / "task") and _digest(tmp_path / "resident") == _digest(tmp_path / "task")
    manifest = _manifest(tmp_path / "resident")
    assert len(manifest) == 3 and all(r["status"] == "accepted" for r in manifest.values())


def test_resident_workers_train_lora_experts_in_batches(mined, tmp_path):
    """--expert-batch-size 2: one resident worker trains two LoRA experts together; the shards
    hold the same samples as per-task experts (pixels equal up to float rounding)."""
    import numpy as np

    extra = ["--max-clusters", "3", "--lambda", "-1", "--lora-rank", "4", "--steps", "6"]
    per_task = _generate(mined, tmp_path / "task", *extra)
    assert per_task.returncode == 0, per_task.stderr[-3000:]
    batched = _generate(mined, tmp_path / "batched", *extra, "--resident-workers", "--expert-batch-size", "2")
    assert batched.returncode == 0, batched.stderr[-3000:]
    manifest = _manifest(tmp_path / "batched")
    assert {cid: r["kept"] for cid, r in manifest.items()} == {cid: r["kept"] for cid, r in _manifest(tmp_path / "task").items()}
    assert sorted(r["expert_batch"] for r in manifest.values()) == [1, 2, 2], "two experts trained together, the third alone"
    alone = {s["__key__"]: np.asarray(s["target.jpg"], dtype=float) for s in _samples(tmp_path / "task")}
    together = {s["__key__"]: np.asarray(s["target.jpg"], dtype=float) for s in _samples(tmp_path / "batched")}
    assert together.keys() == alone.keys() and len(alone) == 6
    assert max(np.abs(together[k] - alone[k]).mean() for k in alone) < 2.0, "same images up to rounding (JPEG levels)"


def test_resident_worker_gathers_concurrent_calls_into_a_batch_and_falls_back_one_at_a_time(mined, tmp_path, monkeypatch):
    """Two concurrent run() calls on one worker train as one batch; a batch whose training fails
    runs its clusters one at a time (each gets its own result)."""
    from concurrent.futures import ThreadPoolExecutor

    import experts.batched
    from generation.resident import ResidentExpertWorker
    from generation.job import GenerateConfig, load_demos
    from mining.cluster import read_clusters

    config = GenerateConfig(clusters=str(mined / "mined" / "clusters.jsonl"), crawl=str(mined / "crawl"), output=str(tmp_path / "o"), model="tiny", steps=3, sample_steps=2,
                            prompts_per_cluster=1, lambda_=-1.0, recipe_overrides={"lora_rank": 4}, resident_workers=True, expert_batch_size=2).resolved()
    rows = read_clusters(config.clusters, limit=2)
    demos = load_demos(config, rows)
    worker = ResidentExpertWorker(config.expert_job("cpu"))
    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(lambda r: worker.run(r, demos[r["cluster_id"]]), rows))
    assert [r["expert_batch"] for r in together] == [2, 2] and [r["cluster_id"] for r in together] == [r["cluster_id"] for r in rows]
    assert worker.experts == 2 and not getattr(worker.pipe.unet, "peft_config", None), "the adapters are deleted after the batch"

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (a batch too large)")

    monkeypatch.setattr(experts.batched, "train_lora_experts", out_of_memory)
    alone = worker.run_batch(rows, [demos[r["cluster_id"]] for r in rows])
    assert [r["kept"] for r in alone] == [r["kept"] for r in together] and [r["expert_batch"] for r in alone] == [1, 1]
    assert worker.experts == 4
    assert worker.base == {}, "LoRA experts, batched or one at a time, keep no copy of the base weights"


def test_resident_worker_copies_the_base_before_its_first_full_expert_and_restores_it(tmp_path):
    """A full fine-tuning expert changes the resident U-Net and text encoder: the worker copies
    them before the first such expert (not at start: the recipe is resolved per cluster) and
    loads them back after each."""
    import torch
    from PIL import Image

    from generation.resident import ResidentExpertWorker

    from generation.config import ExpertJob

    job = ExpertJob(model="tiny", recipe="suti-expert", steps=2, seed=0, samples_per_prompt=1, prompts_per_cluster=None, sample_steps=2,
                    guidance_scale=7.5, scorer="toy-clip", lambda_=-10.0, device="cpu", output=str(tmp_path / "o"))
    worker = ResidentExpertWorker(job)
    assert worker.base == {}
    before = {k: v.clone() for k, v in worker.pipe.unet.state_dict().items()}
    demos = [Image.new("RGB", (32, 32), (40 * i, 90, 200 - 30 * i)) for i in range(3)]
    cluster = {"cluster_id": "c0", "keys": ["k0", "k1", "k2"], "captions": [], "class_noun": "cup", "prompts": [{"prompt": "a {S} in a city"}]}
    restore, trained = worker.restore, []
    worker.restore = lambda: trained.append({k: v.clone() for k, v in worker.pipe.unet.state_dict().items()}) or restore()
    worker.run(cluster, demos)
    assert trained and any(not torch.equal(before[k], v) for k, v in trained[0].items()), "the expert changed the resident U-Net"
    assert set(worker.base) == set(worker.trained) and "unet" in worker.base
    assert all(torch.equal(before[k], v) for k, v in worker.base["unet"].items()), "the copy is of the base, taken before training"
    assert all(torch.equal(before[k], v) for k, v in worker.pipe.unet.state_dict().items()), "the base is restored after the expert"


@pytest.mark.parametrize("extra, message", [(["--expert-batch-size", "2"], "--expert-batch-size 2 needs --resident-workers"),
                                            (["--expert-batch-size", "2", "--resident-workers"], "only as LoRA adapters"),
                                            (["--expert-batch-size", "0", "--resident-workers"], "--expert-batch-size: must be a whole number from 1 to 256, got 0"),
                                            (["--expert-batch-size", "2147483648", "--resident-workers"], "--expert-batch-size: must be a whole number from 1 to 256, got 2147483648"),
                                            (["--expert-batch-size", "4", "--resident-workers", "--max-workers", "2"], "--max-workers 2 (experts in flight) is below --expert-batch-size 4")])
def test_expert_batches_refuse_what_they_cannot_do_before_writing(mined, tmp_path, capsys, extra, message):
    out = tmp_path / "o"
    assert exit_code(["generate", "--clusters", str(mined / "mined" / "clusters.jsonl"), "--crawl", str(mined / "crawl"), "--output", str(out), "--model", "tiny", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and not out.exists()


@pytest.mark.slow
def test_accepted_cluster_whose_samples_do_not_arrive_is_retried_then_failed_never_done(mined, tmp_path):
    out = tmp_path / "sh"
    proc = _generate(mined, out, "--max-clusters", "1", "--lambda", "-1", "--max-retries", "1", env={"SUTI_TEST_DROP_SAMPLES": "1"})
    # every cluster of the job failed: exit 1 with one line naming the first error
    assert proc.returncode == 1 and "suti: error: every cluster failed (first: " in proc.stderr, proc.stderr[-3000:]
    (row,) = _manifest(out).values()
    assert row["status"] == "failed" and "did not reach the driver" in row["error"] and row["attempts"] == 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["accepted"] == 0 and summary["failed"] == 1 and summary["samples"] == 0
    again = _generate(mined, out, "--max-clusters", "1", "--lambda", "-1", "--retry-failed")
    assert again.returncode == 0, again.stderr[-3000:]
    (row,) = _manifest(out).values()
    assert row["status"] == "accepted" and len(_samples(out)) == len(row["kept"]) == 2


@pytest.mark.slow
def test_generation_job_on_an_sdxl_base_resident_equals_per_task(mined, tmp_path):
    """Issue 18: the generation job accepts an SDXL model (both text encoders restored between experts)."""
    extra = ["--model", "tiny-sdxl", "--max-clusters", "2", "--lambda", "-1", "--max-workers", "1", "--lora-rank", "4"]
    per_task = _generate(mined, tmp_path / "task", *extra)
    assert per_task.returncode == 0, per_task.stderr[-3000:]
    resident = _generate(mined, tmp_path / "resident", *extra, "--resident-workers")
    assert resident.returncode == 0, resident.stderr[-3000:]
    assert _digest(tmp_path / "task") and _digest(tmp_path / "resident") == _digest(tmp_path / "task")
    samples = _samples(tmp_path / "resident")
    assert samples and all(s["json"]["expert"]["model"] == "tiny-sdxl" for s in samples)


def test_generation_job_on_a_flux_base_batched_writes_each_sample_once(mined, tmp_path):
    """Issue 33: `suti generate --model tiny-flux --resident-workers --expert-batch-size 2` writes
    shards, every cluster's samples exactly once, sampled at FLUX's distilled guidance 3.5 by
    default (stacked FLUX experts equal lone ones: tests/test_flux_experts.py)."""
    extra = ["--model", "tiny-flux", "--max-clusters", "3", "--lambda", "-1", "--lora-rank", "4", "--steps", "6"]
    batched = _generate(mined, tmp_path / "batched", *extra, "--resident-workers", "--expert-batch-size", "2")
    assert batched.returncode == 0, batched.stderr[-3000:]
    assert json.loads((tmp_path / "batched" / "job.json").read_text())["guidance_scale"] == 3.5
    manifest = _manifest(tmp_path / "batched")
    assert sorted(r["expert_batch"] for r in manifest.values()) == [1, 2, 2]
    samples = _samples(tmp_path / "batched")
    keys = [s["__key__"] for s in samples]
    assert len(keys) == len(set(keys)) == 6, "every sample once"
    assert sorted(keys) == sorted(k for r in manifest.values() for k in r["kept"])
    assert all(s["json"]["expert"]["model"] == "tiny-flux" for s in samples)

def test_a_rerun_whose_suti_resolves_the_experts_differently_is_refused(mined, tmp_path):
    """job.json records every expert setting as the suti that started the job resolved the recipe;
    a rerun by a suti whose defaults changed (here: the resize filter) is refused naming the
    setting, not left to train the rest of the job's experts another way. An older job.json
    without them is completed, not refused."""
    from generation.config import GenerateConfig
    from generation.ledger import check_job
    from suti.errors import InputError

    config = GenerateConfig(clusters=str(mined / "mined" / "clusters.jsonl"), crawl=str(mined / "crawl"), output=str(tmp_path / "out"), model="tiny").resolved()
    assert config.expert_settings["image_interpolation_mode"] == "lanczos" and "instance_dir" not in config.expert_settings
    (tmp_path / "out").mkdir()
    check_job(config.output, config)  # the first run records the identity
    job = tmp_path / "out" / "job.json"
    recorded = json.loads(job.read_text())
    assert recorded["expert_settings"] == config.expert_settings
    check_job(config.output, config)  # the same suti: accepted
    recorded["expert_settings"]["image_interpolation_mode"] = "bicubic"  # as an older suti resolved it
    job.write_text(json.dumps(recorded))
    with pytest.raises(InputError, match=r"image_interpolation_mode 'bicubic' -> 'lanczos'"):
        check_job(config.output, config)
    del recorded["expert_settings"]
    job.write_text(json.dumps(recorded))
    check_job(config.output, config)
    assert json.loads(job.read_text())["expert_settings"] == config.expert_settings


def test_an_empty_clusters_file_is_refused_before_a_job_is_made(tmp_path, capsys):
    (tmp_path / "clusters.jsonl").write_text("")
    assert main(["generate", "--clusters", str(tmp_path / "clusters.jsonl"), "--crawl", str(tmp_path), "--output", str(tmp_path / "o"), "--model", "tiny"]) == 2
    assert "no clusters to generate from" in capsys.readouterr().err and not (tmp_path / "o").exists()
