"""Text conditioning of a denoiser, the same call for SD 1.x/2.x, SDXL and FLUX.1 pipelines.

SD 1.x/2.x: the U-Net attends to the text encoder's last hidden states, ``(B, 77, D)``.
SDXL (Podell et al. 2023, section 2.2; diffusers' ``StableDiffusionXLPipeline.encode_prompt``):
it attends to the *penultimate* hidden states of both text encoders, concatenated on the feature
axis, ``(B, 77, D1 + D2)``, and its ``text_time`` add_embeds take the second encoder's pooled,
projected embedding ``text_embeds (B, P)`` plus ``time_ids (B, 6)`` =
(original height, original width, crop top, crop left, target height, target width) in pixels.
FLUX.1: T5 token states and CLIP's pooled embedding (:func:`encode_flux_prompt`).

:func:`encode_prompt` returns both as a :class:`Conditioning`, whose :meth:`Conditioning.unet_kwargs`
are passed to ``unet(sample, t, **cond.unet_kwargs())``. No gradient mode is set here: callers
that train a text encoder call it with gradients on, others under ``torch.no_grad()``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Conditioning:
    """Text conditioning of a batch: ``encoder_hidden_states (B, L, D)`` and, for SDXL,
    ``added_cond_kwargs`` = ``{"text_embeds": (B, P), "time_ids": (B, 6)}`` (else ``None``)."""

    encoder_hidden_states: torch.Tensor
    added_cond_kwargs: dict[str, torch.Tensor] | None = None

    def unet_kwargs(self) -> dict:
        """Keyword arguments of ``UNet2DConditionModel.forward`` for this conditioning."""
        kw = {"encoder_hidden_states": self.encoder_hidden_states}
        if self.added_cond_kwargs is not None:
            kw["added_cond_kwargs"] = self.added_cond_kwargs
        return kw

    def to(self, device=None, dtype=None) -> "Conditioning":
        """Moved/cast copy (``time_ids`` stay in their own dtype only when ``dtype`` is None)."""
        move = lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else None)  # noqa: E731
        added = None if self.added_cond_kwargs is None else {k: move(v) for k, v in self.added_cond_kwargs.items()}
        return Conditioning(move(self.encoder_hidden_states), added)

    def __getitem__(self, index) -> "Conditioning":
        """Rows ``index`` of the batch (a slice, tensor or list of indices)."""
        added = None if self.added_cond_kwargs is None else {k: v[index] for k, v in self.added_cond_kwargs.items()}
        return Conditioning(self.encoder_hidden_states[index], added)

    def where(self, condition: torch.Tensor, other: "Conditioning") -> "Conditioning":
        """Row-wise ``other`` where ``condition`` (B,) is true, else ``self`` (e.g. text dropout
        with the empty prompt's conditioning, batch 1 or B, as ``other``)."""
        def pick(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            mask = condition.to(a.device).view(-1, *([1] * (a.dim() - 1)))
            return torch.where(mask, b.expand_as(a), a)

        hidden = pick(self.encoder_hidden_states, other.encoder_hidden_states)
        if self.added_cond_kwargs is None:
            return Conditioning(hidden)
        return Conditioning(hidden, {k: pick(v, other.added_cond_kwargs[k]) for k, v in self.added_cond_kwargs.items()})

    @staticmethod
    def cat(parts: list["Conditioning"]) -> "Conditioning":
        """Concatenate batches along the batch axis."""
        hidden = torch.cat([p.encoder_hidden_states for p in parts])
        if parts[0].added_cond_kwargs is None:
            return Conditioning(hidden)
        keys = parts[0].added_cond_kwargs.keys()
        return Conditioning(hidden, {k: torch.cat([p.added_cond_kwargs[k] for p in parts]) for k in keys})


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    """Prompts -> padded, truncated token ids ``(B, model_max_length)``."""
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids


def time_ids(height: int, width: int, batch: int, device=None) -> torch.Tensor:
    """SDXL micro-conditioning ``(batch, 6)``: original size = target size = ``(height, width)``,
    no crop (pixels)."""
    return torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32, device=device).repeat(batch, 1)


def encode_prompt(pipe, prompts: list[str], *, resolution: int | tuple[int, int] | None = None,
                  text_encoder=None, text_encoder_2=None, max_sequence_length: int | None = None) -> Conditioning:
    """Encode ``prompts`` for ``pipe``'s U-Net (see the module docstring).

    Args:
        pipe: a diffusers ``StableDiffusionPipeline``/``StableDiffusionXLPipeline`` or any object
            with ``tokenizer``, ``text_encoder`` (and ``tokenizer_2``, ``text_encoder_2`` for SDXL).
        prompts: B prompts.
        resolution: the target size in pixels for SDXL's ``time_ids`` (an int for square);
            ``None``: the U-Net's native size.
        text_encoder, text_encoder_2: override the pipeline's encoders (e.g. a DeepSpeed- or
            peft-wrapped one being trained).
        max_sequence_length: FLUX only: T5's token count (:func:`encode_flux_prompt`).

    Returns:
        :class:`Conditioning` on the text encoder's device.
    """
    te = text_encoder if text_encoder is not None else pipe.text_encoder
    te2 = text_encoder_2 if text_encoder_2 is not None else getattr(pipe, "text_encoder_2", None)
    from suti.models import pipeline_family

    if pipeline_family(pipe).name == "flux":
        return encode_flux_prompt(pipe, prompts, max_sequence_length=max_sequence_length, text_encoder=te, text_encoder_2=te2)
    device = next(te.parameters()).device
    ids = tokenize(pipe.tokenizer, prompts).to(device)
    if te2 is None:
        return Conditioning(te(ids)[0])
    out1 = te(ids, output_hidden_states=True)
    ids2 = tokenize(pipe.tokenizer_2, prompts).to(device)
    out2 = te2(ids2, output_hidden_states=True)
    hidden = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)
    pooled = out2[0]  # CLIPTextModelWithProjection: text_embeds (B, P)
    if resolution is None:
        vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        resolution = pipe.unet.config.sample_size * vae_scale
    h, w = (resolution, resolution) if isinstance(resolution, int) else resolution
    return Conditioning(hidden, {"text_embeds": pooled, "time_ids": time_ids(h, w, len(prompts), device).to(pooled.dtype)})


#: T5 tokens of a FLUX prompt when none is asked (diffusers' ``FluxPipeline`` and its flux
#: DreamBooth script: ``max_sequence_length=512``).
FLUX_MAX_SEQUENCE_LENGTH = 512


def encode_flux_prompt(pipe, prompts: list[str], *, max_sequence_length: int | None = None, text_encoder=None, text_encoder_2=None) -> Conditioning:
    """FLUX.1's text conditioning, as ``FluxPipeline.encode_prompt``: the T5 encoder's last hidden
    states ``(B, L, joint_attention_dim)`` over ``max_sequence_length`` tokens (``L``; default
    :data:`FLUX_MAX_SEQUENCE_LENGTH`, capped by the T5 tokenizer's length), padded and truncated,
    as ``encoder_hidden_states``, and CLIP's pooled output ``(B, pooled_projection_dim)`` over 77
    tokens as ``added_cond_kwargs["pooled_projections"]``. The text position ids are all zero
    (:class:`suti.denoisers.FluxDenoiser` makes them)."""
    te = text_encoder if text_encoder is not None else pipe.text_encoder
    te2 = text_encoder_2 if text_encoder_2 is not None else pipe.text_encoder_2
    device = next(te.parameters()).device
    pooled = te(tokenize(pipe.tokenizer, prompts).to(device), output_hidden_states=False).pooler_output
    length = max_sequence_length or min(FLUX_MAX_SEQUENCE_LENGTH, pipe.tokenizer_2.model_max_length)
    ids2 = pipe.tokenizer_2(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
    hidden = te2(ids2.to(next(te2.parameters()).device), output_hidden_states=False)[0]
    return Conditioning(hidden, {"pooled_projections": pooled.to(hidden.device)})
