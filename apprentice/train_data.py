"""The data side of apprentice training: the shard loader (:func:`apprentice.data.make_pipeline`)
of each process, and each batch made model inputs: VAE latents of the targets and the
demonstrations, frozen text conditioning of the prompts and the demos' captions, and the demos'
image embeddings for the subject channel (``--subject-tokens``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from apprentice.train_config import ApprenticeTrainConfig


def training_batches(config: ApprenticeTrainConfig, data_seed: int) -> Iterator[dict]:
    """This process's endless stream of collated batches (:func:`apprentice.data.collate`) of
    ``config.batch_size`` examples, shuffled by ``data_seed`` (``seed + 1000 * step`` on resume:
    a fresh shuffle, see :mod:`apprentice.checkpoint`)."""
    from apprentice.data import collate, make_pipeline

    dataset = make_pipeline(config.shards, resolution=config.resolution, num_demos=config.num_demos, seed=data_seed, num_workers=config.num_workers, min_delta_clip=config.min_delta_clip, self_target=config.self_target, caption_prompt=config.caption_prompt, demo_caption=config.demo_caption, copy_view=config.copy_view, weights=config.shard_weights, resampled=config.resampled_shards)
    return iter(torch.utils.data.DataLoader(dataset, batch_size=config.batch_size, collate_fn=collate, num_workers=config.num_workers))


@dataclass
class EncodedBatch:
    """A batch of B examples with n demos each, encoded by the frozen base (no gradient)."""

    target: torch.Tensor  # (B, C, h, w) scaled latents of the targets, sampled from the VAE posterior
    demos: torch.Tensor  # (B, n, C, h, w) scaled latents of the demos (the posterior mean)
    text_cond: object  # the prompts' Conditioning (B rows; SDXL adds pooled embeds and time ids)
    demo_cond: object  # the demos' captions' Conditioning (B * n rows)
    demo_emb: torch.Tensor  # (B, n, L, D) the demos' caption hidden states
    image_embeds: torch.Tensor | None  # (B, n, D) the demos' image embeddings (subject channel), or None


def encode_batch(base, batch: dict, device: str, resolution: int, generator: torch.Generator, scorer=None) -> EncodedBatch:
    """Encode a collated batch (``target`` (B, 3, R, R) and ``demos`` (B, n, 3, R, R) in [-1, 1],
    ``prompt``, ``demo_captions``) with ``base``'s VAE and text encoders, on ``device``.

    The target latents are sampled with ``generator`` on CPU (the global RNG on GPU); ``scorer``
    (:func:`demo_scorer`) embeds the demos, ``None``: no image embeddings.
    """
    vae = base.vae
    b, n = batch["demos"].shape[:2]
    with torch.no_grad():
        shift = getattr(vae.config, "shift_factor", None) or 0.0  # FLUX's VAE: latents are shifted, then scaled
        target = (vae.encode(batch["target"].to(device)).latent_dist.sample(generator if device == "cpu" else None) - shift) * vae.config.scaling_factor
        demos = (vae.encode(batch["demos"].flatten(0, 1).to(device)).latent_dist.mean - shift) * vae.config.scaling_factor
        demos = demos.view(b, n, *demos.shape[1:])  # (B, n, C, h, w)
        text_cond = encode_text(base, batch["prompt"], device, resolution)  # (B, L, D) (+ SDXL pooled, time ids)
        demo_cond = encode_text(base, [c for caps in batch["demo_captions"] for c in caps], device, resolution)  # B * n
        demo_emb = demo_cond.encoder_hidden_states.view(b, n, *demo_cond.encoder_hidden_states.shape[1:])
        image_embeds = None if scorer is None else embed_demos(scorer, batch["demos"]).to(device)  # (B, n, D)
    return EncodedBatch(target, demos, text_cond, demo_cond, demo_emb, image_embeds)


def encode_text(base, prompts: list[str], device: str, resolution: int):
    """Frozen text conditioning of ``prompts`` (:class:`suti.conditioning.Conditioning`, on ``device``)."""
    from suti.conditioning import encode_prompt

    with torch.no_grad():
        return encode_prompt(base, prompts, resolution=resolution).to(device)


def image_encoder_for(config: ApprenticeTrainConfig) -> str | None:
    """The scorer that embeds the demos for the subject channel: ``--image-encoder``, else the
    model's scorer (:func:`suti.scoring.model_scorer`: a preset's ``scorer``, ``toy-clip`` for the
    world presets), or ``"unet-features"`` (:data:`apprentice.adapter.UNET_FEATURES`: a resampler
    over the demos' own U-Net features); ``None`` without a channel (so it never decides a resume)."""
    if not config.subject_tokens:  # an --image-encoder without a channel is refused by ApprenticeTrainConfig.validate
        return None
    from suti.scoring import model_scorer

    return config.image_encoder or model_scorer(config.model)


def demo_scorer(config: ApprenticeTrainConfig):
    """The scorer (:func:`suti.scoring.get_scorer`) that embeds the demos for the subject channel:
    ``config.image_encoder`` (resolved by :func:`image_encoder_for`); ``None`` without a subject
    channel or when it reads the demos' U-Net features."""
    from apprentice.adapter import UNET_FEATURES

    scorer = None  # embeds the demos for the subject channel (none when it reads the U-Net's features)
    if config.subject_tokens and config.image_encoder != UNET_FEATURES:
        from suti.scoring import get_scorer

        scorer = get_scorer(config.image_encoder)
    return scorer


def embed_demos(scorer, demos: torch.Tensor) -> torch.Tensor:
    """(B, n, 3, R, R) demos in [-1, 1] -> (B, n, D) unit-norm image embeddings (``scorer``'s, no grad)."""
    from suti.images import to_pil

    b, n = demos.shape[:2]
    with torch.no_grad():
        emb = scorer.embed_images([to_pil(x) for x in demos.flatten(0, 1)])  # (B * n, D)
    return emb.view(b, n, -1)
