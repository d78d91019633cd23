"""DreamBooth experts on the tiny preset: training, LoRA, prior preservation, resume, bad input."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from experts import load_expert, load_pipeline, resolve_config
from experts.data import ensure_class_images, load_class_images, load_instance_images
from experts.evaluate import denoising_loss
from experts.train import train_expert
from images_util import png_bomb, truncated_jpeg
from orchestration.cli import main
from suti.errors import InputError


def run_cli(*args: str) -> int:
    return main(list(args))


def config(instance_dir, **overrides):
    base = dict(model="tiny", instance_dir=str(instance_dir), class_noun="star toy", steps=30, num_class_images=4, prior_preservation=True)
    base.update(overrides)
    return resolve_config(overrides.pop("recipe", "dreambooth"), base)


def test_cli_train_and_sample_full(instance_dir, tmp_path, capsys):
    out = tmp_path / "expert"
    code = run_cli("expert", "train", "--model", "tiny", "--instance-dir", str(instance_dir), "--class-noun", "star toy", "--output", str(out), "--prior-preservation", "--num-class-images", "4", "--steps", "30")
    assert code == 0
    info = json.loads((out / "expert.json").read_text())
    for key in ("identifier", "class_noun", "base_model", "recipe", "config", "steps", "seed"):
        assert key in info
    assert info["base_model"] == "tiny" and info["steps"] == 30 and info["kind"] == "full"
    assert info["config"]["prior_preservation"] is True and info["config"]["num_class_images"] == 4
    assert list((out / "pipeline" / "unet").glob("*.safetensors"))
    assert not list(out.rglob("*.bin")), "weights are safetensors only"

    # acceptance 4: lower denoising loss than the base on the instance images, same noise
    images = load_instance_images(instance_dir, 32)
    base = denoising_loss(load_pipeline("tiny"), images, info["instance_prompt"], seed=1)
    expert = denoising_loss(load_expert(out), images, info["instance_prompt"], seed=1)
    assert expert < 0.9 * base

    samples = tmp_path / "samples"
    assert run_cli("expert", "sample", "--expert", str(out), "--prompt", "a {V} {class} on the beach", "--num-images", "3", "--output", str(samples), "--steps", "3") == 0
    pngs = sorted(samples.glob("*.png"))
    assert len(pngs) == 3
    # existing images are not overwritten silently
    assert run_cli("expert", "sample", "--expert", str(out), "--prompt", "a {V}", "--num-images", "1", "--output", str(samples)) == 2


def test_lora_expert_loads_through_diffusers(instance_dir, tmp_path):
    out = tmp_path / "lora"
    info = train_expert(config(instance_dir, lora_rank=4, steps=40), out, progress=False)
    assert info.kind == "lora"
    weights = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert weights and all("lora" in k for k in weights)
    assert not (out / "pipeline").exists(), "a LoRA expert stores only the adapter"
    expert = load_expert(out)
    # plain diffusers loads the same file
    plain = load_pipeline("tiny")
    plain.load_lora_weights(str(out))
    images = load_instance_images(instance_dir, 32)
    base_loss = denoising_loss(load_pipeline("tiny"), images, info.instance_prompt, seed=2)
    ours = denoising_loss(expert, images, info.instance_prompt, seed=2)
    theirs = denoising_loss(plain, images, info.instance_prompt, seed=2)
    assert ours == pytest.approx(theirs, rel=1e-5)
    assert ours < base_loss


def test_prior_preservation_reduces_language_drift(instance_dir, tmp_path):
    """Loss on class images with the class prompt rises less (or falls more) with the prior term."""
    pipe = load_pipeline("tiny")
    paths = ensure_class_images(pipe, "tiny", "a star toy", 4, 32, 0, 25)
    class_images = load_class_images(paths, 32)
    before = denoising_loss(pipe, class_images, "a star toy", seed=3)
    drift = {}
    for prior in (True, False):
        out = tmp_path / f"prior-{prior}"
        train_expert(config(instance_dir, prior_preservation=prior, steps=40), out, progress=False)
        drift[prior] = denoising_loss(load_expert(out), class_images, "a star toy", seed=3) - before
    assert drift[True] < drift[False]


def test_class_images_are_cached_and_reused(suti_cache):
    pipe = load_pipeline("tiny")
    first = ensure_class_images(pipe, "tiny", "a cup", 2, 32, 7, 2)
    stamps = [p.stat().st_mtime_ns for p in first]
    again = ensure_class_images(pipe, "tiny", "a cup", 2, 32, 7, 2)
    assert again == first and [p.stat().st_mtime_ns for p in again] == stamps
    assert first[0].is_relative_to(suti_cache)
    other = ensure_class_images(pipe, "tiny", "a cup", 2, 32, 8, 2)  # another seed: another key
    assert other[0].parent != first[0].parent


def test_resume_continues_from_the_saved_step(instance_dir, tmp_path):
    """10 steps, then --resume latest to 20, equals 20 steps in one go."""
    straight = tmp_path / "straight"
    train_expert(config(instance_dir, steps=20, checkpointing_steps=10, prior_preservation=False), straight, progress=False)
    split = tmp_path / "split"
    train_expert(config(instance_dir, steps=10, checkpointing_steps=10, prior_preservation=False), split, progress=False)
    assert (split / "checkpoints" / "step-000010").is_dir()
    info = train_expert(config(instance_dir, steps=20, checkpointing_steps=10, prior_preservation=False), split, resume="latest", progress=False)
    assert info.steps == 20
    a = load_file(str(straight / "checkpoints" / "step-000020" / "trainable.safetensors"))
    b = load_file(str(split / "checkpoints" / "step-000020" / "trainable.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_progress_callback_sees_every_phase_and_can_stop_training(instance_dir, tmp_path):
    calls = []
    # a class noun no other test uses: class images are shared across experts (and tests)
    train_expert(config(instance_dir, steps=4, num_class_images=2, class_sample_steps=2, seed=11, class_noun="callback toy"), tmp_path / "a", progress=False, progress_callback=lambda *a: calls.append(a))
    phases = [c[0] for c in calls]
    assert phases == ["class_images"] * 2 + ["training"] * 4
    assert [c[1:3] for c in calls if c[0] == "training"] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert set(calls[-1][3]) == {"loss", "instance_loss", "prior_loss", "lr", "grad_norm"}

    class Stop(Exception):
        pass

    def stop_at_2(phase, done, total, metrics):
        if phase == "training" and done == 2:
            raise Stop

    with pytest.raises(Stop):
        train_expert(config(instance_dir, steps=4, prior_preservation=False), tmp_path / "b", progress=False, progress_callback=stop_at_2)
    assert not (tmp_path / "b" / "expert.json").exists()


def test_identifier_override_and_suti_recipe(instance_dir, tmp_path):
    info = train_expert(config(instance_dir, recipe="suti-expert", identifier="zwx", steps=5, prior_preservation=None), tmp_path / "e", progress=False)
    assert info.identifier == "zwx" and info.recipe == "suti-expert"
    assert info.instance_prompt == "a zwx", "the SuTI recipe uses no class noun"
    assert info.config["optimizer"] == "adafactor" and info.config["prior_preservation"] is False


def test_model_preset_sets_recipe_defaults_and_the_user_overrides_them(tmp_path, monkeypatch):
    """Recipe < the preset's ``expert_defaults[recipe]`` < command line: the toy preset trains
    the text encoder in DreamBooth (measured in benchmarks/dreambooth_identity.py), but not in
    the SuTI recipe, and ``--no-train-text-encoder`` wins."""
    common = dict(instance_dir="x", class_noun="cup")
    assert resolve_config("dreambooth", dict(common, model="toy")).train_text_encoder is True
    assert resolve_config("dreambooth", dict(common, model="toy", train_text_encoder=False)).train_text_encoder is False
    assert resolve_config("suti-expert", dict(common, model="toy")).train_text_encoder is False
    assert resolve_config("dreambooth", dict(common, model="tiny")).train_text_encoder is False
    assert resolve_config("dreambooth", dict(common, model="toy")).learning_rate_scale == 50

    # a preset with a malformed or unknown default is an error that names the preset
    configs = tmp_path / "configs"
    shutil.copytree(Path(__file__).resolve().parents[1] / "configs", configs)
    monkeypatch.setenv("SUTI_CONFIG_DIR", str(configs))
    from suti.models import _read_preset

    _read_preset.cache_clear()
    try:
        (configs / "models" / "bad.yaml").write_text("name: bad\nsource: random\nexpert_defaults: [1]\n")
        with pytest.raises(InputError, match="'bad'.*expert_defaults"):
            resolve_config("dreambooth", dict(common, model="bad"))
        (configs / "models" / "bad.yaml").write_text("name: bad\nsource: random\nexpert_defaults: {dreambooth: {stepz: 3}}\n")
        _read_preset.cache_clear()
        with pytest.raises(InputError, match="stepz"):
            resolve_config("dreambooth", dict(common, model="bad"))
    finally:
        _read_preset.cache_clear()


def test_cli_no_train_text_encoder_keeps_the_text_encoder_frozen(instance_dir, tmp_path):
    out = tmp_path / "e"
    assert run_cli("expert", "train", "--model", "tiny", "--instance-dir", str(instance_dir), "--class-noun", "star toy", "--output", str(out), "--no-prior-preservation", "--steps", "2", "--no-train-text-encoder") == 0
    assert json.loads((out / "expert.json").read_text())["config"]["train_text_encoder"] is False
    out = tmp_path / "t"
    assert run_cli("expert", "train", "--model", "tiny", "--instance-dir", str(instance_dir), "--class-noun", "star toy", "--output", str(out), "--no-prior-preservation", "--steps", "3", "--train-text-encoder") == 0
    assert json.loads((out / "expert.json").read_text())["config"]["train_text_encoder"] is True
    base, expert = load_pipeline("tiny").text_encoder, load_expert(out).text_encoder
    assert any(not torch.equal(a, b) for a, b in zip(base.state_dict().values(), expert.state_dict().values()))


def _bad_folder(instance_dir: Path, kind: str) -> Path:
    if kind == "corrupt":
        (instance_dir / "zz_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
        return instance_dir / "zz_corrupt.jpg"
    if kind == "empty":
        (instance_dir / "zz_empty.png").write_bytes(b"")
        return instance_dir / "zz_empty.png"
    if kind == "truncated":
        return truncated_jpeg(instance_dir / "zz_cut.jpg")
    if kind == "bomb":
        return png_bomb(instance_dir / "zz_bomb.png")
    if kind == "text":
        (instance_dir / "zz_note.webp").write_text("hello")
        return instance_dir / "zz_note.webp"
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["corrupt", "empty", "truncated", "bomb", "text"])
def test_bad_instance_image_exits_2_names_the_file_and_writes_nothing(instance_dir, tmp_path, capsys, kind):
    bad = _bad_folder(instance_dir, kind)
    out = tmp_path / "never"
    code = run_cli("expert", "train", "--model", "tiny", "--instance-dir", str(instance_dir), "--class-noun", "toy", "--output", str(out), "--steps", "2")
    assert code == 2
    assert bad.name in capsys.readouterr().err
    assert not out.exists()


def test_folder_with_no_images(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code = run_cli("expert", "train", "--instance-dir", str(tmp_path / "empty"), "--class-noun", "dog", "--output", str(tmp_path / "o"))
    assert code == 2 and "no images" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_non_empty_output_is_refused_and_kept(instance_dir, tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    code = run_cli("expert", "train", "--instance-dir", str(instance_dir), "--class-noun", "dog", "--output", str(out), "--steps", "2")
    assert code == 2 and "not empty" in capsys.readouterr().err
    assert (out / "precious.txt").read_text() == "keep me"


def test_cli_help_for_every_command(capsys):
    for args in (["--help"], ["expert", "--help"], ["expert", "train", "--help"], ["expert", "sample", "--help"], ["world", "--help"], ["world", "make", "--help"]):
        with pytest.raises(SystemExit) as exc:
            main(args)
        assert exc.value.code == 0
