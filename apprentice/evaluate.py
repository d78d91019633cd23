"""Denoising loss of an apprentice with and without demonstrations, on fixed noise."""

from __future__ import annotations

import torch
from PIL import Image

from suti.losses import per_sample_mse
from suti.objectives import training_objective


@torch.no_grad()
def heldout_subjects(n: int):
    """The first ``n`` held-out subjects of the toy model's pretraining world (never seen by
    the toy base, its CLIP, its probe or the toy apprentice)."""
    from suti.errors import InvalidValueError
    from suti.world.toy_t2i import pretrain_world

    world = pretrain_world()
    if not 1 <= n <= len(world.heldout_subjects):
        raise InvalidValueError(f"num_subjects must be in 1..{len(world.heldout_subjects)}, got {n}")
    return world, world.heldout_subjects[:n]


def apprentice_loss(pipe, targets: list[Image.Image], prompts: list[str], demos: list[list[Image.Image]] | None, demo_captions: list[list[str]] | None = None, *, seed: int = 0, draws: int = 4) -> float:
    """Mean denoising MSE on ``targets`` given their prompts and (optionally) demonstrations.

    With ``demos=None`` the demonstration attention is off (the base model's prediction when
    the apprentice is untrained). The same ``seed`` gives the same noise and timesteps, so
    "with demos" and "without demos" are compared on identical inputs. The target follows the
    scheduler's ``prediction_type`` (as in training: :func:`suti.objectives.training_objective`).
    """
    objective = training_objective(pipe.scheduler)
    gen = torch.Generator().manual_seed(seed)
    latents = pipe.encode_images(targets)  # (N, C, h, w)
    text = pipe.encode_conditioning(prompts)  # (N, L, D) (+ SDXL pooled embeddings, time ids)
    losses = []
    for i in range(len(targets)):
        ctx = None
        if demos is not None:
            ctx = pipe.encode_demonstrations(demos[i], demo_captions[i] if demo_captions else None)
        losses += _draw_losses(pipe.unet, objective, latents[i : i + 1], text[i : i + 1].unet_kwargs(), gen, draws, cross_attention_kwargs={"demo": ctx})
    return torch.cat(losses).mean().item()


def _draw_losses(unet, objective, latents: torch.Tensor, text_kwargs: dict, gen: torch.Generator, draws: int, **unet_kwargs) -> list[torch.Tensor]:
    """``draws`` denoising MSEs, each (1,), of one target's latents (1, C, h, w) under
    ``objective`` (:mod:`suti.objectives`): noise, then a timestep, drawn from ``gen`` per draw
    (the order every loss here shares)."""
    device = unet.device
    out = []
    for _ in range(draws):
        noise = torch.randn(latents.shape, generator=gen).to(device)
        t = objective.draw_timesteps(1, gen).to(device)
        noisy = objective.add_noise(latents, noise, t)
        pred = unet(noisy, t, **text_kwargs, **unet_kwargs).sample
        out.append(per_sample_mse(pred, objective.target(latents, noise, t)))
    return out


PROMPT_MODES = ("caption", "class")


def heldout_shots(subjects, *, seed: int, count: int, resolution: int) -> list[list[tuple]]:
    """``count`` fresh renders ``(image, caption, scene)`` per subject, drawn in order from one
    generator seeded ``seed + 1`` (the photos of :func:`heldout_demo_loss` and
    :func:`heldout_expert_loss`: the same seed gives the same photos to both)."""
    import numpy as np

    from suti.world.render import sample_scene

    rng = np.random.default_rng(seed + 1)
    return [[sample_scene(subject, rng, size=resolution) for _ in range(count)] for subject in subjects]


@torch.no_grad()
def pipeline_loss(pipe, targets: list[Image.Image], prompt: str, *, resolution: int, generator: torch.Generator, draws: int = 4) -> list[float]:
    """Denoising MSE of a plain text-to-image pipeline (a base model or a DreamBooth expert) on
    ``targets`` prompted with ``prompt``: one value per (target, draw). Noise and timesteps are
    drawn from ``generator`` in the order of :func:`apprentice_loss` (per target, per draw)."""
    from suti.conditioning import encode_prompt
    from suti.images import fit_square, to_tensor

    objective = training_objective(pipe.scheduler)
    pixels = torch.stack([to_tensor(fit_square(img, resolution)) for img in targets]).to(pipe.vae.device, pipe.vae.dtype)
    latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
    text = encode_prompt(pipe, [prompt], resolution=resolution).unet_kwargs()
    return [float(x) for i in range(len(targets)) for x in _draw_losses(pipe.unet, objective, latents[i : i + 1], text, generator, draws)]


def heldout_expert_loss(base, experts: list, subjects, *, seed: int = 7, num_demos: int = 3, num_targets: int = 4, draws: int = 4, resolution: int = 32) -> tuple[float, float]:
    """The DreamBooth reference of :func:`heldout_demo_loss` with ``prompt_mode="class"``: on the
    same other photos, noise and timesteps (one generator seeded ``seed`` per model, drawn in
    :func:`apprentice_loss`'s order), each subject's expert prompted ``"a [V] <class>"`` against
    the base prompted ``"a <class>"``. Returns ``(expert, base)`` mean losses.

    Args:
        base: the base pipeline.
        experts: one ``(pipeline, identifier)`` per subject (or a callable ``i -> (pipeline,
            identifier)``, so that only one expert is loaded at a time).
    """
    expert_losses, base_losses = [], []
    gen_expert, gen_base = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    for i, (subject, shots) in enumerate(zip(subjects, heldout_shots(subjects, seed=seed, count=num_demos + num_targets, resolution=resolution))):
        targets = [img for img, _, _ in shots[num_demos:]]
        pipe, identifier = experts(i) if callable(experts) else experts[i]
        base_losses += pipeline_loss(base, targets, f"a {subject.class_noun}", resolution=resolution, generator=gen_base, draws=draws)
        expert_losses += pipeline_loss(pipe, targets, f"a {identifier} {subject.class_noun}", resolution=resolution, generator=gen_expert, draws=draws)
    return sum(expert_losses) / len(expert_losses), sum(base_losses) / len(base_losses)


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
    if prompt_mode not in PROMPT_MODES:
        raise ValueError(f"unknown prompt_mode {prompt_mode!r}; choose from {PROMPT_MODES}")
    if subjects is None:
        _, subjects = heldout_subjects(num_subjects)
    targets, prompts, demos, demo_captions = [], [], [], []
    for subject, shots in zip(subjects, heldout_shots(subjects, seed=seed, count=num_demos + num_targets, resolution=pipe.resolution)):
        class_prompt = f"a {subject.class_noun}"
        for img, caption, _ in shots[num_demos:]:
            targets.append(img)
            prompts.append(caption if prompt_mode == "caption" else class_prompt)
            demos.append([s[0] for s in shots[:num_demos]])
            demo_captions.append(None if prompt_mode == "caption" else [class_prompt] * num_demos)
    with_demos = apprentice_loss(pipe, targets, prompts, demos, demo_captions if prompt_mode == "class" else None, seed=seed, draws=draws)
    without = apprentice_loss(pipe, targets, prompts, None, seed=seed, draws=draws)
    return with_demos, without


#: The conditions of :func:`heldout_loss_by_timestep`.
LOSS_CONDITIONS = ("without", "demos", "copy", "caption")


@torch.no_grad()
def heldout_loss_by_timestep(pipe, subjects, *, seed: int = 7, num_demos: int = 3, num_targets: int = 2, timesteps: tuple[int, ...] | None = None) -> dict:
    """Where demonstrations can lower the class-only denoising loss: the loss per timestep of each
    subject's other photos under four conditions, on identical noise:

    * ``"without"``: prompt ``"a <class noun>"``, no demos (the denominator of every ratio);
    * ``"demos"``: the same prompt and ``num_demos`` other photos (:func:`heldout_demo_loss`'s
      class-only numerator, here per timestep);
    * ``"copy"``: an oracle whose demos include the target photo itself (plus ``num_demos - 1``
      others): what demonstration attention carries when the answer is among the demos;
    * ``"caption"``: an oracle that names the identity in text: the target's full alt text
      (in the world: class, colour, pattern and scene; ``suti.world.caption`` names no part or
      proportions), no demos.

    The noise-prediction MSE is dominated by the low-noise timesteps, where neither text nor
    demos can tell the noise from fine texture; the per-timestep rows show where each condition
    helps. Timesteps default to 10 evenly spaced ones (25, 125, ..., 925 for 1000).

    Returns:
        ``{"timesteps": [t...], "loss": {condition: [mean loss per t]}, "mean": {condition:
        mean over t}}``; every loss averages ``len(subjects) * num_targets`` targets.
    """
    objective = training_objective(pipe.scheduler)
    n_train = objective.num_train_timesteps
    if timesteps is None:
        timesteps = tuple(range(n_train // 40, n_train, n_train // 10))
    gen = torch.Generator().manual_seed(seed)
    sums = {c: [0.0] * len(timesteps) for c in LOSS_CONDITIONS}
    count = 0
    for subject, shots in zip(subjects, heldout_shots(subjects, seed=seed, count=num_demos + num_targets, resolution=pipe.resolution)):
        class_prompt = f"a {subject.class_noun}"
        demos = [s[0] for s in shots[:num_demos]]
        # per subject: the class prompt and its demos; per target: the copy oracle's demos and the caption
        class_text = pipe.encode_conditioning([class_prompt]).unet_kwargs()
        demo_ctx = pipe.encode_demonstrations(demos, [class_prompt] * num_demos)
        for img, caption, _ in shots[num_demos:]:
            latents = pipe.encode_images([img])
            conditions = {
                "without": (class_text, None),
                "demos": (class_text, demo_ctx),
                "copy": (class_text, pipe.encode_demonstrations([img] + demos[: num_demos - 1], [class_prompt] * num_demos)),
                "caption": (pipe.encode_conditioning([caption]).unet_kwargs(), None),
            }
            for j, t in enumerate(timesteps):
                noise = torch.randn(latents.shape, generator=gen).to(latents.device)
                tt = objective.timesteps_at(torch.tensor([t])).to(latents.device)
                noisy = objective.add_noise(latents, noise, tt)
                target = objective.target(latents, noise, tt)
                for name, (text, ctx) in conditions.items():
                    pred = pipe.unet(noisy, tt, **text, cross_attention_kwargs={"demo": ctx}).sample
                    sums[name][j] += float(per_sample_mse(pred, target))
            count += 1
    loss = {c: [v / count for v in sums[c]] for c in LOSS_CONDITIONS}
    return {"timesteps": list(timesteps), "loss": loss, "mean": {c: sum(v) / len(v) for c, v in loss.items()}}
