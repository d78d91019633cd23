"""Demonstration attention as diffusers attention processors (installed with
``unet.set_attn_processor``; fed through ``cross_attention_kwargs={"demo": DemoContext}``).

Every self-attention (``attn1``) of the U-Net's transformer blocks gets a
:class:`DemoAttnProcessor`. It runs the block's usual self-attention and, in ``"attention"``
mode, adds an extra attention from the generated image's tokens to the demonstrations' tokens
of the same layer:

    out = SelfAttn(h) + W_o · softmax(W_q h · (W_k F)^T / sqrt(d)) · W_v F

with ``F`` the demonstrations' features at that layer, computed once per request (see
:meth:`apprentice.adapter.DemoAttentionAdapter.encode_demos`) and cached as keys and values. ``W_o``
starts at zero, so an untrained apprentice equals the base model. With the adapter's
``position_bias`` the logits get ``-w d^2`` added (:func:`position_bias`: ``d`` the distance
between the query's place and the demonstration token's, ``w`` learned per head from 0). In ``"reference"`` mode
(DreamTuner's training-free reference self-attention) the demonstrations' keys and values from the
block's own projections are concatenated to the self-attention's keys and values instead.

Cross-attention layers (``attn2``) get a :class:`PassthroughProcessor` that ignores ``demo``, or,
with the adapter's global *subject channel* on (``subject_tokens > 0``), a
:class:`SubjectCrossAttnProcessor`: IP-Adapter's decoupled cross-attention (Ye et al. 2023,
arXiv 2308.06721, sec. 3.2), text and a few subject tokens attended to separately with the same query:

    out = W_o · (Attn(W_q h, W_k c, W_v c) + g · Attn(W_q h, K_ip s, V_ip s))

with ``c`` the text states, ``s`` the subject tokens (a projection of the demonstrations' image
embeddings) and ``g`` a learnable per-layer gate that starts at 0.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0


@dataclass
class DemoContext:
    """Per-request demonstration state, passed as ``cross_attention_kwargs={"demo": ctx}``.

    Attributes:
        mode: ``"capture"`` (record each layer's input features of the demonstration batch),
            ``"use"`` (attend to cached keys/values) or ``"off"`` (plain base model).
        num_demos: demonstrations per generated image.
        features: layer name -> captured features, (B * num_demos, HW, C).
        kv: layer name -> (keys, values), each (B_kv, heads, num_demos * HW, head_dim); in reference
            mode keys/values of the block's own projections. ``B_kv`` is the batch of the U-Net
            call, or 1: one request's keys/values shared by every image and every
            classifier-free-guidance branch (broadcast, never copied; see :meth:`repeat`).
        mask: (B,) float, 1 where the image sees its demonstrations, 0 where they are dropped
            (classifier-free guidance over demonstrations); ``None`` means all 1.
        scale: multiplier of the demonstration attention's output (1 = as trained); also
            scales the subject channel.
        subject: the subject channel's tokens, (B_kv or 1, T, cross_attention_dim) (shared like
            ``kv``), or ``None`` when the adapter has no subject channel.
        latent_size: (h, w) of the demonstrations' latents: the aspect ratio from which a layer's
            token grid is recovered for the position bias (``None``: square grids).
        query_size: (h, w) of the latents being denoised, when they differ from the demos'
            (``None``: the same as ``latent_size``); set by the sampler for ``height``/``width``.
        text_tokens: FLUX only (:mod:`apprentice.flux`): the text tokens that precede the image
            tokens in a single-stream block's sequence, for the call under way.
    """

    mode: str = "use"
    num_demos: int = 0
    features: dict[str, torch.Tensor] = field(default_factory=dict)
    kv: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    mask: torch.Tensor | None = None
    scale: float = 1.0
    subject: torch.Tensor | None = None
    latent_size: tuple[int, int] | None = None
    query_size: tuple[int, int] | None = None
    text_tokens: int = 0

    def repeat(self, times: int) -> "DemoContext":
        """The same context for a batch repeated ``times`` (e.g. images x CFG branches).

        Keys and values of a one-request context (batch 1) are shared, not copied: the
        processors broadcast them over the batch. Only a context of several requests is tiled.
        """
        if all(a.shape[0] == 1 for a, _ in self.kv.values()):
            kv = dict(self.kv)
        else:
            kv = {k: (a.repeat(times, 1, 1, 1), b.repeat(times, 1, 1, 1)) for k, (a, b) in self.kv.items()}
        mask = None if self.mask is None else self.mask.repeat(times)
        subject = self.subject
        if subject is not None and subject.shape[0] != 1:
            subject = subject.repeat(times, 1, 1)
        return DemoContext(mode=self.mode, num_demos=self.num_demos, kv=kv, mask=mask, scale=self.scale, subject=subject, latent_size=self.latent_size, query_size=self.query_size,
                           text_tokens=self.text_tokens)

    def cache_bytes(self) -> int:
        """Bytes held by the cached keys and values (distinct storages counted once)."""
        seen, total = set(), 0
        for pair in [*self.kv.values(), () if self.subject is None else (self.subject,)]:
            for t in pair:
                ptr = t.untyped_storage().data_ptr()
                if ptr not in seen:
                    seen.add(ptr)
                    total += t.untyped_storage().nbytes()
        return total


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, C) -> (B, heads, N, C // heads)."""
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)


def _batch(x: torch.Tensor, b: int) -> torch.Tensor:
    """Keys/values of batch 1 (shared) or ``b``, as batch ``b`` (a broadcast view, no copy)."""
    if x.shape[0] == b:
        return x
    if x.shape[0] != 1:
        raise ValueError(f"demonstration keys/values have batch {x.shape[0]}, the U-Net call {b}")
    return x.expand(b, -1, -1, -1)


def _grid(tokens: int, latent_size: tuple[int, int] | None) -> tuple[int, int]:
    """(rows, cols) of a layer's ``tokens`` for latents of ``latent_size`` (h, w): the grid with
    that aspect ratio (``None``: square). Raises ValueError when no such grid has ``tokens`` cells."""
    h, w = latent_size or (1, 1)
    rows = max(1, round((tokens * h / w) ** 0.5))
    cols = tokens // rows
    if rows * cols != tokens:
        raise ValueError(f"{tokens} tokens do not form a grid of aspect {h}:{w}")
    return rows, cols


def _centres(rows: int, cols: int, device) -> torch.Tensor:
    """(rows * cols, 2) cell centres in [0, 1]^2, row-major like the U-Net's flattened tokens."""
    y = (torch.arange(rows, device=device, dtype=torch.float32) + 0.5) / rows
    x = (torch.arange(cols, device=device, dtype=torch.float32) + 0.5) / cols
    return torch.cartesian_prod(y, x)


def position_bias(weight: torch.Tensor, queries: int, keys_per_demo: int, num_demos: int, latent_size: tuple[int, int] | None,
                  query_size: tuple[int, int] | None = None) -> torch.Tensor:
    """The demonstration attention's position bias, (heads, L, n * M): ``-w_h * d^2``.

    ``d`` is the distance between query ``i``'s cell centre and demonstration token ``j``'s, each
    image's grid spanning [0, 1]^2, in units of the query grid's cells (so ``w = 1`` makes a
    neighbouring cell ``e`` times less likely); the same for each of the ``num_demos`` demos.

    Args:
        weight: (heads,) per-head strengths ``w`` (0: no bias).
        queries: L, the generated image's tokens at this layer; keys_per_demo: M, one demo's.
        latent_size: (h, w) of the demonstrations' latents (their grid's aspect ratio).
        query_size: (h, w) of the denoised latents (``None``: ``latent_size``); a differently
            shaped image is matched to the demos by relative place (both grids span [0, 1]^2).

    Raises:
        ValueError: a token count that forms no grid of its latents' aspect ratio.
    """
    dist2 = _squared_distances(queries, keys_per_demo, num_demos, latent_size, query_size).to(weight.device)
    return -weight.float().view(-1, 1, 1) * dist2


@functools.lru_cache(maxsize=64)
def _squared_distances(queries: int, keys_per_demo: int, num_demos: int, latent_size: tuple[int, int] | None, query_size: tuple[int, int] | None) -> torch.Tensor:
    """(L, n * M) squared distances of :func:`position_bias`, in query-grid cells (CPU; computed
    once per layer shape, not per call: only the weights change between calls)."""
    rows, cols = _grid(queries, query_size or latent_size)
    scale = torch.tensor([rows, cols], dtype=torch.float32)
    q = _centres(rows, cols, "cpu") * scale
    k = _centres(*_grid(keys_per_demo, latent_size), "cpu") * scale
    return torch.cdist(q, k).pow(2).repeat(1, num_demos)


def _shared_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d) + bias) v`` with keys/values of batch 1 shared by the whole batch.

    query: (B, heads, L, d); keys, values: (B or 1, heads, M, d); bias: (heads, L, M) or ``None``
    -> (B, heads, L, d). Shared keys and values are attended to by folding the batch into the
    query length (each query row is independent), so they are neither repeated nor copied per
    image or guidance branch. With a bias they are broadcast views instead (``expand``), so that
    the bias, the larger of the two, is broadcast over the batch rather than tiled.
    """
    b, h, n, d = query.shape
    if bias is not None:
        return F.scaled_dot_product_attention(query, _batch(keys, b), _batch(values, b), attn_mask=bias.to(query.dtype).unsqueeze(0))
    if keys.shape[0] == b:
        return F.scaled_dot_product_attention(query, keys, values)
    _batch(keys, b)  # checks the batch
    folded = query.transpose(0, 1).reshape(1, h, b * n, d)  # (1, heads, B * L, d)
    out = F.scaled_dot_product_attention(folded, keys, values)
    return out.reshape(h, b, n, d).transpose(0, 1)


class DemoAttnProcessor:
    """Self-attention plus demonstration attention for one ``attn1`` layer.

    Not an ``nn.Module``: its weights live in :class:`apprentice.adapter.DemoAttentionAdapter`
    (``layer``), so the base U-Net's state dict stays exactly the base model's.
    """

    def __init__(self, name: str, layer: torch.nn.Module | None, method: str = "attention"):
        self.name = name
        self.layer = layer
        self.method = method
        self.base = AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, demo: DemoContext | None = None, **kwargs):
        if demo is None or demo.mode == "off":
            return self.base(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        if demo.mode == "capture":
            demo.features[self.name] = hidden_states.detach() if not torch.is_grad_enabled() else hidden_states
            return self.base(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        if self.name not in demo.kv:
            raise KeyError(f"demonstration keys/values for layer {self.name} were not computed")
        keys, values = demo.kv[self.name]  # (B, heads, M, d) with M = num_demos * HW
        if self.method == "reference":
            return self._reference(attn, hidden_states, keys, values, demo)
        out = self.base(attn, hidden_states, encoder_hidden_states, attention_mask, temb)  # (B, HW, C)
        query = _heads(self.layer.to_q(hidden_states), attn.heads)  # (B, heads, HW, d)
        bias = None
        weight = getattr(self.layer, "position_weight", None)
        if weight is not None:
            bias = position_bias(weight, query.shape[2], keys.shape[2] // demo.num_demos, demo.num_demos, demo.latent_size, demo.query_size)
        extra = _shared_attention(query, keys.to(query.dtype), values.to(query.dtype), bias)
        extra = self.layer.to_out(extra.transpose(1, 2).reshape(hidden_states.shape[0], -1, query.shape[1] * query.shape[3]))
        gate = demo.scale if demo.mask is None else demo.scale * demo.mask.to(extra.dtype).view(-1, 1, 1)
        return out + gate * extra

    def _reference(self, attn, hidden_states, ref_keys, ref_values, demo):
        """DreamTuner-style: concatenate the demos' keys/values to the self-attention's."""
        b = hidden_states.shape[0]
        query = _heads(attn.to_q(hidden_states), attn.heads)
        keys = _heads(attn.to_k(hidden_states), attn.heads)
        values = _heads(attn.to_v(hidden_states), attn.heads)
        if demo.mask is not None and bool((demo.mask == 0).any()):
            # dropped demos: mask out the reference tokens for those rows
            bias = torch.zeros(b, 1, 1, keys.shape[2] + ref_keys.shape[2], dtype=query.dtype, device=query.device)
            bias[:, :, :, keys.shape[2]:] = torch.where(demo.mask.view(-1, 1, 1, 1) > 0, 0.0, float("-inf")).to(query.dtype)
        else:
            bias = None
        ref_keys = _batch(ref_keys, b)
        ref_values = _batch(ref_values, b)
        keys = torch.cat([keys, ref_keys.to(keys.dtype)], dim=2)
        values = torch.cat([values, ref_values.to(values.dtype)], dim=2)
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=bias)
        out = out.transpose(1, 2).reshape(b, -1, attn.heads * query.shape[-1])
        return attn.to_out[1](attn.to_out[0](out))


class PassthroughProcessor(AttnProcessor2_0):
    """The standard processor, accepting (and ignoring) the ``demo`` keyword."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, demo: DemoContext | None = None, **kwargs):
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


class SubjectCrossAttnProcessor(PassthroughProcessor):
    """Text cross-attention plus the subject channel for one ``attn2`` layer (IP-Adapter's
    decoupled cross-attention, Ye et al. 2023, arXiv 2308.06721, sec. 3.2).

    ``layer`` (in :class:`apprentice.adapter.DemoAttentionAdapter`) holds ``to_k_ip``, ``to_v_ip``
    (cross_attention_dim -> inner dim) and the scalar ``gate`` (0 at init: the base model). The
    query is the layer's own ``to_q(h)`` and the channel's output goes through the layer's own
    ``to_out`` (its weight only: ``W_o (a + g b) + bias = [W_o a + bias] + g W_o b``, so the base
    output stays bit-identical). The channel is off without ``demo.subject``, outside ``"use"``
    mode, and for rows with ``demo.mask`` 0; ``demo.scale`` multiplies it.
    """

    def __init__(self, name: str, layer: torch.nn.Module):
        super().__init__()
        self.name = name
        self.layer = layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, demo: DemoContext | None = None, **kwargs):
        out = super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)  # (B, N, C)
        if demo is None or demo.mode != "use" or demo.subject is None:
            return out
        b = hidden_states.shape[0]
        tokens = demo.subject.to(hidden_states.dtype)  # (B or 1, T, cross_attention_dim)
        query = _heads(attn.to_q(hidden_states), attn.heads)  # (B, heads, N, d)
        keys = _heads(self.layer.to_k_ip(tokens), attn.heads)  # (B or 1, heads, T, d)
        values = _heads(self.layer.to_v_ip(tokens), attn.heads)
        if attn.norm_q is not None:
            query, keys = attn.norm_q(query), attn.norm_k(keys)
        extra = _shared_attention(query, keys, values)  # (B, heads, N, d)
        extra = extra.transpose(1, 2).reshape(b, -1, query.shape[1] * query.shape[3])
        extra = attn.to_out[1](F.linear(extra, attn.to_out[0].weight)) / attn.rescale_output_factor
        gate = self.layer.gate.to(extra.dtype) * demo.scale
        if demo.mask is not None:
            gate = gate * demo.mask.to(extra.dtype).view(-1, 1, 1)
        return out + gate * extra
