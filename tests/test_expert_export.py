"""``suti expert export``: a LoRA expert as a kohya-layout (or diffusers-layout) .safetensors file.

The check is code nobody here wrote: plain diffusers, ``from_pretrained`` on the preset's folder
and ``load_lora_weights`` on the exported file, draws the same image as the expert loaded through
suti for the same seed. Also: kohya-like keys and metadata, export -> import round trip, SDXL,
and bad input exits 2 with one line and writes nothing.
"""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from conftest import exit_code
from experts import load_expert, resolve_config
from experts.train import train_expert
from suti.models import preset_folder

STEPS = 2


def _train(instance_dir, out, model="tiny", **overrides):
    settings = dict(model=model, instance_dir=str(instance_dir), class_noun="star toy", steps=4, prior_preservation=False, lora_rank=4, train_text_encoder=True, identifier="sks")
    settings.update(overrides)
    return train_expert(resolve_config("dreambooth", settings), out, progress=False)


@pytest.fixture(scope="module")
def experts_dir(tmp_path_factory):
    """One tiny LoRA expert (U-Net and text encoder, alpha 8 at rank 4), trained once."""
    from conftest import draw_subject

    root = tmp_path_factory.mktemp("export")
    photos = root / "photos"
    photos.mkdir()
    for i in range(4):
        draw_subject(i).save(photos / f"photo_{i}.png")
    torch.manual_seed(0)
    _train(photos, root / "expert", lora_alpha=8.0)
    return root


def _image(pipe, prompt, seed=3):
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(seed), output_type="np", height=32, width=32)
    return out.images[0]


def _keys_and_metadata(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_kohya_export_loads_in_plain_diffusers_and_draws_the_experts_image(experts_dir, tmp_path, capsys):
    from diffusers import StableDiffusionPipeline

    expert = experts_dir / "expert"
    out = tmp_path / "sks_kohya.safetensors"
    assert exit_code(["expert", "export", "--expert", str(expert), "--format", "kohya", "--output", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["format"] == "kohya" and summary["rank"] == 4 and summary["alpha"] == 8 and summary["text_encoder"]

    tensors, meta = _keys_and_metadata(out)
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in tensors), sorted(tensors)[:5]
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in tensors)
    downs = [k for k in tensors if k.endswith(".lora_down.weight")]
    assert any(k.startswith("lora_te_text_model_encoder_layers_") for k in downs)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in tensors or \
        any(k.startswith("lora_unet_") and "_attn1_to_q.lora_down" in k for k in downs)
    for k in downs:
        name = k.removesuffix(".lora_down.weight")
        assert f"{name}.lora_up.weight" in tensors and float(tensors[f"{name}.alpha"]) == 8.0
        assert tensors[k].shape[0] == 4
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "8"
    assert meta["suti_identifier"] == "sks" and meta["suti_class_noun"] == "star toy" and meta["ss_network_module"] == "networks.lora"

    ours = load_expert(expert)
    plain = StableDiffusionPipeline.from_pretrained(str(preset_folder("tiny")), safety_checker=None, requires_safety_checker=False)
    plain.load_lora_weights(str(tmp_path), weight_name=out.name)
    base = StableDiffusionPipeline.from_pretrained(str(preset_folder("tiny")), safety_checker=None, requires_safety_checker=False)
    prompt = "a sks star toy"
    a, b, c = _image(ours, prompt), _image(plain, prompt), _image(base, prompt)
    np.testing.assert_allclose(a, b, atol=1e-4)
    assert np.abs(a - c).max() > 1e-3, "the LoRA changes the image"


def test_diffusers_export_and_round_trip_through_import(experts_dir, tmp_path, capsys):
    expert = experts_dir / "expert"
    prompt = "a sks star toy"
    reference = _image(load_expert(expert), prompt)
    for fmt in ("kohya", "diffusers"):
        out = tmp_path / f"{fmt}.safetensors"
        assert exit_code(["expert", "export", "--expert", str(expert), "--format", fmt, "--output", str(out)]) == 0
        back = tmp_path / f"imported-{fmt}"
        assert exit_code(["expert", "import", "--lora", str(out), "--identifier", "sks", "--class-noun", "star toy", "--model", "tiny", "--output", str(back)]) == 0
        np.testing.assert_allclose(_image(load_expert(back), prompt), reference, atol=1e-4)
    tensors, meta = _keys_and_metadata(tmp_path / "diffusers.safetensors")
    assert all(k.startswith(("unet.", "text_encoder.")) for k in tensors) and "lora_adapter_metadata" in meta
    # the imported kohya file exports again, key for key
    again = tmp_path / "again.safetensors"
    assert exit_code(["expert", "export", "--expert", str(tmp_path / "imported-kohya"), "--output", str(again)]) == 0
    first, _ = _keys_and_metadata(tmp_path / "kohya.safetensors")
    second, _ = _keys_and_metadata(again)
    assert set(first) == set(second) and all(torch.equal(first[k], second[k]) for k in first)


def test_import_refuses_an_empty_or_foreign_kohya_file(tmp_path, capsys):
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"lora_unet_nowhere_block_to_q.lora_down.weight": torch.ones(2, 8), "lora_unet_nowhere_block_to_q.lora_up.weight": torch.ones(8, 2),
               "lora_unet_nowhere_block_to_q.alpha": torch.tensor(2.0)}, str(foreign))
    empty = tmp_path / "empty.safetensors"
    save_file({}, str(empty))
    for lora in (foreign, empty):
        code = exit_code(["expert", "import", "--lora", str(lora), "--identifier", "sks", "--class-noun", "dog", "--model", "tiny", "--output", str(tmp_path / "out")])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and lora.name in err[0], err
        assert not (tmp_path / "out").exists()


def test_sdxl_kohya_export_loads_in_plain_sdxl_pipeline(tmp_path, instance_dir, capsys):
    from diffusers import StableDiffusionXLPipeline

    expert = tmp_path / "xl"
    torch.manual_seed(0)
    _train(instance_dir, expert, model="tiny-sdxl", steps=2)
    out = tmp_path / "xl.safetensors"
    assert exit_code(["expert", "export", "--expert", str(expert), "--output", str(out)]) == 0
    tensors, meta = _keys_and_metadata(out)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    prefixes = {k.split("_text_model")[0] if k.startswith("lora_te") else "lora_unet" for k in tensors}
    assert prefixes == {"lora_unet", "lora_te1", "lora_te2"}, prefixes
    plain = StableDiffusionXLPipeline.from_pretrained(str(preset_folder("tiny-sdxl")))
    plain.load_lora_weights(str(tmp_path), weight_name=out.name)
    prompt = "a sks star toy"
    reference = _image(load_expert(expert), prompt)
    np.testing.assert_allclose(_image(plain, prompt), reference, atol=1e-4)
    # imported back, the kohya file is the same expert (issue 34, acceptance 1, on SDXL)
    back = tmp_path / "imported"
    assert exit_code(["expert", "import", "--lora", str(out), "--identifier", "sks", "--class-noun", "star toy", "--model", "tiny-sdxl", "--output", str(back)]) == 0
    np.testing.assert_allclose(_image(load_expert(back), prompt), reference, atol=1e-4)


def test_bad_input_exits_2_with_one_line_and_writes_nothing(experts_dir, tmp_path, instance_dir, capsys):
    expert = experts_dir / "expert"
    full = tmp_path / "full"
    _train(instance_dir, full, lora_rank=0, train_text_encoder=False, steps=1)
    exists = tmp_path / "exists.safetensors"
    exists.write_bytes(b"keep")
    cases = [
        (["--expert", str(tmp_path / "missing"), "--output", str(tmp_path / "a.safetensors")], "missing"),
        (["--expert", str(expert), "--output", str(exists)], "exists"),
        (["--expert", str(expert), "--format", "onnx", "--output", str(tmp_path / "b.safetensors")], "--format"),
        (["--expert", str(full), "--output", str(tmp_path / "c.safetensors")], "full fine-tune"),
        (["--expert", str(expert), "--output", str(tmp_path / "d.bin")], ".safetensors"),
    ]
    for argv, said in cases:
        assert exit_code(["expert", "export", *argv]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and said in err[0], (argv, err)
    assert exists.read_bytes() == b"keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["exists.safetensors", "full", "instance"])
