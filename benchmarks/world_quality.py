"""Quality of the world models: does the ``toy`` text-to-image model follow its captions?

Text-to-image part (``toy`` preset, :mod:`suti.world.toy_t2i`):

(a) denoising loss on scenes of *held-out* subjects (never seen in pretraining) with their
    right captions vs. wrong ones, on identical images, noise and timesteps
    (:func:`experts.evaluate.denoising_loss`). "shuffled" gives every image another image's
    caption; the other rows change one part of the right caption (context, colour, class
    noun) to a random other value, to show which words the model actually uses.
    A ratio right / wrong < 1 means the caption helps to denoise.
(b) a grid of samples for held-out caption combinations (held-out subjects' class + colour +
    pattern, in each context), one real render of the same caption at the left of each row.
(d) the attribute probe's class and context accuracy on samples for held-out subjects' full
    captions, against chance and against real renders of the same captions.

Usage::

    python benchmarks/world_quality.py --output toy_samples.png [--n 128] [--guidance 4]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


# --------------------------------------------------------------------------------------------
# (a) caption-conditioned denoising loss


def wrong_captions(metas: list[dict], kind: str, seed: int = 0) -> list[str]:
    """Captions of the scenes ``metas`` with one part replaced at random (``context``,
    ``color`` or ``class``), or the whole caption taken from another scene (``shuffled``)."""
    from suti.world.spec import CLASSES, COLORS, CONTEXTS
    from suti.world.captions import compose_caption
    from suti.world.toy_t2i import pretrain_world

    world = pretrain_world()
    subjects = {s.subject_id: s for s in world.subjects}
    rng = np.random.default_rng([seed, 77])
    right = [compose_caption(subjects[m["subject_id"]], m) for m in metas]
    if kind == "shuffled":  # a derangement: nobody keeps their own caption
        n = len(right)
        perm = np.roll(np.arange(n), 1 + int(rng.integers(n - 1))) if n > 1 else np.arange(n)
        return [right[i] for i in perm]
    out = []
    for m in metas:
        subject, m = subjects[m["subject_id"]], dict(m)
        if kind == "context":
            m["context"] = str(rng.choice([c for c in CONTEXTS if c != m["context"]]))
        elif kind == "color":
            m["color"] = str(rng.choice([c for c in COLORS if c != m["color"]]))
        elif kind == "class":
            noun = str(rng.choice([c.class_noun for c in CLASSES.values()
                                   if c.class_noun != subject.class_noun]))
            subject = dataclasses.replace(subject, class_noun=noun)
        else:
            raise ValueError(kind)
        out.append(compose_caption(subject, m))
    return out


def caption_losses(pipe, n: int = 128, seed: int = 0, draws: int = 4,
                   kinds=("shuffled", "context", "color", "class")) -> dict[str, float]:
    """Denoising loss of ``pipe`` on ``n`` held-out scenes with the right and wrong captions
    (same images, noise and timesteps): ``{"right": ..., "shuffled": ..., ...}``."""
    from experts.evaluate import denoising_loss
    from suti.world.training.scenes import heldout_scenes

    images, captions, metas = heldout_scenes(n, seed)
    out = {"right": denoising_loss(pipe, images, captions, seed=seed, draws=draws)}
    for kind in kinds:
        out[kind] = denoising_loss(pipe, images, wrong_captions(metas, kind, seed), seed=seed,
                                   draws=draws)
    return out


# --------------------------------------------------------------------------------------------
# (b) samples for held-out caption combinations

GRID_CONTEXTS = ("beach", "snow", "jungle", "city", "wooden_floor", "blue_carpet", "grass",
                 "brick_wall")


def heldout_subjects(num_subjects: int = 24, world_seed: int = 0):
    """The held-out subjects of the default world ``make_world(24, 0)``: their class + colour
    + pattern is a combination that no pretraining subject has."""
    from suti.world import make_world

    world = make_world(num_subjects, world_seed)
    return world.heldout_subjects


def sample_grid(pipe, output: str | Path, *, contexts=GRID_CONTEXTS, steps: int = 25,
                guidance: float = 4.0, seed: int = 0, scale: int = 3) -> Path:
    """Rows: held-out subjects; first column a real render (beach), then one sample per
    context. Saved (upscaled ``scale`` x, nearest) to ``output``; returns the path."""
    import torch
    from PIL import Image

    from suti.world.render import caption, render

    subjects = heldout_subjects()
    res = 32
    cell = res + 2
    grid = Image.new("RGB", (cell * (len(contexts) + 1), cell * len(subjects)), (255, 255, 255))
    for r, subject in enumerate(subjects):
        real = render(subject, "beach", size=res, rng=np.random.default_rng(r))
        grid.paste(real, (0, r * cell))
        prompts = [caption(subject, c) for c in contexts]
        gen = torch.Generator().manual_seed(seed + r)
        images = pipe(prompts, height=res, width=res, num_inference_steps=steps,
                      guidance_scale=guidance, generator=gen).images
        for c, img in enumerate(images):
            grid.paste(img, ((c + 1) * cell, r * cell))
    big = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    big.save(output)
    return output


# --------------------------------------------------------------------------------------------
# (d) does the probe recognise the samples? (class and context, against chance)


def probe_recognition(pipe, *, num: int = 60, steps: int = 25, guidance: float = 4.0,
                      seed: int = 0) -> dict:
    """Sample one image per held-out subject of the toy model's pretraining world, each for its
    full caption in a random context (a class + colour + pattern + part combination no
    pretraining subject has), and read the samples with the attribute probe. Returns the
    probe's class and context accuracy on the samples, on real renders of the same captions
    (the probe's own ceiling) and the chance levels (1 / number of classes or contexts)."""
    import torch

    from suti.world.probe import load_probe
    from suti.world.render import Pose, caption, render
    from suti.world.spec import CLASSES, CONTEXTS
    from suti.world.toy_t2i import pretrain_world

    subjects = pretrain_world().heldout_subjects[:num]
    rng = np.random.default_rng(seed)
    contexts = sorted(CONTEXTS)
    wanted = [contexts[int(rng.integers(len(contexts)))] for _ in subjects]
    prompts = [caption(s, c) for s, c in zip(subjects, wanted)]
    samples = []
    for i in range(0, len(prompts), 8):
        gen = torch.Generator().manual_seed(seed + i)
        samples += pipe(prompts[i:i + 8], height=32, width=32, num_inference_steps=steps,
                        guidance_scale=guidance, generator=gen).images
    reals = [render(s, c, pose=Pose.random(rng), size=32, rng=rng) for s, c in zip(subjects, wanted)]
    probe = load_probe()
    out = {"n": len(subjects), "chance_class": 1 / len(CLASSES), "chance_context": 1 / len(CONTEXTS)}
    for name, images in (("samples", samples), ("real", reals)):
        rows = probe.predict(images)
        out[f"{name}_class"] = float(np.mean([r["class_name"] == s.class_name for r, s in zip(rows, subjects)]))
        out[f"{name}_context"] = float(np.mean([r["context"] == c for r, c in zip(rows, wanted)]))
    return out


# --------------------------------------------------------------------------------------------
# (c) DreamBooth experts on the model: which learning-rate scale? (--expert-sweep)


def _photos(subject, n: int, seed: int, identifier: str):
    """``n`` new photos of ``subject`` (64 px renders fitted to 32 px like instance photos)
    and their captions with the identifier: ``(pixels, prompts)``."""
    import torch

    from suti.images import fit_square, to_tensor
    from suti.world.render import caption, sample_scene

    rng = np.random.default_rng([seed, 4242])
    pixels, prompts = [], []
    for _ in range(n):
        img, _, meta = sample_scene(subject, rng, size=64)
        pixels.append(to_tensor(fit_square(img, 32)))
        prompts.append(caption(subject, meta["context"], identifier=identifier))
    return torch.stack(pixels), prompts


def expert_sweep(model: str, scales: list[float], *, steps: int = 200, recipes=("dreambooth",),
                 subjects: int = 2, seed: int = 0, workdir: str | Path | None = None) -> list[dict]:
    """Train DreamBooth experts on held-out subjects of ``make_world(24, 0)`` with the recipe
    rates multiplied by each of ``scales`` and measure (same noise everywhere):

    * ``inst``: loss on the 4 instance photos with the instance prompt, / the base model's;
    * ``novel``: loss on 16 *new* photos of the subject (other poses and contexts) with
      "a [V] [class] [context]", / the base model's (below 1: the subject was learnt, not
      just the 4 photos);
    * ``world``: loss on held-out world scenes with their captions, / the base model's (above
      1: the model is being destroyed), and the expert's right / shuffled caption ratio.
    """
    import shutil
    import tempfile

    from experts import load_expert, resolve_config
    from experts.data import load_instance_images
    from experts.evaluate import denoising_loss
    from experts.train import train_expert
    from suti.models import load_pipeline
    from suti.world import export_subject, make_world

    work = Path(workdir or tempfile.mkdtemp(prefix="expert-sweep-"))
    base = load_pipeline(model)
    base_world = caption_losses(base, n=64, seed=seed, draws=2, kinds=("shuffled",))
    rows = []
    for subject in heldout_subjects()[:subjects]:
        instance = work / f"{subject.subject_id}-instance"
        if not instance.exists():
            export_subject(make_world(24, 0), subject.subject_id, instance, n=4, seed=seed,
                           size=64)
        inst_px = load_instance_images(instance, 32)
        for recipe in recipes:
            for scale in scales:
                out = work / f"{subject.subject_id}-{recipe}-x{scale:g}"
                shutil.rmtree(out, ignore_errors=True)
                config = resolve_config(recipe, {"model": model, "instance_dir": str(instance),
                                                 "class_noun": subject.class_noun, "steps": steps,
                                                 "seed": seed, "learning_rate_scale": scale,
                                                 "resolution": 32})
                started = time.perf_counter()
                info = train_expert(config, out, progress=False)
                seconds = time.perf_counter() - started
                expert = load_expert(out)
                novel_px, novel_prompts = _photos(subject, 16, seed + 1, info.identifier)
                row = {"subject": subject.subject_id, "recipe": recipe, "scale": scale,
                       "lr": config.effective_learning_rate, "seconds": round(seconds, 1)}
                row["inst"] = (denoising_loss(expert, inst_px, info.instance_prompt, seed=seed)
                               / denoising_loss(base, inst_px, info.instance_prompt, seed=seed))
                row["novel"] = (denoising_loss(expert, novel_px, novel_prompts, seed=seed)
                                / denoising_loss(base, novel_px, novel_prompts, seed=seed))
                world = caption_losses(expert, n=64, seed=seed, draws=2, kinds=("shuffled",))
                row["world"] = world["right"] / base_world["right"]
                row["world_caption_ratio"] = world["right"] / world["shuffled"]
                rows.append(row)
                print(f"{row['subject']} {recipe:<16} x{scale:<6g} lr {row['lr']:.1e}  "
                      f"inst {row['inst']:.3f}  novel {row['novel']:.3f}  world {row['world']:.3f}"
                      f"  caption ratio {row['world_caption_ratio']:.3f}  ({seconds:.0f} s)",
                      flush=True)
                shutil.rmtree(out, ignore_errors=True)
    print(f"(base model caption ratio on the same world scenes: "
          f"{base_world['right'] / base_world['shuffled']:.3f})")
    return rows


# --------------------------------------------------------------------------------------------


def t2i_report(args) -> dict:
    """Run (a) and (b) for the text-to-image model and print a table."""
    import torch

    from suti.models import load_pipeline
    from suti.world.render import caption

    torch.manual_seed(0)
    pipe = load_pipeline(args.model)
    started = time.perf_counter()
    losses = caption_losses(pipe, n=args.n, seed=args.seed, draws=args.draws)
    print(f"\n(a) denoising loss of {args.model!r} on {args.n} held-out scenes x {args.draws} "
          f"draws ({time.perf_counter() - started:.0f} s)")
    print(f"{'captions':<12} {'loss':>8} {'right / this':>13}")
    for kind, value in losses.items():
        print(f"{kind:<12} {value:8.4f} {losses['right'] / value:13.3f}")
    if args.output:
        path = sample_grid(pipe, args.output, steps=args.steps, guidance=args.guidance,
                           seed=args.seed)
        print(f"\n(b) samples -> {path}")
        print("    rows (left: a real render on the beach; then " + ", ".join(GRID_CONTEXTS) + "):")
        for subject in heldout_subjects():
            print(f"    {subject.subject_id}: {caption(subject)}")
    rec = probe_recognition(pipe, steps=args.steps, guidance=args.guidance, seed=args.seed)
    print(f"\n(d) the probe on {rec['n']} samples for held-out subjects' captions (real renders of "
          f"the same captions: the probe's ceiling)")
    for what in ("class", "context"):
        print(f"    {what:<8} samples {rec['samples_' + what]:.3f}  real {rec['real_' + what]:.3f}  "
              f"chance {rec['chance_' + what]:.3f}  samples / chance {rec['samples_' + what] / rec['chance_' + what]:.1f}x")
    return losses


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="toy", help="preset or pipeline folder (toy)")
    parser.add_argument("--output", default=None, help="PNG for the sample grid (none: skip)")
    parser.add_argument("--n", type=int, default=128, help="held-out scenes for the losses")
    parser.add_argument("--draws", type=int, default=4, help="noise draws per scene")
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps of the samples")
    parser.add_argument("--guidance", type=float, default=4.0, help="CFG scale of the samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--expert-sweep", default=None, metavar="SCALES",
                        help="also train DreamBooth experts with these learning-rate scales "
                             "(comma-separated, e.g. 3,10,30,100) and compare them")
    parser.add_argument("--expert-steps", type=int, default=200)
    parser.add_argument("--expert-recipes", default="dreambooth",
                        help="comma-separated recipes for --expert-sweep (dreambooth)")
    parser.add_argument("--expert-subjects", type=int, default=2)
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    losses = t2i_report(args)
    ratio = losses["right"] / losses["shuffled"]
    print(f"\nright / shuffled captions: {ratio:.3f} ({'OK' if ratio <= 0.95 else 'FAIL'}: "
          f"must be <= 0.95)")
    if args.expert_sweep:
        print(f"\n(c) DreamBooth experts, {args.expert_steps} steps, ratios to the base model:")
        expert_sweep(args.model, [float(x) for x in args.expert_sweep.split(",")],
                     steps=args.expert_steps, recipes=tuple(args.expert_recipes.split(",")),
                     subjects=args.expert_subjects, seed=args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
