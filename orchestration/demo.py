"""``suti demo``: the README's main job, the whole SuTI pipeline on the embedded default.

1. make a synthetic web crawl (``suti world make``; PNG, since JPEG artifacts at 32 px are a
   domain of their own that the apprentice would learn instead of the subject),
2. mine subject clusters from it (``suti mine``),
3. write every cluster's photos as photo shards (``suti apprentice pack-photos``),
4. generate expert data on local Ray for the first ``--expert-clusters`` clusters (``suti
   generate``: one DreamBooth expert per cluster, delta-CLIP filter, webdataset shards),
5. train the apprentice with DeepSpeed on the expert shards and the photo shards (``suti
   apprentice train``): mining is cheap and experts are not, so on a CPU the apprentice sees
   about a thousand subjects through their photos and tens through expert samples,
6. answer in-context queries for held-out subjects of the toy world and compare with a DreamBooth
   expert and the base model on the same prompts and seeds: an image grid
   (demos | apprentice | expert | base) and the fidelity numbers (probe identity accuracy,
   small-CLIP image similarity to the demos) and times.

Each stage skips when its output exists, so a rerun of the same command continues.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from PIL import Image, ImageDraw

from suti import storage
from suti.cli_format import ArgumentParser
from suti.errors import SutiError
from suti.images import save_image_atomic

log = logging.getLogger(__name__)


def demo_args(argv: list[str]) -> argparse.Namespace:
    """``suti demo`` arguments (defaults included) from ``argv``, e.g. ``["--output", "X"]``."""
    parser = ArgumentParser(prog="suti")
    register(parser.add_subparsers())
    return parser.parse_args(["demo", *argv])


def register(subparsers) -> None:
    """Add ``suti demo``."""
    from apprentice.train_config import apprentice_number
    from experts.recipe import expert_number
    from generation.config import generate_number
    from suti import checks

    p = subparsers.add_parser("demo", help="run the whole pipeline on the embedded default (synthetic world, CPU)")
    p.add_argument("--output", default="runs/demo", help="folder of every stage's outputs")
    p.add_argument("--model", default="toy", help="base model")
    p.add_argument("--subjects", type=checks.whole(1, 1_000_000), default=1400, help="subjects in the synthetic crawl (3/4 are crawled)")
    p.add_argument("--noise-pages", type=checks.PROBABILITY, default=0.2, help="share of the crawl's pages that show several subjects, in [0, 1]")
    p.add_argument("--expert-clusters", type=generate_number("max_clusters"), default=30, help="clusters that get a data-generating DreamBooth expert (all get photo shards)")
    p.add_argument("--expert-steps", type=expert_number("steps"), default=120, help="steps of each data-generating expert")
    p.add_argument("--apprentice-steps", type=apprentice_number("steps"), default=3000, help="apprentice training steps")
    p.add_argument("--apprentice-lr", type=apprentice_number("learning_rate"), default=1e-3, help="learning rate of the demonstration-attention layers (the base is frozen)")
    p.add_argument("--self-target", type=apprentice_number("self_target"), default=0.5, help="share of apprentice examples that reconstruct a held-out cluster photo (apprentice train --self-target)")
    p.add_argument("--caption-prompt", type=apprentice_number("caption_prompt"), default=0.0, help="share of reconstruction examples prompted with the photo's alt text instead of 'a <class noun>' (apprentice train --caption-prompt; 0: no identity in the text, so the demos must carry it)")
    p.add_argument("--demo-caption", type=apprentice_number("demo_caption"), default=0.0, help="share of examples whose demos keep their alt texts as captions, else 'a <class noun>' (apprentice train --demo-caption)")
    p.add_argument("--subject-tokens", type=apprentice_number("subject_tokens"), default=4, help="tokens of the apprentice's global subject channel, embedded by the model's CLIP (apprentice train --subject-tokens; 0: none)")
    p.add_argument("--query-subjects", type=checks.whole(1, 10_000), default=3, help="held-out subjects queried at the end")
    p.add_argument("--query-expert-steps", type=expert_number("steps"), default=200, help="steps of the DreamBooth expert compared at the end")
    p.add_argument("--workers", type=generate_number("max_workers"), default=2, help="experts trained in parallel")
    p.add_argument("--seed", type=checks.SEED, default=7, help="seed of the world, the crawl and the final comparison")
    p.set_defaults(func=run_demo, local_paths=("output",))


def _stage(name: str, done: bool, argv: list[str]) -> float:
    from orchestration.cli import build_parser

    if done:
        print(f"[{name}] already done; skipping")
        return 0.0
    print(f"[{name}] suti {' '.join(argv)}")
    started = time.perf_counter()
    stage_args = build_parser().parse_args(argv)
    try:
        code = int(stage_args.func(stage_args) or 0)
    except SutiError as exc:  # one line for the whole demo: the stage and what went wrong
        exc.args = (f"stage {name}: {exc}",)
        raise
    if code != 0:
        raise SutiError(f"stage {name} failed with exit code {code}")
    return time.perf_counter() - started


def run_pipeline(args) -> Path:
    """Stages 1-5; returns the apprentice folder."""
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    crawl, mined, photos, shards, app = out / "crawl", out / "mined", out / "photos", out / "shards", out / "apprentice"
    _stage("crawl", (crawl / "crawl.jsonl").is_file(), ["world", "make", "--output", str(crawl), "--subjects", str(args.subjects), "--noise-pages", str(args.noise_pages), "--seed", str(args.seed), "--size", "32", "--image-format", "png"])
    _stage("mine", (mined / "clusters.jsonl").is_file(), ["mine", "--crawl", str(crawl), "--output", str(mined)])
    _stage("photos", (photos / "summary.json").is_file(), ["apprentice", "pack-photos", "--clusters", str(mined / "clusters.jsonl"), "--crawl", str(crawl), "--output", str(photos)])
    _stage("generate", (shards / "summary.json").is_file(), ["generate", "--clusters", str(mined / "clusters.jsonl"), "--crawl", str(crawl), "--output", str(shards), "--model", args.model, "--steps", str(args.expert_steps), "--max-workers", str(args.workers), "--samples-per-shard", "32", "--max-clusters", str(args.expert_clusters)])
    _stage("apprentice", (app / "model_index.json").is_file(), ["apprentice", "train", "--shards", str(shards / "shard-*.tar"), str(photos / "shard-*.tar"), "--model", args.model, "--output", str(app), "--steps", str(args.apprentice_steps), "--freeze-base", "--batch-size", "8", "--learning-rate", str(args.apprentice_lr), "--save-steps", "500", "--self-target", str(args.self_target), "--caption-prompt", str(args.caption_prompt), "--demo-caption", str(args.demo_caption), "--subject-tokens", str(args.subject_tokens), "--overwrite"])
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
    """Stage 6: in-context queries for held-out toy-world subjects vs a DreamBooth expert and the
    base model (:func:`orchestration.compare.compare_on_world`); writes ``grid.png`` and
    ``results.json`` and returns the mean numbers."""
    from orchestration.compare import compare_on_world, mean_metrics
    from apprentice.sample import load_apprentice
    from experts import load_pipeline

    results = compare_on_world(load_apprentice(str(apprentice_dir)), load_pipeline(args.model),
                               work_dir=Path(args.output) / "query", num_subjects=args.query_subjects,
                               model=args.model, expert_steps=args.query_expert_steps, seed=args.seed)
    rows, labels = [], []
    for i, r in enumerate(results):
        rows += [r.demos, r.images["apprentice"], r.images["expert"], r.images["base"]]
        labels += [f"demos {i}", "apprentice", "expert", "base"]
    save_image_atomic(_grid(rows, labels), Path(args.output) / "grid.png")
    summary = mean_metrics(results)
    summary["speedup_time_to_first_image"] = summary["expert_first_image_s"] / summary["apprentice_first_image_s"]
    storage.write_text(Path(args.output) / "results.json", json.dumps({"per_subject": [r.row() for r in results], "mean": summary}, indent=2))
    return summary


def run_demo(args) -> int:
    """The whole pipeline, then the comparison; prints the numbers."""
    from suti.models import check_model

    check_model(args.model)  # before any stage writes: a bad --model is one line, not a failure at stage 3
    started = time.perf_counter()
    apprentice_dir = run_pipeline(args)
    summary = query(args, apprentice_dir)
    print(f"\ngrid (demos | apprentice | DreamBooth expert | base): {Path(args.output) / 'grid.png'}")
    print(f"{'':12s} {'identity acc':>13s} {'attributes':>11s} {'CLIP-I to demos':>16s}")
    for name in ("apprentice", "expert", "base"):
        print(f"{name:12s} {summary[name + '_identity']:13.2f} {summary[name + '_attributes']:11.2f} {summary[name + '_clip_i']:16.3f}")
    print(f"time to first image: apprentice {summary['apprentice_first_image_s']:.2f} s, DreamBooth expert (train + sample) {summary['expert_first_image_s']:.1f} s -> {summary['speedup_time_to_first_image']:.0f}x faster")
    print(f"total {time.perf_counter() - started:.0f} s")
    return 0
