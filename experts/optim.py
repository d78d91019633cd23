"""Optimizer and learning-rate schedule of expert training (diffusers' train_dreambooth.py options:
``--use_8bit_adam``, ``--adam_beta1/2``, ``--adam_weight_decay``, ``--adam_epsilon``,
``--lr_scheduler``, ``--lr_warmup_steps``, ``--lr_num_cycles``, ``--lr_power``; and
train_dreambooth_lora_sdxl.py's ``--optimizer prodigy``, ``--prodigy_*``, ``--text_encoder_lr``,
``--adam_weight_decay_text_encoder``)."""

from __future__ import annotations

import contextlib
import importlib
import io

import torch

from suti.errors import InputError


def adamw_class(config):
    """``torch.optim.AdamW``, or ``bitsandbytes.optim.AdamW8bit`` with ``use_8bit_adam``.

    Raises:
        InputError: ``use_8bit_adam`` without the bitsandbytes package (checked before training
            writes anything).
    """
    if not config.use_8bit_adam:
        return torch.optim.AdamW
    try:
        bnb = importlib.import_module("bitsandbytes")
    except ImportError:
        raise InputError("--use-8bit-adam needs the bitsandbytes package (pip install bitsandbytes); it is not installed") from None
    return bnb.optim.AdamW8bit


def param_groups(params, config) -> list[dict]:
    """The optimizer's parameter groups: the U-Net's at the effective rate and ``adam_weight_decay``,
    then (when given ``{name: parameter}`` with ``text_encoder*`` names) the text encoders' at
    :attr:`~experts.recipe.ExpertConfig.effective_text_encoder_learning_rate` and
    :attr:`~experts.recipe.ExpertConfig.effective_text_encoder_weight_decay`, as diffusers'
    ``train_dreambooth_lora_sdxl.py`` groups them (``--text_encoder_lr``,
    ``--adam_weight_decay_text_encoder``). A list of parameters is one group."""
    groups = [{"params": [], "lr": config.effective_learning_rate, "weight_decay": config.adam_weight_decay}]
    if not isinstance(params, dict):
        groups[0]["params"] = list(params)
        return groups
    text = {"params": [], "lr": config.effective_text_encoder_learning_rate, "weight_decay": config.effective_text_encoder_weight_decay}
    for name, p in params.items():
        (text if name.startswith("text_encoder") else groups[0])["params"].append(p)
    return [g for g in groups + [text] if g["params"]]


def make_optimizer(params, config):
    """AdamW (8-bit with ``use_8bit_adam``), Adafactor (the SuTI expert recipe) or Prodigy
    (``prodigyopt.Prodigy``, as diffusers' SDXL LoRA script builds it: ``adam_beta1/2``,
    ``prodigy_beta3``, ``adam_epsilon``, ``adam_weight_decay``, ``prodigy_decouple``,
    ``prodigy_use_bias_correction``, ``prodigy_safeguard_warmup``) over :func:`param_groups`.

    Args:
        params: the trainable parameters by name (``unet.*``, ``text_encoder.*``,
            ``text_encoder_2.*``) or a plain list (one group).

    Raises:
        InputError: ``use_8bit_adam`` without bitsandbytes, ``prodigy`` without prodigyopt.
    """
    groups = param_groups(params, config)
    lr = config.effective_learning_rate
    if config.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        for group in groups:  # Adafactor (the SuTI recipe) trains without weight decay: adam_weight_decay is Adam's
            group["weight_decay"] = 0.0
        return Adafactor(groups, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False)
    if config.optimizer == "prodigy":
        with contextlib.redirect_stdout(io.StringIO()):  # prodigyopt prints "Using decoupled weight decay": stdout is the command's JSON
            return prodigy_class()(groups, lr=lr, betas=(config.adam_beta1, config.adam_beta2), beta3=config.prodigy_beta3, eps=config.adam_epsilon, weight_decay=config.adam_weight_decay,
                                   decouple=config.prodigy_decouple, use_bias_correction=config.prodigy_use_bias_correction, safeguard_warmup=config.prodigy_safeguard_warmup)
    return adamw_class(config)(groups, lr=lr, betas=(config.adam_beta1, config.adam_beta2), weight_decay=config.adam_weight_decay, eps=config.adam_epsilon)


def prodigy_class():
    """``prodigyopt.Prodigy`` (Mishchenko & Defazio 2024).

    Raises:
        InputError: the prodigyopt package is not installed.
    """
    try:
        return importlib.import_module("prodigyopt").Prodigy
    except ImportError:
        raise InputError("--optimizer prodigy needs the prodigyopt package (pip install prodigyopt); it is not installed") from None


def make_lr_scheduler(optimizer, config):
    """``diffusers.optimization.get_scheduler(config.lr_scheduler, ...)`` over ``config.steps``
    optimizer steps with ``config.lr_warmup_steps`` of warmup.

    Stepped once per optimizer step (after gradient accumulation), so the learning rate of
    optimizer step ``k`` (1-based) is ``base * lambda(k - 1)``; e.g. ``cosine``:
    ``lambda(s) = s / W`` for ``s < W``, else ``0.5 * (1 + cos(pi * (s - W) / (N - W)))``.
    """
    from diffusers.optimization import get_scheduler

    return get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps, num_training_steps=config.steps, num_cycles=config.lr_num_cycles, power=config.lr_power)
