"""Does the order of the training data explain suti's LoRA parity gap with diffusers?

suti draws each step's instance (and class) images uniformly with replacement; diffusers'
``train_dreambooth_lora.py`` shuffles its dataset once per epoch (a DataLoader with
``shuffle=True``), so every image is seen equally often. This script trains the same LoRA expert
both ways, paired by seed (same initialisation, noise and timesteps draws otherwise), and
compares the experts' denoising loss on their instance photos (fixed noise and timesteps,
:func:`experts.evaluate.denoising_loss`). It prints the per-seed differences (epoch minus
replacement), their mean, standard error and sign count - one run, one ratio.

    python benchmarks/data_order.py --seeds 8 --steps 100
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def epoch_indices(self, n: int, generator: torch.Generator) -> torch.Tensor:
    """``TrainingLatents.draw_indices`` in epoch order: a fresh permutation of the set (from the
    same generator) each time the last one is used up."""
    queue = self.__dict__.setdefault("_epoch_queue", [])
    out = []
    while len(out) < n:
        if not queue:
            queue.extend(torch.randperm(len(self), generator=generator).tolist())
        out.append(queue.pop(0))
    return torch.tensor(out, dtype=torch.long)


def train_and_eval(order: str, seed: int, args, photos: Path, work: Path) -> float:
    """One expert with ``order`` ("replacement" or "epoch"); its eval loss."""
    from experts import load_pipeline, resolve_config
    from experts.evaluate import denoising_loss
    from experts.latents import TrainingLatents, load_training_pixels
    from experts.train import train_expert
    from suti.images import list_image_files

    original = TrainingLatents.draw_indices
    if order == "epoch":
        TrainingLatents.draw_indices = epoch_indices
    try:
        config = resolve_config("dreambooth-lora", {"model": args.model, "instance_dir": str(photos), "class_noun": "toy", "steps": args.steps, "lora_rank": 4,
                                                    "seed": seed, "report_to": "none", "num_class_images": args.class_images, "class_sample_steps": 4})
        pipe = load_pipeline(args.model, device="cpu")
        info = train_expert(config, work / f"{order}-{seed}", progress=False, pipeline=pipe, save=False)
    finally:
        TrainingLatents.draw_indices = original
    images = torch.stack(load_training_pixels(list_image_files(photos), info.resolution, True))
    return denoising_loss(pipe, images, info.instance_prompt, seed=10_000, draws=args.draws)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--class-images", type=int, default=8)
    p.add_argument("--draws", type=int, default=16, help="noise draws per photo in the eval loss")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from conftest import draw_subject

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        photos = work / "photos"
        photos.mkdir()
        for i in range(4):
            draw_subject(i).save(photos / f"p{i}.png")
        rows = []
        for seed in range(args.seeds):
            rep = train_and_eval("replacement", seed, args, photos, work)
            epo = train_and_eval("epoch", seed, args, photos, work)
            rows.append((seed, rep, epo))
            print(f"seed {seed}: replacement {rep:.5f}  epoch {epo:.5f}  epoch - replacement {epo - rep:+.5f}", flush=True)
    diffs = [e - r for _, r, e in rows]
    mean = statistics.mean(diffs)
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
    lower = sum(d < 0 for d in diffs)
    print(f"epoch - replacement: mean {mean:+.5f} (standard error {se:.5f}); epoch lower in {lower} of {len(diffs)} seeds")
    result = {"model": args.model, "steps": args.steps, "seeds": args.seeds, "mean_difference": mean, "standard_error": se, "epoch_lower": lower,
              "rows": [{"seed": s, "replacement": r, "epoch": e} for s, r, e in rows]}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
