"""The apprentice on FLUX.1: demonstrations as extra tokens of every joint-attention block.

UNO (Wu et al. 2025, arXiv 2504.02160) and FLUX.1 Kontext put the reference images' VAE tokens
into the transformer's joint attention, with position ids that keep them apart from the target.
Here each demonstration's clean latents are packed like the target's (2x2 patches,
``FluxPipeline._pack_latents``) and run once per request through the frozen base transformer (at
``demo_timestep``, with its caption's conditioning); every attention layer's image-token input is
captured and turned into keys and values by the adapter's own projections (started as copies of
the layer's ``to_q/to_k/to_v``), with the layer's own RMS norm and rotary embedding at offset
positions (:func:`demo_position_ids`):

- ``"frame"`` (FLUX.1 Kontext): demonstration ``i`` keeps its (row, col) and gets frame index
  ``i + 1`` on the first axis (the target's is 0);
- ``"diagonal"`` (UNO's UnoPE): demonstration ``i``'s (row, col) are shifted by ``(i + 1)`` times
  the grid's height and width.

At every denoising step each block's image tokens (the double-stream blocks' image stream, the
single-stream blocks' image part) attend to the cached keys and values in a decoupled branch
(:class:`FluxDemoAttnProcessor`; diffusers' attention processors, installed with
``set_attn_processor`` and fed through ``joint_attention_kwargs={"demo": ctx}``):

    out = JointAttn(x) + g * W_o softmax(RoPE(norm(W_q x)) RoPE(norm(W_k F))^T / sqrt(d)) W_v F

``W_o`` starts at zero, so an untrained apprentice equals the base exactly; ``g`` is the context's
``scale`` times its per-row ``mask`` (classifier-free guidance over demonstrations). The
transformer itself is never forked. Shapes: latents (B, C, h, w), demo latents (B, n, C, h, w),
cached keys/values (B or 1, heads, n * h/2 * w/2, head_dim).
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from apprentice.adapter import MAX_DEMOS, DemoAttention, _key
from apprentice.attention import DemoContext, _shared_attention
from apprentice.train_config import DEMO_POSITIONS  # how demonstration tokens sit apart from the target's
from suti.errors import InvalidValueError


def demo_position_ids(num_demos: int, rows: int, cols: int, mode: str = "frame", device=None, dtype=torch.float32) -> torch.Tensor:
    """(num_demos * rows * cols, 3) position ids of the demonstrations' packed tokens, demo after
    demo, row-major like ``FluxPipeline._prepare_latent_image_ids`` (whose target ids are
    ``(0, row, col)``): frame index ``i + 1`` (``"frame"``) or (row, col) shifted by ``(i + 1) *
    (rows, cols)`` (``"diagonal"``)."""
    if mode not in DEMO_POSITIONS:
        raise InvalidValueError(f"unknown demonstration positions {mode!r} ({', '.join(DEMO_POSITIONS)})")
    grid = torch.zeros(rows, cols, 3, device=device, dtype=dtype)
    grid[..., 1] = torch.arange(rows, device=device, dtype=dtype)[:, None]
    grid[..., 2] = torch.arange(cols, device=device, dtype=dtype)[None, :]
    grid = grid.reshape(rows * cols, 3)
    out = []
    for i in range(num_demos):
        ids = grid.clone()
        if mode == "frame":
            ids[:, 0] = i + 1
        else:
            ids[:, 1] += (i + 1) * rows
            ids[:, 2] += (i + 1) * cols
        out.append(ids)
    return torch.cat(out)


def _rope(x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """``x`` (B, S, heads, d) rotated by ``rotary`` = (cos, sin), each (S, d) (``None``: unchanged)."""
    if rotary is None:
        return x
    from diffusers.models.embeddings import apply_rotary_emb

    return apply_rotary_emb(x, rotary, sequence_dim=1)


class FluxDemoAttnProcessor:
    """FLUX's joint attention (``base``: diffusers' ``FluxAttnProcessor``) plus the demonstration
    branch of one layer (module docstring). Not an ``nn.Module``: its weights live in
    :class:`FluxDemoAdapter` (``layer``), so the transformer's state dict stays the base model's."""

    def __init__(self, name: str, layer: nn.Module, base):
        self.name, self.layer, self.base = name, layer, base

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None, demo: DemoContext | None = None):
        out = self.base(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        if demo is None or demo.mode == "off":
            return out
        single = encoder_hidden_states is None  # a single-stream block: hidden_states = [text; image]
        image = hidden_states[:, demo.text_tokens:] if single else hidden_states  # (B, N, dim)
        if demo.mode == "capture":
            demo.features[self.name] = image if torch.is_grad_enabled() else image.detach()
            return out
        if self.name not in demo.kv:
            raise KeyError(f"demonstration keys/values for layer {self.name} were not computed")
        keys, values = demo.kv[self.name]  # (B or 1, heads, n * N, d)
        n = image.shape[1]
        rotary = None if image_rotary_emb is None else (image_rotary_emb[0][-n:], image_rotary_emb[1][-n:])
        query = _rope(attn.norm_q(self.layer.to_q(image).unflatten(-1, (-1, attn.head_dim))), rotary).transpose(1, 2)  # (B, heads, N, d)
        extra = _shared_attention(query, keys.to(query.dtype), values.to(query.dtype))
        extra = self.layer.to_out(extra.transpose(1, 2).flatten(2))  # (B, N, dim)
        gate = demo.scale if demo.mask is None else demo.scale * demo.mask.to(extra.dtype).view(-1, 1, 1)
        if single:
            return torch.cat([out[:, : demo.text_tokens], out[:, demo.text_tokens:] + gate * extra], dim=1)
        return out[0] + gate * extra, out[1]


def attention_layers(transformer) -> list[tuple[str, int, int]]:
    """(processor name, dim, heads) of every attention of a ``FluxTransformer2DModel`` (double-
    and single-stream blocks)."""
    out = []
    for name in transformer.attn_processors:
        attn = transformer.get_submodule(name[: -len(".processor")])
        out.append((name, attn.to_q.in_features, attn.heads))
    return out


class FluxDemoAdapter(ModelMixin, ConfigMixin):
    """Demonstration-attention layers for a given FLUX transformer (the constructor is the config).

    Args:
        layer_names: processor names of the transformer's attentions (all of them).
        dims: each layer's model dim (its ``to_q`` input and output size).
        heads: each layer's attention heads.
        demo_timestep: the timestep (0-1000, the scheduler's scale) at which demonstrations are
            encoded: near 0, clean.
        demo_positions: ``"frame"`` or ``"diagonal"`` (:func:`demo_position_ids`).
    """

    config_name = "config.json"

    @register_to_config
    def __init__(self, layer_names: list[str], dims: list[int], heads: list[int], demo_timestep: float = 1.0, demo_positions: str = "frame"):
        super().__init__()
        if demo_positions not in DEMO_POSITIONS:
            raise InvalidValueError(f"unknown demonstration positions {demo_positions!r} ({', '.join(DEMO_POSITIONS)})")
        self.layers = nn.ModuleDict({_key(n): DemoAttention(d) for n, d in zip(layer_names, dims)})

    @classmethod
    def for_transformer(cls, transformer, *, demo_timestep: float = 1.0, demo_positions: str = "frame", init_from_attention: bool = True) -> "FluxDemoAdapter":
        """An adapter matching ``transformer``; q/k/v start as copies of each layer's own."""
        layers = attention_layers(transformer)
        adapter = cls([n for n, _, _ in layers], [d for _, d, _ in layers], [h for _, _, h in layers], demo_timestep, demo_positions)
        if init_from_attention:
            with torch.no_grad():
                for name, _, _ in layers:
                    attn = transformer.get_submodule(name[: -len(".processor")])
                    layer = adapter.layers[_key(name)]
                    for proj in ("to_q", "to_k", "to_v"):
                        getattr(layer, proj).weight.copy_(getattr(attn, proj).weight)
        return adapter.to(transformer.device)

    def install(self, transformer) -> None:
        """Set the demonstration processors on ``transformer`` (``set_attn_processor``)."""
        from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

        transformer.set_attn_processor({name: FluxDemoAttnProcessor(name, self.layers[_key(name)], FluxAttnProcessor()) for name in self.config.layer_names})

    def encode_demos(self, transformer, demo_latents: torch.Tensor, demo_cond, *, scale: float = 1.0, guidance: float = 3.5) -> DemoContext:
        """Encode demonstrations once per request; returns the context for every step.

        Args:
            transformer: the transformer with this adapter installed.
            demo_latents: (B, n, C, h, w) shifted and scaled latents of n demonstrations per image.
            demo_cond: the demos' captions' :class:`suti.conditioning.Conditioning`, B * n rows
                (T5 states and CLIP's ``pooled_projections``).
            scale: demonstration-attention output scale at sampling time.
            guidance: the distilled guidance of the encoding pass (guidance-embedding bases).

        Returns:
            A :class:`~apprentice.attention.DemoContext` in ``"use"`` mode with keys and values
            per layer, (B, heads, n * h/2 * w/2, head_dim), rotated at the demos' positions.

        Raises:
            InvalidValueError: n outside 1..8.
        """
        from diffusers import FluxPipeline

        b, n, c, h, w = demo_latents.shape
        if not 1 <= n <= MAX_DEMOS:
            raise InvalidValueError(f"between 1 and {MAX_DEMOS} demonstrations are supported (got {n})")
        device, dtype = demo_latents.device, transformer.dtype
        flat = demo_latents.flatten(0, 1).to(dtype)
        packed = FluxPipeline._pack_latents(flat, b * n, c, h, w)  # (B * n, N, 4C)
        text = demo_cond.encoder_hidden_states.to(device, dtype)
        ctx = DemoContext(mode="capture", num_demos=n, text_tokens=text.shape[1])
        extra = {}
        if transformer.config.guidance_embeds:
            extra["guidance"] = torch.full((b * n,), float(guidance), device=device, dtype=torch.float32)
        transformer(hidden_states=packed, timestep=torch.full((b * n,), self.config.demo_timestep / 1000, device=device, dtype=dtype),
                    pooled_projections=demo_cond.added_cond_kwargs["pooled_projections"].to(device, dtype), encoder_hidden_states=text,
                    txt_ids=torch.zeros(text.shape[1], 3, device=device, dtype=dtype), img_ids=FluxPipeline._prepare_latent_image_ids(b * n, h // 2, w // 2, device, dtype),
                    joint_attention_kwargs={"demo": ctx}, return_dict=False, **extra)
        rotary = transformer.pos_embed(demo_position_ids(n, h // 2, w // 2, self.config.demo_positions, device, dtype))  # (n * N, d) each
        kv = {}
        for name in self.config.layer_names:
            attn = transformer.get_submodule(name[: -len(".processor")])
            layer = self.layers[_key(name)]
            feats = ctx.features[name]  # (B * n, N, dim)
            feats = feats.reshape(b, n * feats.shape[1], feats.shape[2])  # (B, n * N, dim)
            keys = _rope(attn.norm_k(layer.to_k(feats).unflatten(-1, (-1, attn.head_dim))), rotary)
            values = layer.to_v(feats).unflatten(-1, (-1, attn.head_dim))
            kv[name] = (keys.transpose(1, 2), values.transpose(1, 2))  # (B, heads, n * N, d)
        return DemoContext(mode="use", num_demos=n, kv=kv, scale=scale, latent_size=(h, w))


class FluxApprenticeModule(nn.Module):
    """What DeepSpeed wraps on a FLUX base: transformer + adapter; forward returns the velocity.

    The same call as :class:`apprentice.engine.ApprenticeModule`: ``noisy`` (B, C, h, w),
    ``timesteps`` (B,) in [0, 1000], ``text_emb`` (B, L, D) T5 states, ``demo_latents`` (B, n, C,
    h, w), ``demo_emb`` (B, n, L, D), ``demo_mask`` (B,), ``text_added`` / ``demo_added`` =
    ``{"pooled_projections": (B or B * n, P)}``; ``image_embeds`` is unused (no subject channel).
    """

    def __init__(self, transformer, adapter: FluxDemoAdapter, *, vae_scale_factor: int, guidance: float = 3.5):
        super().__init__()
        self.transformer = transformer
        self.adapter = adapter
        self.vae_scale_factor, self.guidance = vae_scale_factor, guidance

    @property
    def denoiser_module(self):
        return self.transformer

    def forward(self, noisy, timesteps, text_emb, demo_latents, demo_emb, demo_mask, text_added=None, demo_added=None, image_embeds=None):
        from suti.conditioning import Conditioning
        from suti.denoisers import FluxDenoiser

        demo_cond = Conditioning(demo_emb.flatten(0, 1), demo_added)
        ctx = self.adapter.encode_demos(self.transformer, demo_latents, demo_cond, guidance=self.guidance)
        ctx.mask = demo_mask
        ctx.text_tokens = text_emb.shape[1]
        denoiser = FluxDenoiser(self.transformer, self.vae_scale_factor, self.guidance)
        return denoiser(noisy, timesteps, Conditioning(text_emb, text_added), attention_kwargs={"demo": ctx})
