"""Several LoRA experts trained together on one frozen base, one model pass per step (a
resident expert worker's ``--expert-batch-size``).

Each expert is first its own peft adapter on the shared base, initialised exactly as
:func:`experts.train.train_expert` initialises a lone expert (``torch.manual_seed(seed)`` before
its adapter). For training, the adapters are stacked (:mod:`experts.stacked`): every targeted
``Linear`` holds one (K, r, in) ``lora_A`` and one (K, out, r) ``lora_B``, and each layer's LoRA
term is one batched matmul whatever K is. Every step draws each expert's batch from that
expert's own generator (:mod:`experts.stacked_data`), runs all the rows through one forward and
backward, clips each expert's gradient over its own slices, and steps one optimizer whose
update is per expert (AdamW is elementwise; Adafactor is factored and clipped per slice). The
base is frozen and the loss is the sum of the experts' losses, so each expert's gradient is its
own. The result therefore equals K runs of ``train_expert``, up to float rounding (batched
kernels sum in another order), with one exception: with fp16 loss scaling, a step that
overflows is skipped for all the experts together.

At the end the stacked weights go back into the peft adapters, which save and sample as lone
experts do (the keys and layout of ``pytorch_lora_weights.safetensors`` are the same).
"""

from __future__ import annotations

import copy
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from experts.expert import ExpertInfo, save_expert, unsaved_expert_info
from experts.export import write_kohya_copy
from experts.recipe import ExpertConfig
from suti.denoisers import denoiser_module
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
            during training, LoRA dropout, DoRA, Prodigy (one step-size estimate for all the
            stacked experts would not be each expert's own), or a shared setting (:data:`PER_EXPERT_FIELDS` aside) that differs.
    """
    if not configs:
        raise InputError("no experts to train")
    first = configs[0]
    if first.lora_rank <= 0:
        raise InputError("experts train in batches only as LoRA adapters (--lora-rank > 0); full fine-tuning changes the shared base")
    unsupported = {"train_text_encoder": first.train_text_encoder, "gradient_accumulation_steps > 1": first.gradient_accumulation_steps > 1,
                   "checkpointing_steps": first.checkpointing_steps, "validation_steps": first.validation_steps,
                   # each expert's rows would need their own dropout draws, DoRA norms and Prodigy step size
                   "lora_dropout": first.lora_dropout, "use_dora": first.use_dora, "optimizer prodigy": first.optimizer == "prodigy",
                   # one conditioning per expert for every step (per-row prompts and bucket sizes are a lone expert's)
                   "aspect_ratio_buckets": first.aspect_ratio_buckets, "caption_extension": first.caption_extension, "caption_dropout": first.caption_dropout}
    named = [name for name, value in unsupported.items() if value]
    if named:
        raise InputError(f"experts cannot train in batches with {', '.join(named)}; use an expert batch size of 1")
    shared = {k: v for k, v in first.to_dict().items() if k not in PER_EXPERT_FIELDS}
    for config in configs[1:]:
        other = config.to_dict()
        differ = sorted(k for k, v in shared.items() if other.get(k) != v)
        if differ:
            raise InputError(f"experts of one batch must share their training settings; {', '.join(differ)} differ")


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


def adapter_parameters(module: torch.nn.Module, adapters: list[str]) -> dict[str, list[torch.nn.Parameter]]:
    """The LoRA parameters of each adapter (``...lora_A.<adapter>.weight``, ``lora_B``), in the
    module's order, from one walk over its parameters."""
    out: dict[str, list[torch.nn.Parameter]] = {a: [] for a in adapters}
    for name, param in module.named_parameters():
        for kind in (".lora_A.", ".lora_B."):
            if kind in name:
                adapter = name.split(kind, 1)[1].rsplit(".", 1)[0]
                if adapter in out:
                    out[adapter].append(param)
    return out


def train_lora_experts(pipe, configs: list[ExpertConfig], adapters: list[str], outputs: list[Path | None] | None = None, *, compile: bool = False, timings: dict | None = None,
                       on_step=None) -> list[ExpertInfo]:
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
        compile: train through ``torch.compile`` (measure it: it is not always faster).
        timings: a dict to add the seconds of each phase of the steps to (``data``,
            ``forward``, ``backward``, ``optimizer``), for benchmarks; it synchronises the device.
        on_step: called after every optimizer step (``torch.profiler.profile.step``).

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
        denoiser_module(pipe).enable_gradient_checkpointing()
    elapsed = _train_together(pipe, experts, device, compile=compile, timings=timings, on_step=on_step)
    return _expert_infos(pipe, experts, outputs, elapsed)


def _checked_instance_pixels(configs: list[ExpertConfig]) -> list[list[torch.Tensor]]:
    """Validate every config (filling in its resolution) and load every expert's instance images
    as (3, R, R) tensors, so that a bad image fails before any work."""
    from experts.data import instance_images
    from experts.optim import adamw_class
    from suti.models import default_resolution

    for config in configs:
        config.validate()
        config.resolution = config.resolution or default_resolution(config.model)
    pixels = [instance_images(c, c.resolution) for c in configs]  # every image checked before any work
    if configs[0].optimizer == "adamw":
        adamw_class(configs[0])
    return pixels


def _freeze_base(pipe) -> None:
    """No gradient for the base: VAE, text encoders and U-Net (the adapters train)."""
    pipe.vae.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    if getattr(pipe, "text_encoder_2", None) is not None:
        pipe.text_encoder_2.requires_grad_(False)
    denoiser_module(pipe).requires_grad_(False)


def _add_experts(pipe, configs: list[ExpertConfig], adapters: list[str], pixels: list[list[torch.Tensor]]) -> list[_Expert]:
    """Each expert's prompts, class images, LoRA adapter, cached inputs and generator, set up in
    :func:`experts.train.train_expert`'s order; then every adapter's parameters made trainable
    (fp32)."""
    from experts.data import real_class_images
    from experts.train import add_lora, cached_inputs, class_training_pixels, expert_prompts

    experts: list[_Expert] = []
    class_sets: dict[tuple, object] = {}  # one class latent set per class prompt and class images
    for config, adapter, instance_pixels in zip(configs, adapters, pixels):
        torch.manual_seed(config.seed)  # as train_expert: the adapter's initialisation follows the seed
        prompt, class_prompt = expert_prompts(pipe, config)
        real_class = real_class_images(config.class_data_dir, config.num_class_images) if config.prior_preservation and config.class_data_dir else []
        class_pixels = class_training_pixels(pipe, config, real_class, class_prompt, config.resolution)
        if experts:  # the same layers as the first expert's adapter, without peft's walks over the model
            add_adapter_like(denoiser_module(pipe), experts[0].adapter, adapter)
        else:
            with warnings.catch_warnings():  # several adapters on one model is the point here
                warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
                add_lora(pipe, config, adapter_name=adapter)
        key = (class_prompt, tuple(str(p) for p in real_class))
        shared = class_sets.get(key) if class_pixels is not None else None
        inst, cls, cond_inst, cond_cls = cached_inputs(pipe, config, instance_pixels, None if shared is not None else class_pixels, prompt, class_prompt)
        cls = shared if shared is not None else cls
        if cls is not None:
            class_sets.setdefault(key, cls)
        generator = torch.Generator().manual_seed(config.seed)  # train_expert's generator (process 0)
        experts.append(_Expert(config, adapter, prompt, inst, cls, cond_inst, cond_cls, [], generator))
    if len(experts) > 1:  # as after K add_adapter calls: the last adapter is the active one
        denoiser_module(pipe).set_adapter(experts[-1].adapter)
    params = adapter_parameters(denoiser_module(pipe), [e.adapter for e in experts])
    for expert in experts:  # peft trains only the adapter added last: all of them train here
        expert.params = params[expert.adapter]
        for p in expert.params:
            p.requires_grad_(True)
            p.data = p.data.float()
    return experts


def add_adapter_like(module: torch.nn.Module, first: str, adapter: str) -> None:
    """Add the LoRA adapter ``adapter`` to ``module`` with the settings of its adapter ``first``,
    as peft's ``inject_adapter`` (through diffusers' ``add_adapter``) would add it, but without
    walking the whole model: every LoRA layer that carries ``first``, in the model's module order,
    gets ``adapter`` through its own ``update_layer`` (peft's path for a layer that is already a
    LoRA layer). The initialisation therefore draws the same numbers from torch's global RNG, in
    the same order, as ``module.add_adapter(config, adapter)`` would; ``adapter`` also gets a copy
    of ``first``'s config (what peft and diffusers read to save it). Unlike ``add_adapter``, the
    active adapter stays ``first`` (call the model's ``set_adapter`` after the last one), and the
    layers are those that carry ``first`` (not every module its config targets).

    Raises:
        ValueError: ``adapter`` exists already, or ``first``'s config has peft extras (rank or
            alpha patterns, ``modules_to_save``, ...; use ``add_adapter``).
    """
    from peft.tuners.lora import LoraLayer

    configs = module.peft_config
    if adapter in configs:
        raise ValueError(f"adapter {adapter!r} exists already")
    config = copy.deepcopy(configs[first])
    extras = [name for name in ("rank_pattern", "alpha_pattern", "modules_to_save", "layer_replication", "target_parameters", "trainable_token_indices")
              if getattr(config, name, None)]
    if extras:
        raise ValueError(f"adapters with {', '.join(extras)} are added with add_adapter")
    for name, layer in list(module.named_modules()):
        if isinstance(layer, LoraLayer) and first in layer.lora_A:
            layer.update_layer(adapter, config.r, lora_alpha=config.lora_alpha, target_name=name, config=config)
    configs[adapter] = config


def _train_together(pipe, experts: list[_Expert], device: str, *, compile: bool = False, timings: dict | None = None, on_step=None) -> float:
    """``steps`` optimizer steps of all the experts at once on their stacked adapters; returns
    the seconds they took. ``timings``: add each phase's seconds (``data``, ``forward``,
    ``backward``, ``optimizer``; the device is synchronised between phases, which costs a
    little). ``on_step()``: called after every step (a ``torch.profiler`` schedule's ``step``).
    ``compile``: train through ``torch.compile`` of the U-Net with its stacked layers."""
    from experts.optim import make_lr_scheduler
    from experts.stacked import clip_grad_norm_per_expert, make_stacked_optimizer, stacked_lora
    from experts.stacked_data import ExpertData, StackedBatches
    from experts.train import mixed_precision
    from suti.denoisers import denoiser_for
    from suti.objectives import training_objective

    first = experts[0].config
    denoiser = denoiser_for(pipe, guidance_scale=first.guidance_scale)
    unet = denoiser.module  # the U-Net or the transformer
    objective = training_objective(pipe.scheduler, snr_gamma=first.snr_gamma, weighting_scheme=first.weighting_scheme,
                                   logit_mean=first.logit_mean, logit_std=first.logit_std, mode_scale=first.mode_scale)
    precision = mixed_precision(first, device)
    data = StackedBatches([ExpertData(e.inst, e.cls, e.cond_inst, e.cond_cls, e.generator) for e in experts], first.batch_size, objective,
                          pipe.vae.config, first.offset_noise, first.prior_loss_weight, device)
    log.info("training %d LoRA experts stacked (%s), %d steps", len(experts), ", ".join(e.config.identifier for e in experts), first.steps)
    clock = _PhaseClock(timings, device)
    unet.train()
    started = time.perf_counter()
    with stacked_lora(unet, [e.adapter for e in experts]) as stack:
        params = stack.parameters()
        for p in params:
            p.requires_grad_(True)
        optimizer = make_stacked_optimizer(params, first, device)
        lr_scheduler = make_lr_scheduler(optimizer, first)
        stack.route.set_grouped(data.rows_per_expert)
        model = _compiled(unet, compile)
        clock.restart()  # the stack and the optimizer are set up: the steps' phases from here
        for _ in range(first.steps):
            noisy, timesteps, target = data.draw()
            clock.lap("data")
            optimizer.zero_grad(set_to_none=True)
            with precision.autocast():
                pred = denoiser(noisy, timesteps, data.cond, module=model)
            total, _ = data.loss(pred, target, timesteps)
            clock.lap("forward")
            precision.scaler.scale(total).backward()
            clock.lap("backward")
            precision.scaler.unscale_(optimizer)
            clip_grad_norm_per_expert(params, first.max_grad_norm)
            precision.scaler.step(optimizer)
            precision.scaler.update()
            lr_scheduler.step()
            clock.lap("optimizer")
            if on_step is not None:
                on_step()
    elapsed = time.perf_counter() - started
    unet.eval()
    if first.gradient_checkpointing:
        unet.disable_gradient_checkpointing()
    log.info("%d LoRA experts trained together (%d steps, %.1f s)", len(experts), first.steps, elapsed)
    return elapsed


def _compiled(unet, compile: bool):
    """``torch.compile(unet)`` (with the stacked layers in it) when asked, else ``unet``."""
    return torch.compile(unet, dynamic=False) if compile else unet


class _PhaseClock:
    """Adds the seconds since the last lap to ``timings[phase]`` (no-op without ``timings``);
    synchronises a CUDA device first, so that each phase is charged its own kernels."""

    def __init__(self, timings: dict | None, device: str):
        self.timings, self.cuda = timings, str(device).startswith("cuda")
        self.last = time.perf_counter()

    def restart(self) -> None:
        """Start the next phase now (what came before is charged to no phase)."""
        self.last = time.perf_counter()

    def lap(self, phase: str) -> None:
        if self.timings is None:
            return
        if self.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.timings[phase] = self.timings.get(phase, 0.0) + now - self.last
        self.last = now


def _expert_infos(pipe, experts: list[_Expert], outputs: list[Path | None], elapsed: float) -> list[ExpertInfo]:
    """Each expert saved into its output folder (or only described where that is ``None``),
    charged an equal share of the ``elapsed`` seconds."""
    infos = []
    for e, output in zip(experts, outputs):
        c = e.config
        if output is not None:
            Path(output).mkdir(parents=True, exist_ok=True)
            infos.append(save_expert(pipe, c, Path(output), train_seconds=elapsed / len(experts), adapter_name=e.adapter))
            if c.output_kohya_format:
                write_kohya_copy(pipe, infos[-1], Path(output), e.adapter)
        else:
            infos.append(unsaved_expert_info(c, e.prompt, elapsed / len(experts)))
    return infos
