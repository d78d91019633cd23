"""FLUX-family presets: tiny-flux built offline, cached and loaded back through from_pretrained as
a FluxPipeline; the offline T5 tokenizer; flux-arch is FLUX.1-dev's architecture (on meta only)."""

import json

import pytest
import torch
from diffusers import FluxPipeline

from suti.errors import ModelLoadError
from suti.models import (
    FAMILIES, build_random_pipeline, default_resolution, folder_family, is_sdxl, load_pipeline, load_preset,
    pipeline_family, preset_family, preset_folder,
)


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def test_tiny_flux_round_trips_through_save_and_from_pretrained(suti_cache, tmp_path):
    folder = preset_folder("tiny-flux")
    assert folder.is_relative_to(suti_cache)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline" and folder_family(folder).name == "flux"
    assert {"transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"} <= set(index)
    assert list((folder / "transformer").glob("*.safetensors")), "weights are stored as safetensors"

    pipe = load_pipeline("tiny-flux")
    assert isinstance(pipe, FluxPipeline)
    assert pipeline_family(pipe).name == "flux" and not is_sdxl(pipe)  # its text_encoder_2 is T5, not CLIP
    assert pipe.vae.config.latent_channels == 16 and pipe.transformer.config.in_channels == 64
    assert pipe.transformer.config.joint_attention_dim == pipe.text_encoder_2.config.d_model
    assert pipe.transformer.config.pooled_projection_dim == pipe.text_encoder.config.hidden_size
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    # from_pretrained gives back exactly the seeded build
    built = build_random_pipeline(load_preset("tiny-flux"))
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        _same_weights(getattr(built, name), getattr(pipe, name))

    # a plain diffusers FLUX folder (save_pretrained) loads through the same factory
    pipe.save_pretrained(tmp_path / "flux")
    again = load_pipeline(str(tmp_path / "flux"))
    assert isinstance(again, FluxPipeline)
    _same_weights(again.transformer, pipe.transformer)
    assert again.tokenizer_2("a photo of a dog").input_ids == pipe.tokenizer_2("a photo of a dog").input_ids


def test_tiny_flux_generates_an_image():
    pipe = load_pipeline("tiny-flux")
    size = default_resolution("tiny-flux")
    assert size == 32
    out = pipe("a photo of a dog", num_inference_steps=2, height=size, width=size,
               generator=torch.Generator().manual_seed(0), output_type="np").images
    assert out.shape == (1, size, size, 3) and float(out.min()) >= 0 and float(out.max()) <= 1
    image = pipe("a photo of a dog", num_inference_steps=2, height=size, width=size,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (size, size)


def test_t5_tokenizer_is_trained_offline_and_deterministic(monkeypatch, tmp_path):
    from transformers import T5TokenizerFast

    from suti.flux_presets import train_t5_tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = train_t5_tokenizer(vocab_size=1000, model_max_length=512)
    assert isinstance(tok, T5TokenizerFast)
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)  # T5's layout
    assert 100 < len(tok) <= 1000 and tok.model_max_length == 512
    # the same pieces, ids and scores every time (the trainer alone is not bit-reproducible)
    assert tok.backend_tokenizer.to_str() == train_t5_tokenizer(vocab_size=1000).backend_tokenizer.to_str()
    text = "A sks dog, 3 cats & a Zebra-striped teapot!"
    ids = tok(text).input_ids
    assert ids[-1] == tok.eos_token_id and tok.unk_token_id not in ids  # ASCII never maps to <unk>
    assert tok.decode(ids, skip_special_tokens=True) == text
    padded = tok(text, padding="max_length", max_length=64, truncation=True)
    assert len(padded.input_ids) == 64 and padded.input_ids[-1] == tok.pad_token_id
    tok.save_pretrained(tmp_path / "t5")
    assert T5TokenizerFast.from_pretrained(tmp_path / "t5")(text).input_ids == ids


def test_flux_arch_is_flux1_dev():
    """FLUX.1-dev's transformer config, and its parameter counts on the meta device (transformer
    11.90B, 16-channel VAE 83.8M, T5-XXL encoder 4.76B); never instantiated."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    preset = load_preset("flux-arch")
    assert preset_family(preset).name == "flux" and preset["cache"] is False
    assert preset["transformer"] == {
        "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38,
        "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
        "pooled_projection_dim": 768, "guidance_embeds": True, "axes_dims_rope": [16, 56, 56],
    }
    assert default_resolution("flux-arch") == 1024
    with torch.device("meta"):  # not accelerate.init_empty_weights: it unties T5's embeddings
        transformer = FluxTransformer2DModel(**preset["transformer"])
        vae = AutoencoderKL(**preset["vae"])
        t5 = T5EncoderModel(T5Config(**preset["text_encoder_2"]))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(transformer) == 11_901_408_320 and abs(count(transformer) - 11.9e9) < 0.01e9
    assert count(vae) == 83_819_683
    assert count(t5) == 4_762_310_656


def test_families_are_one_table(tmp_path):
    assert set(FAMILIES) == {"sd", "sdxl", "flux"}
    assert preset_family(load_preset("tiny")).name == "sd"
    assert preset_family(load_preset("tiny-sdxl")).name == "sdxl"  # by text_encoder_2, no family key
    assert preset_family(load_preset("tiny-flux")).name == "flux"  # has text_encoder_2 too: the key decides
    for cls, family in [("StableDiffusionPipeline", "sd"), ("StableDiffusionXLPipeline", "sdxl"),
                        ("FluxPipeline", "flux"), ("SomethingElse", "sd")]:
        (tmp_path / cls).mkdir()
        (tmp_path / cls / "model_index.json").write_text(json.dumps({"_class_name": cls}))
        assert folder_family(tmp_path / cls).name == family
    my_flux = type("MyFlux", (FluxPipeline,), {})  # a subclass is of its base's family
    assert pipeline_family(object.__new__(my_flux)).name == "flux"
    with pytest.raises(ModelLoadError, match="unknown family"):
        preset_family({"name": "x", "family": "dalle"})


def test_inconsistent_flux_configs_are_refused_before_building():
    from suti.flux_presets import build_flux_pipeline

    preset = load_preset("tiny-flux")
    preset["transformer"] = dict(preset["transformer"], joint_attention_dim=48)
    with pytest.raises(ModelLoadError, match="joint_attention_dim == text_encoder_2.d_model"):
        build_flux_pipeline(preset)
