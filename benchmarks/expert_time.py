"""Time to a usable DreamBooth expert: train N steps + sample one image, for full and LoRA.

Prints the preset, device, steps/s, the time to a usable expert for full fine-tuning and for
LoRA, and their ratio, all measured in this run. Anchors (other hardware, not comparable to a
CPU run): diffusers DreamBooth runs ~2.6 it/s on one A100 (batch 1 + prior); SuTI's experts take
~5 minutes each.

    python benchmarks/expert_time.py --model tiny --steps 50
    python benchmarks/expert_time.py --model sd15-arch --resolution 512 --steps 500   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def _photos(folder: Path, size: int, n: int = 4) -> None:
    from suti.world import export_subject, make_world

    world = make_world(8, seed=123)
    export_subject(world, world.heldout_subjects[0].subject_id, folder, n=n, size=size)


def run(model: str, steps: int, resolution: int | None, lora_rank: int, num_class_images: int, sample_steps: int, workdir: Path) -> dict:
    from experts import load_expert, resolve_config
    from experts.train import train_expert
    from suti.models import default_device, default_resolution

    resolution = resolution or default_resolution(model)
    photos = workdir / "photos"
    if not photos.exists():
        _photos(photos, resolution)
    config = resolve_config("dreambooth", dict(model=model, instance_dir=str(photos), class_noun="toy", steps=steps, lora_rank=lora_rank, resolution=resolution, num_class_images=num_class_images, prior_preservation=num_class_images > 0))
    # class images are cached: generate them once outside the timed region
    if num_class_images:
        from experts.data import ensure_class_images
        from suti.models import load_pipeline

        ensure_class_images(load_pipeline(model, device=default_device()), model, "a toy", num_class_images, resolution, 0, config.class_sample_steps)
    start = time.perf_counter()
    info = train_expert(config, workdir / f"expert-{lora_rank}", progress=False)
    trained = time.perf_counter()
    pipe = load_expert(workdir / f"expert-{lora_rank}", device=default_device())
    pipe(info.prompt("a {V} {class} on the beach"), height=resolution, width=resolution, num_inference_steps=sample_steps, generator=torch.Generator().manual_seed(0)).images[0]
    done = time.perf_counter()
    return {"kind": info.kind, "steps": steps, "train_s": round(trained - start, 2), "steps_per_s": round(steps / info.train_seconds, 2), "time_to_expert_s": round(done - start, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--resolution", type=int)
    parser.add_argument("--lora-rank", type=int, default=4)
    parser.add_argument("--num-class-images", type=int, default=4)
    parser.add_argument("--sample-steps", type=int, default=25)
    args = parser.parse_args()
    from suti.models import default_device

    device = default_device()
    name = torch.cuda.get_device_name() if device == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    with tempfile.TemporaryDirectory() as tmp:
        full = run(args.model, args.steps, args.resolution, 0, args.num_class_images, args.sample_steps, Path(tmp))
        lora = run(args.model, args.steps, args.resolution, args.lora_rank, args.num_class_images, args.sample_steps, Path(tmp))
    print(f"preset={args.model} device={name} prior={'on' if args.num_class_images else 'off'} ({args.num_class_images} class images)")
    for r in (full, lora):
        print(f"  {r['kind']:4s}: {r['steps']} steps in {r['train_s']} s = {r['steps_per_s']} steps/s; time to usable expert (train + 1 image, {args.sample_steps} sampler steps) {r['time_to_expert_s']} s")
    print(f"ratio full/LoRA time to expert: {full['time_to_expert_s'] / lora['time_to_expert_s']:.2f}")
    print(json.dumps({"model": args.model, "device": name, "full": full, "lora": lora}))


if __name__ == "__main__":
    main()
