"""``suti demo``: the README's main job, the whole SuTI pipeline on the embedded default.

1. make a synthetic web crawl (``suti world make``),
2. mine subject clusters from it (``suti mine``),
3. generate expert data on local Ray (``suti generate``: one DreamBooth expert per cluster,
   delta-CLIP filter, webdataset shards),
4. train the apprentice with DeepSpeed on the shards (``suti apprentice train``),
5. answer in-context queries for held-out subjects of the toy world and compare with a DreamBooth
   expert and the base model on the same prompts and seeds: an image grid
   (demos | apprentice | expert | base) and the fidelity numbers (probe identity accuracy,
   small-CLIP image similarity to the demos) and times.

Each stage skips when its output exists, so a rerun of the same command continues.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from suti.errors import SutiError

log = logging.getLogger(__name__)

QUERY_PROMPTS = ("a {S} on the beach", "a {S} in the snow", "a {S} wearing a hat")


def register(subparsers) -> None:
    """Add ``suti demo``."""
    p = subparsers.add_parser("demo", help="run the whole pipeline on the embedded default (synthetic world, CPU)")
    p.add_argument("--output", default="runs/demo", help="folder of every stage's outputs")
    p.add_argument("--model", default="toy", help="base model")
    p.add_argument("--subjects", type=int, default=40, help="subjects in the synthetic crawl")
    p.add_argument("--noise-pages", type=float, default=0.2)
    p.add_argument("--expert-steps", type=int, default=120, help="steps of each data-generating expert")
    p.add_argument("--apprentice-steps", type=int, default=1500)
    p.add_argument("--query-subjects", type=int, default=3, help="held-out subjects queried at the end")
    p.add_argument("--query-expert-steps", type=int, default=200, help="steps of the DreamBooth expert compared at the end")
    p.add_argument("--workers", type=int, default=2, help="experts trained in parallel")
    p.add_argument("--seed", type=int, default=7)
    p.set_defaults(func=run_demo)


def _stage(name: str, done: bool, argv: list[str]) -> float:
    from suti.cli import main

    if done:
        print(f"[{name}] already done; skipping")
        return 0.0
    print(f"[{name}] suti {' '.join(argv)}")
    started = time.perf_counter()
    code = main(argv)
    if code != 0:
        raise SutiError(f"stage {name} failed with exit code {code}")
    return time.perf_counter() - started


def run_pipeline(args) -> Path:
    """Stages 1-4; returns the apprentice folder."""
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    crawl, mined, shards, app = out / "crawl", out / "mined", out / "shards", out / "apprentice"
    _stage("crawl", (crawl / "crawl.jsonl").is_file(), ["world", "make", "--output", str(crawl), "--subjects", str(args.subjects), "--noise-pages", str(args.noise_pages), "--seed", str(args.seed), "--size", "32"])
    _stage("mine", (mined / "clusters.jsonl").is_file(), ["mine", "--crawl", str(crawl), "--output", str(mined)])
    _stage("generate", (shards / "summary.json").is_file(), ["generate", "--clusters", str(mined / "clusters.jsonl"), "--crawl", str(crawl), "--output", str(shards), "--model", args.model, "--steps", str(args.expert_steps), "--max-workers", str(args.workers), "--samples-per-shard", "32"])
    _stage("apprentice", (app / "model_index.json").is_file(), ["apprentice", "train", "--shards", str(shards / "shard-*.tar"), "--model", args.model, "--output", str(app), "--steps", str(args.apprentice_steps), "--freeze-base", "--batch-size", "8", "--learning-rate", "3e-4", "--save-steps", "500", "--overwrite"])
    return app


def _grid(rows: list[list[Image.Image]], labels: list[str], cell: int = 64) -> Image.Image:
    width = max(len(r) for r in rows)
    label_w = 80
    grid = Image.new("RGB", (label_w + width * cell, len(rows) * cell), "white")
    draw = ImageDraw.Draw(grid)
    for y, (row, label) in enumerate(zip(rows, labels)):
        draw.text((4, y * cell + cell // 2 - 6), label, fill="black")
        for x, img in enumerate(row):
            grid.paste(img.resize((cell, cell), Image.Resampling.NEAREST), (label_w + x * cell, y * cell))
    return grid


def query(args, apprentice_dir: Path) -> dict:
    """Stage 5: in-context queries for held-out toy-world subjects vs a DreamBooth expert and the base."""
    from apprentice.sample import load_apprentice
    from experts import load_expert, load_pipeline, resolve_config
    from experts.train import train_expert
    from suti.models import default_resolution
    from suti.scoring import get_scorer
    from suti.world import export_subject
    from suti.world.probe import load_probe
    from suti.world.toy_t2i import pretrain_world

    out = Path(args.output) / "query"
    out.mkdir(parents=True, exist_ok=True)
    res = default_resolution(args.model)
    world = pretrain_world()
    subjects = world.heldout_subjects[: args.query_subjects]
    probe, clip = load_probe(), get_scorer("toy-clip")
    app = load_apprentice(str(apprentice_dir))
    base = load_pipeline(args.model)
    rows, labels, results = [], [], []
    for i, subject in enumerate(subjects):
        photos = out / subject.subject_id / "photos"
        if not photos.is_dir():
            export_subject(world, subject.subject_id, photos, n=3, seed=args.seed, size=res)
        demos = [Image.open(p).convert("RGB") for p in sorted(photos.glob("*.png"))]
        captions = [f"a {subject.description()}"] * len(demos)
        t0 = time.perf_counter()
        ctx = app.encode_demonstrations(demos, captions)
        app_images = []
        for k, template in enumerate(QUERY_PROMPTS):
            app_images.append(app(template.replace("{S}", subject.class_noun), demo_context=ctx, generator=torch.Generator().manual_seed(k)).images[0])
            if k == 0:
                app_first = time.perf_counter() - t0
        t1 = time.perf_counter()
        expert_dir = out / subject.subject_id / "expert"
        config = resolve_config("dreambooth", dict(model=args.model, instance_dir=str(photos), class_noun=subject.class_noun, steps=args.query_expert_steps, num_class_images=8, seed=args.seed))
        info = train_expert(config, expert_dir, overwrite=True, progress=False)
        expert = load_expert(expert_dir)
        expert_images = []
        for k, template in enumerate(QUERY_PROMPTS):
            expert_images.append(expert(template.replace("{S}", f"{info.identifier} {subject.class_noun}"), height=res, width=res, num_inference_steps=25, guidance_scale=5.0, generator=torch.Generator().manual_seed(k)).images[0])
            if k == 0:
                expert_first = time.perf_counter() - t1
        base_images = [base(t.replace("{S}", subject.class_noun), height=res, width=res, num_inference_steps=25, guidance_scale=5.0, generator=torch.Generator().manual_seed(k)).images[0] for k, t in enumerate(QUERY_PROMPTS)]
        demo_emb = clip.embed_images(demos)
        row = {"subject": subject.subject_id, "description": subject.description(), "apprentice_first_image_s": round(app_first, 2), "expert_first_image_s": round(expert_first, 2)}
        for name, images in (("apprentice", app_images), ("expert", expert_images), ("base", base_images)):
            row[f"{name}_identity"] = probe.identity_accuracy(images, subject)
            row[f"{name}_clip_i"] = float((clip.embed_images(images) @ demo_emb.T).mean())
        results.append(row)
        rows += [demos, app_images, expert_images, base_images]
        labels += [f"demos {i}", "apprentice", "expert", "base"]
    _grid(rows, labels).save(Path(args.output) / "grid.png")
    summary = {k: float(np.mean([r[k] for r in results])) for k in results[0] if k not in ("subject", "description")}
    summary["speedup_time_to_first_image"] = summary["expert_first_image_s"] / summary["apprentice_first_image_s"]
    (Path(args.output) / "results.json").write_text(json.dumps({"per_subject": results, "mean": summary}, indent=2))
    return summary


def run_demo(args) -> int:
    """The whole pipeline, then the comparison; prints the numbers."""
    started = time.perf_counter()
    apprentice_dir = run_pipeline(args)
    summary = query(args, apprentice_dir)
    print(f"\ngrid (demos | apprentice | DreamBooth expert | base): {Path(args.output) / 'grid.png'}")
    print(f"{'':12s} {'identity acc':>13s} {'CLIP-I to demos':>16s}")
    for name in ("apprentice", "expert", "base"):
        print(f"{name:12s} {summary[name + '_identity']:13.2f} {summary[name + '_clip_i']:16.3f}")
    print(f"time to first image: apprentice {summary['apprentice_first_image_s']:.2f} s, DreamBooth expert (train + sample) {summary['expert_first_image_s']:.1f} s -> {summary['speedup_time_to_first_image']:.0f}x faster")
    print(f"total {time.perf_counter() - started:.0f} s")
    return 0
