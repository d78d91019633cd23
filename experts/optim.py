"""Optimizer and learning-rate schedule of expert training (diffusers' train_dreambooth.py options:
``--use_8bit_adam``, ``--adam_beta1/2``, ``--adam_weight_decay``, ``--adam_epsilon``,
``--lr_scheduler``, ``--lr_warmup_steps``, ``--lr_num_cycles``, ``--lr_power``)."""

from __future__ import annotations

import importlib

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


def make_optimizer(params: list[torch.nn.Parameter], config):
    """AdamW (8-bit with ``use_8bit_adam``) or Adafactor (the SuTI expert recipe) at the
    effective learning rate (:attr:`ExpertConfig.effective_learning_rate`)."""
    lr = config.effective_learning_rate
    if config.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False)
    return adamw_class(config)(params, lr=lr, betas=(config.adam_beta1, config.adam_beta2), weight_decay=config.adam_weight_decay, eps=config.adam_epsilon)


def make_lr_scheduler(optimizer, config):
    """``diffusers.optimization.get_scheduler(config.lr_scheduler, ...)`` over ``config.steps``
    optimizer steps with ``config.lr_warmup_steps`` of warmup.

    Stepped once per optimizer step (after gradient accumulation), so the learning rate of
    optimizer step ``k`` (1-based) is ``base * lambda(k - 1)``; e.g. ``cosine``:
    ``lambda(s) = s / W`` for ``s < W``, else ``0.5 * (1 + cos(pi * (s - W) / (N - W)))``.
    """
    from diffusers.optimization import get_scheduler

    return get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps, num_training_steps=config.steps, num_cycles=config.lr_num_cycles, power=config.lr_power)
