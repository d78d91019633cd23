"""Denoising loss of an apprentice with and without demonstrations, on fixed noise."""

from __future__ import annotations

import torch
from PIL import Image

from experts.loss import denoising_target, per_sample_mse


@torch.no_grad()
def apprentice_loss(pipe, targets: list[Image.Image], prompts: list[str], demos: list[list[Image.Image]] | None, demo_captions: list[list[str]] | None = None, *, seed: int = 0, draws: int = 4) -> float:
    """Mean denoising MSE on ``targets`` given their prompts and (optionally) demonstrations.

    With ``demos=None`` the demonstration attention is off (the base model's prediction when
    the apprentice is untrained). The same ``seed`` gives the same noise and timesteps, so
    "with demos" and "without demos" are compared on identical inputs. The target follows the
    scheduler's ``prediction_type`` (as in training).
    """
    from diffusers import DDPMScheduler

    device = pipe.unet.device
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    gen = torch.Generator().manual_seed(seed)
    latents = pipe.encode_images(targets)  # (N, C, h, w)
    text = pipe.encode_conditioning(prompts)  # (N, L, D) (+ SDXL pooled embeddings, time ids)
    losses = []
    for i in range(len(targets)):
        ctx = None
        if demos is not None:
            ctx = pipe.encode_demonstrations(demos[i], demo_captions[i] if demo_captions else None)
        for _ in range(draws):
            noise = torch.randn(latents[i : i + 1].shape, generator=gen).to(device)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (1,), generator=gen).to(device)
            noisy = scheduler.add_noise(latents[i : i + 1], noise, t)
            pred = pipe.unet(noisy, t, **text[i : i + 1].unet_kwargs(), cross_attention_kwargs={"demo": ctx}).sample
            losses.append(per_sample_mse(pred, denoising_target(scheduler, latents[i : i + 1], noise, t)))
    return torch.cat(losses).mean().item()


PROMPT_MODES = ("caption", "class")


def heldout_demo_loss(pipe, num_subjects: int = 12, *, seed: int = 7, num_demos: int = 3, num_targets: int = 4, draws: int = 4, prompt_mode: str = "caption", subjects=None) -> tuple[float, float]:
    """Denoising loss on held-out world subjects' *other* photos, with and without demonstrations.

    For each of the first ``num_subjects`` held-out subjects of the toy model's pretraining world
    (never seen by the toy base, nor by the toy apprentice's training crawl), or for the given
    ``subjects``, ``num_demos`` photos are the demonstrations and ``num_targets`` further photos
    (other contexts and poses) the targets. Returns ``(with_demos, without_demos)`` on identical
    noise and timesteps (see :func:`apprentice_loss`).

    Args:
        prompt_mode: ``"caption"``: each target is prompted with its full caption (which names
            colour, pattern and context) and the demos get no captions; ``"class"``: every target
            is prompted with ``"a <class noun>"`` and so is every demo, so no text carries the
            identity and only the demonstrations can.
        subjects: world subjects to use instead of the first ``num_subjects`` held-out ones.

    Raises:
        ValueError: an unknown ``prompt_mode``.
    """
    import numpy as np

    from apprentice.compare import heldout_subjects
    from suti.world.render import sample_scene

    if prompt_mode not in PROMPT_MODES:
        raise ValueError(f"unknown prompt_mode {prompt_mode!r}; choose from {PROMPT_MODES}")
    if subjects is None:
        _, subjects = heldout_subjects(num_subjects)
    rng = np.random.default_rng(seed + 1)
    targets, prompts, demos, demo_captions = [], [], [], []
    for subject in subjects:
        shots = [sample_scene(subject, rng, size=pipe.resolution) for _ in range(num_demos + num_targets)]
        class_prompt = f"a {subject.class_noun}"
        for img, caption, _ in shots[num_demos:]:
            targets.append(img)
            prompts.append(caption if prompt_mode == "caption" else class_prompt)
            demos.append([s[0] for s in shots[:num_demos]])
            demo_captions.append(None if prompt_mode == "caption" else [class_prompt] * num_demos)
    with_demos = apprentice_loss(pipe, targets, prompts, demos, demo_captions if prompt_mode == "class" else None, seed=seed, draws=draws)
    without = apprentice_loss(pipe, targets, prompts, None, seed=seed, draws=draws)
    return with_demos, without
