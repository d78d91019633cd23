"""Several LoRA experts trained together, in one U-Net pass per step (a resident expert worker's
``--expert-batch-size``).

Each expert is its own peft adapter on the shared frozen base. Every step draws each expert's
batch from that expert's own generator, exactly as :func:`experts.train.train_expert` does, and
runs all of them through one U-Net forward. The LoRA layers route each row to its expert's
adapter with peft's mixed-adapter batches (the ``adapter_names`` argument of peft's LoRA layers,
passed in by forward pre-hooks). Because the base is frozen and the loss is the sum of the
experts' losses, each adapter's gradient is its own expert's. Gradients are clipped per expert,
and Adafactor and AdamW update each parameter from its own state. The result therefore equals K
runs of ``train_expert``, up to float rounding (batched kernels sum in another order), with one
exception: with fp16 loss scaling, a step that overflows is skipped for all the experts together.

What batching buys is the base model's work: one forward and backward of K rows instead of K
of one row, which on a GPU (batch 1 uses a fraction of it) and in Python overhead is most of a
LoRA step. The adapters' own work and the optimizer are not shared.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from experts.expert import ExpertInfo, save_expert, unsaved_expert_info
from experts.recipe import ExpertConfig
from suti.errors import InputError

log = logging.getLogger(__name__)

# ExpertConfig fields that may differ between the experts of one batch; every other field
# (model, rank, steps, optimizer, learning rate, schedule, precision...) must be equal.
PER_EXPERT_FIELDS = frozenset({"instance_dir", "class_noun", "identifier", "instance_prompt", "class_data_dir", "seed", "validation_prompt", "extra"})


def check_batchable(configs: list[ExpertConfig]) -> None:
    """Refuse configurations that cannot train in one batch.

    Raises:
        InputError: no configs, full fine-tuning (one set of U-Net weights cannot be K experts),
            a trained text encoder, gradient accumulation, checkpoints or validation images
            during training, or a shared setting (:data:`PER_EXPERT_FIELDS` aside) that differs.
    """
    if not configs:
        raise InputError("no experts to train")
    first = configs[0]
    if first.lora_rank <= 0:
        raise InputError("experts train in batches only as LoRA adapters (--lora-rank > 0); full fine-tuning changes the shared base")
    unsupported = {"train_text_encoder": first.train_text_encoder, "gradient_accumulation_steps > 1": first.gradient_accumulation_steps > 1,
                   "checkpointing_steps": first.checkpointing_steps, "validation_steps": first.validation_steps}
    named = [name for name, value in unsupported.items() if value]
    if named:
        raise InputError(f"experts cannot train in batches with {', '.join(named)}; use an expert batch size of 1")
    shared = {k: v for k, v in first.to_dict().items() if k not in PER_EXPERT_FIELDS}
    for config in configs[1:]:
        other = config.to_dict()
        differ = sorted(k for k, v in shared.items() if other.get(k) != v)
        if differ:
            raise InputError(f"experts of one batch must share their training settings; {', '.join(differ)} differ")


@contextlib.contextmanager
def routed_adapters(module: torch.nn.Module):
    """Route each row of a batch to its own LoRA adapter (peft's mixed-adapter batches).

    Yields a dict; set ``["names"]`` to the adapter name of every row (a list as long as the
    batch) before calling ``module``; ``None`` leaves peft's active adapter in charge. A layer
    input with a whole multiple of that many rows gets the list repeated: a diffusers pipeline
    with classifier-free guidance runs ``cat([uncond, cond])``, each block in prompt order.
    Forward pre-hooks on every peft LoRA layer of ``module`` pass the list as
    ``adapter_names``; they are removed on exit.
    """
    from peft.tuners.lora import LoraLayer

    route: dict = {"names": None}

    def hook(_module, args, kwargs):
        names = route["names"]
        if names is not None:
            rows = len(args[0]) if args else len(next(iter(kwargs.values())))
            if rows != len(names) and rows % len(names) == 0:
                names = names * (rows // len(names))
            kwargs["adapter_names"] = names
        return args, kwargs

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in module.modules() if isinstance(m, LoraLayer)]
    try:
        yield route
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class _Expert:
    config: ExpertConfig
    adapter: str
    prompt: str
    inst: object
    cls: object
    cond_inst: object
    cond_cls: object
    params: list
    generator: torch.Generator


def adapter_parameters(unet: torch.nn.Module, adapter: str) -> list[torch.nn.Parameter]:
    """The LoRA parameters of one adapter (``...lora_A.<adapter>.weight``, ``lora_B``)."""
    return [p for n, p in unet.named_parameters() if f".lora_A.{adapter}." in n or f".lora_B.{adapter}." in n]


def train_lora_experts(pipe, configs: list[ExpertConfig], adapters: list[str], outputs: list[Path | None] | None = None) -> list[ExpertInfo]:
    """Train the LoRA experts ``configs`` together on ``pipe`` (loaded once, frozen).

    Expert ``i`` becomes the U-Net adapter ``adapters[i]``, which is left on ``pipe`` for
    sampling (``pipe.unet.set_adapters(adapters[i])``); the caller deletes the adapters. Each
    expert is initialised and drawn exactly as :func:`experts.train.train_expert` with the same
    config would (``torch.manual_seed(seed)`` before its adapter; its own generator).

    Args:
        pipe: the base pipeline (SD or SDXL), already on its device.
        configs: resolved configs (:func:`experts.recipe.resolve_config`), checked by
            :func:`check_batchable`.
        adapters: one new adapter name per config.
        outputs: a folder per expert to save it into (``None`` entries: not saved).

    Returns:
        One :class:`ExpertInfo` per expert; ``train_seconds`` is the batch's training time
        divided by the number of experts.

    Raises:
        InputError: as :func:`check_batchable`, or a bad instance image (named); nothing is
            trained then.
    """
    from suti.models import default_device

    check_batchable(configs)
    if len(adapters) != len(configs) or len(set(adapters)) != len(adapters):
        raise ValueError("one distinct adapter name per expert is needed")
    outputs = outputs or [None] * len(configs)
    pixels = _checked_instance_pixels(configs)
    device = default_device()
    _freeze_base(pipe)
    experts = _add_experts(pipe, configs, adapters, pixels)
    if configs[0].gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    elapsed = _train_together(pipe, experts, device)
    return _expert_infos(pipe, experts, outputs, elapsed)


def _checked_instance_pixels(configs: list[ExpertConfig]) -> list[list[torch.Tensor]]:
    """Validate every config (filling in its resolution) and load every expert's instance images
    as (3, R, R) tensors, so that a bad image fails before any work."""
    from experts.latents import load_training_pixels
    from experts.optim import adamw_class
    from suti.images import list_image_files
    from suti.models import default_resolution

    for config in configs:
        config.validate()
        config.resolution = config.resolution or default_resolution(config.model)
    pixels = [load_training_pixels(list_image_files(c.instance_dir), c.resolution, c.center_crop) for c in configs]  # every image checked before any work
    if configs[0].optimizer == "adamw":
        adamw_class(configs[0])
    return pixels


def _freeze_base(pipe) -> None:
    """No gradient for the base: VAE, text encoders and U-Net (the adapters train)."""
    pipe.vae.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    if getattr(pipe, "text_encoder_2", None) is not None:
        pipe.text_encoder_2.requires_grad_(False)
    pipe.unet.requires_grad_(False)


def _add_experts(pipe, configs: list[ExpertConfig], adapters: list[str], pixels: list[list[torch.Tensor]]) -> list[_Expert]:
    """Each expert's prompts, class images, LoRA adapter, cached inputs and generator, set up in
    :func:`experts.train.train_expert`'s order; then every adapter's parameters made trainable
    (fp32)."""
    from experts.data import real_class_images
    from experts.train import add_lora, cached_inputs, class_training_pixels, expert_prompts

    experts: list[_Expert] = []
    for config, adapter, instance_pixels in zip(configs, adapters, pixels):
        torch.manual_seed(config.seed)  # as train_expert: the adapter's initialisation follows the seed
        prompt, class_prompt = expert_prompts(pipe, config)
        real_class = real_class_images(config.class_data_dir, config.num_class_images) if config.prior_preservation and config.class_data_dir else []
        class_pixels = class_training_pixels(pipe, config, real_class, class_prompt, config.resolution)
        with warnings.catch_warnings():  # several adapters on one model is the point here
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            add_lora(pipe, config, adapter_name=adapter)
        inst, cls, cond_inst, cond_cls = cached_inputs(pipe, config, instance_pixels, class_pixels, prompt, class_prompt)
        generator = torch.Generator().manual_seed(config.seed)  # train_expert's generator (process 0)
        experts.append(_Expert(config, adapter, prompt, inst, cls, cond_inst, cond_cls, [], generator))
    for expert in experts:  # peft trains only the adapter added last: all of them train here
        expert.params = adapter_parameters(pipe.unet, expert.adapter)
        for p in expert.params:
            p.requires_grad_(True)
            p.data = p.data.float()
    return experts


def _train_together(pipe, experts: list[_Expert], device: str) -> float:
    """``steps`` optimizer steps of all the experts at once (one optimizer, per-parameter state;
    each expert's gradient clipped on its own); returns the seconds they took."""
    from diffusers import DDPMScheduler

    from experts.optim import make_lr_scheduler, make_optimizer
    from experts.train import mixed_precision

    first = experts[0].config
    unet = pipe.unet
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    optimizer = make_optimizer([p for e in experts for p in e.params], first)  # per-parameter state: K optimizers in one
    lr_scheduler = make_lr_scheduler(optimizer, first)
    precision = mixed_precision(first, device)
    scale = pipe.vae.config.scaling_factor
    log.info("training %d LoRA experts in one batch (%s), %d steps", len(experts), ", ".join(e.config.identifier for e in experts), first.steps)
    unet.train()
    started = time.perf_counter()
    with routed_adapters(unet) as route:
        for _ in range(first.steps):
            batch = _draw_batch(experts, noise_scheduler, scale, device)
            route["names"] = batch.names
            optimizer.zero_grad(set_to_none=True)
            total = _batch_loss(unet, experts, batch, noise_scheduler, precision, device)
            precision.scaler.scale(total).backward()
            precision.scaler.unscale_(optimizer)
            for e in experts:
                torch.nn.utils.clip_grad_norm_(e.params, first.max_grad_norm)
            precision.scaler.step(optimizer)
            precision.scaler.update()
            lr_scheduler.step()
    elapsed = time.perf_counter() - started
    unet.eval()
    if first.gradient_checkpointing:
        unet.disable_gradient_checkpointing()
    log.info("%d LoRA experts trained together (%d steps, %.1f s)", len(experts), first.steps, elapsed)
    return elapsed


class _Batch(NamedTuple):
    """One step's rows of all the experts, expert after expert."""

    noisy: list[torch.Tensor]  # per expert: (rows, C, h, w)
    timesteps: torch.Tensor  # (all rows,)
    target: list[torch.Tensor]  # per expert: (rows, C, h, w)
    conds: list  # per row: its Conditioning (batch 1)
    names: list[str]  # per row: its expert's adapter
    spans: list[tuple[int, int]]  # per expert: (first row, rows)


def _draw_batch(experts: list[_Expert], noise_scheduler, scale: float, device: str) -> _Batch:
    """Every expert's batch, drawn from its own generator as
    :func:`experts.train.draw_training_batch` draws one expert's."""
    from experts.train import draw_training_batch

    b = experts[0].config.batch_size
    noisy, timesteps, target, conds, names, spans = [], [], [], [], [], []
    for e in experts:
        x, t, y = draw_training_batch(e.inst, e.cls, b, e.generator, noise_scheduler, scale, e.config.offset_noise, device)
        spans.append((sum(len(v) for v in noisy), len(x)))
        noisy.append(x)
        timesteps.append(t)
        target.append(y)
        conds += [e.cond_inst] * b + ([e.cond_cls] * b if e.cls is not None else [])
        names += [e.adapter] * len(x)
    return _Batch(noisy, torch.cat(timesteps), target, conds, names, spans)


def _batch_loss(unet, experts: list[_Expert], batch: _Batch, noise_scheduler, precision, device: str) -> torch.Tensor:
    """One U-Net forward of all the rows (routed to their adapters by the caller); returns the
    sum over experts of each one's loss (instance, plus the weighted prior loss), a scalar."""
    from suti.conditioning import Conditioning
    from suti.losses import per_sample_mse, snr_weights

    first = experts[0].config
    b = first.batch_size
    with precision.autocast():
        pred = unet(torch.cat(batch.noisy), batch.timesteps, **Conditioning.cat(batch.conds).to(device).unet_kwargs()).sample
    losses = per_sample_mse(pred, torch.cat(batch.target))
    if first.snr_gamma:
        losses = losses * snr_weights(noise_scheduler, batch.timesteps, first.snr_gamma)
    total = 0.0
    for e, (start, rows) in zip(experts, batch.spans):
        total = total + losses[start : start + b].mean()
        if e.cls is not None:
            total = total + first.prior_loss_weight * losses[start + b : start + rows].mean()
    return total


def _expert_infos(pipe, experts: list[_Expert], outputs: list[Path | None], elapsed: float) -> list[ExpertInfo]:
    """Each expert saved into its output folder (or only described where that is ``None``),
    charged an equal share of the ``elapsed`` seconds."""
    infos = []
    for e, output in zip(experts, outputs):
        c = e.config
        if output is not None:
            Path(output).mkdir(parents=True, exist_ok=True)
            infos.append(save_expert(pipe, c, Path(output), train_seconds=elapsed / len(experts), adapter_name=e.adapter))
        else:
            infos.append(unsaved_expert_info(c, e.prompt, elapsed / len(experts)))
    return infos
