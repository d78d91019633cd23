"""The denoising network of each pipeline family behind one call, in the VAE's latent layout:
``denoiser(noisy (B, C, h, w), timesteps (B,), cond) -> prediction (B, C, h, w)``, where ``cond``
is the :class:`suti.conditioning.Conditioning` that :func:`suti.conditioning.encode_prompt` gives
for the same pipeline.

- :class:`UNetDenoiser` (SD 1.x/2.x, SDXL): ``unet(noisy, t, encoder_hidden_states,
  added_cond_kwargs).sample``.
- :class:`FluxDenoiser` (FLUX.1): as diffusers' ``FluxPipeline`` and
  ``train_dreambooth_lora_flux.py`` call ``FluxTransformer2DModel``: the latents packed into 2x2
  patches ``(B, h/2 * w/2, 4C)`` (``FluxPipeline._pack_latents``) with position ids
  ``(0, row, col)`` (``_prepare_latent_image_ids``), text ids all zero, the timestep divided by
  1000, the guidance scale as an embedding on guidance-distilled bases (``guidance_embeds``), and
  the output unpacked back.

:func:`denoiser_for` picks the class by the pipeline's family (:data:`suti.models.FAMILIES`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class UNetDenoiser:
    """A ``UNet2DConditionModel`` (``module``: ``pipe.unet``)."""

    module: Any
    attribute = "unet"  # the pipeline attribute that holds the network
    #: modules LoRA adapts (diffusers' train_dreambooth_lora.py: the attention projections)
    lora_targets = ("to_k", "to_q", "to_v", "to_out.0")
    lora_keys = "diffusers"  # saved LoRA keys: converted to diffusers' names (train_dreambooth_lora.py)

    @classmethod
    def from_pipeline(cls, pipe, **_) -> "UNetDenoiser":
        return cls(pipe.unet)

    def __call__(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond, *, module=None, attention_kwargs: dict | None = None) -> torch.Tensor:
        """The U-Net's prediction; ``module``: the same network wrapped (DDP, compile) to call
        instead; ``attention_kwargs``: its attention processors' ``cross_attention_kwargs``."""
        net = module if module is not None else self.module
        extra = {} if attention_kwargs is None else {"cross_attention_kwargs": attention_kwargs}
        return net(noisy, timesteps, **cond.unet_kwargs(), **extra).sample


@dataclass
class FluxDenoiser:
    """A ``FluxTransformer2DModel`` (``module``: ``pipe.transformer``).

    Attributes:
        vae_scale_factor: pixels per latent cell (``2 ** (len(vae.block_out_channels) - 1)``).
        guidance_scale: the distilled guidance fed to ``guidance_embeds`` bases (diffusers' flux
            script: ``--guidance_scale``, 3.5 for FLUX.1-dev); ignored by bases without it.
    """

    module: Any
    vae_scale_factor: int
    guidance_scale: float = 3.5
    attribute = "transformer"
    #: modules LoRA adapts: diffusers' train_dreambooth_lora_flux.py default ``--lora_layers`` (the
    #: joint attention's image and text projections and both streams' feed-forward layers of every
    #: double-stream block; the single-stream blocks' attention shares ``attn.to_q/k/v``)
    lora_targets = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj",
                    "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
    lora_keys = "peft"  # saved LoRA keys: peft's names, as train_dreambooth_lora_flux.py saves them

    @classmethod
    def from_pipeline(cls, pipe, *, guidance_scale: float | None = None) -> "FluxDenoiser":
        scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        return cls(pipe.transformer, scale, 3.5 if guidance_scale is None else float(guidance_scale))

    def __call__(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond, *, module=None, attention_kwargs: dict | None = None) -> torch.Tensor:
        """The transformer's velocity prediction, unpacked to ``noisy``'s shape
        (``attention_kwargs``: its attention processors' ``joint_attention_kwargs``).

        ``noisy`` (B, C, h, w) with even ``h`` and ``w``; ``cond.encoder_hidden_states`` the T5
        token states (B, L, D) and ``cond.added_cond_kwargs["pooled_projections"]`` CLIP's pooled
        embedding (B, P); ``timesteps`` (B,) in ``[0, 1000]``.
        """
        from diffusers import FluxPipeline

        net = module if module is not None else self.module
        b, c, h, w = noisy.shape
        packed = FluxPipeline._pack_latents(noisy, b, c, h, w)
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, noisy.dtype)
        text = cond.encoder_hidden_states
        txt_ids = torch.zeros(text.shape[1], 3, device=text.device, dtype=text.dtype)
        guidance = None
        if self.module.config.guidance_embeds:
            guidance = torch.full((b,), self.guidance_scale, device=noisy.device, dtype=torch.float32)
        out = net(hidden_states=packed, timestep=timesteps.to(noisy.device, packed.dtype) / 1000, guidance=guidance,
                  pooled_projections=cond.added_cond_kwargs["pooled_projections"], encoder_hidden_states=text,
                  txt_ids=txt_ids, img_ids=img_ids, joint_attention_kwargs=attention_kwargs, return_dict=False)[0]
        scale = self.vae_scale_factor
        return FluxPipeline._unpack_latents(out, h * scale, w * scale, scale)


def denoiser_for(pipe, *, guidance_scale: float | None = None):
    """The denoiser of ``pipe``'s family (:class:`UNetDenoiser` or :class:`FluxDenoiser`)."""
    from suti.models import pipeline_family, resolve

    return resolve(pipeline_family(pipe).denoiser).from_pipeline(pipe, guidance_scale=guidance_scale)


def denoiser_module(pipe):
    """The pipeline's denoising network: ``pipe.unet`` or ``pipe.transformer``."""
    from suti.models import pipeline_family, resolve

    return getattr(pipe, resolve(pipeline_family(pipe).denoiser).attribute)


def latents_from_vae(mean: torch.Tensor, std: torch.Tensor, vae_config, generator=None) -> torch.Tensor:
    """A draw from the cached latent distribution, shifted and scaled as the denoiser takes it:
    ``(mean + std * eps - shift_factor) * scaling_factor`` (``shift_factor`` 0 where the VAE has
    none: SD's; FLUX's VAE has 0.1159). Drawn on ``mean``'s device from ``generator``."""
    eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
    shift = getattr(vae_config, "shift_factor", None) or 0.0
    return (mean + std * eps - shift) * vae_config.scaling_factor
