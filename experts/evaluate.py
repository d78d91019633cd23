"""Denoising loss of a pipeline on images and a prompt, on fixed noise and timesteps.

Used to compare an expert with its base model: the same images, prompt, noise and timesteps go
through both, so the difference is due to the weights alone.
"""

from __future__ import annotations

import torch

from suti.losses import denoising_target, encode_images, per_sample_mse


@torch.no_grad()
def denoising_loss(pipe, images: torch.Tensor, prompt: str | list[str], *, seed: int = 0, draws: int = 8, timesteps: list[int] | None = None) -> float:
    """Mean denoising MSE of ``pipe`` on ``images`` (N, 3, R, R) in [-1, 1] with ``prompt``.

    Each image is noised ``draws`` times with noise and timesteps drawn from ``seed`` (or the
    given ``timesteps``), so two pipelines evaluated with the same arguments see identical inputs.
    """
    from diffusers import DDPMScheduler

    from suti.conditioning import encode_prompt

    device = pipe.unet.device
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    generator = torch.Generator().manual_seed(seed)
    mean, std = encode_images(pipe.vae, images)
    n = len(images)
    prompts = [prompt] * n if isinstance(prompt, str) else list(prompt)
    cond = encode_prompt(pipe, prompts)  # (N, 77, D) hidden states (+ SDXL pooled embeds, time ids)
    total = []
    for d in range(draws):
        eps = torch.randn(mean.shape, generator=generator).to(device)
        latents = (mean + std * eps) * pipe.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator).to(device)
        if timesteps is None:
            t = torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=generator).to(device)
        else:
            t = torch.full((n,), timesteps[d % len(timesteps)], dtype=torch.long, device=device)
        noisy = scheduler.add_noise(latents, noise, t)
        pred = pipe.unet(noisy, t, **cond.unet_kwargs()).sample
        total.append(per_sample_mse(pred, denoising_target(scheduler, latents, noise, t)))
    return torch.cat(total).mean().item()
