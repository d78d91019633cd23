"""In-context apprentice vs DreamBooth expert vs base model on held-out subjects of the toy world.

Used by the main job's last stage (``suti demo``) and by ``benchmarks/in_context.py``. For each
held-out world subject: 3 photos are exported as the demonstrations / DreamBooth instance
images; the apprentice (from the demos, no tuning), a DreamBooth expert (trained on the same
photos, then sampled) and the base model (class noun only) generate the same prompts with the
same seeds; subject fidelity is the probe's identity accuracy and the small CLIP's image
similarity to the demos, and the wall-clock times to the first image are recorded.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from apprentice.evaluate import heldout_subjects
from suti.errors import InvalidValueError
from suti.sampling import DEFAULT_DEMO_GUIDANCE_SCALE

#: Query prompts; ``{S}`` is the subject phrase ("star toy" or "[V] star toy").
QUERY_PROMPTS = ("a {S} on the beach", "a {S} in the snow", "a {S} wearing a hat")
METHODS = ("apprentice", "expert", "base")


@dataclass
class SubjectResult:
    """One held-out subject: the demos, each method's images (prompt order) and the numbers."""

    subject_id: str
    description: str
    demos: list[Image.Image]
    images: dict[str, list[Image.Image]] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)

    def row(self) -> dict:
        return {"subject": self.subject_id, "description": self.description, **self.metrics}


def compare_on_world(apprentice, base, *, work_dir: str | Path, num_subjects: int = 3,
                     prompts: tuple[str, ...] = QUERY_PROMPTS, methods: tuple[str, ...] = METHODS,
                     model: str = "toy", expert_steps: int = 200, num_inference_steps: int = 25,
                     guidance_scale: float = 5.0, demo_guidance_scale: float = DEFAULT_DEMO_GUIDANCE_SCALE,
                     seed: int = 7) -> list[SubjectResult]:
    """Run the comparison; see the module docstring.

    Args:
        apprentice: an :class:`~apprentice.pipeline.ApprenticePipeline` (``None`` if
            ``"apprentice"`` is not in ``methods``).
        base: the base ``StableDiffusionPipeline`` (the toy preset).
        work_dir: gets ``<subject>/photos`` and ``<subject>/expert`` (reused when present).
        methods: any of ``"apprentice"``, ``"expert"``, ``"base"``.
        model: the experts' base model preset.
        expert_steps: DreamBooth steps of each expert (recipe ``dreambooth``, prior preservation).
        seed: photo export and expert seed; image ``k`` uses generator seed ``k``.

    Returns:
        one :class:`SubjectResult` per subject, with metrics ``<method>_identity`` (probe: all
        identity attributes right), ``<method>_attributes`` (probe: share of identity attributes
        right), ``<method>_clip_i`` and ``<method>_first_image_s`` (apprentice: demo encoding + first
        image; expert: training + loading + first image; base: first image).
    """
    from suti.models import default_resolution
    from suti.scoring import get_scorer
    from suti.world import export_subject
    from suti.world.probe import load_probe

    unknown = set(methods) - set(METHODS)
    if unknown:
        raise InvalidValueError(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
    work = Path(work_dir)
    res = default_resolution(model)
    world, subjects = heldout_subjects(num_subjects)
    probe, clip = load_probe(), get_scorer("toy-clip")
    out: list[SubjectResult] = []
    for subject in subjects:
        photos = work / subject.subject_id / "photos"
        if not photos.is_dir():
            export_subject(world, subject.subject_id, photos, n=3, seed=seed, size=res)
        demos = [Image.open(p).convert("RGB") for p in sorted(photos.glob("*.png"))]
        result = SubjectResult(subject.subject_id, subject.description(), demos)
        sample_kw = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)
        demo_emb = clip.embed_images(demos)  # (n, D)
        for method in methods:
            t0 = time.perf_counter()
            # each method: text for a prompt template -> one image (the clock runs from t0, so
            # the apprentice's demo encoding and the expert's training count to the first image)
            if method == "apprentice":
                ctx = apprentice.encode_demonstrations(demos, [f"a {subject.description()}"] * len(demos))
                phrase = subject.class_noun
                generate = lambda text, gen: apprentice(text, demo_context=ctx, demo_guidance_scale=demo_guidance_scale, generator=gen, **sample_kw).images[0]  # noqa: E731
            elif method == "expert":
                pipe, identifier = _train_expert(photos, subject.class_noun, work / subject.subject_id / "expert", model, expert_steps, seed)
                phrase = f"{identifier} {subject.class_noun}"
                generate = lambda text, gen: pipe(text, height=res, width=res, generator=gen, **sample_kw).images[0]  # noqa: E731
            else:
                phrase = subject.class_noun
                generate = lambda text, gen: base(text, height=res, width=res, generator=gen, **sample_kw).images[0]  # noqa: E731
            images, first = [], None
            for k, template in enumerate(prompts):
                images.append(generate(template.replace("{S}", phrase), torch.Generator().manual_seed(k)))
                first = first if first is not None else time.perf_counter() - t0
            result.images[method] = images
            result.metrics[f"{method}_identity"] = probe.identity_accuracy(images, subject)
            result.metrics[f"{method}_attributes"] = probe.identity_attribute_score(images, subject)
            result.metrics[f"{method}_clip_i"] = float((clip.embed_images(images) @ demo_emb.T).mean())
            result.metrics[f"{method}_first_image_s"] = round(first, 3)
        out.append(result)
    return out


def _train_expert(photos: Path, class_noun: str, folder: Path, model: str, steps: int, seed: int):
    """A DreamBooth expert (trained now, timed by the caller): ``(pipeline, identifier)``."""
    from experts import load_expert, resolve_config
    from experts.train import train_expert

    config = resolve_config("dreambooth", dict(model=model, instance_dir=str(photos), class_noun=class_noun, steps=steps, num_class_images=8, seed=seed))
    info = train_expert(config, folder, overwrite=True, progress=False)
    return load_expert(folder), info.identifier


def mean_metrics(results: list[SubjectResult]) -> dict[str, float]:
    """Mean of every metric over subjects."""
    keys = results[0].metrics.keys()
    return {k: float(np.mean([r.metrics[k] for r in results])) for k in keys}


def gap_closed(method, base, expert, *, n_boot: int = 2000, seed: int = 0, min_gap: float = 1e-9) -> dict:
    """Share of the base->expert gap a method closes, with a paired bootstrap 95% interval.

    ``(mean(method) - mean(base)) / (mean(expert) - mean(base))`` over subjects (1 = as good as
    the expert, 0 = no better than the base). The interval resamples *subjects* with replacement
    (``n_boot`` times, the same subjects for the three methods: paired) and recomputes the ratio
    of means; its 2.5th and 97.5th percentiles (Efron & Tibshirani, *An Introduction to the
    Bootstrap*, ch. 13, percentile interval).

    Args:
        method, base, expert: per-subject values of one metric, each of length ``n >= 1``, in the
            same subject order.
        min_gap: a gap of at most this size (absolute) is degenerate: no ratio.

    Returns:
        ``{"point", "low", "high", "n_valid"}``: ``point`` is ``nan`` when the gap over all
        subjects is degenerate; ``low``/``high`` are ``nan`` then or when fewer than half the
        resamples have a non-degenerate gap (``n_valid`` counts those that do; degenerate ones
        are left out of the percentiles).

    Raises:
        ValueError: the three lists differ in length or are empty.
    """
    m, b, e = (np.asarray(x, dtype=float) for x in (method, base, expert))
    if not (m.shape == b.shape == e.shape) or m.ndim != 1 or len(m) == 0:
        raise ValueError(f"gap_closed needs three equally long, non-empty lists (got {m.shape}, {b.shape}, {e.shape})")
    gap = e.mean() - b.mean()
    point = float((m.mean() - b.mean()) / gap) if abs(gap) > min_gap else float("nan")
    idx = np.random.default_rng(seed).integers(0, len(m), size=(n_boot, len(m)))  # (n_boot, n)
    gaps = e[idx].mean(1) - b[idx].mean(1)
    valid = np.abs(gaps) > min_gap
    ratios = (m[idx].mean(1)[valid] - b[idx].mean(1)[valid]) / gaps[valid]
    low = high = float("nan")
    if point == point and valid.sum() >= n_boot / 2:
        low, high = (float(v) for v in np.percentile(ratios, [2.5, 97.5]))
    return {"point": point, "low": low, "high": high, "n_valid": int(valid.sum())}


def bootstrap_mean(values, *, n_boot: int = 2000, seed: int = 0) -> dict:
    """Mean over subjects with a bootstrap 95% percentile interval (subjects resampled with
    replacement ``n_boot`` times; the same resamples as :func:`gap_closed` for the same ``seed``
    and length, so rows of one table are paired).

    Returns:
        ``{"point", "low", "high"}``; nan entries of ``values`` are left out.

    Raises:
        ValueError: no finite value.
    """
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        raise ValueError("bootstrap_mean needs at least one finite value")
    idx = np.random.default_rng(seed).integers(0, len(v), size=(n_boot, len(v)))
    low, high = np.percentile(v[idx].mean(1), [2.5, 97.5])
    return {"point": float(v.mean()), "low": float(low), "high": float(high)}
