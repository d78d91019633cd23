"""``suti demo``: the README's main job on the embedded default (the synthetic world).

Today it shows the first thing users do: a DreamBooth expert on a subject the project renders
itself. It exports 4 photos of a held-out world subject, trains an expert on the ``toy`` model
(prior preservation on), samples it and the base model on the same prompts and seeds, writes an
image grid (photos | expert | base) and prints the fidelity numbers (denoising loss on the photos
and, with the world's attribute probe, identity accuracy of the samples).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from PIL import Image

log = logging.getLogger(__name__)

DEMO_PROMPTS = ("a {V} {class} on the beach", "a {V} {class} in the snow", "a {V} {class} in the jungle", "a {V} {class} in a city")


def register(subparsers) -> None:
    """Add ``suti demo``."""
    p = subparsers.add_parser("demo", help="run the main job on the embedded default (synthetic world)")
    p.add_argument("--output", default="runs/demo", help="folder for the photos, expert, samples and grid")
    p.add_argument("--model", default="toy", help="base model (default: the toy preset pretrained on the world)")
    p.add_argument("--steps", type=int, default=None, help="expert training steps (default: the model's demo steps)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--subject", type=int, default=0, help="index of the held-out subject")
    p.set_defaults(func=run_demo)


def _grid(rows: list[list[Image.Image]], labels: list[str], cell: int = 96) -> Image.Image:
    from PIL import ImageDraw

    width = max(len(r) for r in rows)
    label_w = 90
    grid = Image.new("RGB", (label_w + width * cell, len(rows) * cell), "white")
    draw = ImageDraw.Draw(grid)
    for y, (row, label) in enumerate(zip(rows, labels)):
        draw.text((4, y * cell + cell // 2 - 6), label, fill="black")
        for x, img in enumerate(row):
            grid.paste(img.resize((cell, cell), Image.Resampling.NEAREST), (label_w + x * cell, y * cell))
    return grid


def _sample(pipe, prompts: list[str], resolution: int, seed: int, steps: int = 25, guidance: float = 5.0) -> list[Image.Image]:
    out = []
    for i, prompt in enumerate(prompts):
        g = torch.Generator().manual_seed(seed + i)
        out.append(pipe(prompt, height=resolution, width=resolution, num_inference_steps=steps, guidance_scale=guidance, generator=g).images[0])
    return out


def run_demo(args) -> int:
    """Photos of a held-out world subject -> DreamBooth expert -> grid and numbers."""
    from experts import load_expert, load_pipeline, resolve_config
    from experts.data import load_instance_images
    from experts.evaluate import denoising_loss
    from experts.train import train_expert
    from suti.models import default_resolution, list_presets, load_preset
    from suti.world import export_subject, make_world

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    preset = load_preset(args.model) if args.model in list_presets() else {}
    world_cfg = preset.get("world", {"num_subjects": 64, "seed": 0})
    world = make_world(int(world_cfg["num_subjects"]), seed=int(world_cfg["seed"]))
    subject = world.heldout_subjects[args.subject % len(world.heldout_subjects)]
    resolution = default_resolution(args.model)
    photos_dir = out / "photos"
    if photos_dir.exists():
        for old in photos_dir.iterdir():
            old.unlink()
    export_subject(world, subject.subject_id, photos_dir, n=4, seed=args.seed, size=resolution)
    print(f"subject {subject.subject_id}: a {subject.description()} (held out of pretraining); photos in {photos_dir}")

    steps = args.steps or int(preset.get("demo_steps", 200))
    config = resolve_config("dreambooth", dict(model=args.model, instance_dir=str(photos_dir), class_noun=subject.class_noun, steps=steps, num_class_images=int(preset.get("demo_class_images", 16)), seed=args.seed))
    info = train_expert(config, out / "expert", overwrite=True)
    expert = load_expert(out / "expert")
    base = load_pipeline(args.model)

    photos = load_instance_images(photos_dir, resolution)
    loss_base = denoising_loss(base, photos, info.instance_prompt, seed=args.seed)
    loss_expert = denoising_loss(expert, photos, info.instance_prompt, seed=args.seed)
    expert_prompts = [info.prompt(p) for p in DEMO_PROMPTS]
    base_prompts = [p.replace("{V} ", "").replace("{class}", subject.class_noun) for p in DEMO_PROMPTS]
    expert_images = _sample(expert, expert_prompts, resolution, args.seed)
    base_images = _sample(base, base_prompts, resolution, args.seed)
    samples = out / "samples"
    samples.mkdir(exist_ok=True)
    for i, (e, b) in enumerate(zip(expert_images, base_images)):
        e.save(samples / f"expert_{i}.png")
        b.save(samples / f"base_{i}.png")
    from suti.images import load_image_folder

    grid = _grid([load_image_folder(photos_dir), expert_images, base_images], ["photos", "expert", "base"])
    grid.save(out / "grid.png")

    result = {"subject": subject.subject_id, "description": subject.description(), "identifier": info.identifier, "model": args.model, "steps": steps, "train_seconds": info.train_seconds, "loss_base": round(loss_base, 4), "loss_expert": round(loss_expert, 4)}
    try:
        from suti.world.probe import load_probe

        probe = load_probe()
        result["identity_accuracy_expert"] = probe.identity_accuracy(expert_images, subject)
        result["identity_accuracy_base"] = probe.identity_accuracy(base_images, subject)
    except ImportError:
        log.info("the world probe is not available; identity accuracy skipped")
    result["seconds"] = round(time.perf_counter() - started, 1)
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print(f"grid: {out / 'grid.png'}")
    print(f"denoising loss on the photos with {info.instance_prompt!r}: base {loss_base:.4f} -> expert {loss_expert:.4f} ({loss_expert / loss_base:.2f}x)")
    if "identity_accuracy_expert" in result:
        print(f"probe identity accuracy of samples: base {result['identity_accuracy_base']:.2f} -> expert {result['identity_accuracy_expert']:.2f}")
    print(json.dumps(result))
    return 0
