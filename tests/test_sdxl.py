"""SDXL (tiny-sdxl): DreamBooth experts, full and LoRA, through the same factory and CLI."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from experts import load_expert, load_pipeline, resolve_config
from experts.data import load_instance_images
from experts.evaluate import denoising_loss
from experts.train import train_expert
from orchestration.cli import main


def sdxl_config(instance_dir, **overrides):
    base = dict(model="tiny-sdxl", instance_dir=str(instance_dir), class_noun="star toy", steps=30, num_class_images=2, prior_preservation=True)
    base.update(overrides)
    return resolve_config("dreambooth", base)


def test_sdxl_lora_expert_with_both_text_encoders_loads_in_plain_diffusers(instance_dir, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from suti.models import preset_folder

    out = tmp_path / "lora"
    info = train_expert(sdxl_config(instance_dir, lora_rank=4, steps=40, train_text_encoder=True), out, progress=False)
    assert info.kind == "lora" and info.base_model == "tiny-sdxl"
    keys = load_file(str(out / "pytorch_lora_weights.safetensors")).keys()
    assert {k.split(".")[0] for k in keys} == {"unet", "text_encoder", "text_encoder_2"}
    plain = StableDiffusionXLPipeline.from_pretrained(str(preset_folder("tiny-sdxl")))
    plain.load_lora_weights(str(out), weight_name="pytorch_lora_weights.safetensors")
    images = load_instance_images(instance_dir, 32)
    base_loss = denoising_loss(load_pipeline("tiny-sdxl"), images, info.instance_prompt, seed=2)
    ours = denoising_loss(load_expert(out), images, info.instance_prompt, seed=2)
    theirs = denoising_loss(plain, images, info.instance_prompt, seed=2)
    assert ours == pytest.approx(theirs, rel=1e-5)
    assert ours < base_loss


def test_sdxl_full_expert_trains_and_samples_from_the_cli(instance_dir, tmp_path):
    out = tmp_path / "full"
    code = main(["expert", "train", "--model", "tiny-sdxl", "--instance-dir", str(instance_dir), "--class-noun", "star toy", "--output", str(out), "--no-prior-preservation", "--steps", "30"])
    assert code == 0
    info = json.loads((out / "expert.json").read_text())
    assert info["kind"] == "full" and json.loads((out / "pipeline" / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    images = load_instance_images(instance_dir, 32)
    base = denoising_loss(load_pipeline("tiny-sdxl"), images, info["instance_prompt"], seed=1)
    expert = denoising_loss(load_expert(out), images, info["instance_prompt"], seed=1)
    assert expert < 0.9 * base
    samples = tmp_path / "samples"
    assert main(["expert", "sample", "--expert", str(out), "--prompt", "a {V} {class} on the beach", "--num-images", "2", "--output", str(samples), "--steps", "3"]) == 0
    assert len(list(samples.glob("*.png"))) == 2


def _demos(n: int):
    from PIL import Image

    return [Image.new("RGB", (32, 32), (40 * i, 200 - 20 * i, 90)) for i in range(n)]


def test_untrained_sdxl_apprentice_equals_the_sdxl_base():
    import torch

    from apprentice import ApprenticePipeline

    base = load_pipeline("tiny-sdxl")
    ref = base("a red cup", negative_prompt="", height=32, width=32, num_inference_steps=4, guidance_scale=5.0, generator=torch.Generator().manual_seed(0), output_type="pt").images
    app = ApprenticePipeline.from_base(load_pipeline("tiny-sdxl"))
    app.set_progress_bar_config(disable=True)
    assert app.text_encoder_2 is not None and app.tokenizer_2 is not None
    out = app("a red cup", demo_images=_demos(3), num_inference_steps=4, guidance_scale=5.0, demo_guidance_scale=3.0, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert torch.equal(out, ref)


def test_sdxl_apprentice_trains_with_deepspeed_and_samples_from_the_cli(tmp_path):
    from apprentice import ApprenticePipeline
    from apprentice.train import ApprenticeTrainConfig, train_apprentice
    from shard_util import world_shards

    shards = world_shards(tmp_path / "sh", num_subjects=2, per_subject=2)
    config = ApprenticeTrainConfig(shards=str(shards / "*.tar"), output=str(tmp_path / "app"), model="tiny-sdxl", steps=3, batch_size=2, learning_rate=2e-3, save_steps=3, freeze_base=True)
    out = train_apprentice(config, progress=False)
    pipe = ApprenticePipeline.from_pretrained(str(out))
    assert pipe.text_encoder_2 is not None, "the SDXL components round-trip through save_pretrained"
    moved = [p for n, p in pipe.adapter.named_parameters() if n.endswith("to_out.weight") and p.abs().sum() > 0]
    assert moved, "a DeepSpeed step changed the zero-initialised demo layers"
    demos = tmp_path / "demos"
    demos.mkdir()
    for i, img in enumerate(_demos(3)):
        img.save(demos / f"d{i}.png")
    code = main(["apprentice", "sample", "--apprentice", str(out), "--demos", *map(str, sorted(demos.glob("*.png"))), "--prompt", "a cup in the snow", "--num-images", "2", "--output", str(tmp_path / "samples"), "--steps", "3"])
    assert code == 0 and len(list((tmp_path / "samples").glob("*.png"))) == 2


def test_serving_generates_with_an_sdxl_apprentice(tmp_path):
    import io

    from fastapi.testclient import TestClient
    from PIL import Image

    from apprentice import ApprenticePipeline
    from serving import Settings, create_app

    folder = tmp_path / "sdxl-apprentice"
    ApprenticePipeline.from_base(load_pipeline("tiny-sdxl")).save_pretrained(str(folder), safe_serialization=True)
    settings = Settings(model="tiny-sdxl", apprentice=str(folder), data_dir=tmp_path / "data", torch_threads=1, preload=False, default_steps=2)
    buf = io.BytesIO()
    _demos(1)[0].save(buf, format="PNG")
    with TestClient(create_app(settings)) as client:
        r = client.post("/v1/generate", files=[("images", (f"d{i}.png", buf.getvalue(), "image/png")) for i in range(3)], data={"prompt": "a cup on the beach", "seed": 1, "steps": 2})
    assert r.status_code == 200, r.text
    assert Image.open(io.BytesIO(r.content)).size == (32, 32)
