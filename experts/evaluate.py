"""Denoising loss of a pipeline on images and a prompt, on fixed noise and timesteps.

Used to compare an expert with its base model: the same images, prompt, noise and timesteps go
through both, so the difference is due to the weights alone.
"""

from __future__ import annotations

import torch

from suti.losses import encode_images, per_sample_mse


@torch.no_grad()
def denoising_loss(pipe, images: torch.Tensor, prompt: str | list[str], *, seed: int = 0, draws: int = 8, timesteps: list[int] | None = None) -> float:
    """Mean denoising MSE of ``pipe`` on ``images`` (N, 3, R, R) in [-1, 1] with ``prompt``, under
    the objective that trains it (:func:`suti.objectives.training_objective`: epsilon/v for SD
    and SDXL, flow matching for FLUX) and its denoiser (:func:`suti.denoisers.denoiser_for`).

    Each image is noised ``draws`` times with noise and timesteps drawn from ``seed`` (or at the
    given schedule indices ``timesteps``: the timestep itself for DDPM-type schedules), so two
    pipelines evaluated with the same arguments see identical inputs.
    """
    from suti.conditioning import encode_prompt
    from suti.denoisers import denoiser_for, latents_from_vae
    from suti.objectives import training_objective

    denoiser = denoiser_for(pipe)
    device = denoiser.module.device
    objective = training_objective(pipe.scheduler)
    generator = torch.Generator().manual_seed(seed)
    mean, std = encode_images(pipe.vae, images)
    n = len(images)
    prompts = [prompt] * n if isinstance(prompt, str) else list(prompt)
    cond = encode_prompt(pipe, prompts)  # SD: hidden states; SDXL: + pooled embeds, time ids; FLUX: T5 states + CLIP pooled
    total = []
    for d in range(draws):
        latents = latents_from_vae(mean, std, pipe.vae.config, generator)
        noise = torch.randn(latents.shape, generator=generator).to(device)
        if timesteps is None:
            t = objective.draw_timesteps(n, generator).to(device)
        else:
            t = objective.timesteps_at(torch.full((n,), timesteps[d % len(timesteps)], dtype=torch.long)).to(device)
        noisy = objective.add_noise(latents, noise, t)
        pred = denoiser(noisy, t, cond)
        total.append(per_sample_mse(pred, objective.target(latents, noise, t)))
    return torch.cat(total).mean().item()
