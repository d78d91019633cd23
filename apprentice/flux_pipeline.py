"""``FluxApprenticePipeline``: in-context subject-driven generation on a FLUX.1 base.

A ``FluxPipeline`` (so the family, text encoding and LoRA loading are FLUX's) plus the
demonstration adapter (:class:`apprentice.flux.FluxDemoAdapter`); ``save_pretrained`` /
``from_pretrained`` give one folder. Sampling follows ``FluxPipeline.__call__`` (the same initial
noise for the same generator, the shifted flow-matching schedule, the distilled guidance
embedding), with classifier-free guidance over demonstrations only (FLUX.1-dev is
guidance-distilled: no text branch):

    v = v(∅) + s_demo · (v(demos) - v(∅))

``s_demo = 1`` runs one branch. The demonstrations' keys and values are computed once per request
(:meth:`encode_demonstrations`) and shared by every image, branch and step.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import FluxPipeline
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from PIL import Image

from apprentice.flux import FluxDemoAdapter
from apprentice.pipeline import checked_demonstrations
from suti.conditioning import Conditioning, encode_prompt
from suti.errors import InputError
from suti.images import fit_square, to_pil, to_tensor
from suti.sampling import DEFAULT_DEMO_GUIDANCE_SCALE, check_prompt, check_sampler_args

#: FLUX.1-dev's distilled guidance (diffusers' ``FluxPipeline`` default).
FLUX_GUIDANCE_SCALE = 3.5


class FluxApprenticePipeline(FluxPipeline):
    """The SuTI apprentice on a FLUX.1 base: transformer + demonstration adapter, tuning-free.

    Components: FLUX's (``transformer``, ``vae``, ``text_encoder`` (CLIP), ``tokenizer``,
    ``text_encoder_2`` (T5), ``tokenizer_2``, ``scheduler``) and ``adapter``.
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->transformer->vae"

    def __init__(self, scheduler, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, transformer, adapter: FluxDemoAdapter,
                 image_encoder=None, feature_extractor=None):
        super().__init__(scheduler, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, transformer, image_encoder, feature_extractor)
        self.register_modules(adapter=adapter)
        adapter.install(transformer)
        self.trained_resolution: int | None = None  # set by apprentice.sample.load_apprentice
        self.max_sequence_length: int | None = None  # T5 tokens (None: suti.conditioning's default)

    @classmethod
    def from_base(cls, base, **adapter_kwargs) -> "FluxApprenticePipeline":
        """An untrained apprentice on a base ``FluxPipeline`` (it equals the base)."""
        adapter = FluxDemoAdapter.for_transformer(base.transformer, **adapter_kwargs)
        return cls(base.scheduler, base.vae, base.text_encoder, base.tokenizer, base.text_encoder_2, base.tokenizer_2, base.transformer, adapter)

    @property
    def resolution(self) -> int:
        """Default image size in pixels: the trained resolution (``training.json``), else the
        VAE's native sample size."""
        return int(self.trained_resolution or self.vae.config.sample_size)

    @property
    def unet(self):
        """No U-Net: callers that ask for the denoiser's device get the transformer."""
        return self.transformer

    @torch.no_grad()
    def encode_conditioning(self, prompts: list[str], resolution=None) -> Conditioning:
        """Prompts -> FLUX's conditioning (:func:`suti.conditioning.encode_flux_prompt`)."""
        return encode_prompt(self, prompts, max_sequence_length=self.max_sequence_length)

    def encode_images(self, images: list[Image.Image], sample: bool = False, generator=None) -> torch.Tensor:
        """PIL images -> (N, C, h, w) latents, shifted and scaled as the transformer takes them."""
        pixels = torch.stack([to_tensor(fit_square(img, self.resolution)) for img in images]).to(self.vae.device, self.vae.dtype)
        dist = self.vae.encode(pixels).latent_dist
        latents = dist.sample(generator) if sample else dist.mean
        return (latents - (self.vae.config.shift_factor or 0.0)) * self.vae.config.scaling_factor

    @torch.no_grad()
    def encode_demonstrations(self, demos: list[Image.Image], captions: list[str] | None = None, scale: float = 1.0, image_embeds=None, guidance_scale: float = FLUX_GUIDANCE_SCALE):
        """Encode one request's demonstrations once (cached keys/values for every step)."""
        captions = checked_demonstrations(self.tokenizer, demos, captions)
        latents = self.encode_images(demos)[None].to(self.transformer.device)  # (1, n, C, h, w)
        return self.adapter.encode_demos(self.transformer, latents, self.encode_conditioning(captions), scale=scale, guidance=guidance_scale)

    @torch.no_grad()
    def __call__(self, prompt: str, demo_images: list[Image.Image] | None = None, demo_captions: list[str] | None = None, num_images: int = 1,
                 num_inference_steps: int = 28, guidance_scale: float = FLUX_GUIDANCE_SCALE, demo_guidance_scale: float = DEFAULT_DEMO_GUIDANCE_SCALE,
                 generator: torch.Generator | list[torch.Generator] | None = None, demo_context=None, output_type: str = "pil",
                 height: int | None = None, width: int | None = None):
        """Generate ``num_images`` images of ``prompt`` in context of the demonstrations.

        Args:
            prompt: the target prompt; demo_images: 1-8 demonstrations (``None``: the base alone).
            guidance_scale: FLUX's distilled guidance (the embedding's value; 3.5 for FLUX.1-dev).
            demo_guidance_scale: ``s_demo`` (1: one branch, no guidance over demonstrations).
            generator: one generator, or a list of ``num_images`` (image ``i`` draws its initial
                noise from ``generator[i]`` alone).
            demo_context: a context from :meth:`encode_demonstrations` to reuse across calls.
            height, width: pixels (default :attr:`resolution`), multiples of 2 x the VAE's factor.

        Raises:
            InputError: an argument out of range (:func:`suti.sampling.check_sampler_args`).
        """
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

        from suti.denoisers import FluxDenoiser

        height, width = height or self.resolution, width or self.resolution
        check_sampler_args(steps=num_inference_steps, num_images=num_images, guidance_scale=guidance_scale, demo_guidance_scale=demo_guidance_scale, height=height, width=width)
        check_prompt(self.tokenizer, prompt)
        device, dtype = self.transformer.device, self.transformer.dtype
        ctx = demo_context
        if ctx is None and demo_images:
            ctx = self.encode_demonstrations(demo_images, demo_captions, guidance_scale=guidance_scale)
        two = ctx is not None and demo_guidance_scale != 1.0
        branches = 2 if two else 1
        text = self.encode_conditioning([prompt])
        cond = Conditioning.cat([text] * (branches * num_images)).to(device, dtype)
        batch_ctx = None
        if ctx is not None:
            batch_ctx = ctx.repeat(branches * num_images)  # keys/values shared, not copied
            batch_ctx.mask = torch.cat(([torch.zeros(num_images)] if two else []) + [torch.ones(num_images)]).to(device)
            batch_ctx.text_tokens = cond.encoder_hidden_states.shape[1]
        scale = self.vae_scale_factor
        shape = (num_images, self.transformer.config.in_channels // 4, 2 * (height // (scale * 2)), 2 * (width // (scale * 2)))
        latents = self._initial_latents(shape, generator, num_images, device, dtype)
        seq_len = (shape[2] // 2) * (shape[3] // 2)
        config = self.scheduler.config
        mu = calculate_shift(seq_len, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5), config.get("max_shift", 1.15))
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        timesteps, _ = retrieve_timesteps(self.scheduler, num_inference_steps, device, sigmas=sigmas, mu=mu)
        denoiser = FluxDenoiser(self.transformer, scale, guidance_scale)
        attention = None if batch_ctx is None else {"demo": batch_ctx}
        for t in self.progress_bar(timesteps):  # latents: (N, C, h, w)
            v = denoiser(torch.cat([latents] * branches), t.expand(branches * num_images), cond, attention_kwargs=attention)
            if two:
                v_none, v_demo = v.chunk(2)
                v = v_none + demo_guidance_scale * (v_demo - v_none)
            latents = self.scheduler.step(v, t, latents, return_dict=False)[0]
        latents = latents / self.vae.config.scaling_factor + (self.vae.config.shift_factor or 0.0)
        images = self.vae.decode(latents.to(self.vae.dtype)).sample  # (N, 3, H, W) in [-1, 1]
        if output_type == "pt":
            return ImagePipelineOutput(images=(images / 2 + 0.5).clamp(0, 1))
        return ImagePipelineOutput(images=[to_pil(x) for x in images])

    @staticmethod
    def _initial_latents(shape, generator, num_images: int, device, dtype) -> torch.Tensor:
        """FluxPipeline's initial noise (B, C, h, w): one draw, or one per generator."""
        from diffusers.utils.torch_utils import randn_tensor

        if isinstance(generator, list):
            if len(generator) != num_images:
                raise InputError(f"{len(generator)} generators for {num_images} images")
            return torch.cat([randn_tensor((1, *shape[1:]), generator=g, device=device, dtype=dtype) for g in generator])
        return randn_tensor(shape, generator=generator, device=device, dtype=dtype)
