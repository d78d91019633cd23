"""suti.conditioning: one text-conditioning call for SD and SDXL, equal to diffusers' own."""

from __future__ import annotations

import torch

from suti.conditioning import Conditioning, encode_prompt
from suti.models import load_pipeline


def test_sdxl_conditioning_equals_diffusers_encode_prompt():
    pipe = load_pipeline("tiny-sdxl")
    prompts = ["a dog on the beach", "a cat"]
    cond = encode_prompt(pipe, prompts, resolution=32)
    embeds, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    assert torch.equal(cond.encoder_hidden_states, embeds)
    assert torch.equal(cond.added_cond_kwargs["text_embeds"], pooled)
    expected_ids = pipe._get_add_time_ids((32, 32), (0, 0), (32, 32), dtype=torch.float32, text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    assert torch.equal(cond.added_cond_kwargs["time_ids"], expected_ids.repeat(2, 1))
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    out = pipe.unet(latents, torch.tensor([500, 500]), **cond.unet_kwargs()).sample
    assert out.shape == latents.shape
    first = cond[0:1]
    assert first.encoder_hidden_states.shape[0] == 1 and first.added_cond_kwargs["time_ids"].shape == (1, 6)
    both = Conditioning.cat([first, cond[1:2]])
    assert torch.equal(both.encoder_hidden_states, cond.encoder_hidden_states)


def test_sd_conditioning_is_the_last_hidden_state():
    pipe = load_pipeline("tiny")
    cond = encode_prompt(pipe, ["a dog"])
    ids = pipe.tokenizer(["a dog"], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert cond.added_cond_kwargs is None
    assert torch.equal(cond.encoder_hidden_states, pipe.text_encoder(ids)[0])
    assert set(cond.unet_kwargs()) == {"encoder_hidden_states"}
