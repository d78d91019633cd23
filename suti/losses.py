"""The denoising objective shared by training and evaluation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from suti.errors import ModelLoadError


def encode_images(vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (B, 3, H, W) in [-1, 1] -> latent distribution (mean, std), each (B, C, h, w)."""
    dist = vae.encode(images.to(vae.device, vae.dtype)).latent_dist
    return dist.mean, dist.std


def denoising_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """The U-Net's regression target for the scheduler's prediction type.

    ``epsilon``: the noise; ``v_prediction``: ``scheduler.get_velocity`` (Salimans & Ho 2022);
    ``sample``: the clean latents. Same shape as ``latents``.
    """
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if kind == "sample":
        return latents
    raise ModelLoadError(f"the scheduler's prediction type {kind!r} is not supported (epsilon, v_prediction or sample)")


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample: (B, ...) -> (B,)."""
    return F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=tuple(range(1, pred.ndim)))


def snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023), (B,)."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps)
    weights = torch.clamp(snr, max=gamma) / snr
    if scheduler.config.prediction_type == "v_prediction":
        weights = torch.clamp(snr, max=gamma) / (snr + 1)
    return weights
