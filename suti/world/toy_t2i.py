"""The ``toy`` model: a small latent text-to-image Stable Diffusion pretrained on the world.

Same classes as Stable Diffusion 1.x, so everything that runs on SD (DreamBooth experts, the
apprentice, serving) runs on it unchanged: an :class:`~diffusers.AutoencoderKL` (32 px RGB ->
16x16x4 latents), a :class:`~diffusers.UNet2DConditionModel` with cross-attention, a
:class:`~transformers.CLIPTextModel` over the real CLIP BPE tokenizer (:mod:`suti.tokenizer`)
and a :class:`~diffusers.DDIMScheduler` with SD's ``scaled_linear`` betas.

This module is the architecture and its weights: :func:`new_models`, :func:`make_pipeline`,
:func:`load_components`, :func:`ship_weights`, :func:`assemble_shipped`. Its pretraining on the
train subjects of :data:`PRETRAIN_WORLD` (``pretrain_t2i``, ``continue_t2i``) lives in
:mod:`suti.world.training.t2i`.

:func:`build_toy_pipeline` is the ``builder`` of ``configs/models/toy.yaml``: it assembles the
shipped fp16 weights (``suti/world/weights/toy``) into a float32 pipeline folder, or pretrains
from scratch when they are missing.
"""

from __future__ import annotations

import importlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

RESOLUTION = 32
#: (num_subjects, seed) of the world whose *train* subjects the toy model sees.
PRETRAIN_WORLD = (240, 0)
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights" / "toy"
SUMMARY_FILE = "toy_training.json"
#: Bump together with ``weights_version`` in configs/models/toy.yaml when the weights change.
WEIGHTS_VERSION = 3

VAE_CONFIG: dict[str, Any] = dict(
    sample_size=RESOLUTION, in_channels=3, out_channels=3, latent_channels=4,
    block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
)
UNET_CONFIG: dict[str, Any] = dict(
    sample_size=RESOLUTION // 2, in_channels=4, out_channels=4,
    block_out_channels=(32, 64, 128), layers_per_block=1, norm_num_groups=32,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=64,
    attention_head_dim=(1, 2, 4),  # diffusers' legacy name: the number of heads (32-dim heads)
)
TEXT_CONFIG: dict[str, Any] = dict(
    vocab_size=49408, hidden_size=64, intermediate_size=256, num_attention_heads=4,
    num_hidden_layers=3, max_position_embeddings=77, projection_dim=64, hidden_act="quick_gelu",
    layer_norm_eps=1e-5, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
)
SCHEDULER_CONFIG: dict[str, Any] = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
)
#: The training run :func:`build_toy_pipeline` falls back on without shipped weights, as
#: ``module:function`` (resolved only then: the training code imports this module, not the
#: other way round).
PRETRAIN = "suti.world.training.t2i:pretrain_t2i"


def pretrain_world():
    """The world whose train subjects are shown in pretraining (held-out ones never)."""
    from suti.world.spec import make_world

    return make_world(*PRETRAIN_WORLD)


# --------------------------------------------------------------------------------------------
# models


def new_models(seed: int = 0):
    """Freshly initialised ``(vae, unet, text_encoder)`` of the toy architecture (float32,
    seeded by ``torch.manual_seed(seed)``): the VAE maps ``(B, 3, 32, 32)`` pixels in [-1, 1]
    to ``(B, 4, 16, 16)`` latents, the text encoder 77 token ids to ``(B, 77, 64)`` states,
    which the U-Net cross-attends to."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    vae = AutoencoderKL(**VAE_CONFIG)
    # Start with a near-deterministic posterior (std ~0.05 instead of 1): with a 1e-6 KL weight
    # the log-variance would take hundreds of steps to get there, and until then the sampling
    # noise drowns the latents (measured: +1.7 dB PSNR after 200 steps).
    n = vae.quant_conv.out_channels // 2
    with torch.no_grad():
        vae.quant_conv.weight[n:].zero_()
        vae.quant_conv.bias[n:].fill_(-6.0)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))
    return vae, unet, text_encoder


def num_params(module) -> int:
    """Number of parameters of a ``torch.nn.Module``."""
    return sum(p.numel() for p in module.parameters())


def make_pipeline(vae, unet, text_encoder, tokenizer=None, scheduler=None):
    """A ``StableDiffusionPipeline`` of toy components (DDIM, no safety checker)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from suti.tokenizer import load_clip_tokenizer

    return StableDiffusionPipeline(
        vae=vae, unet=unet, text_encoder=text_encoder,
        tokenizer=tokenizer or load_clip_tokenizer(),
        scheduler=scheduler or DDIMScheduler(**SCHEDULER_CONFIG),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


# --------------------------------------------------------------------------------------------
# shipped weights and the preset builder


def load_components(folder: Path, dtype):
    """``(vae, unet, text_encoder, scheduler)`` of a toy pipeline folder (or of the shipped
    weights), weights cast to ``dtype`` (a ``torch.dtype``).

    Raises:
        ModelLoadError: the folder's weight files are missing, cut or do not match their
            configs (:func:`suti.weights.check_weight_folder`, :func:`suti.weights.loading`).
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    from suti.weights import check_weight_folder, loading

    check_weight_folder(folder)
    with loading(folder):
        vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=dtype)
        unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=dtype)
        text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=dtype)
        scheduler = DDIMScheduler.from_pretrained(folder / "scheduler")
    return vae, unet, text_encoder, scheduler


def ship_weights(pipeline_dir: str | Path, dest: str | Path = WEIGHTS_DIR) -> Path:
    """Write the compact copy of a pretrained toy pipeline that the repository ships:
    fp16 safetensors and configs, no tokenizer (rebuilt offline by :mod:`suti.tokenizer`)."""
    import torch

    src, dest = Path(pipeline_dir), Path(dest)
    vae, unet, text_encoder, scheduler = load_components(src, torch.float16)
    dest.mkdir(parents=True, exist_ok=True)
    for name, part in (("vae", vae), ("unet", unet), ("text_encoder", text_encoder),
                       ("scheduler", scheduler)):
        if (dest / name).exists():
            shutil.rmtree(dest / name)
        part.save_pretrained(dest / name)
    shutil.copy(src / "model_index.json", dest / "model_index.json")
    if (src / SUMMARY_FILE).is_file():
        shutil.copy(src / SUMMARY_FILE, dest / SUMMARY_FILE)
    return dest


def assemble_shipped(out_dir: str | Path, weights: str | Path = WEIGHTS_DIR) -> Path:
    """Turn the shipped fp16 weights into a float32 pipeline folder at ``out_dir``."""
    import torch

    weights, out = Path(weights), Path(out_dir)
    vae, unet, text_encoder, scheduler = load_components(weights, torch.float32)
    make_pipeline(vae, unet, text_encoder, scheduler=scheduler).save_pretrained(out, safe_serialization=True)
    if (weights / SUMMARY_FILE).is_file():
        shutil.copy(weights / SUMMARY_FILE, out / SUMMARY_FILE)
    return out


def build_toy_pipeline(preset: dict, out_dir: str | Path) -> Path:
    """Builder of the ``toy`` preset: the shipped weights if present, else pretrain (~25 min)."""
    if (WEIGHTS_DIR / "model_index.json").is_file():
        summary = WEIGHTS_DIR / SUMMARY_FILE
        shipped = json.loads(summary.read_text()).get("weights_version") if summary.is_file() else None
        wanted = preset.get("weights_version")
        if wanted is not None and shipped is not None and int(wanted) != int(shipped):
            log.warning("toy preset asks for weights version %s, the shipped ones are version %s",
                        wanted, shipped)
        log.info("toy model: assembling the shipped weights from %s", WEIGHTS_DIR)
        return assemble_shipped(out_dir)
    minutes = float(preset.get("pretrain_minutes", 25))
    log.warning("toy model: no shipped weights in %s; pretraining from scratch, this takes "
                "~%.0f minutes on a 2-core CPU (once; the result is cached)", WEIGHTS_DIR, minutes)
    module, name = PRETRAIN.split(":")
    pretrain_t2i = getattr(importlib.import_module(module), name)
    pretrain_t2i(out_dir, seed=int(preset.get("seed", 0)), minutes=minutes)
    return Path(out_dir)
