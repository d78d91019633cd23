"""Denoising loss of an apprentice with and without demonstrations, on fixed noise."""

from __future__ import annotations

import torch
from PIL import Image

from experts.loss import per_sample_mse


@torch.no_grad()
def apprentice_loss(pipe, targets: list[Image.Image], prompts: list[str], demos: list[list[Image.Image]] | None, demo_captions: list[list[str]] | None = None, *, seed: int = 0, draws: int = 4) -> float:
    """Mean denoising MSE on ``targets`` given their prompts and (optionally) demonstrations.

    With ``demos=None`` the demonstration attention is off (the base model's prediction when
    the apprentice is untrained). The same ``seed`` gives the same noise and timesteps, so
    "with demos" and "without demos" are compared on identical inputs.
    """
    from diffusers import DDPMScheduler

    device = pipe.unet.device
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    gen = torch.Generator().manual_seed(seed)
    latents = pipe.encode_images(targets)  # (N, C, h, w)
    text = pipe.encode_text(prompts)  # (N, L, D)
    losses = []
    for i in range(len(targets)):
        ctx = None
        if demos is not None:
            ctx = pipe.encode_demonstrations(demos[i], demo_captions[i] if demo_captions else None)
        for _ in range(draws):
            noise = torch.randn(latents[i : i + 1].shape, generator=gen).to(device)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (1,), generator=gen).to(device)
            noisy = scheduler.add_noise(latents[i : i + 1], noise, t)
            pred = pipe.unet(noisy, t, text[i : i + 1], cross_attention_kwargs={"demo": ctx}).sample
            losses.append(per_sample_mse(pred, noise))
    return torch.cat(losses).mean().item()
