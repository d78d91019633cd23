"""In-context apprentice vs DreamBooth expert vs base model on held-out toy-world subjects.

One run measures, on the same held-out subjects, prompts and seeds (:mod:`apprentice.compare`):

(a) subject fidelity: the probe's identity accuracy and the small CLIP's image similarity to
    the 3 demos (CLIP-I), for the apprentice (3 demos, no tuning), a DreamBooth expert trained on
    the same 3 photos, and the base model (class noun only);
(b) time to first image: DreamBooth expert (train + load + first image) / apprentice (encode the
    demos + first image) -> the speed-up ratio (paper: 20x; our goal: at least 50x);
(c) time per image with the demos cached: apprentice / base model, same denoising steps, for
    demo guidance 2 (three guidance branches) and 1 (two branches, as the base) (goal: <= 1.25x);
(d) the denoising loss of the apprentice on held-out subjects' *other* photos with their 3 demos
    vs without demos (same noise and timesteps; :func:`apprentice.evaluate.heldout_demo_loss`);
(e) optionally (``--ablation-shards``, shards generated with ``suti generate --no-filter``): the
    delta-CLIP ablation of SuTI section 5.3: apprentices trained on the same shards filtered at
    lambda = none, 0 and 0.02 for ``--ablation-steps`` each, then (a) for the apprentice only.

Usage::

    python benchmarks/in_context.py [--apprentice toy] [--subjects 3] [--expert-steps 200]
    python benchmarks/in_context.py --ablation-shards runs/ablation/shards --ablation-steps 600
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def time_per_image(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def per_image_ratio(app, base, demos, prompt: str, steps: int, repeats: int) -> dict:
    """(c): median seconds per image of the apprentice (cached demos) and the base model."""
    import torch

    res = base.unet.config.sample_size * (2 ** (len(base.vae.config.block_out_channels) - 1))
    ctx = app.encode_demonstrations(demos)
    out = {"base_s": time_per_image(lambda: base(prompt, height=res, width=res, num_inference_steps=steps, generator=torch.Generator().manual_seed(0)), repeats)}
    for s_demo in (2.0, 1.0):
        out[f"apprentice_sdemo{s_demo:g}_s"] = time_per_image(lambda: app(prompt, demo_context=ctx, num_inference_steps=steps, demo_guidance_scale=s_demo, generator=torch.Generator().manual_seed(0)), repeats)
    return out


def ablation(shards: str, steps: int, args, base) -> list[dict]:
    """(e): train one apprentice per lambda on the same shards and score it."""
    from apprentice.compare import compare_on_world, mean_metrics
    from apprentice.sample import load_apprentice
    from apprentice.train import ApprenticeTrainConfig, train_apprentice

    rows = []
    work = Path(args.work_dir) / "ablation"
    for lam in (None, 0.0, 0.02):
        name = "none" if lam is None else f"{lam:g}"
        out = work / f"lambda-{name}"
        if not (out / "model_index.json").is_file():
            config = ApprenticeTrainConfig(shards=shards, output=str(out), model=args.model, steps=steps, batch_size=8, learning_rate=3e-4, freeze_base=True, min_delta_clip=lam, self_target=args.self_target, save_steps=steps, seed=args.seed)
            train_apprentice(config, overwrite=True, progress=False)
        used = json.loads((out / "training.json").read_text())
        results = compare_on_world(load_apprentice(str(out)), base, work_dir=Path(args.work_dir) / "query", num_subjects=args.subjects, methods=("apprentice",), model=args.model, num_inference_steps=args.steps, seed=args.seed)
        rows.append({"lambda": name, "steps": used["steps"], **mean_metrics(results)})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--apprentice", default="toy", help='apprentice folder or "toy"')
    p.add_argument("--model", default="toy", help="base model preset of the apprentice and the experts")
    p.add_argument("--subjects", type=int, default=3, help="held-out world subjects")
    p.add_argument("--loss-subjects", type=int, default=12, help="held-out world subjects of (d) (4 target photos each)")
    p.add_argument("--expert-steps", type=int, default=200, help="DreamBooth steps of each expert")
    p.add_argument("--steps", type=int, default=25, help="denoising steps of every sampler")
    p.add_argument("--repeats", type=int, default=5, help="timed images per method for (c)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--work-dir", help="folder for photos, experts and ablation apprentices (default: a temp folder)")
    p.add_argument("--ablation-shards", help="shards from `suti generate --no-filter` for the lambda ablation")
    p.add_argument("--ablation-steps", type=int, default=600)
    p.add_argument("--self-target", type=float, default=0.5, help="--self-target of the ablation apprentices")
    p.add_argument("--json", help="also write the numbers to this file")
    args = p.parse_args(argv)

    from apprentice.compare import compare_on_world, mean_metrics
    from apprentice.evaluate import heldout_demo_loss
    from apprentice.sample import load_apprentice
    from experts import load_pipeline

    tmp = None
    if not args.work_dir:
        tmp = tempfile.TemporaryDirectory(prefix="suti-in-context-")
        args.work_dir = tmp.name
    app = load_apprentice(args.apprentice)
    base = load_pipeline(args.model)
    report: dict = {"settings": {k: v for k, v in vars(args).items() if k != "json"}}

    results = compare_on_world(app, base, work_dir=Path(args.work_dir) / "query", num_subjects=args.subjects, model=args.model, expert_steps=args.expert_steps, num_inference_steps=args.steps, seed=args.seed)
    mean = mean_metrics(results)
    report["fidelity"] = {"per_subject": [r.row() for r in results], "mean": mean}
    print(f"(a) subject fidelity on {args.subjects} held-out subjects x {len(results[0].images['base'])} prompts")
    print(f"    {'method':12s} {'identity acc':>12s} {'attributes':>10s} {'CLIP-I':>8s} {'first image (s)':>16s}")
    for m in ("apprentice", "expert", "base"):
        print(f"    {m:12s} {mean[m + '_identity']:12.3f} {mean[m + '_attributes']:10.3f} {mean[m + '_clip_i']:8.3f} {mean[m + '_first_image_s']:16.2f}")
    speedup = mean["expert_first_image_s"] / mean["apprentice_first_image_s"]
    report["time_to_first_image_ratio"] = speedup
    print(f"(b) time to first image: expert {mean['expert_first_image_s']:.1f} s / apprentice {mean['apprentice_first_image_s']:.2f} s = {speedup:.0f}x")

    per = per_image_ratio(app, base, results[0].demos, "a toy on the beach", args.steps, args.repeats)
    report["time_per_image"] = per
    for s_demo in ("2", "1"):
        ratio = per[f"apprentice_sdemo{s_demo}_s"] / per["base_s"]
        report["time_per_image"][f"ratio_sdemo{s_demo}"] = ratio
        print(f"(c) time per image, demo guidance {s_demo}: apprentice {per[f'apprentice_sdemo{s_demo}_s']:.3f} s / base {per['base_s']:.3f} s = {ratio:.2f}x")

    with_demos, without = heldout_demo_loss(app, args.loss_subjects, seed=args.seed)
    report["loss"] = {"with_demos": with_demos, "without_demos": without, "ratio": with_demos / without}
    print(f"(d) denoising loss on other photos: with demos {with_demos:.4f}, without {without:.4f} (ratio {with_demos / without:.3f})")

    if args.ablation_shards:
        rows = ablation(args.ablation_shards, args.ablation_steps, args, base)
        report["ablation"] = rows
        print(f"(e) delta-CLIP ablation ({args.ablation_steps} steps each)")
        print(f"    {'lambda':8s} {'identity acc':>12s} {'attributes':>10s} {'CLIP-I':>8s}")
        for r in rows:
            print(f"    {r['lambda']:8s} {r['apprentice_identity']:12.3f} {r['apprentice_attributes']:10.3f} {r['apprentice_clip_i']:8.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
