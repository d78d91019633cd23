"""``ApprenticePipeline``: in-context subject-driven generation from 1-8 demonstrations.

A ``DiffusionPipeline`` of the base model's components plus the demonstration-attention
``adapter``; ``save_pretrained``/``from_pretrained`` give one folder that loads in one call.
Sampling uses classifier-free guidance over text and demonstrations (as in InstructPix2Pix):

    eps = eps(∅, ∅) + s_demo · (eps(demos, ∅) - eps(∅, ∅)) + s_text · (eps(demos, text) - eps(demos, ∅))

"demos" there means both the demonstration attention and, when the adapter has one, its global
subject channel (IP-Adapter-style; :class:`~apprentice.adapter.DemoAttentionAdapter`): the
no-demonstration branch has neither.
"""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from PIL import Image

from apprentice.adapter import DemoAttentionAdapter
from suti.conditioning import Conditioning, encode_prompt
from suti.errors import InputError, InvalidValueError
from suti.images import fit_square, to_pil, to_tensor
from suti.sampling import DEFAULT_DEMO_GUIDANCE_SCALE, check_prompt, check_sampler_args


def checked_demonstrations(tokenizer, demos: list, captions: list[str] | None) -> list[str]:
    """The demonstrations' captions (``""`` each when none are given), checked: 1-8 demos, one
    caption per demo, each caption fitting the text encoder (:func:`suti.sampling.check_prompt`).

    Raises:
        InvalidValueError: naming the count or the caption.
    """
    if not 1 <= len(demos) <= 8:
        raise InvalidValueError(f"give 1 to 8 demonstration images (got {len(demos)})")
    captions = captions or [""] * len(demos)
    if len(captions) != len(demos):
        raise InvalidValueError(f"{len(captions)} captions for {len(demos)} demonstration images")
    for i, caption in enumerate(captions):
        check_prompt(tokenizer, caption, what=f"demo caption {i}")
    return captions


class ApprenticePipeline(DiffusionPipeline):
    """The SuTI apprentice: base U-Net + demonstration attention, tuning-free.

    Components: ``unet``, ``vae``, ``text_encoder``, ``tokenizer``, ``scheduler`` (the base
    model's) and ``adapter`` (:class:`DemoAttentionAdapter`); on an SDXL base also
    ``text_encoder_2`` and ``tokenizer_2``, and the demonstrations and the target get SDXL's
    pooled text embeddings and time ids (:mod:`suti.conditioning`).
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->unet->vae"
    _optional_components = ["text_encoder_2", "tokenizer_2"]

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler, adapter: DemoAttentionAdapter, text_encoder_2=None, tokenizer_2=None):
        super().__init__()
        self.register_modules(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler, adapter=adapter, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)
        adapter.install(unet)
        self.trained_resolution: int | None = None  # set by apprentice.sample.load_apprentice
        self._image_scorers: dict = {}  # image_encoder name -> scorer (shared by shallow per-request copies)

    @classmethod
    def from_base(cls, base, **adapter_kwargs) -> "ApprenticePipeline":
        """An untrained apprentice on a base ``StableDiffusionPipeline`` (equals the base)."""
        adapter = DemoAttentionAdapter.for_unet(base.unet, **adapter_kwargs)
        return cls(base.unet, base.vae, base.text_encoder, base.tokenizer, base.scheduler, adapter,
                   text_encoder_2=getattr(base, "text_encoder_2", None), tokenizer_2=getattr(base, "tokenizer_2", None))

    @property
    def resolution(self) -> int:
        """Default image size in pixels: the resolution the apprentice was trained at (the
        adapter config's ``resolution``, else ``training.json``'s, read by
        :func:`apprentice.sample.load_apprentice`), else the U-Net's native size."""
        trained = getattr(self.adapter.config, "resolution", None) or self.trained_resolution
        return int(trained) if trained else self.unet.config.sample_size * self.vae_scale_factor

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> (B, L, D) text-encoder states (SDXL: both encoders'; see :meth:`encode_conditioning`)."""
        return self.encode_conditioning(prompts).encoder_hidden_states

    @torch.no_grad()
    def encode_conditioning(self, prompts: list[str], resolution: int | tuple[int, int] | None = None) -> Conditioning:
        """Prompts -> the U-Net's text conditioning (:func:`suti.conditioning.encode_prompt`):
        hidden states (B, L, D), plus SDXL's pooled embeddings and time ids for ``resolution``
        (pixels; default :attr:`resolution`)."""
        return encode_prompt(self, prompts, resolution=resolution or self.resolution)

    def encode_images(self, images: list[Image.Image], sample: bool = False, generator=None) -> torch.Tensor:
        """PIL images -> (N, C, h, w) scaled latents (the distribution's mean unless ``sample``)."""
        pixels = torch.stack([to_tensor(fit_square(img, self.resolution)) for img in images]).to(self.vae.device, self.vae.dtype)
        dist = self.vae.encode(pixels).latent_dist
        latents = dist.sample(generator) if sample else dist.mean
        return latents * self.vae.config.scaling_factor

    def image_scorer(self):
        """The adapter's ``image_encoder`` scorer (:func:`suti.scoring.get_scorer`), built once per pipeline.

        Raises:
            InvalidValueError: the adapter has a subject channel but names no image encoder.
        """
        from suti.scoring import get_scorer

        name = self.adapter.config.image_encoder
        if name is None:
            raise InvalidValueError("the adapter's subject channel names no image_encoder; pass image_embeds to encode_demonstrations")
        scorers = self.__dict__.setdefault("_image_scorers", {})
        if name not in scorers:
            scorers[name] = get_scorer(name)
        return scorers[name]

    @torch.no_grad()
    def encode_demonstrations(self, demos: list[Image.Image], captions: list[str] | None = None, scale: float = 1.0, image_embeds: torch.Tensor | None = None):
        """Encode one request's demonstrations once (cached keys/values for every step).

        With a subject channel the demonstrations are also embedded by the adapter's
        ``image_encoder`` (or ``image_embeds``, (n, D), is used) for the subject tokens; a
        channel that reads the U-Net's features (``"unet-features"``) needs neither.
        """
        captions = checked_demonstrations(self.tokenizer, demos, captions)
        latents = self.encode_images(demos)[None]  # (1, n, C, h, w)
        cond = self.encode_conditioning(captions)  # (n, L, D) (+ SDXL: (n, P), (n, 6))
        if self.adapter.needs_image_embeds and image_embeds is None:
            image_embeds = self.image_scorer().embed_images(demos)  # (n, D), unit-norm
        if image_embeds is not None:
            image_embeds = image_embeds.reshape(1, len(demos), -1).to(self.unet.device)  # (1, n, D)
        return self.adapter.encode_demos(self.unet, latents, cond.encoder_hidden_states[None], scale=scale, added_cond_kwargs=cond.added_cond_kwargs, image_embeds=image_embeds)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str,
        demo_images: list[Image.Image] | None = None,
        demo_captions: list[str] | None = None,
        num_images: int = 1,
        num_inference_steps: int = 25,
        guidance_scale: float = 5.0,
        demo_guidance_scale: float = DEFAULT_DEMO_GUIDANCE_SCALE,
        generator: torch.Generator | list[torch.Generator] | None = None,
        demo_context=None,
        output_type: str = "pil",
        height: int | None = None,
        width: int | None = None,
    ):
        """Generate ``num_images`` images of ``prompt`` in context of the demonstrations.

        Args:
            prompt: the target prompt (the subject is taken from the demonstrations).
            demo_images: 1-8 demonstration images (``None``: the base model alone).
            demo_captions: one caption per demonstration (optional).
            guidance_scale: text guidance scale ``s_text``.
            demo_guidance_scale: demonstration guidance scale ``s_demo`` (default
                :data:`suti.sampling.DEFAULT_DEMO_GUIDANCE_SCALE`); 1 skips the no-demonstration
                branch (two U-Net branches per step, as the base model). Larger values carry
                more of the subject and less of the prompt (docs/results.md, the guidance sweep).
            generator: one generator for the whole batch, or a list of ``num_images`` (image ``i``
                draws its initial noise from ``generator[i]`` alone, as in diffusers, so a batch
                of seeded generators gives the images of one call per seed).
            demo_context: a context from :meth:`encode_demonstrations` to reuse across calls.
            height, width: image size in pixels (default: :attr:`resolution`, the trained size).

        Raises:
            InputError: an argument out of range (:func:`suti.sampling.check_sampler_args`), or a
                prompt too long for the text encoder (a shorter cut is logged as a warning).
        """
        height = height or self.resolution
        width = width or self.resolution
        check_sampler_args(steps=num_inference_steps, num_images=num_images, guidance_scale=guidance_scale,
                           demo_guidance_scale=demo_guidance_scale, height=height, width=width)
        check_prompt(self.tokenizer, prompt)
        device = self.unet.device
        ctx = demo_context
        if ctx is None and demo_images:
            ctx = self.encode_demonstrations(demo_images, demo_captions)
        text = Conditioning.cat([self.encode_conditioning([prompt], (height, width))] * num_images)
        null = Conditioning.cat([self.encode_conditioning([""], (height, width))] * num_images)
        # branches of classifier-free guidance, batched in one U-Net call per step:
        # demos: (no demos, no text), (demos, no text), (demos, text); with demo_guidance_scale
        # 1 the first drops out (eps = e_demo + s_text (e_full - e_demo)): 2 branches, as the base.
        three = ctx is not None and demo_guidance_scale != 1.0
        branches = 3 if three else 2
        emb = Conditioning.cat([null, null, text] if three else [null, text]).to(device, self.unet.dtype)
        batch_ctx = None
        if ctx is not None:
            batch_ctx = ctx.repeat(branches * num_images)  # keys/values shared, not copied
            mask = [torch.zeros(num_images)] if three else []
            batch_ctx.mask = torch.cat(mask + [torch.ones(2 * num_images)]).to(device)
        shape = (num_images, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if batch_ctx is not None:
            batch_ctx.query_size = shape[2:]  # the position bias's grid when height/width differ from the demos
        if isinstance(generator, list):
            if len(generator) != num_images:
                raise InputError(f"{len(generator)} generators for {num_images} images")
            latents = torch.cat([torch.randn((1, *shape[1:]), generator=g) for g in generator]).to(device, self.unet.dtype)
        else:
            latents = torch.randn(shape, generator=generator).to(device, self.unet.dtype)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        latents = latents * self.scheduler.init_noise_sigma
        for t in self.progress_bar(self.scheduler.timesteps):  # latents: (N, C, h, w)
            model_in = self.scheduler.scale_model_input(torch.cat([latents] * branches), t)
            eps = self.unet(model_in, t, **emb.unet_kwargs(), cross_attention_kwargs={"demo": batch_ctx}).sample
            if three:
                e_none, e_demo, e_full = eps.chunk(3)
                eps = e_none + demo_guidance_scale * (e_demo - e_none) + guidance_scale * (e_full - e_demo)
            else:  # (demos or nothing, no text), (demos or nothing, text)
                e_none, e_text = eps.chunk(2)
                eps = e_none + guidance_scale * (e_text - e_none)
            latents = self.scheduler.step(eps, t, latents).prev_sample
        images = self.vae.decode((latents / self.vae.config.scaling_factor).to(self.vae.dtype)).sample  # (N, 3, H, W)
        if output_type == "pt":  # diffusers' convention: [0, 1]
            return ImagePipelineOutput(images=(images / 2 + 0.5).clamp(0, 1))
        return ImagePipelineOutput(images=[to_pil(x) for x in images])
