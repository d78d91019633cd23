"""DreamBooth expert training (Ruiz et al. 2023, sections 3.2-3.3; diffusers' train_dreambooth.py).

One expert binds a rare identifier "[V]" to a subject from 3-5 photos:
loss = || eps - eps_theta(z_t, t, "a [V] [class]") ||^2
       + lambda * || eps' - eps_theta(z'_t, t', "a [class]") ||^2
where the second (prior-preservation) term uses images the frozen base generated for the class
prompt. Full U-Net fine-tuning (optionally the text encoder) or LoRA adapters (peft).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from pathlib import Path

import torch
from tqdm import tqdm

from experts import checkpoint as ckpt
from experts.data import ensure_class_images, load_class_images, load_instance_images
from experts.expert import EXPERT_FILE, ExpertInfo, save_expert
from experts.identifier import fill_prompt, instance_prompt, sample_identifier
from experts.loss import denoising_target, encode_images, per_sample_mse, sample_latents, snr_weights
from experts.recipe import ExpertConfig
from suti.errors import InputError
from suti.models import default_device, default_resolution, load_pipeline

log = logging.getLogger(__name__)

LORA_TARGETS_UNET = ["to_k", "to_q", "to_v", "to_out.0"]
LORA_TARGETS_TEXT = ["q_proj", "k_proj", "v_proj", "out_proj"]


def prepare_output(output: Path, resume: str | None, overwrite: bool) -> None:
    """Refuse a non-empty output folder unless resuming or overwriting."""
    if output.exists() and not output.is_dir():
        raise InputError(f"{output}: exists and is not a folder")
    non_empty = output.is_dir() and any(output.iterdir())
    if non_empty and not resume and not overwrite:
        raise InputError(f"{output}: output folder is not empty; pass --resume latest to continue or --overwrite to replace it")
    if non_empty and overwrite and not resume:
        shutil.rmtree(output)


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str]) -> torch.Tensor:
    """Prompts -> text-encoder hidden states (B, 77, D)."""
    ids = tokenize(pipe.tokenizer, prompts).to(pipe.text_encoder.device)
    return pipe.text_encoder(ids)[0]


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    """Prompts -> padded token ids (B, model_max_length)."""
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids


def add_lora(pipe, config: ExpertConfig) -> None:
    """Attach peft LoRA adapters to the U-Net attention projections (and the text encoder)."""
    from peft import LoraConfig

    alpha = config.lora_alpha or config.lora_rank
    pipe.unet.add_adapter(LoraConfig(r=config.lora_rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=LORA_TARGETS_UNET))
    if config.train_text_encoder:
        pipe.text_encoder.add_adapter(LoraConfig(r=config.lora_rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=LORA_TARGETS_TEXT))


def make_optimizer(params: list[torch.nn.Parameter], config: ExpertConfig):
    """AdamW or Adafactor (the SuTI expert recipe) at the effective learning rate."""
    lr = config.effective_learning_rate
    if config.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False)
    return torch.optim.AdamW(params, lr=lr, weight_decay=config.adam_weight_decay)


def train_expert(config: ExpertConfig, output: str | Path, *, resume: str | None = None, overwrite: bool = False, progress: bool = True, progress_callback=None, pipeline=None, save: bool = True) -> ExpertInfo:
    """Train one DreamBooth expert into ``output`` and return its :class:`ExpertInfo`.

    Args:
        config: the resolved configuration (see :func:`experts.recipe.resolve_config`).
        output: the expert folder; must be empty or absent unless ``resume``/``overwrite``.
        resume: ``"latest"`` or a checkpoint folder to continue from.
        overwrite: replace a non-empty ``output``.
        progress: show a progress bar with the loss.
        progress_callback: ``f(phase, done, total, metrics)``, called after every class image
            (phase ``"class_images"``) and every training step (``"training"``, metrics
            ``loss``, ``instance_loss``, ``prior_loss``); an exception it raises stops the run
            (a serving job uses this to stop a cancelled job).
        pipeline: an already loaded base pipeline of ``config.model`` to train in place (a
            resident expert worker, :class:`mining.expert_task.ResidentExpertWorker`): LoRA adds
            the adapter ``default`` to it, full fine-tuning changes its weights; the caller
            restores it. ``None``: load the model.
        save: write the expert to ``output`` (``False``: only the returned info; the trained
            weights stay in ``pipeline``).

    Raises:
        InputError: a bad instance image (named), a non-empty output, inconsistent settings.
    """
    config.validate()
    output = Path(output)
    resolution = config.resolution or default_resolution(config.model)
    instance_pixels = load_instance_images(config.instance_dir, resolution)  # validate before any write
    prepare_output(output, resume, overwrite)
    start_ckpt = None
    if resume:
        start_ckpt = ckpt.latest_checkpoint(output) if resume == "latest" else Path(resume)
        if start_ckpt is None:
            log.info("no checkpoint in %s; starting from step 0", output)
        elif not (start_ckpt / "config.json").is_file():
            raise InputError(f"{start_ckpt}: not a checkpoint folder")
        else:
            saved = ckpt.checkpoint_config(start_ckpt)
            config.identifier = saved["identifier"]  # the identifier must not change mid-run
    if (output / EXPERT_FILE).is_file() and start_ckpt is not None and ckpt.checkpoint_step(start_ckpt) >= config.steps:
        log.info("%s is already trained to %d steps", output, config.steps)
        return ExpertInfo.read(output)

    device = default_device()
    torch.manual_seed(config.seed)
    pipe = pipeline if pipeline is not None else load_pipeline(config.model, device=device)
    config.resolution = resolution
    if config.identifier is None:
        config.identifier = sample_identifier(pipe.tokenizer, seed=config.seed, num_tokens=config.identifier_tokens)
    prompt = instance_prompt(config.identifier, config.class_noun, config.use_class_noun)
    class_prompt = fill_prompt(config.class_prompt, config.identifier, config.class_noun)
    log.info("expert: identifier %r, prompt %r, %d instance images at %d px on %s", config.identifier, prompt, len(instance_pixels), resolution, device)

    class_pixels = None
    if config.prior_preservation:
        paths = ensure_class_images(pipe, config.model, class_prompt, config.num_class_images, resolution, config.seed, config.class_sample_steps, config.guidance_scale, progress_callback=progress_callback)
        class_pixels = load_class_images(paths, resolution)

    output.mkdir(parents=True, exist_ok=True)
    vae, unet, text_encoder = pipe.vae, pipe.unet, pipe.text_encoder
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    unet.requires_grad_(config.lora_rank == 0)
    if config.lora_rank > 0:
        add_lora(pipe, config)
    elif config.train_text_encoder:
        text_encoder.requires_grad_(True)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if config.train_text_encoder:
            text_encoder.gradient_checkpointing_enable()
    params = {f"unet.{n}": p for n, p in unet.named_parameters() if p.requires_grad}
    params.update({f"text_encoder.{n}": p for n, p in text_encoder.named_parameters() if p.requires_grad})
    for p in params.values():
        p.data = p.data.float()

    # Cached latents (the VAE is always frozen) and, with a frozen text encoder, cached embeddings.
    with torch.no_grad():
        inst_mean, inst_std = encode_images(vae, instance_pixels)
        cls_mean, cls_std = encode_images(vae, class_pixels) if class_pixels is not None else (None, None)
    ids_inst, ids_cls = tokenize(pipe.tokenizer, [prompt]), tokenize(pipe.tokenizer, [class_prompt])
    emb_inst = emb_cls = None
    if not config.train_text_encoder:
        emb_inst, emb_cls = encode_prompts(pipe, [prompt]), encode_prompts(pipe, [class_prompt])

    from diffusers import DDPMScheduler

    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    optimizer = make_optimizer(list(params.values()), config)
    generator = torch.Generator().manual_seed(config.seed)
    step = 0
    if start_ckpt is not None:
        step = ckpt.load_checkpoint(start_ckpt, params, optimizer, generator)
        log.info("resumed from %s at step %d", start_ckpt, step)

    use_amp = device == "cuda" and config.mixed_precision != "no"
    amp_dtype = torch.bfloat16 if config.mixed_precision == "bf16" else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    writer = _tensorboard(output / "logs")
    scale = vae.config.scaling_factor
    num_train_timesteps = noise_scheduler.config.num_train_timesteps
    unet.train()
    started = time.perf_counter()
    bar = tqdm(total=config.steps, initial=step, desc="expert", unit="step", disable=not progress)
    while step < config.steps:
        b = config.batch_size
        idx = torch.randint(0, len(inst_mean), (b,), generator=generator)
        mean, std = inst_mean[idx], inst_std[idx]
        emb = _repeat(emb_inst, b) if emb_inst is not None else None
        ids = ids_inst.repeat(b, 1)
        if cls_mean is not None:
            cidx = torch.randint(0, len(cls_mean), (b,), generator=generator)
            mean, std = torch.cat([mean, cls_mean[cidx]]), torch.cat([std, cls_std[cidx]])
            emb = torch.cat([emb, _repeat(emb_cls, b)]) if emb is not None else None
            ids = torch.cat([ids, ids_cls.repeat(b, 1)])
        latents = sample_latents(mean.cpu(), std.cpu(), scale, generator).to(device)  # (B', C, h, w)
        noise = torch.randn(latents.shape, generator=generator)
        if config.offset_noise:
            noise = noise + config.offset_noise * torch.randn(latents.shape[:2] + (1, 1), generator=generator)
        noise = noise.to(device)
        timesteps = torch.randint(0, num_train_timesteps, (latents.shape[0],), generator=generator).to(device)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        target = denoising_target(noise_scheduler, latents, noise, timesteps)
        autocast = torch.autocast("cuda", dtype=amp_dtype) if use_amp else contextlib.nullcontext()
        with autocast:
            if emb is None:
                emb = text_encoder(ids.to(device))[0]
            pred = unet(noisy, timesteps, emb.to(device)).sample
        losses = per_sample_mse(pred, target)  # (B',)
        if config.snr_gamma:
            losses = losses * snr_weights(noise_scheduler, timesteps, config.snr_gamma)
        loss_inst = losses[:b].mean()
        loss_prior = losses[b:].mean() if cls_mean is not None else torch.zeros((), device=device)
        loss = loss_inst + config.prior_loss_weight * loss_prior
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(list(params.values()), config.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", inst=f"{loss_inst.item():.4f}", prior=f"{loss_prior.item():.4f}")
        if progress_callback is not None:
            progress_callback("training", step, config.steps, {"loss": loss.item(), "instance_loss": loss_inst.item(), "prior_loss": loss_prior.item()})
        if writer:
            writer.add_scalar("loss/total", loss.item(), step)
            writer.add_scalar("loss/instance", loss_inst.item(), step)
            writer.add_scalar("loss/prior", loss_prior.item(), step)
        if config.checkpointing_steps and step % config.checkpointing_steps == 0 and step < config.steps:
            ckpt.save_checkpoint(output, step, params, optimizer, generator, config.to_dict(), config.checkpoints_total_limit)
        if config.validation_steps and step % config.validation_steps == 0:
            _validate(pipe, config, output, step, writer)
    bar.close()
    elapsed = time.perf_counter() - started
    unet.eval()
    if config.checkpointing_steps:  # the final state, so that --resume can extend the run
        ckpt.save_checkpoint(output, step, params, optimizer, generator, config.to_dict(), config.checkpoints_total_limit)
    if save:
        info = save_expert(pipe, config, output, train_seconds=elapsed)
    else:
        info = ExpertInfo(identifier=config.identifier, class_noun=config.class_noun, base_model=config.model, recipe=config.recipe, kind="lora" if config.lora_rank > 0 else "full", steps=config.steps, seed=config.seed, resolution=config.resolution, instance_prompt=prompt, weights="", config=config.to_dict(), train_seconds=elapsed)
    if writer:
        writer.close()
    log.info("expert written to %s (%d steps, %.1f s)", output, step, elapsed)
    return info


def _repeat(x: torch.Tensor, b: int) -> torch.Tensor:
    return x.expand(b, *x.shape[1:])


def _tensorboard(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a declared dependency, but do not fail training on it
        log.warning("tensorboard is not installed; no training logs")
        return None
    return SummaryWriter(str(folder))


@torch.no_grad()
def _validate(pipe, config: ExpertConfig, output: Path, step: int, writer) -> None:
    """Sample the validation prompt with the weights being trained."""
    pipe.unet.eval()
    prompt = fill_prompt(config.validation_prompt, config.identifier, config.class_noun)
    generator = torch.Generator(device="cpu").manual_seed(config.seed)
    image = pipe(prompt, height=config.resolution, width=config.resolution, num_inference_steps=config.sample_steps, guidance_scale=config.guidance_scale, generator=generator).images[0]
    folder = output / "validation"
    folder.mkdir(exist_ok=True)
    image.save(folder / f"step-{step:06d}.png")
    (folder / "prompts.json").write_text(json.dumps({"prompt": prompt}))
    if writer:
        import numpy as np

        writer.add_image("validation", np.asarray(image), step, dataformats="HWC")
    pipe.unet.train()
