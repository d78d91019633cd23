"""The model factory: presets built offline, cached and loaded back through from_pretrained."""

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline

from suti.errors import ModelLoadError
from suti.models import list_presets, load_pipeline, load_preset, preset_folder


def test_tiny_is_saved_and_loaded_through_from_pretrained(suti_cache):
    pipe = load_pipeline("tiny")
    assert isinstance(pipe, StableDiffusionPipeline)
    folder = preset_folder("tiny")
    assert folder.is_relative_to(suti_cache)
    index = json.loads((folder / "model_index.json").read_text())
    assert {"unet", "vae", "text_encoder", "tokenizer", "scheduler"} <= set(index)
    assert list((folder / "unet").glob("*.safetensors")), "weights are stored as safetensors"
    assert pipe.unet.config._name_or_path == str(folder / "unet") or str(folder) in str(pipe.unet.config._name_or_path)
    # a second load gives the same weights (built once, seeded)
    again = load_pipeline("tiny")
    for (n, a), (_, b) in zip(pipe.unet.state_dict().items(), again.unet.state_dict().items()):
        assert torch.equal(a, b), n


def test_tiny_generates_an_image():
    pipe = load_pipeline("tiny")
    image = pipe("a dog", height=32, width=32, num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)


def test_sd15_arch_is_the_stable_diffusion_15_architecture():
    """Parameter counts of SD 1.5 (U-Net 859.5M, VAE 83.7M, CLIP ViT-L/14 text 123.1M), on meta."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    preset = load_preset("sd15-arch")
    with torch.device("meta"):
        unet = UNet2DConditionModel(**preset["unet"])
        vae = AutoencoderKL(**preset["vae"])
        text = CLIPTextModel(CLIPTextConfig(**preset["text_encoder"]))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(unet) == 859_520_964
    assert count(vae) == 83_653_863
    assert count(text) == 123_060_480


def test_presets_are_data():
    assert {"tiny", "sd15-arch"} <= set(list_presets())


def test_fingerprint_follows_weights_not_training_advice():
    """Editing how a preset is fine-tuned (learning-rate scale, expert defaults) keeps its cached
    pipeline; editing its architecture or weight source rebuilds it."""
    from suti.models import preset_fingerprint

    toy = load_preset("toy")
    same = dict(toy, learning_rate_scale=7, expert_defaults={"dreambooth": {"steps": 3}}, description="x")
    assert preset_fingerprint(same) == preset_fingerprint(toy)
    assert preset_fingerprint(dict(toy, weights_version=toy["weights_version"] + 1)) != preset_fingerprint(toy)
    tiny = load_preset("tiny")
    assert preset_fingerprint(dict(tiny, unet=dict(tiny["unet"], layers_per_block=2))) != preset_fingerprint(tiny)


def test_unknown_model_offline_gives_one_clear_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as err:
        load_pipeline("stable-diffusion-v1-5/stable-diffusion-v1-5")
    text = str(err.value)
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in text and "--model DIR" in text


def test_local_folder_without_model_index(tmp_path):
    with pytest.raises(ModelLoadError, match="model_index.json"):
        load_pipeline(str(tmp_path))


def test_local_folder_loads(tmp_path):
    load_pipeline("tiny").save_pretrained(tmp_path / "copy")
    pipe = load_pipeline(str(tmp_path / "copy"))
    assert isinstance(pipe, StableDiffusionPipeline)


def test_tiny_sdxl_round_trips_as_an_sdxl_pipeline(suti_cache, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from suti.models import is_sdxl

    folder = preset_folder("tiny-sdxl")
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    assert (folder / "text_encoder_2").is_dir() and (folder / "tokenizer_2").is_dir()
    pipe = load_pipeline("tiny-sdxl")
    assert isinstance(pipe, StableDiffusionXLPipeline) and is_sdxl(pipe)
    assert pipe.unet.config.addition_embed_type == "text_time"
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    image = pipe("a dog", num_inference_steps=2, height=32, width=32, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)
    # a plain diffusers SDXL folder (save_pretrained) loads through the same factory
    pipe.save_pretrained(tmp_path / "sdxl")
    again = load_pipeline(str(tmp_path / "sdxl"))
    assert isinstance(again, StableDiffusionXLPipeline)
    assert torch.equal(again.unet.conv_in.weight, pipe.unet.conv_in.weight)
    assert not is_sdxl(load_pipeline("tiny"))


def test_sdxl_arch_is_the_sdxl_base_architecture():
    import yaml
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from suti.models import config_dir

    preset = yaml.safe_load((config_dir() / "models" / "sdxl-arch.yaml").read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel(**preset["unet"])
        text_2 = CLIPTextModelWithProjection(CLIPTextConfig(**preset["text_encoder_2"]))
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684  # SDXL base 1.0 U-Net
    assert sum(p.numel() for p in text_2.parameters()) == 694_659_840  # OpenCLIP ViT-bigG/14 text tower
