"""The fixed evaluation of the apprentice (issue 17, item 1): many held-out subjects, class-only
prompts, paired seeds, every method on the same images' settings, cached baselines.

* subjects: :func:`fixed_subjects` - held-out subjects of the toy model's pretraining world
  (never seen by the toy base, its CLIP, its probe or the toy apprentice), taken round-robin over
  the six classes in a fixed order, so any ``n >= 6`` covers every class and ``fixed_subjects(n)``
  is a prefix of ``fixed_subjects(n + 1)``;
* prompts: :func:`fixed_prompts` - four class-only prompts per subject, one per SuTI skill
  (re-contextualisation, accessorisation, colour edit, stylisation), in the world's caption
  vocabulary (:func:`mining.prompts.compose`) so the probe can read what was asked; ``{S}`` is
  the class noun (``[V] <class>`` for the DreamBooth expert);
* seeds: image ``(prompt, s)`` uses ``torch.Generator().manual_seed(s)`` for every method;
* methods (:data:`METHODS`): the apprentice with 1, 3 and 5 demonstrations, the base model with
  the class noun, a DreamBooth expert trained on the 3 demonstrations (``dreambooth`` recipe,
  model preset defaults, 800 steps) and training-free reference attention on the base
  (:mod:`apprentice.reference`, DreamTuner-style);
* metrics per image (:func:`score_images`), averaged per subject: the probe's identity-attribute
  score, exact identity and per-attribute accuracy (with the edited colour expected after a colour
  edit), whether the probe reads the asked edit, CLIP-I to the 3 demonstrations and CLIP-T to the
  prompt with the world's small CLIP;
* the share of the base->expert gap each method closes, with a paired bootstrap 95% interval over
  subjects (:func:`orchestration.compare.gap_closed`).

Cache (``work_dir``): ``photos/<subject>/`` (5 renders; the first 3 are the demonstrations and the
expert's instance images), ``experts/<subject>-<key>/`` (complete when ``expert.json`` exists) and
``images/<method>-<key>/<subject>/<prompt hash>-s<seed>.png`` where ``<key>`` hashes every setting
that determines the images: the model's fingerprint (:func:`suti.models.model_fingerprint`:
preset content, a folder's files), sampler steps and guidance, the precision and scheduler of the
pipeline that samples (:func:`pipeline_key`: a bfloat16 base is another base), the expert's fully
resolved training config (:func:`expert_key`: recipe file content and the preset's expert
defaults included, not just the recipe's name) and the photo seed; for the apprentice a hash of
its weights plus its scheduler and trained resolution. A changed setting is a new cache entry
(nothing is overwritten). Base, expert and reference images are reused across runs, and so are an
unchanged apprentice's: a new or retrained apprentice costs only its own images
(``cache_apprentice=False`` regenerates them, e.g. to time them).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from suti.errors import InputError
from suti.sampling import DEFAULT_DEMO_GUIDANCE_SCALE

log = logging.getLogger(__name__)

#: Methods in table order; ``apprentice-k`` uses the first ``k`` demonstrations.
METHODS = ("apprentice-3", "base", "expert", "reference", "apprentice-1", "apprentice-5")
#: Methods whose images are cached (they do not depend on the apprentice).
CACHED_METHODS = ("base", "expert", "reference")
SKILLS = ("recontextualization", "accessorization", "attribute", "stylization")
NUM_PHOTOS = 5
EXPERT_PHOTOS = 3


@dataclass
class FixedEvalConfig:
    """Settings of one fixed evaluation (everything that determines its images)."""

    num_subjects: int = 24
    seeds: int = 2
    model: str = "toy"
    expert_steps: int = 800
    num_class_images: int = 8  # prior-preservation images (the recipe's 100 cost ~5 s each on the shared CPU)
    sample_steps: int = 25
    guidance_scale: float = 5.0
    demo_guidance_scale: float = DEFAULT_DEMO_GUIDANCE_SCALE
    apprentice_guidance_scale: float | None = None  # the apprentice's text guidance (None: guidance_scale)
    seed: int = 0  # photo export and expert training seed
    methods: tuple[str, ...] = METHODS
    cache_apprentice: bool = True  # False: regenerate the apprentice's images (to time them)

    def validate(self) -> None:
        """Raise :class:`InputError` on unknown methods, a subject count outside the held-out
        set or fewer than one seed / sampler step."""
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown:
            raise InputError(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
        if self.seeds < 1 or self.sample_steps < 1 or self.expert_steps < 1:
            raise InputError("--seeds, --sample-steps and --expert-steps must be at least 1")
        fixed_subjects(self.num_subjects)


def fixed_subjects(n: int = 24):
    """``(world, subjects)``: ``n`` held-out subjects of the toy model's pretraining world, taken
    round-robin over the classes (:data:`suti.world.CLASSES` order) in held-out order; once a class
    runs out the others continue. Deterministic; ``n >= 6`` covers all six classes.

    Raises:
        InputError: ``n`` is not in ``1..len(world.heldout_subjects)`` (58).
    """
    from suti.world import CLASSES
    from suti.world.toy_t2i import pretrain_world

    world = pretrain_world()
    held = world.heldout_subjects
    if not 1 <= n <= len(held):
        raise InputError(f"--subjects must be in 1..{len(held)} (the held-out subjects of the toy world), got {n}")
    queues = {c: [s for s in held if s.class_name == c] for c in CLASSES}
    order: list = []
    while len(order) < n:
        for c in CLASSES:
            if queues[c] and len(order) < n:
                order.append(queues[c].pop(0))
    return world, order


def fixed_prompts(subject) -> list[dict]:
    """Four class-only prompts for ``subject``, one per skill of :data:`SKILLS`.

    Each is ``{"skill", "template", "expect"}``: ``template`` has ``{S}`` for the subject phrase;
    ``expect`` is what the probe should read (``context``, ``accessory``, ``style`` or the edited
    body ``color``). The choices depend only on the subject id (crc32), so they are stable
    whatever else is evaluated; the new colour differs clearly from the body and pattern colours.
    """
    from mining.prompts import compose
    from suti.world import ACCESSORIES, COLORS, CONTEXTS, STYLES

    h = zlib.crc32(subject.subject_id.encode())
    body = np.array(COLORS[subject.body_color], float)
    colours = [c for c in COLORS if c not in (subject.body_color, subject.pattern_color)
               and np.abs(np.array(COLORS[c], float) - body).sum() > 200]
    context = list(CONTEXTS)[h % len(CONTEXTS)]
    accessory = list(ACCESSORIES)[(h // 7) % len(ACCESSORIES)]
    colour = colours[(h // 11) % len(colours)]
    style = list(STYLES)[(h // 13) % len(STYLES)]
    return [
        {"skill": "recontextualization", "template": compose(context=context), "expect": {"context": context}},
        {"skill": "accessorization", "template": compose(accessory=accessory), "expect": {"accessory": accessory}},
        {"skill": "attribute", "template": compose(color=colour), "expect": {"color": colour}},
        {"skill": "stylization", "template": compose(style=style), "expect": {"style": style}},
    ]


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def subject_photos(world, subject, work: Path, seed: int) -> list[Path]:
    """The subject's :data:`NUM_PHOTOS` renders (cached): demos are the first ``k``; the expert's
    instance folder holds the first :data:`EXPERT_PHOTOS`."""
    from suti.models import default_resolution  # noqa: F401  (resolution is the toy's 32 px)
    from suti.world import subject_images

    folder = work / "photos" / f"{subject.subject_id}-s{seed}"
    paths = [folder / "demos" / f"{subject.subject_id}_{i:02d}.png" for i in range(NUM_PHOTOS)]
    if not all(p.is_file() for p in paths):
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "demos").mkdir(parents=True)
        (tmp / "instance").mkdir()
        for i, img in enumerate(subject_images(world, subject.subject_id, NUM_PHOTOS, seed, 32)):
            img.save(tmp / "demos" / paths[i].name)
            if i < EXPERT_PHOTOS:
                img.save(tmp / "instance" / paths[i].name)
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    return paths


def _expert_overrides(config: FixedEvalConfig, class_noun: str, instance_dir: str) -> dict:
    """The command-line settings of a subject's expert (on top of the ``dreambooth`` recipe)."""
    return dict(model=config.model, instance_dir=instance_dir, class_noun=class_noun, steps=config.expert_steps,
                seed=config.seed, num_class_images=config.num_class_images)


def expert_key(config: FixedEvalConfig) -> dict:
    """Everything that determines an expert (its cache key): the training config resolved as
    :func:`experts.train.train_expert` gets it (recipe file, the preset's expert defaults and the
    overrides), the model as its fingerprint, without the per-subject instance folder and class
    noun (the folder name carries the subject)."""
    from experts import resolve_config
    from experts.data import model_fingerprint

    resolved = resolve_config("dreambooth", _expert_overrides(config, "{class}", "")).to_dict()
    for name in ("model", "instance_dir", "class_noun"):
        resolved.pop(name)
    return {"model": model_fingerprint(config.model), "config": resolved, "photos": EXPERT_PHOTOS}


def pipeline_key(pipe) -> dict:
    """What of a loaded sampling pipeline changes its images beyond the model's weights: the
    precision (:func:`experts.data.sampling_precision`, ``None`` for float32) and the scheduler
    (class and config, diffusers' bookkeeping ``_`` keys left out)."""
    from experts.data import sampling_precision
    from suti.fingerprint import digest

    scheduler = getattr(pipe, "scheduler", None)
    config = {k: v for k, v in dict(getattr(scheduler, "config", {}) or {}).items() if not str(k).startswith("_")}
    return {"precision": sampling_precision(pipe), "scheduler": type(scheduler).__name__, "scheduler_config": digest(config)}


def ensure_expert(subject, photos: list[Path], work: Path, config: FixedEvalConfig) -> tuple[Path, bool]:
    """Train (or reuse) the subject's DreamBooth expert: ``(folder, trained_now)``.

    Training writes into a folder of its own (``<folder>.tmp-<pid>``) that is renamed into place
    when complete, so an interrupted run or a second process never leaves a half-written expert
    under the cached name (a leftover incomplete folder is replaced)."""
    import os

    from experts import resolve_config
    from experts.expert import EXPERT_FILE
    from experts.train import train_expert

    folder = work / "experts" / f"{subject.subject_id}-{_digest(expert_key(config))}"
    if (folder / EXPERT_FILE).is_file():
        return folder, False
    overrides = _expert_overrides(config, subject.class_noun, str(photos[0].parent.parent / "instance"))
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    train_expert(resolve_config("dreambooth", overrides), tmp, overwrite=True, progress=False)
    if (folder / EXPERT_FILE).is_file():  # another process finished it meanwhile
        shutil.rmtree(tmp)
        return folder, False
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder, True


def apprentice_fingerprint(pipe) -> str:
    """Content hash of an apprentice's weights (U-Net, adapter, text encoder, VAE), so cached
    apprentice images are reused only for the very same apprentice."""
    h = hashlib.sha256()
    for part in ("unet", "adapter", "text_encoder", "vae"):
        for name, tensor in sorted(getattr(pipe, part).state_dict().items()):
            h.update(f"{part}.{name}".encode())
            h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _image_key(method: str, config: FixedEvalConfig, apprentice=None, base=None) -> str:
    """Cache folder name of a method's images: ``<method>-<hash of its settings>`` (module docstring)."""
    from experts.data import model_fingerprint

    settings = {"model": model_fingerprint(config.model), "sample_steps": config.sample_steps,
                "guidance_scale": config.guidance_scale, "resolution": 32}
    if method.startswith("apprentice-"):
        if not hasattr(apprentice, "_fixed_eval_fingerprint"):
            apprentice._fixed_eval_fingerprint = apprentice_fingerprint(apprentice)
        settings.update(apprentice=apprentice._fixed_eval_fingerprint, demo_guidance_scale=config.demo_guidance_scale,
                        **({"guidance_scale": config.apprentice_guidance_scale} if config.apprentice_guidance_scale is not None else {}),
                        demo_captions="a {class}", photo_seed=config.seed, pipeline=pipeline_key(apprentice),
                        trained_resolution=getattr(apprentice, "trained_resolution", None))
    if method == "expert":
        settings["expert"] = expert_key(config)
    if method in ("base", "reference") and base is not None:
        settings["pipeline"] = pipeline_key(base)
    if method == "reference":
        settings.update(reference_prompt="a {class}", references=EXPERT_PHOTOS, photo_seed=config.seed)
    return f"{method}-{_digest(settings)}"


def _image_path(folder: Path, text: str, seed: int) -> Path:
    return folder / f"{hashlib.sha256(text.encode()).hexdigest()[:10]}-s{seed}.png"


def image_jobs(subject, config: FixedEvalConfig, phrase: str) -> list[tuple[str, int]]:
    """``[(prompt text, seed)]`` of one subject in table order (prompt-major), ``{S}`` -> ``phrase``."""
    return [(p["template"].replace("{S}", phrase), s) for p in fixed_prompts(subject) for s in range(config.seeds)]


def method_images(method: str, subject, demos: list[Image.Image], photos: list[Path], *, apprentice, base,
                  work: Path, config: FixedEvalConfig, stats: dict) -> list[Image.Image]:
    """The images of one method for one subject (``len(prompts) * seeds``, prompt-major).

    Images are read from the cache when present (the expert is trained or loaded only if an
    image is missing); apprentice images are keyed by the apprentice's weights
    (:func:`apprentice_fingerprint`) and regenerated when ``config.cache_apprentice`` is false.
    ``stats`` counts ``generated``/``cached`` images and ``experts_trained``.
    """
    kw = dict(num_inference_steps=config.sample_steps, guidance_scale=config.guidance_scale)
    folder = work / "images" / _image_key(method, config, apprentice, base) / subject.subject_id
    use_cache = config.cache_apprentice or not method.startswith("apprentice-")
    state: dict = {}

    def generator_fn():  # built lazily: a fully cached method loads nothing
        if method.startswith("apprentice-"):
            k = int(method.split("-")[1])
            ctx = apprentice.encode_demonstrations(demos[:k], [f"a {subject.class_noun}"] * k)
            app_kw = kw if config.apprentice_guidance_scale is None else {**kw, "guidance_scale": config.apprentice_guidance_scale}
            return subject.class_noun, lambda text, s: apprentice(text, demo_context=ctx, demo_guidance_scale=config.demo_guidance_scale, generator=torch.Generator().manual_seed(s), **app_kw).images[0]
        if method == "base":
            return subject.class_noun, lambda text, s: base(text, height=32, width=32, generator=torch.Generator().manual_seed(s), **kw).images[0]
        if method == "reference":
            from apprentice.reference import reference_generate

            refs = demos[:EXPERT_PHOTOS]
            return subject.class_noun, lambda text, s: reference_generate(base, text, refs, reference_prompt=f"a {subject.class_noun}", generator=torch.Generator().manual_seed(s), **kw)
        from experts import load_expert
        from experts.expert import ExpertInfo

        expert_dir, trained = ensure_expert(subject, photos, work, config)
        stats["experts_trained"] = stats.get("experts_trained", 0) + int(trained)
        pipe = load_expert(expert_dir)
        pipe.set_progress_bar_config(disable=True)
        info = ExpertInfo.read(expert_dir)
        return f"{info.identifier} {subject.class_noun}", lambda text, s: pipe(text, height=32, width=32, generator=torch.Generator().manual_seed(s), **kw).images[0]

    images = []
    # cached files are named by the class-noun prompt (the expert's identifier is a setting)
    for (text, s) in image_jobs(subject, config, subject.class_noun):
        path = _image_path(folder, text, s)
        if use_cache and path.is_file():
            images.append(Image.open(path).convert("RGB"))
            stats["cached"] = stats.get("cached", 0) + 1
            continue
        if not state:
            state["phrase"], state["fn"] = generator_fn()
        image = state["fn"](text.replace(subject.class_noun, state["phrase"], 1) if method == "expert" else text, s)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.png")
        image.save(tmp)
        tmp.rename(path)  # atomic: an interrupted run leaves no half-written image
        images.append(image)
        stats["generated"] = stats.get("generated", 0) + 1
    return images


def score_images(images: list[Image.Image], subject, config: FixedEvalConfig, *, probe, clip, demo_emb) -> dict[str, float]:
    """Per-subject means over ``images`` (prompt-major, as :func:`image_jobs`).

    ``attributes`` (probe: share of class, body colour, pattern, part, proportions read right;
    the edited colour after a colour edit; colours skipped on sketches), ``identity`` (all at
    once), ``attr_<name>`` per attribute, ``prompt`` (the probe reads the asked context,
    accessory, colour or style), ``clip_i`` (mean cosine to the demos, ``demo_emb`` (M, D)) and
    ``clip_t`` (cosine to the image's class-noun prompt).
    """
    from suti.scoring import clip_i, clip_t
    from suti.world.probe import IDENTITY_ATTRS

    prompts = fixed_prompts(subject)
    hits, edit = [], []
    for i, p in enumerate(prompts):
        batch = images[i * config.seeds:(i + 1) * config.seeds]
        hits += probe.identity_hits(batch, subject, color=p["expect"].get("color"))
        expect = {"body_color" if k == "color" else k: v for k, v in p["expect"].items()}
        acc = probe.attribute_accuracy(batch, expect)
        edit += [v for v in acc.values() if v == v]  # nan: colour unreadable on sketches
    out = {"attributes": float(np.mean([np.mean(list(h.values())) for h in hits])),
           "identity": float(np.mean([all(h.values()) for h in hits])),
           "prompt": float(np.mean(edit)) if edit else float("nan")}
    for a in IDENTITY_ATTRS:
        seen = [h[a] for h in hits if a in h]
        out[f"attr_{a}"] = float(np.mean(seen)) if seen else float("nan")
    emb = clip.embed_images(images)  # (N, D)
    texts = [t for t, _ in image_jobs(subject, config, subject.class_noun)]
    out["clip_i"] = clip_i(emb, demo_emb)
    out["clip_t"] = clip_t(emb, clip.embed_texts(texts))
    return out


#: Metrics of the table (and of the gap-closed columns).
TABLE_METRICS = ("attributes", "identity", "clip_i", "clip_t")


def run_fixed_eval(apprentice, base, work_dir: str | Path, config: FixedEvalConfig, *, progress=None) -> dict:
    """Run the fixed evaluation (module docstring) and return every number.

    Args:
        apprentice: an :class:`~apprentice.pipeline.ApprenticePipeline` (``None`` when no
            ``apprentice-k`` method is asked for).
        base: the base ``StableDiffusionPipeline`` of ``config.model``.
        work_dir: the cache folder.
        progress: ``f(line)`` for one line per subject (``None``: log).

    Returns:
        ``{"subjects": [{"subject", "class_name", "description", "prompts", <method>: {metric:
        value}}], "mean": {method: {metric: mean}}, "gap_closed": {method: {metric: {"point",
        "low", "high", "n_valid"}}}, "seconds": {method: wall s}, "cpu_seconds": {method: this
        process's CPU s}, "stats": {method: {...}}}``.
    """
    from orchestration.compare import gap_closed
    from suti.scoring import get_scorer
    from suti.world.probe import load_probe

    config.validate()
    work = Path(work_dir)
    world, subjects = fixed_subjects(config.num_subjects)
    probe, clip = load_probe(), get_scorer("toy-clip")
    seconds = {m: 0.0 for m in config.methods}
    cpu_seconds = {m: 0.0 for m in config.methods}  # this process's CPU time: the cost on an unshared core
    stats: dict = {m: {} for m in config.methods}
    rows = []
    for i, subject in enumerate(subjects):
        photos = subject_photos(world, subject, work, config.seed)
        demos = [Image.open(p).convert("RGB") for p in photos]
        demo_emb = clip.embed_images(demos[:EXPERT_PHOTOS])  # (3, D)
        row = {"subject": subject.subject_id, "class_name": subject.class_name, "description": subject.description(),
               "prompts": [p["template"] for p in fixed_prompts(subject)]}
        for method in config.methods:
            t0, c0 = time.perf_counter(), time.process_time()
            images = method_images(method, subject, demos, photos, apprentice=apprentice, base=base, work=work, config=config, stats=stats[method])
            row[method] = score_images(images, subject, config, probe=probe, clip=clip, demo_emb=demo_emb)
            seconds[method] += time.perf_counter() - t0
            cpu_seconds[method] += time.process_time() - c0
        rows.append(row)
        line = f"[{i + 1}/{len(subjects)}] {subject.subject_id} ({subject.description()}): " + ", ".join(
            f"{m} {row[m]['attributes']:.2f}/{row[m]['clip_i']:.3f}" for m in config.methods) + " (attributes/CLIP-I)"
        (progress or log.info)(line)
    metrics = list(rows[0][config.methods[0]])
    mean = {m: {k: float(np.nanmean([r[m][k] for r in rows])) for k in metrics} for m in config.methods}
    gaps = {}
    if "base" in config.methods and "expert" in config.methods:
        for m in config.methods:
            gaps[m] = {k: gap_closed([r[m][k] for r in rows], [r["base"][k] for r in rows], [r["expert"][k] for r in rows])
                       for k in metrics}
    return {"config": asdict(config), "subjects": rows, "mean": mean, "gap_closed": gaps,
            "seconds": {m: round(s, 2) for m, s in seconds.items()},
            "cpu_seconds": {m: round(s, 2) for m, s in cpu_seconds.items()}, "stats": stats}
