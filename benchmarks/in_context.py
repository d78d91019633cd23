"""In-context apprentice vs DreamBooth expert vs base model on held-out toy-world subjects.

One run measures, on the same held-out subjects, prompts and seeds (:mod:`orchestration.compare`):

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

``--eval fixed`` runs the fixed evaluation instead (:mod:`orchestration.fixed_eval`): 24 held-out
subjects (all six classes) x 4 class-only prompts (re-contextualisation, accessory, colour edit,
style) x 2 seeds, for the apprentice with 3 demos, the base (class noun), an 800-step DreamBooth
expert, training-free reference attention (:mod:`apprentice.reference`) and the apprentice with
1 and 5 demos; per method the probe's identity-attribute score, exact identity and per-attribute
accuracy, CLIP-I to the demos and CLIP-T to the prompt, the share of the base->expert gap closed
with a paired bootstrap 95% interval over subjects, and the held-out denoising loss with and
without 3 demos under class-only prompts, beside the experts' loss ("a [V] <class>") against the
base's ("a <class>") on the same photos, noise and timesteps (the DreamBooth reference of that
ratio), and that loss per timestep beside two oracles (the target itself among the demos; its
full alt text instead of demos: :func:`apprentice.evaluate.heldout_loss_by_timestep`).
``--demo-guidance-scale`` and ``--apprentice-guidance-scale`` set the apprentice's guidance
(the demonstration scale trades subject fidelity for prompt fidelity: docs/results.md, "Demonstration guidance sweep").
Base, expert and reference images (and the experts)
are cached in ``--work-dir`` (default ``runs/fixed-eval``), so a rerun costs only the apprentice.
With ``--ablation-shards`` it also runs the delta-CLIP ablation on the fixed evaluation: one
apprentice per lambda in (none, 0, 0.01, 0.02, 0.03) trained on the same shards
(``--ablation-steps``, class-only prompts and demonstration captions), each scored by its
apprentice-3 rows (mean with a bootstrap 95% interval over subjects, and the share of the
base->expert gap closed).

Usage::

    python benchmarks/in_context.py [--apprentice toy] [--subjects 3] [--expert-steps 200]
    python benchmarks/in_context.py --ablation-shards runs/ablation/shards --ablation-steps 600
    python benchmarks/in_context.py --eval fixed [--subjects 24] [--json runs/fixed-eval/fixed.json]
    python benchmarks/in_context.py --eval fixed --methods base,expert --ablation-shards "runs/ablation/shards/shard-*.tar" --self-target 0
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

from suti.sampling import DEFAULT_DEMO_GUIDANCE_SCALE  # noqa: E402


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
    from orchestration.compare import compare_on_world, mean_metrics
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


FIXED_LAMBDAS = (None, 0.0, 0.01, 0.02, 0.03)


def fixed_ablation(args, base, config) -> list[dict]:
    """The delta-CLIP ablation on the fixed evaluation: per lambda of :data:`FIXED_LAMBDAS`, an
    apprentice trained on ``--ablation-shards`` filtered at that lambda (cached in
    ``WORK/ablation/lambda-<name>``), scored by its apprentice-3 rows; base and expert rows come
    from the fixed evaluation's cache. Returns one row per lambda: training samples kept, mean
    attributes and CLIP-I with bootstrap 95% intervals, and the gap closed with its interval."""
    import dataclasses

    from orchestration.compare import bootstrap_mean
    from apprentice.data import make_pipeline
    from orchestration.fixed_eval import run_fixed_eval
    from apprentice.sample import load_apprentice
    from apprentice.train import ApprenticeTrainConfig, train_apprentice

    work = Path(args.work_dir or "runs/fixed-eval")
    methods = ("apprentice-3",) + tuple(m for m in ("base", "expert") if m in config.methods)
    rows = []
    for lam in FIXED_LAMBDAS:
        name = "none" if lam is None else f"{lam:g}"
        out = work / "ablation" / f"lambda-{name}"
        kept = sum(1 for _ in make_pipeline(args.ablation_shards, resolution=32, repeat=False, min_delta_clip=lam))
        if not (out / "model_index.json").is_file():
            train = ApprenticeTrainConfig(shards=args.ablation_shards, output=str(out), model=args.model, steps=args.ablation_steps, batch_size=8, learning_rate=1e-3,
                                          freeze_base=True, min_delta_clip=lam, self_target=args.self_target, caption_prompt=0.0, demo_caption=0.0,
                                          save_steps=args.ablation_steps, seed=args.seed)
            train_apprentice(train, overwrite=True, progress=False)
        result = run_fixed_eval(load_apprentice(str(out)), base, work, dataclasses.replace(config, methods=methods), progress=lambda line: None)
        per = [r["apprentice-3"] for r in result["subjects"]]
        row = {"lambda": name, "samples": kept, "steps": args.ablation_steps,
               "attributes": bootstrap_mean([p["attributes"] for p in per]), "clip_i": bootstrap_mean([p["clip_i"] for p in per])}
        if result["gap_closed"]:
            row["gap_closed"] = {k: result["gap_closed"]["apprentice-3"][k] for k in ("attributes", "clip_i")}
        rows.append(row)
        print(f"    lambda {name:5s}: {kept:4d} samples, attributes {_interval(row['attributes'])}, CLIP-I {_interval(row['clip_i'], 3)}"
              + (f", gap closed {_interval(row['gap_closed']['attributes'])} / {_interval(row['gap_closed']['clip_i'])}" if "gap_closed" in row else ""), flush=True)
    return rows


def _interval(g: dict, digits: int = 2) -> str:
    """``0.42 [0.10, 0.70]`` (``n/a`` for a degenerate gap)."""
    if g["point"] != g["point"]:
        return "n/a (no gap)"
    ci = "[n/a]" if g["low"] != g["low"] else f"[{g['low']:.{digits}f}, {g['high']:.{digits}f}]"
    return f"{g['point']:.{digits}f} {ci}"


def fixed_expert_loss(config, work: Path, base, *, seed: int) -> tuple[float, float]:
    """(expert, base) held-out loss of the fixed evaluation's experts (cached; one loaded at a
    time) on the photos of the apprentice's class-only loss (:func:`apprentice.evaluate.heldout_expert_loss`)."""
    from apprentice.evaluate import heldout_expert_loss
    from orchestration.fixed_eval import ensure_expert, fixed_subjects, subject_photos
    from experts import load_expert
    from experts.expert import ExpertInfo

    world, subjects = fixed_subjects(config.num_subjects)

    def expert(i: int):
        folder, _ = ensure_expert(subjects[i], subject_photos(world, subjects[i], work, config.seed), work, config)
        return load_expert(folder), ExpertInfo.read(folder).identifier

    return heldout_expert_loss(base, expert, subjects, seed=seed)


def fixed(args) -> int:
    """``--eval fixed``: the fixed evaluation table (see the module docstring)."""
    from apprentice.evaluate import LOSS_CONDITIONS, heldout_demo_loss, heldout_loss_by_timestep
    from orchestration.fixed_eval import METHODS, TABLE_METRICS, FixedEvalConfig, fixed_subjects, run_fixed_eval
    from apprentice.sample import load_apprentice
    from experts import load_pipeline
    from suti.world.probe import IDENTITY_ATTRS

    methods = tuple(args.methods.split(",")) if args.methods else METHODS
    config = FixedEvalConfig(num_subjects=args.subjects or 24, seeds=args.seeds, model=args.model,
                             expert_steps=args.expert_steps or 800, num_class_images=args.class_images,
                             sample_steps=args.steps, seed=args.seed, methods=methods, demo_guidance_scale=args.demo_guidance_scale,
                             apprentice_guidance_scale=args.apprentice_guidance_scale,
                             cache_apprentice=not args.no_apprentice_cache)
    config.validate()
    work = Path(args.work_dir or "runs/fixed-eval")
    started = time.perf_counter()
    app = load_apprentice(args.apprentice) if any(m.startswith("apprentice") for m in methods) else None
    base = load_pipeline(args.model)
    base.set_progress_bar_config(disable=True)
    result = run_fixed_eval(app, base, work, config, progress=lambda line: print(line, flush=True))
    n = len(result["subjects"])
    print(f"\nfixed evaluation: {n} held-out subjects ({len({r['class_name'] for r in result['subjects']})} classes) x 4 class-only prompts x {config.seeds} seeds; "
          f"expert: dreambooth {config.expert_steps} steps ({config.num_class_images} class images); {config.sample_steps} sampler steps, guidance {config.guidance_scale:g}, demo guidance {config.demo_guidance_scale:g}")
    print(f"    {'method':13s} {'attributes':>10s} {'identity':>9s} {'CLIP-I':>7s} {'CLIP-T':>7s} {'prompt':>7s} {'wall s':>8s} {'CPU s':>8s} {'images new/cached':>18s}")
    for m in methods:
        a, st = result["mean"][m], result["stats"][m]
        print(f"    {m:13s} {a['attributes']:10.3f} {a['identity']:9.3f} {a['clip_i']:7.3f} {a['clip_t']:7.3f} {a['prompt']:7.3f} {result['seconds'][m]:8.1f} {result['cpu_seconds'][m]:8.1f} {st.get('generated', 0):>9d}/{st.get('cached', 0):<8d}")
    if result["gap_closed"]:
        print(f"  share of the base->expert gap closed, paired bootstrap 95% interval over {n} subjects")
        print(f"    {'method':13s} " + " ".join(f"{k:>20s}" for k in TABLE_METRICS))
        for m in methods:
            if m not in ("base", "expert"):
                print(f"    {m:13s} " + " ".join(f"{_interval(result['gap_closed'][m][k]):>20s}" for k in TABLE_METRICS))
    print("  probe per attribute: " + ", ".join(IDENTITY_ATTRS))
    for m in methods:
        print(f"    {m:13s} " + " ".join(f"{result['mean'][m]['attr_' + a]:6.3f}" for a in IDENTITY_ATTRS))
    report = {"settings": {k: v for k, v in vars(args).items() if k != "json"}, "fixed": result}
    loss_s = loss_cpu = 0.0
    if app is not None and not args.no_loss:
        t0, c0 = time.perf_counter(), time.process_time()
        _, subjects = fixed_subjects(config.num_subjects)
        with_demos, without = heldout_demo_loss(app, subjects=subjects, seed=args.seed, prompt_mode="class")
        loss_s, loss_cpu = time.perf_counter() - t0, time.process_time() - c0
        report["loss_class_prompts"] = {"with_demos": with_demos, "without_demos": without, "ratio": with_demos / without, "seconds": round(loss_s, 1), "cpu_seconds": round(loss_cpu, 1)}
        print(f"  held-out denoising loss, class-only prompts ({n} subjects x 4 other photos x 4 draws): with 3 demos {with_demos:.4f}, "
              f"without {without:.4f}, ratio {with_demos / without:.3f} ({loss_s:.1f} s)")
        t0, c0 = time.perf_counter(), time.process_time()
        by_t = heldout_loss_by_timestep(app, subjects, seed=args.seed)
        report["loss_by_timestep"] = by_t
        loss_s, loss_cpu = loss_s + time.perf_counter() - t0, loss_cpu + time.process_time() - c0
        print(f"  the same per timestep ({n} subjects x 2 other photos, one noise each), over the class-only loss without demos; "
              "copy: the target itself among the demos, caption: its full alt text instead of demos")
        print(f"    {'t':>5s} {'without':>8s} " + " ".join(f"{c:>8s}" for c in LOSS_CONDITIONS[1:]))
        for j, t in enumerate(by_t["timesteps"]):
            w = by_t["loss"]["without"][j]
            print(f"    {t:>5d} {w:8.4f} " + " ".join(f"{by_t['loss'][c][j] / w:8.3f}" for c in LOSS_CONDITIONS[1:]))
        w = by_t["mean"]["without"]
        print(f"    {'mean':>5s} {w:8.4f} " + " ".join(f"{by_t['mean'][c] / w:8.3f}" for c in LOSS_CONDITIONS[1:]))
    if "expert" in methods and not args.no_loss:
        expert_loss, base_loss = fixed_expert_loss(config, work, base, seed=args.seed)
        report["expert_loss_class_prompts"] = {"expert": expert_loss, "base": base_loss, "ratio": expert_loss / base_loss}
        print(f"  the same photos, noise and timesteps for the DreamBooth experts (\"a [V] <class>\") against the base (\"a <class>\"): "
              f"expert {expert_loss:.4f}, base {base_loss:.4f}, ratio {expert_loss / base_loss:.3f}")
    if args.ablation_shards:
        print(f"  delta-CLIP ablation on the fixed evaluation ({args.ablation_steps} steps each, --self-target {args.self_target:g}): apprentice-3 rows, "
              "mean [bootstrap 95% interval over subjects]")
        report["ablation"] = fixed_ablation(args, base, config)
    app_s = sum(result["seconds"][m] for m in methods if m.startswith("apprentice")) + loss_s
    app_cpu = sum(result["cpu_seconds"][m] for m in methods if m.startswith("apprentice")) + loss_cpu
    report["apprentice_seconds"], report["apprentice_cpu_seconds"] = round(app_s, 1), round(app_cpu, 1)
    scale = f" (-> {app_s / n * 24 / 60:.1f} / {app_cpu / n * 24 / 60:.1f} min for 24)" if n != 24 else ""
    print(f"  apprentice rows (all apprentice methods + the loss): {app_s:.0f} s wall, {app_cpu:.0f} s CPU for {n} subjects{scale}; "
          f"whole run {time.perf_counter() - started:.0f} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--eval", choices=("query", "fixed"), default="query", help="query: the 3-subject comparison (a)-(e); fixed: the fixed evaluation")
    p.add_argument("--apprentice", default="toy", help='apprentice folder or "toy"')
    p.add_argument("--model", default="toy", help="base model preset of the apprentice and the experts")
    p.add_argument("--subjects", type=int, default=None, help="held-out world subjects (query: 3, fixed: 24)")
    p.add_argument("--loss-subjects", type=int, default=12, help="held-out world subjects of (d) (4 target photos each)")
    p.add_argument("--expert-steps", type=int, default=None, help="DreamBooth steps of each expert (query: 200, fixed: 800, the recipe's)")
    p.add_argument("--steps", "--sample-steps", type=int, default=25, help="denoising steps of every sampler")
    p.add_argument("--seeds", type=int, default=2, help="fixed: seeds per prompt")
    p.add_argument("--class-images", type=int, default=8, help="fixed: prior-preservation images of each expert")
    p.add_argument("--methods", default=None, help="fixed: comma-separated subset of apprentice-3,base,expert,reference,apprentice-1,apprentice-5")
    p.add_argument("--demo-guidance-scale", type=float, default=DEFAULT_DEMO_GUIDANCE_SCALE, help="fixed: the apprentice's demonstration guidance s_demo (1: two guidance branches, as the base)")
    p.add_argument("--apprentice-guidance-scale", type=float, default=None, help="fixed: the apprentice's text guidance (default: the other methods' 5)")
    p.add_argument("--no-loss", action="store_true", help="fixed: skip the class-only held-out loss")
    p.add_argument("--no-apprentice-cache", action="store_true", help="fixed: regenerate the apprentice's images even when cached for the same weights (to time them)")
    p.add_argument("--repeats", type=int, default=5, help="timed images per method for (c)")
    p.add_argument("--seed", type=int, default=None, help="photo/expert seed (query: 7, fixed: 0)")
    p.add_argument("--work-dir", help="folder for photos, experts, cached images and ablation apprentices (query: a temp folder; fixed: runs/fixed-eval)")
    p.add_argument("--ablation-shards", help="shards from `suti generate --no-filter` for the lambda ablation")
    p.add_argument("--ablation-steps", type=int, default=600)
    p.add_argument("--self-target", type=float, default=0.5, help="--self-target of the ablation apprentices")
    p.add_argument("--json", help="also write the numbers to this file")
    args = p.parse_args(argv)
    if args.eval == "fixed":
        if args.subjects is not None and args.subjects < 1:
            p.error("--subjects must be at least 1")
        args.seed = 0 if args.seed is None else args.seed
        from suti.errors import InputError

        try:
            return fixed(args)
        except InputError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    args.seed = 7 if args.seed is None else args.seed
    args.subjects = args.subjects or 3
    args.expert_steps = args.expert_steps or 200

    from orchestration.compare import compare_on_world, mean_metrics
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
