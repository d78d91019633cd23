"""Where should the FLUX apprentice's demonstration tokens sit: FLUX.1 Kontext's frame index or
UNO's diagonal offset (``--demo-positions frame|diagonal``, :mod:`apprentice.flux`)?

For each seed, two apprentices are trained on the same oracle shards of the synthetic world
(``tests/shard_util.world_shards``: demos are renders of a subject, targets the same subject
elsewhere), the same steps and rate, the base frozen (so that only the demonstration branch
differs), one per position scheme. Each is scored on held-out subjects' shards by its *demo gain*:
the flow-matching loss of the target without its demonstrations minus with them (the same
noise, timesteps, prompts and demos for both schemes). It prints the per-seed gains, the paired
difference frame - diagonal, its mean, standard error and sign count - one run, one comparison.

    python benchmarks/flux_demo_positions.py --seeds 3 --steps 60

Caveat: ``tiny-flux`` is a random base (no FLUX.1 checkpoint can be downloaded here), so this
measures which placement a randomly initialised transformer's demonstration branch learns to
use faster, not which one FLUX.1-dev prefers.
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

SCHEMES = ("frame", "diagonal")


def train(scheme: str, seed: int, shards: Path, out: Path, args) -> Path:
    """One apprentice with ``scheme``; its folder."""
    from apprentice.train import train_apprentice
    from apprentice.train_config import ApprenticeTrainConfig

    config = ApprenticeTrainConfig(shards=str(shards / "*.tar"), output=str(out), model="tiny-flux", steps=args.steps, batch_size=args.batch_size,
                                   learning_rate=args.learning_rate, freeze_base=True, demo_positions=scheme, seed=seed, save_steps=0)
    train_apprentice(config, overwrite=True, progress=False)
    return out


@torch.no_grad()
def demo_gain(folder: Path, heldout: Path, args) -> float:
    """Held-out loss without demonstrations minus with them (fixed noise and timesteps)."""
    from apprentice.flux import FluxApprenticeModule
    from apprentice.sample import load_apprentice
    from apprentice.train_data import encode_batch
    from apprentice.data import collate, make_pipeline
    from suti.objectives import training_objective
    from suti.losses import per_sample_mse

    pipe = load_apprentice(str(folder), device="cpu")
    module = FluxApprenticeModule(pipe.transformer, pipe.adapter, vae_scale_factor=pipe.vae_scale_factor)
    objective = training_objective(pipe.scheduler)
    data = make_pipeline(str(heldout / "*.tar"), resolution=32, num_demos=3, seed=0, repeat=False, shuffle_buffer=1)
    examples = [collate([x]) for x in data][: args.eval_examples]
    gen = torch.Generator().manual_seed(12345)
    losses = {True: [], False: []}
    for batch in examples:
        x = encode_batch(pipe, batch, "cpu", 32, gen)
        for _ in range(args.draws):
            noise = torch.randn(x.target.shape, generator=gen)
            t = objective.draw_timesteps(1, gen)
            noisy = objective.add_noise(x.target, noise, t)
            target = objective.target(x.target, noise, t)
            for demos_on in (True, False):
                pred = module(noisy, t, x.text_cond.encoder_hidden_states, x.demos, x.demo_emb, torch.tensor([1.0 if demos_on else 0.0]),
                              x.text_cond.added_cond_kwargs, x.demo_cond.added_cond_kwargs)
                losses[demos_on].append(per_sample_mse(pred, target).item())
    return statistics.fmean(losses[False]) - statistics.fmean(losses[True])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--eval-examples", type=int, default=8)
    p.add_argument("--draws", type=int, default=4)
    p.add_argument("--output", help="write the rows as JSON here")
    args = p.parse_args(argv)
    from shard_util import world_shards

    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="suti-positions-") as tmp:
        tmp = Path(tmp)
        shards = world_shards(tmp / "train", num_subjects=6, per_subject=4, size=32, seed=0)
        heldout = world_shards(tmp / "heldout", num_subjects=4, per_subject=2, size=32, seed=99)
        for seed in range(args.seeds):
            gains = {s: demo_gain(train(s, seed, shards, tmp / f"{s}-{seed}", args), heldout, args) for s in SCHEMES}
            rows.append({"seed": seed, **{f"gain_{s}": round(g, 6) for s, g in gains.items()}, "frame_minus_diagonal": round(gains["frame"] - gains["diagonal"], 6)})
            print(json.dumps(rows[-1]), flush=True)
    diffs = [r["frame_minus_diagonal"] for r in rows]
    mean = statistics.fmean(diffs)
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
    summary = {"seeds": len(rows), "steps": args.steps, "mean_frame_minus_diagonal": round(mean, 6), "standard_error": round(se, 6),
               "frame_higher_gain": sum(d > 0 for d in diffs), "rows": rows}
    print(f"demo gain, frame minus diagonal: {mean:+.5f} (SE {se:.5f}), frame higher in {summary['frame_higher_gain']} of {len(rows)} seeds")
    if args.output:
        Path(args.output).write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
