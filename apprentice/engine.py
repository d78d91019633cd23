"""The apprentice model and its DeepSpeed engine: the base U-Net with the demonstration-attention
adapter installed (:class:`ApprenticeModule`), the DeepSpeed config completed for the run, the
optimizer's parameter groups, and ``deepspeed.initialize``.
"""

from __future__ import annotations

import json

import torch

from apprentice.train_config import ApprenticeTrainConfig
from suti import storage
from suti.errors import InputError


class ApprenticeModule(torch.nn.Module):
    """What DeepSpeed wraps: U-Net + adapter; forward returns the predicted noise."""

    def __init__(self, unet, adapter):
        super().__init__()
        self.unet = unet
        self.adapter = adapter

    @property
    def denoiser_module(self):
        """The base's denoising network (the U-Net; :class:`apprentice.flux.FluxApprenticeModule`: the transformer)."""
        return self.unet

    def forward(self, noisy, timesteps, text_emb, demo_latents, demo_emb, demo_mask, text_added=None, demo_added=None, image_embeds=None):
        """noisy (B, C, h, w), text_emb (B, L, D), demo_latents (B, n, C, h, w), demo_emb (B, n, L, D),
        demo_mask (B,); SDXL: ``text_added`` = {text_embeds (B, P), time_ids (B, 6)} and
        ``demo_added`` the same for the B * n demonstrations (:mod:`suti.conditioning`);
        ``image_embeds`` (B, n, D): the demos' image embeddings for the subject channel (or ``None``)."""
        ctx = self.adapter.encode_demos(self.unet, demo_latents, demo_emb, added_cond_kwargs=demo_added, image_embeds=image_embeds)
        ctx.mask = demo_mask
        extra = {} if text_added is None else {"added_cond_kwargs": text_added}
        return self.unet(noisy, timesteps, text_emb, cross_attention_kwargs={"demo": ctx}, **extra).sample


def add_base_lora(base, rank: int) -> None:
    """``--base-lora-rank``: peft LoRA adapters (``default``, alpha = rank, gaussian init: the
    untrained apprentice still equals the base) on the layers the family's DreamBooth LoRA script
    adapts (:attr:`suti.denoisers.UNetDenoiser.lora_targets`, ``FluxDenoiser.lora_targets``)."""
    from peft import LoraConfig

    from suti.denoisers import denoiser_for

    denoiser = denoiser_for(base)
    denoiser.module.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(denoiser.lora_targets)))


def merge_base_lora(module) -> None:
    """Fold the base's LoRA adapters into its weights and remove them (diffusers' ``fuse_lora`` /
    ``unload_lora``), so the saved apprentice is a plain base plus the adapter."""
    net = module.denoiser_module
    if getattr(net, "peft_config", None):
        net.fuse_lora()
        net.unload_lora()


def load_deepspeed_config(path: str, config: ApprenticeTrainConfig, device: str) -> dict:
    """The DeepSpeed config ``path`` (a preset name such as ``zero2``, a local file, or an object
    store URI that every rank reads), completed for this run: the micro-batch is
    ``config.batch_size`` (``train_batch_size`` is dropped: DeepSpeed derives it), and ``"auto"``
    bf16/fp16 become bf16 where the GPU supports it, else fp16 on GPU; fp32 on CPU.

    Raises:
        InputError: no such config, not a JSON object, or fp16 without ZeRO stage 1 or 2.
    """
    from suti.models import config_path

    if storage.is_remote(path):  # every rank reads it: object storage, not one node's disk
        if not storage.isfile(path):
            raise InputError(f"--deepspeed-config {path}: no such DeepSpeed config")
        text = storage.read_text(path)
    else:
        p = config_path("deepspeed", storage.resolve(path) if "://" in path else path, ".json")
        if not p.is_file():
            raise InputError(f"{path}: no such DeepSpeed config")
        text = p.read_text()
    try:
        ds = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"--deepspeed-config {path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(ds, dict):
        raise InputError(f"--deepspeed-config {path}: a DeepSpeed config is a JSON object")
    ds["train_micro_batch_size_per_gpu"] = config.batch_size
    ds.pop("train_batch_size", None)
    bf16 = ds.setdefault("bf16", {})
    if bf16.get("enabled") == "auto":
        bf16["enabled"] = device == "cuda" and torch.cuda.is_bf16_supported()
    fp16 = ds.get("fp16")
    if fp16 is not None and fp16.get("enabled") == "auto":
        fp16["enabled"] = device == "cuda" and not bf16["enabled"]
    if fp16 and fp16.get("enabled") and int(ds.get("zero_optimization", {}).get("stage", 0)) == 0:
        raise InputError(f"{path}: fp16 needs ZeRO stage 1 or 2 (its checkpoints are gathered per parameter)")
    return ds


def module_dtype(engine) -> torch.dtype:
    """The dtype DeepSpeed gave the wrapped module (fp32, or bf16/fp16 by the config); inputs are cast to it."""
    return next(engine.module.parameters()).dtype


def param_groups(module, config: ApprenticeTrainConfig) -> list[dict]:
    """The optimizer's parameter groups: the adapter's trainable weights at ``--learning-rate``
    and, when the base trains (no ``--freeze-base``) and ``--base-learning-rate`` is set, the
    U-Net's at that rate; without it one group holds both at ``--learning-rate``. Empty groups are
    left out."""
    adapter = [p for p in module.adapter.parameters() if p.requires_grad]
    base = [p for p in module.denoiser_module.parameters() if p.requires_grad]
    if config.base_learning_rate is None:  # one group, as before the option
        return [{"params": base + adapter, "lr": config.learning_rate}]  # the module's order
    return [g for g in ({"params": adapter, "lr": config.learning_rate}, {"params": base, "lr": config.base_learning_rate}) if g["params"]]


def make_optimizer(params, config: ApprenticeTrainConfig):
    """``--optimizer``: AdamW (weight decay 0.01) or Adafactor (the paper's, at a fixed rate) over
    ``params`` (parameters or :func:`param_groups`), at ``--learning-rate`` by default.

    Raises:
        InputError: an unknown optimizer.
    """
    if config.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=config.learning_rate, scale_parameter=False, relative_step=False, warmup_init=False)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=1e-2)
    raise InputError(f"unknown optimizer {config.optimizer!r} (adamw or adafactor)")


def build_engine(config: ApprenticeTrainConfig, device: str, scorer=None):
    """Base pipeline, :class:`ApprenticeModule`, DeepSpeed engine, trainable ``(name, param)`` list, module dtype.

    ``scorer``: the built ``config.image_encoder`` scorer, whose embedding size sizes the subject
    channel (``None``: for_unet builds one to measure it)."""
    import deepspeed

    from apprentice.adapter import DemoAttentionAdapter, image_embedding_size
    from suti.denoisers import denoiser_module
    from suti.models import load_pipeline, pipeline_family

    base = load_pipeline(config.model, device=device)
    unet = denoiser_module(base)  # the U-Net, or FLUX's transformer
    base.vae.requires_grad_(False)
    base.text_encoder.requires_grad_(False)
    if getattr(base, "text_encoder_2", None) is not None:  # SDXL
        base.text_encoder_2.requires_grad_(False)
    unet.requires_grad_(not config.freeze_base and not config.base_lora_rank)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if pipeline_family(base).name == "flux":  # demonstrations as extra tokens of the joint attention (apprentice.flux)
        from apprentice.flux import FluxApprenticeModule, FluxDemoAdapter

        adapter = FluxDemoAdapter.for_transformer(unet, demo_timestep=config.demo_timestep, demo_positions=config.demo_positions)
        adapter.install(unet)
        module = FluxApprenticeModule(unet, adapter, vae_scale_factor=base.vae_scale_factor, guidance=config.guidance_scale)
    else:
        embed_dim = None if scorer is None else image_embedding_size(scorer)  # measured on the training loop's scorer: built once
        adapter = DemoAttentionAdapter.for_unet(unet, demo_timestep=config.demo_timestep, method=config.method,
                                                subject_tokens=config.subject_tokens, image_encoder=config.image_encoder, image_embed_dim=embed_dim,
                                                position_bias=config.demo_position_bias)
        adapter.install(unet)
        module = ApprenticeModule(unet, adapter)
    if config.base_lora_rank:  # after the adapter copied the base's projections
        add_base_lora(base, config.base_lora_rank)
    groups = param_groups(module, config)
    params = [p for g in groups for p in g["params"]]
    ds_config = load_deepspeed_config(config.deepspeed_config, config, device)
    engine, _, _, _ = deepspeed.initialize(model=module, model_parameters=params, optimizer=make_optimizer(groups, config), config=ds_config)
    trainable = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    return base, module, engine, trainable, module_dtype(engine)
