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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from experts import checkpoint as ckpt
from experts.data import ensure_class_images, instance_images, real_class_images
from experts.expert import EXPERT_FILE, ExpertInfo, save_expert, unsaved_expert_info
from experts.export import write_kohya_copy
from experts.identifier import fill_prompt, sample_identifier
from experts.latents import TrainingLatents, latent_sets, load_training_pixels
from experts.rows import cached_conditioning, instance_text, row_prompts, step_rows, with_time_ids
from suti.denoisers import FluxDenoiser, UNetDenoiser, denoiser_for, denoiser_module, latents_from_vae
from suti.losses import per_sample_mse
from suti.objectives import training_objective
from experts.optim import adamw_class, make_lr_scheduler, make_optimizer, prodigy_class
from experts.recipe import ExpertConfig
from experts.tracking import check_tracker, log_image, start_trackers
from suti import storage
from suti.conditioning import encode_prompt
from suti.errors import InputError
from suti.images import save_image_atomic
from suti.models import check_model, default_device, default_resolution, load_pipeline

log = logging.getLogger(__name__)

#: LoRA targets of each denoiser (:mod:`suti.denoisers`: ``lora_targets`` of its class).
LORA_TARGETS_UNET = list(UNetDenoiser.lora_targets)
LORA_TARGETS_TRANSFORMER = list(FluxDenoiser.lora_targets)
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


def _check_training_prompts(tokenizer, config, prompt: str, class_prompt: str) -> None:
    """Prompts and sampler settings of training, checked as every sampler's (suti.sampling):
    a truncated prompt is warned about, one whose cut loses the identifier is an InputError."""
    from suti.sampling import check_prompt, check_sampler_args

    check_sampler_args(steps=config.class_sample_steps, guidance_scale=config.guidance_scale, flags={"steps": "class_sample_steps"})
    check_sampler_args(steps=config.sample_steps, flags={"steps": "sample_steps"})
    check_prompt(tokenizer, prompt, identifier=config.identifier, what="instance prompt")
    check_prompt(tokenizer, class_prompt, what="class prompt")
    if config.validation_prompt:
        check_prompt(tokenizer, fill_prompt(config.validation_prompt, config.identifier, config.class_noun), identifier=config.identifier, what="--validation-prompt")


def text_encoders(pipe) -> list:
    """The text encoders that ``--train-text-encoder`` trains (the family's,
    :attr:`suti.models.Family.text_encoders`): ``[text_encoder]``, ``[text_encoder,
    text_encoder_2]`` for SDXL, CLIP's alone for FLUX (T5 stays frozen)."""
    from suti.models import pipeline_family

    names = pipeline_family(pipe).text_encoders
    return [getattr(pipe, name) for name in names if getattr(pipe, name, None) is not None]


def lora_targets(pipe) -> list[str]:
    """The modules of ``pipe``'s denoiser that LoRA adapts (its class's ``lora_targets``)."""
    return list(denoiser_for(pipe).lora_targets)


def lora_config(config: ExpertConfig, target_modules: list[str]):
    """peft's ``LoraConfig`` of an expert, as diffusers' ``get_lora_config`` builds it: rank
    ``lora_rank``, ``lora_alpha`` (the rank when unset: scaling alpha / rank), ``lora_dropout``,
    ``use_dora``, gaussian initialisation."""
    from peft import LoraConfig

    return LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha or config.lora_rank, lora_dropout=config.lora_dropout, use_dora=config.use_dora,
                      init_lora_weights="gaussian", target_modules=target_modules)


def add_lora(pipe, config: ExpertConfig, adapter_name: str = "default") -> None:
    """Attach peft LoRA adapters named ``adapter_name`` (:func:`lora_config`) to the U-Net
    attention projections (and the text encoders: both of SDXL's, as diffusers'
    ``train_dreambooth_lora_sdxl.py`` does). The initialisation draws from torch's global RNG."""
    denoiser_module(pipe).add_adapter(lora_config(config, lora_targets(pipe)), adapter_name=adapter_name)
    if config.train_text_encoder:
        for encoder in text_encoders(pipe):
            encoder.add_adapter(lora_config(config, LORA_TARGETS_TEXT), adapter_name=adapter_name)


def train_expert(config: ExpertConfig, output: str | Path, *, resume: str | None = None, overwrite: bool = False, progress: bool = True, progress_callback=None, pipeline=None, save: bool = True) -> ExpertInfo:
    """Train one DreamBooth expert into ``output`` and return its :class:`ExpertInfo`.

    ``config.steps`` counts optimizer steps; each takes ``gradient_accumulation_steps``
    micro-batches of ``batch_size`` instance (and as many class) images per process. The data of
    one optimizer step is drawn at once and then split, so accumulation of 4 at batch 1 computes
    the same update as batch 4 (up to float rounding). Under ``accelerate launch`` (DDP) every
    process draws its own data (seed ``seed + 1000003 * rank``), gradients are averaged, and the
    main process writes checkpoints, logs and the expert.

    Args:
        config: the resolved configuration (see :func:`experts.recipe.resolve_config`).
        output: the expert folder; must be empty or absent unless ``resume``/``overwrite``.
        resume: ``"latest"``, a checkpoint name (``step-000004``) or a checkpoint folder.
        overwrite: replace a non-empty ``output``.
        progress: show a progress bar with the loss.
        progress_callback: ``f(phase, done, total, metrics)``, called after every class image
            (phase ``"class_images"``) and every optimizer step (``"training"``, metrics
            ``loss``, ``instance_loss``, ``prior_loss``, ``lr`` (the rate of that step) and
            ``grad_norm`` (before clipping)); an exception it raises stops the run (a serving
            job uses this to stop a cancelled job).
        pipeline: an already loaded base pipeline of ``config.model`` to train in place (a
            resident expert worker, :class:`generation.resident.ResidentExpertWorker`): LoRA adds
            the adapter ``default`` to it, full fine-tuning changes its weights; the caller
            restores it. ``None``: load the model.
        save: write the expert to ``output`` (``False``: only the returned info; the trained
            weights stay in ``pipeline``).

    Raises:
        InputError: a bad instance or class image (named), a non-empty output, an unknown
            checkpoint, a missing optional package (bitsandbytes, wandb), inconsistent settings.
    """
    config.validate()
    if pipeline is None:
        check_model(config.model)  # a misspelt model before any write (not after minutes of hub retries)
    output = Path(output)
    resolution, instance_pixels, real_class, log_with = _checked_inputs(config)  # everything checked before any write
    accelerator, device = _start_accelerator(output, log_with)
    start_ckpt = _claim_output(accelerator, output, config, resume, overwrite)
    if (output / EXPERT_FILE).is_file() and start_ckpt is not None and ckpt.checkpoint_step(start_ckpt) >= config.steps:
        log.info("%s is already trained to %d steps", output, config.steps)
        return ExpertInfo.read(output)

    pipe = _load_base(config, accelerator, device, pipeline)
    config.resolution = resolution
    prompt, class_prompt = expert_prompts(pipe, config)
    log.info("expert: identifier %r, prompt %r, %d instance images at %d px on %s", config.identifier, prompt, len(instance_pixels), resolution, device)
    class_pixels = class_training_pixels(pipe, config, real_class, class_prompt, resolution, accelerator.main_process_first, progress_callback)
    output.mkdir(parents=True, exist_ok=True)
    params = _trainable_parameters(pipe, config)
    inputs = cached_inputs(pipe, config, instance_pixels, class_pixels, prompt, class_prompt)
    run = _build_run(config, pipe, accelerator, output, device, (prompt, class_prompt), params, inputs)
    step = _resume_step(run, start_ckpt)

    start_trackers(accelerator, config.report_to, output, config.to_dict())
    step, elapsed = _train_steps(run, step, progress, progress_callback)
    return _finish(run, step, elapsed, save_weights=save)


@dataclass
class MixedPrecision:
    """``mixed_precision`` of expert training: autocast on CUDA (bf16 or fp16), and the gradient
    scaler that fp16 needs (a disabled one, a pass-through, otherwise)."""

    dtype: torch.dtype | None  # the autocast dtype; None: fp32, no autocast
    scaler: torch.amp.GradScaler

    def autocast(self):
        """A fresh autocast context for one forward (a null context in fp32)."""
        return torch.autocast("cuda", dtype=self.dtype) if self.dtype is not None else contextlib.nullcontext()


def mixed_precision(config: ExpertConfig, device: str) -> MixedPrecision:
    """``config.mixed_precision`` (``"no"``, ``"fp16"`` or ``"bf16"``) as it acts on ``device``:
    autocast only on a ``cuda`` device (CPU training stays fp32), loss scaling only for fp16."""
    use_amp = device.startswith("cuda") and config.mixed_precision != "no"
    amp_dtype = torch.bfloat16 if config.mixed_precision == "bf16" else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    return MixedPrecision(amp_dtype if use_amp else None, scaler)


@dataclass
class _Run:
    """One expert's training state: what the step loop, the checkpoints and the final save use."""

    config: ExpertConfig
    pipe: Any
    accelerator: Any
    output: Path
    device: str
    prompt: str
    class_prompt: str
    params: dict[str, torch.nn.Parameter]  # by name: unet.*, text_encoder.*, text_encoder_2.*
    inputs: tuple  # (inst, cls, cond_inst, cond_cls) of cached_inputs
    objective: Any  # suti.objectives: DiffusionObjective or FlowMatchingObjective
    denoiser: Any  # suti.denoisers: UNetDenoiser or FluxDenoiser (its module is the plain network)
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    train_model: torch.nn.Module  # the denoiser's network as DDP wraps it (pipe.unet / pipe.transformer stay plain)
    train_texts: list  # the text encoders, DDP-wrapped when they train
    generator: torch.Generator  # this process's data generator
    precision: MixedPrecision

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def distributed(self) -> bool:
        return self.accelerator.num_processes > 1


def _checked_inputs(config: ExpertConfig):
    """Everything ``train_expert`` checks before it writes: ``(resolution, instance_pixels,
    real_class, log_with)``, the instance images as (3, R, R) tensors (or shorter side R), the
    real class images to use, and the trackers to log with."""
    resolution = config.resolution or default_resolution(config.model)
    instance_pixels = instance_images(config, resolution)  # buckets, captions, the resize filter
    real_class = real_class_images(config.class_data_dir, config.num_class_images) if config.prior_preservation and config.class_data_dir else []
    if config.class_data_dir and not config.prior_preservation:
        log.warning("--class-data-dir %s is unused without prior preservation", config.class_data_dir)
    if config.optimizer == "adamw":
        adamw_class(config)
    elif config.optimizer == "prodigy":
        prodigy_class()
    return resolution, instance_pixels, real_class, check_tracker(config.report_to)


def _start_accelerator(output: Path, log_with):
    """The run's :class:`accelerate.Accelerator` (logs in ``output/logs``) and its device."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    device = default_device()
    accelerator = Accelerator(mixed_precision="no", cpu=device == "cpu", log_with=log_with, project_config=ProjectConfiguration(project_dir=str(output), logging_dir=str(output / "logs")))
    if accelerator.num_processes > 1:
        device = str(accelerator.device)
    return accelerator, device


def _claim_output(accelerator, output: Path, config: ExpertConfig, resume: str | None, overwrite: bool) -> Path | None:
    """Check (or clear) ``output`` on the main process and find the checkpoint to resume from
    (``None``: start at step 0); resuming keeps the checkpoint's identifier."""
    if accelerator.is_main_process:
        prepare_output(output, resume, overwrite)
        try:  # made now, so an output that cannot be written fails before the class images and the steps, not after
            output.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"--output {output}: cannot create the expert folder ({exc.strerror or type(exc).__name__})") from None
    accelerator.wait_for_everyone()
    start_ckpt = None
    if resume:
        start_ckpt = ckpt.find_checkpoint(output, resume)
        if start_ckpt is None:
            log.info("no checkpoint in %s; starting from step 0", output)
        else:
            saved = ckpt.checkpoint_config(start_ckpt)
            ckpt.check_resumable(start_ckpt, saved, config.to_dict())  # e.g. a full fine-tune resumed as LoRA
            config.identifier = saved["identifier"]  # the identifier must not change mid-run
    return start_ckpt


def _load_base(config: ExpertConfig, accelerator, device: str, pipeline):
    """The base pipeline (``pipeline``, or ``config.model`` loaded), with torch's global RNG seeded."""
    torch.manual_seed(config.seed)
    with accelerator.main_process_first():  # a preset is built into the cache once, by the main process
        pipe = pipeline if pipeline is not None else load_pipeline(config.model, device=device)
    # loading may draw from the global RNG (first loads of some models do): re-seed, so the LoRA
    # initialisation is the same for a fresh and a resident (already loaded) pipeline
    torch.manual_seed(config.seed)
    return pipe


def _trainable_parameters(pipe, config: ExpertConfig) -> dict[str, torch.nn.Parameter]:
    """Freeze what does not train, add LoRA or unfreeze the text encoders, turn on gradient
    checkpointing; the trainable parameters by name, made fp32."""
    vae, unet = pipe.vae, denoiser_module(pipe)
    encoders = text_encoders(pipe)  # SDXL: both text encoders train together
    vae.requires_grad_(False)
    for encoder in encoders + [getattr(pipe, "text_encoder_2", None)]:  # FLUX's T5 never trains
        if encoder is not None:
            encoder.requires_grad_(False)
    unet.requires_grad_(config.lora_rank == 0)
    if config.lora_rank > 0:
        add_lora(pipe, config)
    elif config.train_text_encoder:
        for encoder in encoders:
            encoder.requires_grad_(True)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if config.train_text_encoder:
            for encoder in encoders:
                encoder.gradient_checkpointing_enable()
    prefix = denoiser_for(pipe).attribute  # unet.* or transformer.*
    params = {f"{prefix}.{n}": p for n, p in unet.named_parameters() if p.requires_grad}
    for name, encoder in zip(("text_encoder", "text_encoder_2"), encoders):
        params.update({f"{name}.{n}": p for n, p in encoder.named_parameters() if p.requires_grad})
    for p in params.values():
        p.data = p.data.float()
    return params


def _build_run(config: ExpertConfig, pipe, accelerator, output: Path, device: str, prompts: tuple[str, str], params: dict, inputs: tuple) -> _Run:
    """The training objective, denoiser, optimizer, learning-rate schedule, DDP-wrapped models and
    data generator of a run."""
    objective = training_objective(pipe.scheduler, snr_gamma=config.snr_gamma, weighting_scheme=config.weighting_scheme,
                                   logit_mean=config.logit_mean, logit_std=config.logit_std, mode_scale=config.mode_scale)
    denoiser = denoiser_for(pipe, guidance_scale=config.guidance_scale)
    optimizer = make_optimizer(params, config)  # the U-Net's group, then the text encoders'
    lr_scheduler = make_lr_scheduler(optimizer, config)
    # DDP wraps only what trains; pipe.unet (transformer) / pipe.text_encoder stay the plain modules
    train_model = accelerator.prepare(denoiser.module)
    encoders = text_encoders(pipe)
    train_texts = [accelerator.prepare(e) for e in encoders] if config.train_text_encoder else encoders
    generator = torch.Generator().manual_seed(config.seed + 1000003 * accelerator.process_index)
    return _Run(config, pipe, accelerator, output, device, *prompts, params, inputs, objective, denoiser, optimizer, lr_scheduler,
                train_model, train_texts, generator, mixed_precision(config, device))


def _resume_step(run: _Run, start_ckpt: Path | None) -> int:
    """Load ``start_ckpt`` into the run (weights, optimizer, schedule, generator); its step, or 0.

    The optimizer's and the schedule's hyperparameters are this run's, not the checkpoint's: a
    resume with another ``--learning-rate`` (or Adam setting) trains at the new value from the
    resume step on, as asked; the change is logged and recorded in ``expert.json``
    (``config.extra["resumes"]``)."""
    if start_ckpt is None:
        return 0
    asked = [{k: v for k, v in group.items() if k != "params"} for group in run.optimizer.param_groups]
    step = ckpt.load_checkpoint(start_ckpt, run.params, run.optimizer, run.generator, lr_scheduler=run.lr_scheduler, rank=run.accelerator.process_index)
    changes = ckpt.apply_hyperparameters(run.optimizer, run.lr_scheduler, asked)
    if changes:
        said = ", ".join(f"{k} {a:g} -> {b:g}" for k, (a, b) in changes.items())
        log.warning("resuming %s at step %d with other settings than it was saved with: %s (from step %d on)", start_ckpt, step, said, step + 1)
        run.config.extra.setdefault("resumes", []).append({"checkpoint": start_ckpt.name, "step": step, "changed": {k: list(v) for k, v in changes.items()}})
    log.info("resumed from %s at step %d", start_ckpt, step)
    return step


def _train_steps(run: _Run, step: int, progress: bool, progress_callback) -> tuple[int, float]:
    """Optimizer steps from ``step`` to ``config.steps``, each reported (progress bar, callback,
    trackers), with checkpoints and validation images at their intervals. Returns the last step
    and the seconds they took."""
    config, accelerator = run.config, run.accelerator
    run.denoiser.module.train()
    started = time.perf_counter()
    bar = tqdm(total=config.steps, initial=step, desc="expert", unit="step", disable=not progress or not run.main)
    while step < config.steps:
        metrics = _optimizer_step(run)
        step += 1
        loss, loss_inst, loss_prior, lr = metrics["loss"], metrics["instance_loss"], metrics["prior_loss"], metrics["lr"]
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", inst=f"{loss_inst:.4f}", prior=f"{loss_prior:.4f}")
        if progress_callback is not None:
            progress_callback("training", step, config.steps, metrics)
        accelerator.log({"loss/total": loss, "loss/instance": loss_inst, "loss/prior": loss_prior, "lr": lr, "grad_norm": metrics["grad_norm"]}, step=step)
        if config.checkpointing_steps and step % config.checkpointing_steps == 0 and step < config.steps:
            _save_checkpoint(run, step)
        if config.validation_steps and step % config.validation_steps == 0 and run.main:
            _validate(run.pipe, config, run.output, step, accelerator)
    bar.close()
    elapsed = time.perf_counter() - started
    run.denoiser.module.eval()
    return step, elapsed


def _optimizer_step(run: _Run) -> dict[str, float]:
    """One optimizer step: its data drawn at once, ``gradient_accumulation_steps`` micro-batches
    forward and backward, gradients clipped, the optimizer and schedule stepped. Returns the
    step's metrics (losses averaged over processes, the rate it used, the norm before clipping)."""
    config = run.config
    b, accum = config.batch_size, config.gradient_accumulation_steps
    inst, cls = run.inputs[:2]
    noisy, timesteps, target = draw_training_batch(inst, cls, b * accum, run.generator, run.objective, run.pipe.vae.config, config.offset_noise, run.device)
    step_data = step_rows(inst, cls, b * accum, run.generator, config.caption_dropout)  # captions, dropout, SDXL sizes of the rows

    lr = run.lr_scheduler.get_last_lr()[0]
    run.optimizer.zero_grad(set_to_none=True)
    loss_inst = loss_prior = 0.0
    for k in range(accum):
        micro_inst, micro_prior = _micro_batch_backward(run, k, noisy, timesteps, target, step_data)
        loss_inst = loss_inst + micro_inst.detach() / accum
        loss_prior = loss_prior + micro_prior.detach() / accum
    scaler = run.precision.scaler
    scaler.unscale_(run.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(list(run.params.values()), config.max_grad_norm)
    scaler.step(run.optimizer)
    scaler.update()
    run.lr_scheduler.step()
    if run.distributed:  # report the mean over processes
        loss_inst, loss_prior = run.accelerator.reduce(torch.stack([loss_inst, loss_prior]).to(run.accelerator.device), "mean").tolist()
    else:
        loss_inst, loss_prior = float(loss_inst), float(loss_prior)
    loss = loss_inst + config.prior_loss_weight * loss_prior
    return {"loss": loss, "instance_loss": loss_inst, "prior_loss": loss_prior, "lr": lr, "grad_norm": float(grad_norm)}


def _micro_batch_backward(run: _Run, k: int, noisy: torch.Tensor, timesteps: torch.Tensor, target: torch.Tensor, step_data) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward of micro-batch ``k`` of a step's rows (its instance rows, then its
    class rows); gradients are all-reduced only on the last. Returns its instance and prior
    losses (scalars; the prior loss is 0 without class images)."""
    config = run.config
    inst, cls, cond_inst, cond_cls = run.inputs
    b, accum = config.batch_size, config.gradient_accumulation_steps
    n = b * accum
    rows = torch.arange(k * b, (k + 1) * b)
    if cls is not None:
        rows = torch.cat([rows, rows + n])
    prompts = row_prompts(step_data, k, b, inst.text, run.class_prompt if cls is not None else None)  # experts.rows
    cond = None
    if cond_inst is not None:
        cond = cached_conditioning(step_data, k, b, inst.text, cond_inst, cond_cls if cls is not None else None)
    texts = run.train_texts
    sync = contextlib.nullcontext() if k == accum - 1 else _no_sync(run.accelerator, run.train_model, *(texts if config.train_text_encoder else []))
    autocast = run.precision.autocast()
    with sync:
        with autocast:
            if cond is None:
                cond = encode_prompt(run.pipe, prompts, resolution=config.resolution, text_encoder=texts[0], text_encoder_2=texts[1] if len(texts) > 1 else None,
                                      max_sequence_length=config.max_sequence_length)
            cond = with_time_ids(cond, step_data, rows)  # SDXL: each row's original size and crop
            pred = run.denoiser(noisy[rows], timesteps[rows], cond.to(run.device), module=run.train_model)
        losses = per_sample_mse(pred, target[rows])  # (b or 2b,)
        weights = run.objective.loss_weights(timesteps[rows])  # Min-SNR-gamma, or a flow-matching scheme's
        if weights is not None:
            losses = losses * weights.to(losses.device)
        micro_inst = losses[:b].mean()
        micro_prior = losses[b:].mean() if cls is not None else torch.zeros((), device=run.device)
        run.precision.scaler.scale((micro_inst + config.prior_loss_weight * micro_prior) / accum).backward()
    return micro_inst, micro_prior


def _save_checkpoint(run: _Run, step: int) -> None:
    """Every process's generator state gathered; the main process writes the checkpoint."""
    from accelerate.utils import gather_object

    states = gather_object([run.generator.get_state()]) if run.distributed else None
    if run.main:
        ckpt.save_checkpoint(run.output, step, run.params, run.optimizer, run.generator, run.config.to_dict(), run.config.checkpoints_total_limit, lr_scheduler=run.lr_scheduler, rank_generators=states)


def _finish(run: _Run, step: int, elapsed: float, *, save_weights: bool) -> ExpertInfo:
    """The final checkpoint, the expert written (or only described) by the main process, the
    trackers closed; every process returns the expert's info."""
    config, accelerator = run.config, run.accelerator
    if config.checkpointing_steps:  # the final state, so that --resume can extend the run
        _save_checkpoint(run, step)
    info = None
    if run.main and save_weights:
        info = save_expert(run.pipe, config, run.output, train_seconds=elapsed)
        if config.output_kohya_format and info.kind == "lora":
            write_kohya_copy(run.pipe, info, run.output)
    elif run.main:
        info = unsaved_expert_info(config, run.prompt, elapsed)
    for tracker in accelerator.trackers:  # not end_training(): it would end a launcher's process group
        tracker.finish()
    accelerator.wait_for_everyone()
    if info is None:
        info = ExpertInfo.read(run.output)
    log.info("expert written to %s (%d steps, %.1f s)", run.output, step, elapsed)
    return info


def expert_prompts(pipe, config: ExpertConfig) -> tuple[str, str]:
    """The instance and class prompts of an expert, with the identifier sampled (seeded by
    ``config.seed``) when ``config.identifier`` is unset; both checked against the tokenizer.

    Raises:
        InputError: a prompt that the tokenizer would truncate (named).
    """
    if config.identifier is None:
        config.identifier = sample_identifier(pipe.tokenizer, seed=config.seed, num_tokens=config.identifier_tokens)
    prompt = fill_prompt(config.instance_prompt_template, config.identifier, config.class_noun)
    class_prompt = fill_prompt(config.class_prompt, config.identifier, config.class_noun)
    _check_training_prompts(pipe.tokenizer, config, prompt, class_prompt)
    return prompt, class_prompt


def class_training_pixels(pipe, config: ExpertConfig, real_class: list[Path], class_prompt: str, resolution: int, main_process_first=contextlib.nullcontext, progress_callback=None) -> list[torch.Tensor] | None:
    """The prior-preservation images as (3, R, R) tensors: ``real_class`` topped up with images
    the base generates for ``class_prompt`` (cached per model and prompt,
    :func:`experts.data.ensure_class_images`); ``None`` without prior preservation."""
    class_paths = list(real_class)
    if config.prior_preservation and len(class_paths) < config.num_class_images:
        missing = config.num_class_images - len(class_paths)
        if real_class:
            log.info("%s has %d class images; generating %d more", config.class_data_dir, len(real_class), missing)
        with main_process_first():  # the main process generates, the others reuse
            class_paths += ensure_class_images(pipe, config.model, class_prompt, missing, resolution, config.class_seed, config.class_sample_steps, config.guidance_scale, progress_callback=progress_callback, sample_batch_size=config.sample_batch_size)
    return load_training_pixels(class_paths, resolution, config.center_crop, interpolation=config.image_interpolation_mode) if class_paths else None


def cached_inputs(pipe, config: ExpertConfig, instance_pixels: list[torch.Tensor], class_pixels: list[torch.Tensor] | None, prompt: str, class_prompt: str):
    """Cached latents (the VAE is always frozen) and, with a frozen text encoder, cached prompt
    embeddings: ``(inst, cls, cond_inst, cond_cls)``, :class:`TrainingLatents` (``cls`` ``None``
    without class images; with ``aspect_ratio_buckets`` a :class:`experts.latents.BucketedLatents`
    and the class images at each of its buckets, recorded in ``config.extra``) and
    :class:`suti.conditioning.Conditioning` of batch 1 (``None`` when the text encoder trains:
    encoded per step). ``inst.text`` holds each image's prompt (:class:`experts.rows.InstanceText`:
    captions, the empty prompt of caption dropout)."""
    resolution = config.resolution
    aug = dict(random_flip=config.random_flip, center_crop=config.center_crop, batch_size=config.vae_encode_batch_size)
    bucketed = config.aspect_ratio_buckets is not None
    inst, cls = latent_sets(pipe.vae, instance_pixels, class_pixels, bucketed=bucketed, interpolation=config.image_interpolation_mode, **aug)
    if bucketed:  # recorded in expert.json
        config.extra["aspect_ratio_buckets"] = [{"size": list(size), "images": [Path(instance_pixels.paths[i]).name for i in members]}
                                                for size, members in instance_pixels.by_size().items()]
    captions = getattr(instance_pixels, "captions", [None] * len(instance_pixels))
    inst.text = instance_text(pipe, config, prompt, captions, encode=not config.train_text_encoder)  # per-image prompts (experts.rows)
    # Text conditioning (suti.conditioning: SD hidden states; SDXL adds pooled embeds and time ids)
    cond_inst = cond_cls = None
    if not config.train_text_encoder:
        with torch.no_grad():
            length = config.max_sequence_length
            cond_inst = encode_prompt(pipe, [prompt], resolution=resolution, max_sequence_length=length)
            cond_cls = encode_prompt(pipe, [class_prompt], resolution=resolution, max_sequence_length=length)
    return inst, cls, cond_inst, cond_cls


def draw_training_batch(inst: TrainingLatents, cls: TrainingLatents | None, n: int, generator: torch.Generator, objective, vae_config, offset_noise: float, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimizer step's data, drawn at once from ``generator``: ``n`` instance rows, then
    ``n`` class rows with prior preservation. Returns ``(noisy, timesteps, target)``: noisy
    latents (rows, C, h, w), timesteps (rows,) and the denoiser's regression target (rows, C, h, w).

    ``objective`` (:mod:`suti.objectives`) draws the timesteps, noises and gives the target;
    ``vae_config`` shifts and scales the latents (:func:`suti.denoisers.latents_from_vae`);
    ``offset_noise`` adds per-channel noise of that
    standard deviation (Guttenberg 2023). The draws are in a fixed order, so a run is a function
    of the generator's seed.
    """
    idx = inst.draw_indices(n, generator)
    mean, std = inst.latents(idx, *inst.draw_augmentation(n, generator))
    if cls is not None:
        cidx = cls.draw_indices(n, generator)
        c_mean, c_std = cls.latents(cidx, *cls.draw_augmentation(n, generator))
        mean, std = torch.cat([mean, c_mean]), torch.cat([std, c_std])
    latents = latents_from_vae(mean.cpu(), std.cpu(), vae_config, generator).to(device)  # (n or 2n, C, h, w)
    noise = torch.randn(latents.shape, generator=generator)
    if offset_noise:
        noise = noise + offset_noise * torch.randn(latents.shape[:2] + (1, 1), generator=generator)
    noise = noise.to(device)
    timesteps = objective.draw_timesteps(latents.shape[0], generator).to(device)
    noisy = objective.add_noise(latents, noise, timesteps)
    return noisy, timesteps, objective.target(latents, noise, timesteps)


def _no_sync(accelerator, *models):
    """No gradient all-reduce for the models (DDP) on a micro-batch that is not the last."""
    stack = contextlib.ExitStack()
    for model in models:
        if model is not None:
            stack.enter_context(accelerator.no_sync(model))
    return stack


@torch.no_grad()
def _validate(pipe, config: ExpertConfig, output: Path, step: int, accelerator) -> None:
    """Sample the validation prompt with the weights being trained."""
    trained = [denoiser_module(pipe), *text_encoders(pipe)]
    modes = [m.training for m in trained]
    for module in trained:  # no LoRA dropout while sampling
        module.eval()
    prompt = fill_prompt(config.validation_prompt, config.identifier, config.class_noun)
    generator = torch.Generator(device="cpu").manual_seed(config.seed)
    image = pipe(prompt, height=config.resolution, width=config.resolution, num_inference_steps=config.sample_steps, guidance_scale=config.guidance_scale, generator=generator).images[0]
    folder = output / "validation"
    folder.mkdir(exist_ok=True)
    save_image_atomic(image, folder / f"step-{step:06d}.png")
    storage.write_text(folder / "prompts.json", json.dumps({"prompt": prompt}))
    log_image(accelerator, "validation", image, step)
    for module, mode in zip(trained, modes):
        module.train(mode)
