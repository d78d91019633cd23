"""Training-free reference attention (DreamTuner's subject-encoder-free "reference" self-attention):
the baseline that carries a subject into the base model without any training.

DreamTuner (Hua et al., 2023, section 3.3 "self-subject-attention") and the reference-only
control of the diffusers community ``StableDiffusionReferencePipeline``: at every denoising step
the reference images' latents are noised to the same timestep ``t`` and run through the *same*
U-Net (``mode="write"``); each self-attention (``attn1``) records its input features ``F_ref``
(``(n_refs, HW, C)``). The generated image's pass (``mode="read"``) then attends to its own tokens
and the references' tokens with the layer's own projections:

    out = W_o · softmax(W_q h · [W_k h ; W_k F]^T / sqrt(d)) · [W_v h ; W_v F]

No weights are added or changed: :class:`ReferenceAttnProcessor` is a diffusers attention
processor installed with ``unet.set_attn_processor`` for the duration of a
:func:`reference_attention` block and fed through ``cross_attention_kwargs={"reference": ctx}``.
With no references (``ctx=None``, ``mode="off"`` or an empty bank) it is the standard
``AttnProcessor2_0``, so the U-Net's output is exactly the base model's.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0
from PIL import Image


@dataclass
class ReferenceContext:
    """Per-step reference state, passed as ``cross_attention_kwargs={"reference": ctx}``.

    Attributes:
        mode: ``"write"`` (record each ``attn1`` input of the reference batch), ``"read"`` (attend
            to the recorded features too) or ``"off"`` (the base model).
        bank: ``attn1`` processor name -> recorded features, ``(n_refs, HW, C)``.
    """

    mode: str = "off"
    bank: dict[str, torch.Tensor] = field(default_factory=dict)


class ReferenceAttnProcessor:
    """Self-attention over the image's own tokens plus the references' tokens (one ``attn1``)."""

    def __init__(self, name: str):
        self.name = name
        self.base = AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 reference: ReferenceContext | None = None, **kwargs):
        if reference is None or reference.mode == "off":
            return self.base(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        if reference.mode == "write":
            reference.bank[self.name] = hidden_states.detach()
            return self.base(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        ref = reference.bank.get(self.name)
        if ref is None or ref.shape[0] == 0:
            return self.base(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        if hidden_states.ndim != 3 or attn.group_norm is not None or attn.spatial_norm is not None or attn.residual_connection:
            raise ValueError(f"{self.name}: reference attention supports plain (B, N, C) self-attention only")
        b, n, c = hidden_states.shape
        ref = ref.to(hidden_states.dtype).reshape(1, -1, c).expand(b, -1, -1)  # (B, n_refs * HW, C)
        context = torch.cat([hidden_states, ref], dim=1)  # (B, N + n_refs * HW, C)
        heads = attn.heads
        query = attn.to_q(hidden_states).view(b, n, heads, -1).transpose(1, 2)
        key = attn.to_k(context).view(b, context.shape[1], heads, -1).transpose(1, 2)
        value = attn.to_v(context).view(b, context.shape[1], heads, -1).transpose(1, 2)
        if attn.norm_q is not None:
            query, key = attn.norm_q(query), attn.norm_k(key)
        out = F.scaled_dot_product_attention(query, key, value)  # (B, heads, N, d)
        out = out.transpose(1, 2).reshape(b, n, -1)
        out = attn.to_out[1](attn.to_out[0](out))
        return out / attn.rescale_output_factor


class PassthroughProcessor(AttnProcessor2_0):
    """The standard processor for the other layers, accepting (and ignoring) ``reference``."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 reference: ReferenceContext | None = None, **kwargs):
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


@contextlib.contextmanager
def reference_attention(unet):
    """Install :class:`ReferenceAttnProcessor` on every ``attn1`` of ``unet`` (a diffusers
    ``UNet2DConditionModel``) for the block, then restore the previous processors."""
    previous = dict(unet.attn_processors)
    unet.set_attn_processor({name: ReferenceAttnProcessor(name) if ".attn1." in name else PassthroughProcessor() for name in previous})
    try:
        yield unet
    finally:
        unet.set_attn_processor(previous)


@torch.no_grad()
def reference_generate(pipe, prompt: str, references: list[Image.Image], *, reference_prompt: str = "",
                       num_inference_steps: int = 25, guidance_scale: float = 5.0,
                       generator: torch.Generator | None = None) -> Image.Image:
    """One image of ``prompt`` from a base ``StableDiffusionPipeline`` with reference attention.

    The sampler is the pipeline's own (its scheduler, classifier-free guidance over the text,
    initial noise ``randn((1, C, h, w), generator)``), so with ``references=[]`` the image equals
    ``pipe(prompt, generator=...)``'s. Per step the references' latents (VAE means), noised to
    ``t`` with noise drawn once after the initial latents, run through the U-Net with
    ``reference_prompt`` to fill the bank; both guidance branches then read it.

    Args:
        pipe: a ``StableDiffusionPipeline`` (its U-Net's processors are restored afterwards).
        references: 0-8 PIL images of the subject.
        reference_prompt: text for the references' pass (e.g. ``"a teddy bear"``).
    """
    from suti.images import fit_square, to_pil, to_tensor

    unet, vae, scheduler = pipe.unet, pipe.vae, pipe.scheduler
    device = unet.device
    res = unet.config.sample_size * pipe.vae_scale_factor
    cond, uncond = pipe.encode_prompt(prompt, device, 1, True, "")
    emb = torch.cat([uncond, cond])  # (2, L, D)
    size = unet.config.sample_size
    latents = torch.randn((1, unet.config.in_channels, size, size), generator=generator).to(device, unet.dtype)
    scheduler.set_timesteps(num_inference_steps, device=device)
    latents = latents * scheduler.init_noise_sigma
    ref_latents = ref_noise = ref_emb = None
    if references:
        pixels = torch.stack([to_tensor(fit_square(img, res)) for img in references]).to(device, vae.dtype)
        ref_latents = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor  # (n, C, h, w)
        ref_noise = torch.randn(ref_latents.shape, generator=generator).to(device, ref_latents.dtype)
        ref_emb = pipe.encode_prompt(reference_prompt, device, len(references), False)[0]  # (n, L, D)
    with reference_attention(unet):
        for t in scheduler.timesteps:
            ctx = None
            if ref_latents is not None:
                ctx = ReferenceContext(mode="write")
                noisy = scheduler.add_noise(ref_latents, ref_noise, t.reshape(1))
                unet(scheduler.scale_model_input(noisy, t), t, ref_emb, cross_attention_kwargs={"reference": ctx})
                ctx.mode = "read"
            model_in = scheduler.scale_model_input(torch.cat([latents] * 2), t)
            eps = unet(model_in, t, emb, cross_attention_kwargs={"reference": ctx}).sample
            e_none, e_text = eps.chunk(2)
            latents = scheduler.step(e_none + guidance_scale * (e_text - e_none), t, latents).prev_sample
    image = vae.decode(latents / vae.config.scaling_factor).sample  # (1, 3, H, W)
    return to_pil(image[0])
