"""What a worker loads lives on object storage, never on the driver's disk (no shared filesystem):
a model folder at a URI is copied once per machine; the generation job ships its recipe; DeepSpeed
configs and mining's CLIP folders may be URIs; ``file://`` is a local path everywhere and an
object-store URI is refused by every command that only works on local files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from suti import storage
from suti.errors import InputError, MissingInputError, ModelLoadError

ROOT = Path(__file__).resolve().parents[1]


def _upload_tiny(uri: str) -> None:
    from suti.models import preset_folder

    storage.upload(preset_folder("tiny"), uri)


def test_cached_copy_downloads_once_and_again_when_the_object_changes(s3_server, tmp_path, monkeypatch):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "a.txt").write_text("one")
    uri = storage.join(s3_server, "models", "m")
    storage.upload(tmp_path / "m", uri)
    fs, _ = storage.filesystem(uri)
    gets = []
    real_get = fs.get  # s3fs mirrors its sync methods onto the (cached) instance

    def counting_get(*args, **kwargs):
        gets.append(args[0])
        return real_get(*args, **kwargs)

    monkeypatch.setattr(fs, "get", counting_get)
    first = storage.cached_copy(uri, tmp_path / "cache")
    assert (first / "a.txt").read_text() == "one" and first.name == "m"
    assert storage.cached_copy(uri, tmp_path / "cache") == first and len(gets) == 1  # the second process of a node reuses it
    storage.write_text(storage.join(uri, "a.txt"), "two, longer")  # re-uploaded: another size and ETag
    second = storage.cached_copy(uri, tmp_path / "cache")
    assert second != first and (second / "a.txt").read_text() == "two, longer" and len(gets) == 2
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]  # no temporary folder left
    with pytest.raises(MissingInputError, match="no such file or folder"):
        storage.cached_copy(storage.join(s3_server, "nothing"), tmp_path / "cache")
    assert storage.cached_copy(str(tmp_path / "m"), tmp_path / "cache") == tmp_path / "m"  # local: itself


def test_a_model_folder_on_s3_loads_and_is_checked_up_front(s3_server, tmp_path):
    from suti.models import check_model, load_pipeline

    uri = storage.join(s3_server, "models", "tiny")
    _upload_tiny(uri)
    check_model(uri)
    pipe = load_pipeline(uri)
    reference = load_pipeline("tiny")
    assert all((a == b).all() for a, b in zip(pipe.unet.state_dict().values(), reference.unet.state_dict().values()))
    with pytest.raises(InputError, match="no model_index.json"):
        check_model(storage.join(s3_server, "models"))
    with pytest.raises(ModelLoadError, match="no such file or folder"):
        load_pipeline(storage.join(s3_server, "missing"))
    check_model(f"file://{Path(pipe.config._name_or_path)}")  # a file:// URL is the local folder
    assert not os.path.exists("s3:") and not os.path.exists("file:")


def test_generation_ships_its_recipe_to_the_workers(tmp_path):
    """A recipe YAML on the driver's disk is read once there: the task runs from the job's copy
    even where the file does not exist (another node)."""
    import yaml

    from generation.task import run_cluster
    from generation.job import GenerateConfig
    from suti.world import export_subject, make_world

    recipe = tmp_path / "my-recipe.yaml"
    recipe.write_text(yaml.safe_dump({"name": "my-recipe", "use_class_noun": False, "prior_preservation": False, "num_class_images": 0, "optimizer": "adamw",
                                      "learning_rate": 1e-4, "lora_learning_rate": 1e-4, "steps": 2, "batch_size": 1, "lora_rank": 0, "train_text_encoder": False}))
    (tmp_path / "crawl").mkdir()
    config = GenerateConfig(clusters="unused", crawl=str(tmp_path / "crawl"), output=str(tmp_path / "out"), model="tiny", recipe=str(recipe), lambda_=-1.0,
                            prompts_per_cluster=1, sample_steps=2).resolved()
    assert config.recipe_data["name"] == "my-recipe" and config.recipe_data["steps"] == 2
    recipe.unlink()  # the worker's node has no such file
    world = make_world(4, seed=0)
    from PIL import Image

    photos = export_subject(world, world.heldout_subjects[0].subject_id, tmp_path / "photos", n=3, size=32)
    demos = [Image.open(p).convert("RGB") for p in photos]
    job = config.expert_job("cpu")
    out = run_cluster({"cluster_id": "c1", "keys": ["a", "b", "c"], "prompts": ["a photo of {S} in the snow"], "class_noun": "toy"}, demos, job)
    assert out["status"] == "accepted" and out["num_candidates"] == 1
    with pytest.raises(InputError, match="unknown recipe"):
        GenerateConfig(clusters="unused", crawl=str(tmp_path / "crawl"), output=str(tmp_path / "out"), model="tiny", recipe=str(recipe)).resolved()


def test_recipe_and_deepspeed_config_from_object_storage(s3_server):
    from apprentice.train import _ds_config
    from apprentice.train_config import ApprenticeTrainConfig
    from experts.recipe import load_recipe

    storage.write_text(storage.join(s3_server, "cfg", "r.yaml"), "name: remote\nsteps: 7\n")
    assert load_recipe(storage.join(s3_server, "cfg", "r.yaml")) == {"name": "remote", "steps": 7}
    storage.write_text(storage.join(s3_server, "cfg", "bad.yaml"), "- a list\n")
    with pytest.raises(InputError, match="YAML mapping"):
        load_recipe(storage.join(s3_server, "cfg", "bad.yaml"))
    storage.write_text(storage.join(s3_server, "cfg", "ds.json"), json.dumps({"zero_optimization": {"stage": 0}, "gradient_clipping": 0.5}))
    config = ApprenticeTrainConfig(shards="x", output="y", batch_size=3)
    ds = _ds_config(storage.join(s3_server, "cfg", "ds.json"), config, "cpu")
    assert ds["gradient_clipping"] == 0.5 and ds["train_micro_batch_size_per_gpu"] == 3
    storage.write_text(storage.join(s3_server, "cfg", "broken.json"), "{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        _ds_config(storage.join(s3_server, "cfg", "broken.json"), config, "cpu")
    with pytest.raises(InputError, match="no such DeepSpeed config"):
        _ds_config(storage.join(s3_server, "cfg", "none.json"), config, "cpu")


def test_mining_loads_a_toy_clip_folder_from_object_storage(s3_server, tmp_path):
    """``suti mine --model s3://.../toy-clip``: checked, thresholded and loaded as the local folder
    would be (each Ray worker downloads it once to its own cache)."""
    import shutil

    import torch

    from mining.cluster import default_thresholds
    from mining.embed import check_embedder, load_scorer
    from suti.world.toy_clip import WEIGHTS_DIR

    local = tmp_path / "toy-clip"
    local.mkdir()
    for name in ("toy_clip.json", "toy_clip.safetensors"):
        shutil.copy(WEIGHTS_DIR / name, local / name)
    uri = storage.join(s3_server, "clip")
    storage.upload(local, uri)
    check_embedder(uri)
    assert default_thresholds(uri) == default_thresholds(str(local)) == default_thresholds("toy-clip")
    remote, here = load_scorer(uri), load_scorer(str(local))
    assert torch.equal(remote.embed_texts(["a red star toy"]), here.embed_texts(["a red star toy"]))


def _suti(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "orchestration.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("argv", [
    ["demo", "--output", "s3://b/demo"],
    ["serve", "--data-dir", "s3://b/serving"],
    ["world", "show", "--world", "s3://b/world"],
    ["world", "pretrain", "--output", "out", "--continue-from", "s3://b/t2i"],
    ["mine", "--crawl", "c", "--output", "o", "--llm-model", "s3://b/llm"],
    ["eval", "--dataset", "world:2", "--method", "apprentice", "--output", "o", "--apprentice", "s3://b/app"],
])
def test_local_only_options_refuse_object_storage_in_one_line(argv, tmp_path):
    proc = _suti(*argv, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "local files only" in lines[0] and "s3://b/" in lines[0], proc.stderr
    assert list(tmp_path.iterdir()) == []  # no folder named s3: (nor anything else)


def test_file_urls_are_local_paths_in_every_command(tmp_path):
    proc = _suti("world", "make", "--output", f"file://{tmp_path}/crawl", "--subjects", "2", "--seed", "1", "--size", "32", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "crawl" / "ground_truth.json").is_file() and not (tmp_path / "file:").exists()
    proc = _suti("mine", "--crawl", f"file://{tmp_path}/crawl", "--output", f"file://{tmp_path}/mined", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "mined" / "clusters.jsonl").is_file() and not (tmp_path / "file:").exists()


@pytest.fixture()
def small_crawl(tmp_path):
    from orchestration.cli import main

    assert main(["world", "make", "--output", str(tmp_path / "crawl"), "--subjects", "4", "--seed", "2", "--size", "32"]) == 0
    return tmp_path / "crawl"


def test_a_missing_output_bucket_is_one_line_and_never_created(s3_server, small_crawl, tmp_path, capsys):
    import s3fs

    from orchestration.cli import main

    assert main(["mine", "--crawl", str(small_crawl), "--output", str(tmp_path / "mined")]) == 0
    clusters = str(tmp_path / "mined" / "clusters.jsonl")
    capsys.readouterr()
    for argv in (["mine", "--crawl", str(small_crawl), "--output", "s3://no-such-bucket-x/mined"],
                 ["generate", "--clusters", clusters, "--crawl", str(small_crawl), "--output", "s3://no-such-bucket-x/job", "--model", "tiny"],
                 ["apprentice", "pack-photos", "--clusters", clusters, "--crawl", str(small_crawl), "--output", "s3://no-such-bucket-x/photos"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "bucket 'no-such-bucket-x' does not exist" in err[0], err
    s3fs.S3FileSystem.clear_instance_cache()
    assert not s3fs.S3FileSystem().exists("no-such-bucket-x"), "a typo in a bucket name never makes a new bucket"


def test_mining_a_jsonl_manifest_on_s3_reads_its_relative_images(s3_server, small_crawl, tmp_path):
    from orchestration.cli import main

    storage.upload(small_crawl, storage.join(s3_server, "crawl"))
    assert main(["mine", "--crawl", str(small_crawl / "crawl.jsonl"), "--output", str(tmp_path / "local")]) == 0
    assert main(["mine", "--crawl", storage.join(s3_server, "crawl", "crawl.jsonl"), "--output", str(tmp_path / "remote")]) == 0
    local = [json.loads(line) for line in (tmp_path / "local" / "clusters.jsonl").read_text().splitlines()]
    remote = [json.loads(line) for line in (tmp_path / "remote" / "clusters.jsonl").read_text().splitlines()]
    assert local and [r["keys"] for r in remote] == [r["keys"] for r in local]
    assert all(s["path"].startswith(f"{s3_server}/crawl/") for r in remote for s in r["sources"] if s), "sources name the objects, not the temporary copy"
