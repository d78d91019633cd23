"""Issue 16, failures 5, 7 and 9: weight files that cannot be loaded exit 2 with one line that
names the file; LoRA with the text encoder trains, saves and loads; InputError-class conditions
(resuming a full fine-tune as LoRA) exit 2 without a traceback."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
from safetensors.torch import load_file, save_file

from conftest import exit_code
from experts import load_expert
from orchestration.cli import main
from suti.errors import ModelLoadError
from suti.weights import check_safetensors, check_weight_folder, describe_load_error


def _cli(capsys, *args) -> tuple[int, str]:
    code = main([str(a) for a in args])
    err = capsys.readouterr().err.strip()
    return code, err


def _truncate(path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.fixture(scope="module")
def lora_expert(tmp_path_factory, request):
    """A tiny LoRA expert that also trains the text encoder (3 steps)."""
    from conftest import draw_subject

    root = tmp_path_factory.mktemp("lora")
    inst = root / "inst"
    inst.mkdir()
    for i in range(3):
        draw_subject(i).save(inst / f"p{i}.png")
    out = root / "expert"
    assert main(["expert", "train", "--model", "tiny", "--instance-dir", str(inst), "--class-noun", "star toy",
                 "--output", str(out), "--lora-rank", "4", "--train-text-encoder", "--steps", "3",
                 "--no-prior-preservation"]) == 0
    return out


def test_lora_with_the_text_encoder_trains_saves_and_samples(lora_expert, tmp_path, capsys):
    weights = load_file(str(lora_expert / "pytorch_lora_weights.safetensors"))
    assert any(k.startswith("text_encoder.") and "lora" in k for k in weights)
    assert any(k.startswith("unet.") and "lora" in k for k in weights)
    info = json.loads((lora_expert / "expert.json").read_text())
    assert info["kind"] == "lora" and info["config"]["train_text_encoder"] is True
    code, err = _cli(capsys, "expert", "sample", "--expert", lora_expert, "--prompt", "a {V} {class}",
                     "--num-images", "1", "--steps", "2", "--output", tmp_path / "s")
    assert code == 0, err
    assert len(list((tmp_path / "s").glob("*.png"))) == 1


@pytest.mark.slow
def test_toy_preset_lora_trains_the_text_encoder(instance_dir, tmp_path, capsys):
    out = tmp_path / "toy"
    code, err = _cli(capsys, "expert", "train", "--model", "toy", "--instance-dir", instance_dir, "--class-noun",
                     "star toy", "--output", out, "--lora-rank", "4", "--steps", "2", "--no-prior-preservation")
    assert code == 0, err
    assert any(k.startswith("text_encoder.") for k in load_file(str(out / "pytorch_lora_weights.safetensors")))
    load_expert(out)


def test_truncated_lora_file_exits_2_with_one_line(lora_expert, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(lora_expert, copy)
    weights = copy / "pytorch_lora_weights.safetensors"
    _truncate(weights)
    code, err = _cli(capsys, "expert", "sample", "--expert", copy, "--prompt", "a {V} {class}",
                     "--num-images", "1", "--steps", "2", "--output", tmp_path / "s")
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"suti: error: {weights}: not a complete safetensors file")
    assert not (tmp_path / "s").exists()


def test_lora_for_another_base_exits_2_naming_both_bases(lora_expert, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(lora_expert, copy)
    info = json.loads((copy / "expert.json").read_text())
    info["base_model"] = "toy"
    (copy / "expert.json").write_text(json.dumps(info))
    code, err = _cli(capsys, "expert", "sample", "--expert", copy, "--prompt", "a {V} {class}",
                     "--num-images", "1", "--steps", "2", "--output", tmp_path / "s")
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "pytorch_lora_weights.safetensors: trained for base tiny, its shapes do not fit base toy" in err


def test_a_cut_weight_in_a_pipeline_folder_is_named(tmp_path, capsys):
    from suti.models import load_pipeline

    folder = tmp_path / "pipe"
    load_pipeline("tiny").save_pretrained(folder, safe_serialization=True)
    unet = next((folder / "unet").glob("*.safetensors"))
    _truncate(unet, 0.9)
    with pytest.raises(ModelLoadError, match=f"{unet}: not a complete safetensors file"):
        load_pipeline(str(folder))
    code, err = _cli(capsys, "expert", "train", "--model", folder, "--instance-dir", tmp_path, "--class-noun", "x",
                     "--output", tmp_path / "o", "--steps", "1")
    assert code == 2 and len(err.splitlines()) == 1


def test_safetensors_checks(tmp_path):
    import torch

    good = tmp_path / "good.safetensors"
    save_file({"a": torch.zeros(4, 4), "b": torch.ones(3)}, str(good))
    assert check_safetensors(good) == good
    assert check_weight_folder(tmp_path) == tmp_path
    data = good.read_bytes()
    for name, content in (("cut", data[:-5]), ("empty", b""), ("header", data[:20]),
                          ("garbage", struct.pack("<Q", 4) + b"nope")):
        bad = tmp_path / f"{name}.safetensors"
        bad.write_bytes(content)
        with pytest.raises(ModelLoadError, match=f"{bad}: not a complete safetensors file"):
            check_safetensors(bad)
    with pytest.raises(ModelLoadError, match="cut.safetensors: not a complete"):
        check_weight_folder(tmp_path)
    with pytest.raises(ModelLoadError, match="no such weight file"):
        check_safetensors(tmp_path / "missing.safetensors")


def test_shape_mismatch_is_summarised_in_one_line():
    import torch

    try:
        torch.nn.Linear(2, 3).load_state_dict({"weight": torch.zeros(4, 2), "bias": torch.zeros(4)})
    except RuntimeError as exc:
        line = describe_load_error(exc)
    assert line == "shapes do not fit the model: weight is [4, 2] in the file, [3, 2] in the model and 1 more"


def test_resuming_a_full_fine_tune_as_lora_exits_2(instance_dir, tmp_path, capsys):
    out = tmp_path / "full"
    common = ["expert", "train", "--model", "tiny", "--instance-dir", instance_dir, "--class-noun", "star toy",
              "--output", out, "--no-prior-preservation", "--checkpointing-steps", "1"]
    assert _cli(capsys, *common, "--steps", "1")[0] == 0
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    code, err = _cli(capsys, *common, "--steps", "2", "--lora-rank", "4", "--resume", "latest")
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "saved by a full fine-tune (--lora-rank 0), cannot resume as LoRA (--lora-rank 4)" in err
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # nothing written


def test_apprentice_train_entry_point_exits_2_with_one_line(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-m", "apprentice.train", "--shards", str(tmp_path / "none-*.tar"),
                          "--output", str(tmp_path / "o")], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(root)})
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("apprentice.train: error: no shards match")
    assert "Traceback" not in out.stderr


def test_world_library_value_errors_exit_2(tmp_path, capsys):
    assert main(["world", "make", "--output", str(tmp_path / "w"), "--subjects", "2", "--shard-size", "0"]) == 0
    capsys.readouterr()
    code = exit_code(["world", "export-subject", "--world", str(tmp_path / "w"), "--subject", "subject_0000",
                      "--output", str(tmp_path / "e"), "--size", "4"])
    assert code == 2 and "argument --size: must be a whole number from 16 to 4096, got 4" in capsys.readouterr().err
    from suti.errors import InputError
    from suti.world import export_subject
    from suti.world.spec import load_world

    with pytest.raises(InputError, match="image size must be >= 16 px, got 4"):  # the library checks it too
        export_subject(load_world(tmp_path / "w"), "subject_0000", tmp_path / "e", size=4)
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("option,value,message", [
    ("--self-target", "2", "suti apprentice train: error: argument --self-target: must be a finite number in [0, 1], got 2"),
    ("--num-demos", "0", "suti apprentice train: error: argument --num-demos: must be a whole number from 1 to 8, got 0"),
    ("--steps", "0", "suti apprentice train: error: argument --steps: must be a whole number from 1 to 10000000, got 0"),
    ("--nproc", "0", "suti apprentice train: error: argument --nproc: must be a whole number from 1 to 1024, got 0"),
    ("--deepspeed-config", "zero9", "suti: error: zero9: no such DeepSpeed config"),
])
def test_apprentice_train_options_exit_2_before_any_worker(tmp_path, capsys, option, value, message):
    import tarfile

    with tarfile.open(tmp_path / "shard-000000.tar", "w"):
        pass
    code = exit_code(["apprentice", "train", "--shards", str(tmp_path / "shard-*.tar"), "--output", str(tmp_path / "o"),
                      "--nproc", "2", option, value])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith(message), err
    assert not (tmp_path / "o").exists()


def test_apprentice_and_world_weights_name_a_cut_file(tmp_path, capsys):
    import torch

    from apprentice.sample import load_apprentice
    from suti.world.toy_clip import _load_from

    folder = tmp_path / "app"
    (folder / "adapter").mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    weights = folder / "adapter" / "diffusion_pytorch_model.safetensors"
    save_file({"w": torch.zeros(64, 64)}, str(weights))
    _truncate(weights)
    with pytest.raises(ModelLoadError, match=f"{weights}: not a complete safetensors file"):
        load_apprentice(str(folder), device="cpu")
    code, err = _cli(capsys, "apprentice", "sample", "--apprentice", folder, "--demos", weights, "--prompt", "x",
                     "--output", tmp_path / "o")
    assert code == 2 and len(err.splitlines()) == 1

    clip = tmp_path / "clip"
    clip.mkdir()
    (clip / "toy_clip.json").write_text('{"model_cfg": {}}')
    (clip / "toy_clip.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(ModelLoadError, match="toy_clip.safetensors: not a complete safetensors file"):
        _load_from(clip)
    (clip / "toy_clip.json").write_text("{cut")
    with pytest.raises(ModelLoadError, match="toy_clip.json: not a readable JSON file"):
        _load_from(clip)


def test_lora_whose_keys_match_no_layer_of_the_base_is_one_line(lora_expert, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(lora_expert, copy)
    weights = copy / "pytorch_lora_weights.safetensors"
    state = load_file(str(weights))
    save_file({k.replace("unet.", "unet.other_").replace("text_encoder.", "text_encoder.other_"): v
               for k, v in state.items()}, str(weights))
    with pytest.raises(ModelLoadError) as info:
        load_expert(copy)
    msg = str(info.value)
    assert msg.startswith(f"{weights}: ") and "base tiny" in msg and "\n" not in msg
