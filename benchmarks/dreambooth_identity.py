"""Does a DreamBooth expert carry a held-out subject's identity? (issue 3, acceptance 3)

For each of ``--subjects`` held-out subjects (after the first ``--skip``) of the toy model's pretraining world
(never seen by the ``toy`` base): export ``--photos`` renders of it, train a classic DreamBooth
expert on them (``dreambooth`` recipe with the model preset's defaults: full fine-tuning of
the U-Net, and of the text encoder for ``toy``; prior preservation; ``--steps`` steps), then
sample the expert ("a [V] <class>" in four DreamBench-style prompts) and the base model
("a <class>" in the same prompts) with the same seeds and settings. The
attribute probe (:mod:`suti.world.probe`) reads every sample:

* exact identity accuracy: the share of samples whose class, body colour, pattern, part and
  proportions all match the subject (:meth:`Probe.identity_accuracy`);
* attribute score: the mean share of those five attributes that match (a graded companion),
  and the accuracy of each attribute on its own.

Prints both per subject and on average, and the ratio expert / base of the attribute score.

Usage::

    python benchmarks/dreambooth_identity.py [--subjects 6] [--steps 800] [--model toy]
    python benchmarks/dreambooth_identity.py --model OTHER_TOY_FOLDER --learning-rate-scale 50
    python benchmarks/dreambooth_identity.py --steps 800 --set train_text_encoder=false
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PROMPTS = ("a {} on the beach", "a {} in the snow", "a {} wearing a hat", "a {} in the city")


def samples(pipe, phrase: str, *, seeds: int, guidance: float, steps: int = 25) -> list:
    """``len(PROMPTS) * seeds`` images of ``phrase`` (32 px), seeded per image."""
    import torch

    return [pipe(p.format(phrase), height=32, width=32, num_inference_steps=steps,
                 guidance_scale=guidance, generator=torch.Generator().manual_seed(k)).images[0]
            for p in PROMPTS for k in range(seeds)]


def measure_subject(subject, world, base_pipe, probe, work: Path, *, model: str, steps: int,
                    photos: int, seeds: int, guidance: float, seed: int = 0,
                    learning_rate_scale: float | None = None, extra: dict | None = None) -> dict:
    """Train one expert on ``subject`` and score its samples and the base model's."""
    from experts import load_expert, resolve_config
    from experts.train import train_expert
    from suti.world import export_subject
    from suti.world.probe import IDENTITY_ATTRS

    instance = work / subject.subject_id / "instance"
    export_subject(world, subject.subject_id, instance, n=photos, seed=seed, size=32)
    overrides = {"model": model, "instance_dir": str(instance), "class_noun": subject.class_noun,
                 "steps": steps, "num_class_images": 8, "seed": seed, "resolution": 32}
    if learning_rate_scale is not None:
        overrides["learning_rate_scale"] = learning_rate_scale
    overrides.update(extra or {})
    config = resolve_config("dreambooth", overrides)
    started = time.perf_counter()
    info = train_expert(config, work / subject.subject_id / "expert", progress=False)
    train_s = time.perf_counter() - started
    expert_pipe = load_expert(work / subject.subject_id / "expert")
    row = {"subject": subject.subject_id, "description": subject.description(),
           "train_s": round(train_s, 1)}
    for name, pipe, phrase in (("base", base_pipe, subject.class_noun),
                               ("expert", expert_pipe, f"{info.identifier} {subject.class_noun}")):
        images = samples(pipe, phrase, seeds=seeds, guidance=guidance)
        row[f"{name}_identity"] = probe.identity_accuracy(images, subject)
        row[f"{name}_attributes"] = probe.identity_attribute_score(images, subject)
        hits = probe.identity_hits(images, subject)
        for attr in IDENTITY_ATTRS:
            seen = [h[attr] for h in hits if attr in h]
            row[f"{name}_{attr}"] = float(np.mean(seen)) if seen else float("nan")
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="toy")
    parser.add_argument("--subjects", type=int, default=6, help="held-out subjects (6)")
    parser.add_argument("--skip", type=int, default=0,
                        help="start after this many held-out subjects (0), for fresh subjects")
    parser.add_argument("--steps", type=int, default=800, help="DreamBooth steps (800, the recipe's)")
    parser.add_argument("--photos", type=int, default=4, help="instance photos per subject (4)")
    parser.add_argument("--seeds", type=int, default=2, help="samples per prompt (2)")
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--learning-rate-scale", type=float, default=None,
                        help="multiplier of the recipe's learning rate (default: the preset's; "
                             "give the toy preset's 50 when --model is a folder)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override an expert config field (YAML value), e.g. "
                             "--set train_text_encoder=false; repeatable")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    extra = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--set wants KEY=VALUE, got {item!r}")
        extra[key] = yaml.safe_load(value)

    import torch

    from experts import load_pipeline
    from suti.world.probe import load_probe
    from suti.world.toy_t2i import pretrain_world

    torch.manual_seed(0)
    world = pretrain_world()
    subjects = world.heldout_subjects[args.skip: args.skip + args.subjects]
    base_pipe, probe = load_pipeline(args.model), load_probe()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, subject in enumerate(subjects):
            row = measure_subject(subject, world, base_pipe, probe, Path(tmp), model=args.model,
                                  steps=args.steps, photos=args.photos, seeds=args.seeds,
                                  guidance=args.guidance,
                                  learning_rate_scale=args.learning_rate_scale, extra=extra)
            rows.append(row)
            print(f"[{i + 1}/{len(subjects)}] {row['subject']} ({row['description']}): exact identity "
                  f"expert {row['expert_identity']:.2f} / base {row['base_identity']:.2f}; attributes "
                  f"{row['expert_attributes']:.2f} / {row['base_attributes']:.2f} (trained in {row['train_s']:.0f} s)",
                  flush=True)
    mean = {k: float(np.mean([r[k] for r in rows])) for k in
            ("expert_identity", "base_identity", "expert_attributes", "base_attributes")}
    n_images = len(PROMPTS) * args.seeds
    print(f"\n{len(rows)} held-out subjects x {n_images} samples, {args.steps}-step DreamBooth experts:")
    print(f"  exact identity accuracy: expert {mean['expert_identity']:.3f}, base {mean['base_identity']:.3f}"
          f" (subjects where the expert is higher: {sum(r['expert_identity'] > r['base_identity'] for r in rows)}/{len(rows)})")
    print(f"  attribute score:         expert {mean['expert_attributes']:.3f}, base {mean['base_attributes']:.3f}"
          f" -> ratio expert/base {mean['expert_attributes'] / max(mean['base_attributes'], 1e-9):.2f}")
    from suti.world.probe import IDENTITY_ATTRS

    for name in ("expert", "base"):
        per = {a: np.nanmean([r[f"{name}_{a}"] for r in rows]) for a in IDENTITY_ATTRS}
        print(f"  {name:6s} per attribute: " + ", ".join(f"{a} {v:.2f}" for a, v in per.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": vars(args), "rows": rows, "mean": mean}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
