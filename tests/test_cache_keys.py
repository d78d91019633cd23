"""Every cache is keyed on everything that made it (issue 31, D2): ``suti eval``'s results folder,
the fixed evaluation's work folder, the class images of prior preservation and the local copy of
a model on object storage are reused only for the very settings (and contents) that made them."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import pytest
import torch

from conftest import draw_subject, exit_code
from orchestration.cli import main

PROMPTS = """Classes

subject_name,class
star,toy

Prompts

Object Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a {0} {1} in the snow'.format(unique_token, class_token)
]

Live Subject Prompts

prompt_list = [
'a {0} {1} wearing a red hat'.format(unique_token, class_token)
]
"""


def make_bench(root: Path) -> Path:
    """One subject (star, 2 object prompts, 3 photos)."""
    (root / "star").mkdir(parents=True)
    (root / "prompts_and_classes.txt").write_text(PROMPTS)
    for i in range(3):
        draw_subject(i).save(root / "star" / f"{i:02d}.jpg")
    return root


def _eval(root, out, method, *extra):
    args = ["eval", "--dataset", str(root), "--method", method, *(["--model", "tiny"] if method in ("base", "expert") else []), "--output", str(out), "--clip", "toy-clip",
            "--dino", "toy-identity", "--images-per-prompt", "1", "--sample-steps", "2", *extra]
    if "--prompts" not in extra:
        args += ["--prompts", "1"]
    return exit_code(args)


def _tree(folder: Path) -> dict:
    """Every file under ``folder`` with its modification time and size."""
    return {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*") if p.is_file()}


def _refused(capsys, *words) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for word in words:
        assert word in err, err
    return err


# ----------------------------------------------------------------- suti eval


def test_eval_refuses_another_methods_or_samplers_images_naming_the_settings(tmp_path, capsys):
    root, out = make_bench(tmp_path / "bench"), tmp_path / "out"
    assert _eval(root, out, "base") == 0
    capsys.readouterr()
    before = _tree(out)
    assert _eval(root, out, "apprentice") == 2  # was: the apprentice's table scored on the base's images
    _refused(capsys, "--method base there, apprentice now", str(out))
    assert _tree(out) == before, "a refused run writes nothing"
    assert _eval(root, out, "base", "--sample-steps", "3", "--dtype", "bf16") == 2
    _refused(capsys, "--sample-steps 2 there, 3 now", "--dtype float32 there, bfloat16 now")
    assert _eval(root, out, "base", "--guidance-scale", "2", "--seed", "1") == 2
    _refused(capsys, "--guidance-scale", "--seed 0 there, 1 now")
    assert _tree(out) == before
    # what only chooses which images are made (or how they are scored) may change: they are reused
    assert _eval(root, out, "base", "--prompts", "2", "--images-per-prompt", "2", "--sample-batch-size", "1") == 0
    assert "generated 3 new images" in capsys.readouterr().out
    assert all(before[p] == (p.stat().st_mtime_ns, p.stat().st_size) for p in before if "images" in p.parts)


def test_eval_prompts_must_be_positive_and_settings_record_the_resolved_values(tmp_path, capsys):
    root = make_bench(tmp_path / "bench")
    assert _eval(root, tmp_path / "zero", "base", "--prompts", "0") == 2  # was: all prompts, settings saying 0
    _refused(capsys, "--prompts: must be a whole number from 1 to 10000, got 0")
    assert not (tmp_path / "zero").exists()
    assert main(["eval", "--dataset", str(root), "--method", "base", "--model", "tiny", "--output", str(tmp_path / "all"), "--clip", "toy-clip",
                 "--dino", "toy-identity", "--images-per-prompt", "1", "--sample-steps", "2"]) == 0
    settings = json.loads((tmp_path / "all" / "settings.json").read_text())
    assert settings["prompts"] == 2 and settings["dtype"] == "float32"  # the number used, the dtype sampled in
    key = settings["images_key"]
    assert key["method"] == "base" and key["model"].startswith("preset:tiny:") and key["subjects"]["star"]["class"] == "toy"


def test_eval_expert_images_and_experts_are_keyed_on_the_expert_settings_and_photos(tmp_path, capsys):
    root, out = make_bench(tmp_path / "bench"), tmp_path / "out"
    expert = ("--expert-steps", "1", "--num-class-images", "1")
    assert _eval(root, out, "expert", *expert) == 0
    assert (out / "experts" / "star" / "expert.json").is_file()
    capsys.readouterr()
    before = _tree(out)
    assert _eval(root, out, "expert", "--expert-steps", "2", "--num-class-images", "1") == 2  # was: the 1-step expert and its images reused
    _refused(capsys, "--expert-steps 1 there, 2 now")
    draw_subject(7).save(root / "star" / "01.jpg")  # another photo of the subject
    assert _eval(root, out, "expert", *expert) == 2
    _refused(capsys, "--dataset subject star photos")
    assert _tree(out) == before


def test_eval_world_dataset_is_keyed_on_its_spec(tmp_path, capsys):
    out = tmp_path / "world"
    world = ("--method", "real", "--output", str(out), "--clip", "toy-clip", "--dino", "toy-identity")
    assert main(["eval", "--dataset", "world:1", *world]) == 0
    capsys.readouterr()
    assert main(["eval", "--dataset", "world:2", *world]) == 2  # was: the 1-subject dataset silently reused
    _refused(capsys, "--dataset world:1 there, world:2 now")
    assert len(json.loads((out / "dataset" / "world_subjects.json").read_text())) == 1


# ----------------------------------------------------------------- the fixed evaluation


def test_fixed_eval_base_images_are_keyed_on_the_base_pipelines_precision(tmp_path):
    from orchestration.fixed_eval import FixedEvalConfig, run_fixed_eval
    from suti.models import load_pipeline

    config = FixedEvalConfig(num_subjects=1, seeds=1, model="tiny", sample_steps=2, methods=("base",))
    fp32 = load_pipeline("tiny")
    assert run_fixed_eval(None, fp32, tmp_path, config, progress=lambda line: None)["stats"]["base"] == {"generated": 4}
    bf16 = load_pipeline("tiny", torch_dtype=torch.bfloat16)
    assert run_fixed_eval(None, bf16, tmp_path, config, progress=lambda line: None)["stats"]["base"] == {"generated": 4}  # was: cached
    assert run_fixed_eval(None, fp32, tmp_path, config, progress=lambda line: None)["stats"]["base"] == {"cached": 4}


def test_fixed_eval_expert_key_covers_the_recipe_files_content(tmp_path, monkeypatch):
    from orchestration.fixed_eval import FixedEvalConfig, expert_key
    from suti.models import config_dir

    config = FixedEvalConfig(model="tiny", expert_steps=2, num_class_images=1)
    before = expert_key(config)
    shutil.copytree(config_dir(), tmp_path / "configs")
    recipe = tmp_path / "configs" / "recipes" / "dreambooth.yaml"
    recipe.write_text(recipe.read_text() + "\nprior_loss_weight: 0.25\n")
    monkeypatch.setenv("SUTI_CONFIG_DIR", str(tmp_path / "configs"))
    assert expert_key(config) != before  # was: keyed on the recipe's name only
    assert expert_key(config)["config"]["prior_loss_weight"] == 0.25


# ----------------------------------------------------------------- class images


def test_class_images_are_keyed_on_the_pipelines_precision():
    from experts.data import class_images_folder, ensure_class_images
    from suti.models import load_pipeline

    calls = []
    fp32, bf16 = load_pipeline("tiny"), load_pipeline("tiny", torch_dtype=torch.bfloat16)
    real = fp32.__class__.__call__
    fp32.__class__.__call__ = lambda self, prompt, **kw: calls.append(self.dtype) or real(self, prompt, **kw)
    try:
        first = ensure_class_images(fp32, "tiny", "a keyed cup", 1, 32, 0, 2)
        assert first[0].parent == class_images_folder("tiny", "a keyed cup", 32, 0, 2) and calls == [torch.float32]
        second = ensure_class_images(bf16, "tiny", "a keyed cup", 1, 32, 0, 2)
        assert calls == [torch.float32, torch.bfloat16], "was: the float32 images reused for a bfloat16 pipeline"
        assert second[0].parent != first[0].parent
        assert ensure_class_images(fp32, "tiny", "a keyed cup", 1, 32, 0, 2) == first and len(calls) == 2
    finally:
        fp32.__class__.__call__ = real


def test_class_images_of_a_local_model_are_keyed_on_all_of_its_files(tmp_path):
    from experts.data import class_images_folder
    from suti.models import preset_folder

    model = tmp_path / "model"
    shutil.copytree(preset_folder("tiny"), model)
    before = class_images_folder(str(model), "a cup", 32, 0, 2)
    weights = next((model / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes())  # retrained in place: model_index.json untouched
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert class_images_folder(str(model), "a cup", 32, 0, 2) != before  # was: keyed on model_index.json's time only


# ----------------------------------------------------------------- a model on object storage


@pytest.fixture()
def memory_folder():
    """A folder on fsspec's memory filesystem (whose ``info`` has no ETag or mtime)."""
    import fsspec

    fs = fsspec.filesystem("memory")
    path = f"/suti-{uuid.uuid4().hex[:8]}/model"
    fs.pipe_file(f"{path}/weights.bin", b"one")
    yield fs, path
    fs.rm(path.rsplit("/", 1)[0], recursive=True)


def test_cached_copy_of_a_model_is_fetched_again_when_an_object_changes_at_the_same_size(memory_folder, tmp_path):
    from experts.data import model_fingerprint
    from suti import storage

    fs, path = memory_folder
    uri = f"memory://{path}"
    first, stamp = storage.cached_copy(uri, tmp_path / "cache"), model_fingerprint(uri)
    assert (first / "weights.bin").read_bytes() == b"one"
    fs.pipe_file(f"{path}/weights.bin", b"two")  # same size, no ETag
    second = storage.cached_copy(uri, tmp_path / "cache")
    assert (second / "weights.bin").read_bytes() == b"two", "was: the stale copy served"
    assert model_fingerprint(uri) != stamp


def test_fingerprint_hashes_the_bytes_where_the_filesystem_reports_no_stamp(memory_folder, monkeypatch):
    from suti import storage

    fs, path = memory_folder
    info = fs.info
    monkeypatch.setattr(type(fs), "info", lambda self, p, **kw: {k: v for k, v in info(p, **kw).items() if k != "created"})
    first = storage.fingerprint(f"memory://{path}/weights.bin")
    fs.pipe_file(f"{path}/weights.bin", b"owt")
    assert storage.fingerprint(f"memory://{path}/weights.bin") != first


def test_a_hub_model_recorded_before_its_download_matches_the_snapshot_it_then_got():
    from suti.fingerprint import differences

    assert differences({"model": "hub:org/model"}, {"model": "hub:org/model@abc123"}) == []
    assert differences({"model": "hub:org/model@abc123"}, {"model": "hub:org/model@def456"}) != [], "another snapshot is another model"
    assert differences({"model": "hub:org/model"}, {"model": "hub:org/other@abc123"}) != []
