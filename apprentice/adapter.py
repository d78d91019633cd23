"""The apprentice's trainable demonstration-attention layers, as one diffusers model.

:class:`DemoAttentionAdapter` holds one small attention (q, k, v, zero-initialised out) per
self-attention layer of the U-Net; ``install(unet)`` puts :class:`DemoAttnProcessor` on them with
``set_attn_processor``. The U-Net itself is never forked or modified. ``encode_demos`` runs the
U-Net's own layers once over the demonstrations (clean latents at a fixed low timestep, their
caption embeddings as context), captures every layer's features and turns them into cached
keys and values, so each denoising step costs one extra attention per layer.

Optionally (``subject_tokens > 0``) the adapter also holds a global *subject channel*
(IP-Adapter, Ye et al. 2023, arXiv 2308.06721, sec. 3.2): the mean of the demonstrations' image
embeddings (a :mod:`suti.scoring` scorer, ``image_encoder``) projected by diffusers'
``ImageProjection`` into ``subject_tokens`` tokens, attended to by every cross-attention
(``attn2``) beside the text through :class:`SubjectCrossAttnProcessor`. With ``image_encoder``
``"unet-features"`` (:data:`UNET_FEATURES`) the tokens come instead from the demonstrations' own
U-Net features at one self-attention layer (every token of every demo, with its place in the
grid), read by a learned resampler (IP-Adapter-Plus's ``IPAdapterPlusImageProjection``, a
Perceiver-style set of ``subject_tokens`` latent queries; Ye et al. 2023 sec. 3.2, Alayrac et al.
2022): a global channel that can see the silhouette, which a pooled image embedding does not keep.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from apprentice.attention import DemoAttnProcessor, DemoContext, PassthroughProcessor, SubjectCrossAttnProcessor, _heads
from suti.errors import InvalidValueError

MAX_DEMOS = 8
#: ``image_encoder`` value for a subject channel read from the demos' U-Net features by a resampler.
UNET_FEATURES = "unet-features"
POSITION_FREQUENCIES = 4  # Fourier frequencies per axis of the resampler's position code


class DemoAttention(nn.Module):
    """Projections of one demonstration-attention layer (dim -> dim).

    With ``position_heads > 0`` it also holds ``position_weight``, (heads,), 0 at init: the
    per-head strength of the position bias (see :func:`apprentice.attention.position_bias`).
    """

    def __init__(self, dim: int, position_heads: int = 0):
        super().__init__()
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)
        nn.init.zeros_(self.to_out.weight)  # an untrained apprentice is exactly the base model
        nn.init.zeros_(self.to_out.bias)
        if position_heads:
            self.position_weight = nn.Parameter(torch.zeros(position_heads))


class SubjectAttention(nn.Module):
    """The subject channel's keys/values of one ``attn2`` layer (cross_attention_dim -> dim) and
    its gate (a scalar, shape (1,), 0 at init: an untrained channel leaves the base model unchanged)."""

    def __init__(self, cross_attention_dim: int, dim: int):
        super().__init__()
        self.to_k_ip = nn.Linear(cross_attention_dim, dim, bias=False)
        self.to_v_ip = nn.Linear(cross_attention_dim, dim, bias=False)
        self.gate = nn.Parameter(torch.zeros(1))  # (1,): DeepSpeed broadcasts no 0-d parameters


def self_attention_layers(unet) -> list[tuple[str, int, int]]:
    """(processor name, channels, heads) of every transformer self-attention of a U-Net."""
    return _attention_layers(unet, "attn1")


def cross_attention_layers(unet) -> list[tuple[str, int, int]]:
    """(processor name, inner dim of its keys, context dim) of every cross-attention of a U-Net."""
    return [(name, attn.to_k.out_features, attn.to_k.in_features) for name, attn in _modules(unet, "attn2")]


def _modules(unet, kind: str):
    for name in unet.attn_processors:
        if name.endswith(f"{kind}.processor"):
            yield name, unet.get_submodule(name[: -len(".processor")])


def _attention_layers(unet, kind: str) -> list[tuple[str, int, int]]:
    return [(name, attn.to_q.in_features, attn.heads) for name, attn in _modules(unet, kind)]


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
            training-free reference self-attention; the layers' weights are unused, and so is
            the subject channel).
        subject_tokens: tokens of the global subject channel (0: no channel, as before).
        image_encoder: the :func:`suti.scoring.get_scorer` name that embeds the demonstrations
            for the channel (``"toy-clip"``, ``"openai-clip-vit-b-32"``...).
        image_embed_dim: size D of those embeddings.
        cross_attention_dim: size of the U-Net's cross-attention context (the tokens' size).
        subject_layer_names: processor names of the ``attn2`` layers that get the channel.
        subject_dims: inner (key/value) dim of each of those layers.
        subject_feature_layer: with ``image_encoder="unet-features"``, the ``attn1`` processor name
            whose input features (captured in :meth:`encode_demos`) the resampler reads; its
            channels are ``image_embed_dim``.
        position_bias: add a learned, per-head bias ``-w * d^2`` to the demonstration
            attention's logits, ``d`` the distance (in the layer's grid cells) between a query's
            position and a demonstration token's (each image's grid spanning [0, 1]^2); ``w``
            starts at 0 (no bias). It lets a noisy image, whose own features say little, take
            each position's content from the same place in the demonstrations (layout, silhouette).
            The bias is materialised per layer call, (heads, L, n * L) floats for L tokens (the
            size of one image's attention weights): small for the toy's 16 x 16 latents, about
            1.6 GB for 3 demos at SD's 64 x 64 and 8 heads (not measured there).
    """

    config_name = "config.json"

    @register_to_config
    def __init__(self, layer_names: list[str], dims: list[int], heads: list[int], demo_timestep: int = 1, method: str = "attention",
                 subject_tokens: int = 0, image_encoder: str | None = None, image_embed_dim: int | None = None, cross_attention_dim: int | None = None,
                 subject_layer_names: list[str] | None = None, subject_dims: list[int] | None = None, position_bias: bool = False,
                 subject_feature_layer: str | None = None):
        super().__init__()
        if method not in ("attention", "reference"):
            raise InvalidValueError(f"unknown demonstration method {method!r}")
        self.layers = nn.ModuleDict({_key(n): DemoAttention(d, h if position_bias else 0) for n, d, h in zip(layer_names, dims, heads)})
        if subject_tokens < 0:
            raise InvalidValueError(f"subject_tokens must be >= 0, got {subject_tokens}")
        if subject_tokens:
            if not (image_embed_dim and cross_attention_dim and subject_layer_names and subject_dims):
                raise InvalidValueError("a subject channel needs image_embed_dim, cross_attention_dim, subject_layer_names and subject_dims")
            if image_encoder == UNET_FEATURES:
                if subject_feature_layer not in layer_names:
                    raise InvalidValueError(f"subject_feature_layer must be one of the demonstration layers, got {subject_feature_layer!r}")
                from diffusers.models.embeddings import IPAdapterPlusImageProjection

                proj_heads = max(1, cross_attention_dim // 64)
                self.image_proj = IPAdapterPlusImageProjection(embed_dims=image_embed_dim, output_dims=cross_attention_dim, hidden_dims=cross_attention_dim,
                                                               depth=2, dim_head=cross_attention_dim // proj_heads, heads=proj_heads, num_queries=subject_tokens, ffn_ratio=2)
                self.feature_position = nn.Linear(4 * POSITION_FREQUENCIES, image_embed_dim)  # Fourier code of a token's (y, x) -> its channels
            else:
                from diffusers.models.embeddings import ImageProjection

                self.image_proj = ImageProjection(image_embed_dim=image_embed_dim, cross_attention_dim=cross_attention_dim, num_image_text_embeds=subject_tokens)
            self.subject = nn.ModuleDict({_key(n): SubjectAttention(cross_attention_dim, d) for n, d in zip(subject_layer_names, subject_dims)})

    @property
    def has_subject_channel(self) -> bool:
        """Whether the subject channel is in use (it is ignored in ``"reference"`` mode)."""
        return self.config.subject_tokens > 0 and self.config.method == "attention"

    @property
    def reads_unet_features(self) -> bool:
        """Whether the subject channel reads the demos' U-Net features (no image encoder needed)."""
        return self.has_subject_channel and self.config.image_encoder == UNET_FEATURES

    @property
    def needs_image_embeds(self) -> bool:
        """Whether :meth:`encode_demos` needs the demos' image embeddings (a channel fed by an
        image encoder, not by the U-Net's features)."""
        return self.has_subject_channel and not self.reads_unet_features

    @classmethod
    def for_unet(cls, unet, *, demo_timestep: int = 1, method: str = "attention", init_from_self_attention: bool = True,
                 subject_tokens: int = 0, image_encoder: str | None = None, image_embed_dim: int | None = None, position_bias: bool = False,
                 subject_feature_layer: str | None = None) -> "DemoAttentionAdapter":
        """An adapter matching ``unet``; q/k/v start as copies of each layer's self-attention.

        With ``subject_tokens > 0`` the subject channel's ``to_k_ip``/``to_v_ip`` start as copies
        of each cross-attention's ``to_k``/``to_v`` (as IP-Adapter), its gates at 0.
        ``image_embed_dim`` defaults to the size of ``image_encoder``'s embeddings (measured).
        With ``image_encoder="unet-features"`` the resampler reads ``subject_feature_layer``
        (default: the first self-attention on the down path, the finest grid the encoder attends
        at: ``down_blocks.1`` at 8 x 8 for the toy's 16 x 16 latents, ``down_blocks.0`` at 64 x 64
        for SD 1.5's).
        """
        layers = self_attention_layers(unet)
        subject: dict = {}
        cross = cross_attention_layers(unet) if subject_tokens else []
        if subject_tokens and image_encoder == UNET_FEATURES:
            dims = {n: d for n, d, _ in layers}
            if subject_feature_layer is None:
                subject_feature_layer = next((n for n, _, _ in layers if n.startswith("down_blocks.")), layers[0][0])
            if subject_feature_layer not in dims:
                raise InvalidValueError(f"subject_feature_layer must be one of the U-Net's self-attentions ({', '.join(dims)}), got {subject_feature_layer!r}")
            image_embed_dim = dims[subject_feature_layer]
        if subject_tokens:
            if image_embed_dim is None:
                if image_encoder is None:
                    raise InvalidValueError("a subject channel needs image_encoder or image_embed_dim")
                image_embed_dim = image_embedding_size(image_encoder)
            context_dims = {c for _, _, c in cross}
            if len(context_dims) != 1:
                raise InvalidValueError(f"the U-Net's cross-attentions have context sizes {sorted(context_dims)}; one is needed for a subject channel")
            subject = dict(subject_tokens=subject_tokens, image_encoder=image_encoder, image_embed_dim=image_embed_dim, cross_attention_dim=context_dims.pop(),
                           subject_layer_names=[n for n, _, _ in cross], subject_dims=[d for _, d, _ in cross],
                           subject_feature_layer=subject_feature_layer if image_encoder == UNET_FEATURES else None)
        adapter = cls([n for n, _, _ in layers], [d for _, d, _ in layers], [h for _, _, h in layers], demo_timestep, method, position_bias=position_bias, **subject)
        with torch.no_grad():
            if init_from_self_attention:
                for name, _, _ in layers:
                    attn = unet.get_submodule(name[: -len(".processor")])
                    layer = adapter.layers[_key(name)]
                    layer.to_q.weight.copy_(attn.to_q.weight)
                    layer.to_k.weight.copy_(attn.to_k.weight)
                    layer.to_v.weight.copy_(attn.to_v.weight)
            for name, _, _ in cross:
                attn = unet.get_submodule(name[: -len(".processor")])
                adapter.subject[_key(name)].to_k_ip.weight.copy_(attn.to_k.weight)
                adapter.subject[_key(name)].to_v_ip.weight.copy_(attn.to_v.weight)
        return adapter.to(unet.device)

    def install(self, unet) -> None:
        """Set the demonstration processors on ``unet`` (``set_attn_processor``)."""
        names = set(self.config.layer_names)
        subject = set(self.config.subject_layer_names or []) if self.has_subject_channel else set()
        processors = {}
        for name in unet.attn_processors:
            if name in names:
                processors[name] = DemoAttnProcessor(name, self.layers[_key(name)], self.config.method)
            elif name in subject:
                processors[name] = SubjectCrossAttnProcessor(name, self.subject[_key(name)])
            else:
                processors[name] = PassthroughProcessor()
        unet.set_attn_processor(processors)

    def encode_demos(self, unet, demo_latents: torch.Tensor, demo_embeddings: torch.Tensor, scale: float = 1.0, added_cond_kwargs: dict | None = None,
                     image_embeds: torch.Tensor | None = None) -> DemoContext:
        """Encode demonstrations once per request; returns the context for every step.

        Args:
            unet: the U-Net with this adapter installed.
            demo_latents: (B, n, C, h, w) scaled latents of n demonstrations per image.
            demo_embeddings: (B, n, L, D) text-encoder states of the demonstrations' captions.
            scale: demonstration-attention output scale at sampling time.
            added_cond_kwargs: SDXL only: the demonstrations' ``text_embeds`` (B * n, P) and
                ``time_ids`` (B * n, 6) (:mod:`suti.conditioning`), flattened like the latents.
            image_embeds: (B, n, D) unit-norm image embeddings of the demonstrations (the
                ``image_encoder`` scorer's); needed when the subject channel is on, else unused
                (also unused when the channel reads the U-Net's features).

        Returns:
            A :class:`DemoContext` in ``"use"`` mode with keys/values per layer,
            (B, heads, n * hw, d), and with the channel on the subject tokens
            ``image_proj(mean_n image_embeds)``, (B, subject_tokens, cross_attention_dim), or the
            resampler's tokens over the captured features (:meth:`resample_subject`).

        Raises:
            InvalidValueError: n outside 1..8, or the channel is on and ``image_embeds`` is
                missing or not (B, n, image_embed_dim).
        """
        b, n = demo_latents.shape[:2]
        if not 1 <= n <= MAX_DEMOS:
            raise InvalidValueError(f"between 1 and {MAX_DEMOS} demonstrations are supported (got {n})")
        subject = self.project_subject(image_embeds, b, n) if self.needs_image_embeds else None
        ctx = DemoContext(mode="capture", num_demos=n)
        t = torch.full((b * n,), self.config.demo_timestep, device=demo_latents.device, dtype=torch.long)
        extra = {} if added_cond_kwargs is None else {"added_cond_kwargs": {k: v.to(unet.dtype) for k, v in added_cond_kwargs.items()}}
        unet(demo_latents.flatten(0, 1), t, demo_embeddings.flatten(0, 1).to(unet.dtype), cross_attention_kwargs={"demo": ctx}, **extra)
        if self.reads_unet_features:
            subject = self.resample_subject(ctx.features[self.config.subject_feature_layer], b, n, tuple(demo_latents.shape[-2:]))
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
        return DemoContext(mode="use", num_demos=n, kv=kv, scale=scale, subject=subject, latent_size=tuple(demo_latents.shape[-2:]))

    def project_subject(self, image_embeds: torch.Tensor | None, b: int, n: int) -> torch.Tensor:
        """(B, n, D) demonstration embeddings -> (B, subject_tokens, cross_attention_dim) tokens."""
        want = (b, n, self.config.image_embed_dim)
        if image_embeds is None:
            raise InvalidValueError(f"this adapter has a subject channel ({self.config.subject_tokens} tokens): encode_demos needs image_embeds {want} "
                                    f"of the demonstrations (scorer {self.config.image_encoder!r})")
        if tuple(image_embeds.shape) != want:
            raise InvalidValueError(f"image_embeds must be (B, n, D) = {want}, got {tuple(image_embeds.shape)}")
        proj = self.image_proj.image_embeds.weight
        return self.image_proj(image_embeds.to(proj.device, proj.dtype).mean(dim=1))

    def resample_subject(self, features: torch.Tensor, b: int, n: int, latent_size: tuple[int, int]) -> torch.Tensor:
        """(B * n, hw, C) captured demo features -> (B, subject_tokens, cross_attention_dim) tokens.

        Each token gets a learned projection of the Fourier code of its cell centre in its demo's
        grid (``(y, x)`` in [0, 1]^2, :data:`POSITION_FREQUENCIES` octaves, sin and cos) added, so
        the resampler knows where in a demo a feature lies; then all n demos' tokens are read
        together by the resampler's latent queries.
        """
        from apprentice.attention import _centres, _grid

        rows, cols = _grid(features.shape[1], latent_size)
        centres = _centres(rows, cols, features.device)  # (hw, 2)
        freqs = (2.0 ** torch.arange(POSITION_FREQUENCIES, device=features.device, dtype=torch.float32)) * torch.pi
        angles = (centres[:, :, None] * freqs).flatten(1)  # (hw, 2F)
        code = torch.cat([angles.sin(), angles.cos()], dim=1).to(features.dtype)  # (hw, 4F)
        tokens = features + self.feature_position(code)
        return self.image_proj(tokens.reshape(b, n * tokens.shape[1], tokens.shape[2]))


def image_embedding_size(image_encoder) -> int:
    """Size of the image embeddings of ``image_encoder``: a :func:`suti.scoring.get_scorer` name
    (built here) or an already built scorer."""
    from PIL import Image

    from suti.scoring import get_scorer

    scorer = get_scorer(image_encoder) if isinstance(image_encoder, str) else image_encoder
    return int(scorer.embed_images([Image.new("RGB", (32, 32))]).shape[1])
