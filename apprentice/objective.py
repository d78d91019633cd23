"""The apprentice's training objective (SuTI): denoise the target's latents given the prompt and
the demonstrations, with text, demos and both dropped at small rates for classifier-free
guidance, and, with ``--caption-distillation``, a frozen base given the target photo's alt text as
a teacher for reconstruction examples.
"""

from __future__ import annotations

import torch

from apprentice.train_config import ApprenticeTrainConfig


def denoising_loss(model, objective, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, text_emb: torch.Tensor, demo_latents: torch.Tensor, demo_emb: torch.Tensor, demo_mask: torch.Tensor, dtype: torch.dtype = torch.float32, text_added: dict | None = None, demo_added: dict | None = None, image_embeds: torch.Tensor | None = None, snr_gamma: float | None = None, teacher: torch.Tensor | None = None, teacher_weight: torch.Tensor | None = None) -> torch.Tensor:
    """The apprentice's training loss on one batch (a scalar, fp32).

    Args:
        model: :class:`ApprenticeModule` or the DeepSpeed engine wrapping it.
        objective: the base's training objective (:func:`suti.objectives.training_objective`:
            epsilon/v/sample targets with Min-SNR-gamma weights, or flow matching's velocity), or
            the base's scheduler (made its objective with ``snr_gamma``).
        latents: (B, C, h, w) scaled clean latents; noise: the same shape; timesteps: (B,).
        text_emb: (B, L, D); demo_latents: (B, n, C, h, w); demo_emb: (B, n, L, D); demo_mask: (B,).
        dtype: the module's dtype; every input is cast to it (fp16/bf16 DeepSpeed configs).
        text_added, demo_added: SDXL's added conditioning of the targets and the demonstrations
            (see :class:`ApprenticeModule`); ``None`` for SD 1.x/2.x.
        image_embeds: (B, n, D) image embeddings of the demos, for the subject channel (or ``None``).
        snr_gamma: Min-SNR-gamma weights when ``objective`` is a scheduler (an objective carries
            its own); ``None``: the plain mean squared error.
        teacher, teacher_weight: ``--caption-distillation``: (B, C, h, w) predictions of a teacher
            (:func:`teacher_prediction`) and (B,) weights ``w`` in [0, 1]; each row's target becomes
            ``(1 - w) * target + w * teacher``. ``None``: the true target only.
    """
    from suti.losses import per_sample_mse

    objective = as_objective(objective, snr_gamma)
    noisy = objective.add_noise(latents, noise, timesteps)
    cast = lambda d: None if d is None else {k: v.to(dtype) for k, v in d.items()}  # noqa: E731
    pred = model(noisy.to(dtype), timesteps, text_emb.to(dtype), demo_latents.to(dtype), demo_emb.to(dtype), demo_mask.to(dtype), cast(text_added), cast(demo_added), None if image_embeds is None else image_embeds.to(dtype))
    target = objective.target(latents, noise, timesteps)
    if teacher is not None:
        w = teacher_weight.to(target.device, target.dtype).view(-1, *([1] * (target.dim() - 1)))
        target = target + w * (teacher.to(target.device, target.dtype) - target)
    weights = objective.loss_weights(timesteps)  # Min-SNR-gamma, or a flow-matching weighting scheme
    if weights is None:
        return torch.nn.functional.mse_loss(pred.float(), target.float())
    return (per_sample_mse(pred, target) * weights.to(pred.device)).mean()


def as_objective(objective_or_scheduler, snr_gamma: float | None = None):
    """An objective (:mod:`suti.objectives`) as given, or the training objective of a scheduler."""
    if hasattr(objective_or_scheduler, "target"):
        return objective_or_scheduler
    from suti.objectives import training_objective

    return training_objective(objective_or_scheduler, snr_gamma=snr_gamma)


def guidance_dropout(config: ApprenticeTrainConfig, batch_size: int, text_cond, null_cond, generator: torch.Generator, device: str):
    """Classifier-free guidance dropout of one batch: one uniform draw per row from ``generator``
    drops both the text and the demos (``--drop-both``), only the text (``--drop-text``) or only
    the demos (``--drop-demos``).

    Args:
        text_cond: the rows' :class:`suti.conditioning.Conditioning` (``batch_size`` rows).
        null_cond: the empty prompt's conditioning (1 row), which replaces dropped text.

    Returns:
        ``(text_cond, demo_mask)``: the conditioning with the dropped rows replaced, and a
        (B,) float mask on ``device``, 0 where the demos are dropped, else 1.
    """
    u = torch.rand(batch_size, generator=generator)
    drop_both = u < config.drop_both
    drop_text = drop_both | ((u >= config.drop_both) & (u < config.drop_both + config.drop_text))
    drop_demo = drop_both | ((u >= config.drop_both + config.drop_text) & (u < config.drop_both + config.drop_text + config.drop_demos))
    text_cond = text_cond.where(drop_text, null_cond)  # dropped text: the empty prompt's conditioning
    return text_cond, (~drop_demo).float().to(device)


def caption_teacher(config: ApprenticeTrainConfig, unet):
    """The frozen U-Net of ``--caption-distillation`` (``None`` when it is off).

    Learning from privileged information (Vapnik & Vashist 2009; the distillation form of Lopez-Paz
    et al. 2016): a reconstruction example's prompt names only the class, but its target photo
    has an alt text that describes the subject. The base model given that alt text predicts what
    the caption adds (whatever it names: in the world, colour and pattern, not parts or
    proportions; and the scene), and since the demonstrations are
    photos of the same subject, that prediction is a low-variance target for what the
    demonstrations should add. With ``--freeze-base`` the teacher is the training U-Net itself,
    called without demonstrations (exactly the base model); otherwise a frozen copy taken before
    training or resuming (one more U-Net in memory: 3.4 GB for SD 1.5 in fp32).
    """
    if not config.caption_distillation:
        return None
    if config.freeze_base:
        return unet
    import copy

    from diffusers.models.attention_processor import AttnProcessor2_0

    teacher = copy.deepcopy(unet).requires_grad_(False).eval()
    teacher.set_attn_processor(AttnProcessor2_0())  # the copy's demonstration processors are never used
    return teacher


def teacher_prediction(teacher, objective, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, cond) -> torch.Tensor:
    """The teacher's prediction (B, C, h, w), fp32, in the scheduler's ``prediction_type``, on the
    same noisy latents as the student; ``cond``: the privileged captions'
    :class:`suti.conditioning.Conditioning` (B rows). No demonstrations, no gradient."""
    dtype = next(teacher.parameters()).dtype
    noisy = as_objective(objective).add_noise(latents, noise, timesteps).to(dtype)
    extra = {} if cond.added_cond_kwargs is None else {"added_cond_kwargs": {k: v.to(dtype) for k, v in cond.added_cond_kwargs.items()}}
    with torch.no_grad():
        return teacher(noisy, timesteps, cond.encoder_hidden_states.to(dtype), **extra).sample.float()


def distillation_targets(teacher, objective, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, teacher_prompts: list[str], prompts: list[str], weight: float, encode) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``--caption-distillation``'s ``(teacher, teacher_weight)`` for :func:`denoising_loss`: the
    teacher's (B, C, h, w) predictions given each row's privileged caption (``teacher_prompts``;
    a row without one gets its own prompt and weight 0), and (B,) weights ``weight`` or 0.
    ``(None, None)`` without a teacher or when no row has a caption.

    ``encode``: prompts -> :class:`suti.conditioning.Conditioning` on the teacher's device
    (the frozen text encoders).
    """
    has_caption = [bool(p) for p in teacher_prompts]
    if teacher is None or not any(has_caption):
        return None, None
    captions = [p if p else q for p, q in zip(teacher_prompts, prompts)]  # rows without one: weight 0
    teacher_pred = teacher_prediction(teacher, objective, latents, noise, timesteps, encode(captions))
    return teacher_pred, torch.tensor(has_caption, dtype=torch.float32) * weight
