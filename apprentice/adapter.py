"""The apprentice's trainable demonstration-attention layers, as one diffusers model.

:class:`DemoAttentionAdapter` holds one small attention (q, k, v, zero-initialised out) per
self-attention layer of the U-Net; ``install(unet)`` puts :class:`DemoAttnProcessor` on them with
``set_attn_processor``. The U-Net itself is never forked or modified. ``encode_demos`` runs the
U-Net's own layers once over the demonstrations (clean latents at a fixed low timestep, their
caption embeddings as context), captures every layer's features and turns them into cached
keys and values, so each denoising step costs one extra attention per layer.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from apprentice.attention import DemoAttnProcessor, DemoContext, PassthroughProcessor, _heads
from suti.errors import InvalidValueError

MAX_DEMOS = 8


class DemoAttention(nn.Module):
    """Projections of one demonstration-attention layer (dim -> dim)."""

    def __init__(self, dim: int):
        super().__init__()
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)
        nn.init.zeros_(self.to_out.weight)  # an untrained apprentice is exactly the base model
        nn.init.zeros_(self.to_out.bias)


def self_attention_layers(unet) -> list[tuple[str, int, int]]:
    """(processor name, channels, heads) of every transformer self-attention of a U-Net."""
    out = []
    for name, module in unet.attn_processors.items():
        if name.endswith("attn1.processor"):
            attn = unet.get_submodule(name[: -len(".processor")])
            out.append((name, attn.to_q.in_features, attn.heads))
    return out


def _key(name: str) -> str:
    return name.replace(".processor", "").replace(".", "__")


class DemoAttentionAdapter(ModelMixin, ConfigMixin):
    """Demonstration-attention layers for a given U-Net (the constructor is the config).

    Args:
        layer_names: processor names of the U-Net's ``attn1`` layers that get demo attention.
        dims: channels of each layer.
        heads: attention heads of each layer.
        demo_timestep: the timestep at which demonstrations are encoded.
        method: ``"attention"`` (trained demo attention) or ``"reference"`` (DreamTuner-style
            training-free reference self-attention; the layers' weights are unused).
    """

    config_name = "config.json"

    @register_to_config
    def __init__(self, layer_names: list[str], dims: list[int], heads: list[int], demo_timestep: int = 1, method: str = "attention"):
        super().__init__()
        if method not in ("attention", "reference"):
            raise InvalidValueError(f"unknown demonstration method {method!r}")
        self.layers = nn.ModuleDict({_key(n): DemoAttention(d) for n, d in zip(layer_names, dims)})

    @classmethod
    def for_unet(cls, unet, *, demo_timestep: int = 1, method: str = "attention", init_from_self_attention: bool = True) -> "DemoAttentionAdapter":
        """An adapter matching ``unet``; q/k/v start as copies of each layer's self-attention."""
        layers = self_attention_layers(unet)
        adapter = cls([n for n, _, _ in layers], [d for _, d, _ in layers], [h for _, _, h in layers], demo_timestep, method)
        if init_from_self_attention:
            with torch.no_grad():
                for name, _, _ in layers:
                    attn = unet.get_submodule(name[: -len(".processor")])
                    layer = adapter.layers[_key(name)]
                    layer.to_q.weight.copy_(attn.to_q.weight)
                    layer.to_k.weight.copy_(attn.to_k.weight)
                    layer.to_v.weight.copy_(attn.to_v.weight)
        return adapter.to(unet.device)

    def install(self, unet) -> None:
        """Set the demonstration processors on ``unet`` (``set_attn_processor``)."""
        names = set(self.config.layer_names)
        processors = {}
        for name in unet.attn_processors:
            if name in names:
                processors[name] = DemoAttnProcessor(name, self.layers[_key(name)], self.config.method)
            else:
                processors[name] = PassthroughProcessor()
        unet.set_attn_processor(processors)

    def encode_demos(self, unet, demo_latents: torch.Tensor, demo_embeddings: torch.Tensor, scale: float = 1.0, added_cond_kwargs: dict | None = None) -> DemoContext:
        """Encode demonstrations once per request; returns the context for every step.

        Args:
            unet: the U-Net with this adapter installed.
            demo_latents: (B, n, C, h, w) scaled latents of n demonstrations per image.
            demo_embeddings: (B, n, L, D) text-encoder states of the demonstrations' captions.
            scale: demonstration-attention output scale at sampling time.
            added_cond_kwargs: SDXL only: the demonstrations' ``text_embeds`` (B * n, P) and
                ``time_ids`` (B * n, 6) (:mod:`suti.conditioning`), flattened like the latents.

        Returns:
            A :class:`DemoContext` in ``"use"`` mode with keys/values per layer,
            (B, heads, n * hw, d).
        """
        b, n = demo_latents.shape[:2]
        if not 1 <= n <= MAX_DEMOS:
            raise InvalidValueError(f"between 1 and {MAX_DEMOS} demonstrations are supported (got {n})")
        ctx = DemoContext(mode="capture", num_demos=n)
        t = torch.full((b * n,), self.config.demo_timestep, device=demo_latents.device, dtype=torch.long)
        extra = {} if added_cond_kwargs is None else {"added_cond_kwargs": {k: v.to(unet.dtype) for k, v in added_cond_kwargs.items()}}
        unet(demo_latents.flatten(0, 1), t, demo_embeddings.flatten(0, 1).to(unet.dtype), cross_attention_kwargs={"demo": ctx}, **extra)
        heads = dict(zip(self.config.layer_names, self.config.heads))
        kv = {}
        for name in self.config.layer_names:
            feats = ctx.features[name]  # (B * n, hw, C)
            feats = feats.reshape(b, n * feats.shape[1], feats.shape[2])  # (B, n * hw, C)
            if self.config.method == "reference":
                attn = unet.get_submodule(name[: -len(".processor")])
                k, v = attn.to_k(feats), attn.to_v(feats)
            else:
                layer = self.layers[_key(name)]
                k, v = layer.to_k(feats), layer.to_v(feats)
            kv[name] = (_heads(k, heads[name]), _heads(v, heads[name]))
        return DemoContext(mode="use", num_demos=n, kv=kv, scale=scale)
