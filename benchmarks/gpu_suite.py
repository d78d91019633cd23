"""The performance rows that need a GPU, in one run (driven by ``benchmarks/gpu_suite.sh``).

Rows (sd15-arch: Stable Diffusion 1.5's architecture with random weights, no hub download):

1. expert, full fine-tuning: ``--expert-steps`` (500) steps at 512 px with prior preservation
   (``--class-images`` class images, generated once and cached, outside the timed region);
2. expert, LoRA rank 4: the same;
3. apprentice time per image against the base model (same steps, demos cached, fp16);
4. time to first image: apprentice (load demos, encode, first image) against expert (train +
   load + first image, from rows 1-2);
5. apprentice training: images/s of ``train_apprentice`` (DeepSpeed, frozen base, 3 demos) and
   its MFU (model FLOPs per image counted with ``torch.utils.flop_counter`` / time / the GPU's
   dense bf16 peak);
6. experts per GPU-hour: 3600 / (expert training + sampling ``--prompts-per-expert`` images),
   one expert at a time per GPU, for full and LoRA;
7. generation throughput: ``benchmarks/generation_throughput.py --in-process`` (the generation
   job's expert code without Ray: per-task experts against one resident worker, LoRA rank 4,
   ``--throughput-clusters`` clusters, ``--throughput-steps`` steps, and the same worker
   training ``--throughput-batch`` experts together (``--expert-batch-size``); the scorer is OpenAI CLIP
   ViT-B/32's architecture with random weights, as the machine has no hub access) - row
   ``resident``;
8. stacked experts, the K sweep (``throughput``): ``generation_throughput.py --expert-batch-size
   --sweep`` (``benchmarks/expert_sweep.py``: one resident worker, LoRA rank 4, one warm-up and
   ``--sweep-batches`` timed batches per K on ``--sweep-batches`` x largest K clusters,
   ``--sweep-steps`` training steps and ``--sweep-sample-steps`` sample steps per expert; the
   defaults are sized for about 6 minutes on one H100 by reasoning from 0.18 s per K = 1 step,
   K = 1's 32 experts being most of it - not yet run on a GPU): steady experts per
   GPU-hour per K and its ratio to K = 1, training steps per second, the 500-step experts per
   GPU-hour that follow, seconds per expert by phase, aten operators per step; the profiler
   trace of one stacked step of K = 1 and of the largest K goes to ``traces/`` beside ``--json``.
9. FLUX (``flux``; ``flux-arch``: FLUX.1-dev's 11.9B transformer, random bf16 weights, built on
   the GPU from its config: no T5 or VAE on the device): ``benchmarks/memory.py --flux-only
   --cuda``'s rows at ``--flux-resolution`` (1024 px: 4096 image + 512 text tokens): the analytic
   peaks, then one measured training step of a LoRA rank 4 expert (batch 1 + 1, gradient
   checkpointing) and of the apprentice with 3 demonstrations (the demos' pass once, then a
   training step; ``--flux-adapter-rank``): peak memory (``max_memory_allocated``) and median
   seconds per step of ``--flux-steps`` steps (``benchmarks/memory_flux.py``). Run first, once
   (not per ``--sdxl`` run); ``tiny-flux`` at 32 px on the CPU under ``--dry-run``.

A row that fails prints ``ROW <name>: error ...`` and the suite goes on with the next one;
``--rows`` picks rows (``flux,experts,apprentice,training,resident,throughput``). The exit status is 1 when
a row failed.

``--dry-run`` runs every row on the CPU with the ``tiny`` preset and tiny sizes (CI).
``--sdxl`` adds the same rows for ``sdxl-arch`` (SDXL base's architecture) at 1024 px with
``--sdxl-expert-steps`` (100) expert steps (``tiny-sdxl`` under ``--dry-run``).
Every row is printed as ``ROW <name>: <values>``, and all rows as JSON at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from suti.checks import whole

# Dense bf16/fp16 tensor-core peaks (FLOP/s) from the vendors' data sheets.
PEAK_FLOPS = {"H100": 989.4e12, "H200": 989.4e12, "GH200": 989.4e12, "A100": 312e12, "L40S": 362.1e12, "L4": 121e12, "A10": 125e12, "V100": 125e12}

ROWS: list[dict] = []


JSON_PATH: Path | None = None


def _number(v: float) -> str:
    """3 decimals, or 3 significant digits below 0.001 (a delta-CLIP difference of 1e-05 is not 0.000)."""
    return f"{v:.3f}" if v == 0 or abs(v) >= 1e-3 else f"{v:.2e}"


def row(name: str, **values) -> None:
    """Print a row and append it to ``--json`` at once (a run cut short keeps its rows)."""
    ROWS.append({"row": name, **values})
    text = ", ".join(f"{k} {_number(v)}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())
    print(f"ROW {name}: {text}", flush=True)
    if JSON_PATH is not None:
        JSON_PATH.write_text(json.dumps(ROWS, indent=2))


def guarded(name: str, fn, *args, default=None):
    """``fn(*args)``; an exception becomes an error row (with its traceback on stderr)."""
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 - a benchmark row must not stop the others
        traceback.print_exc()
        row(name, error=f"{type(exc).__name__}: {str(exc)[:300]}")
        return default


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _photos(folder: Path, size: int, n: int = 4) -> Path:
    from suti.world import export_subject, make_world

    world = make_world(8, seed=123)
    export_subject(world, world.heldout_subjects[0].subject_id, folder, n=n, size=size)
    return folder


def expert_rows(a, work: Path, photos: Path) -> dict:
    """Rows 1-2: a full and a LoRA expert with prior preservation; returns their timings."""
    from experts import load_expert, resolve_config
    from experts.data import ensure_class_images
    from experts.identifier import fill_prompt
    from experts.train import train_expert
    from suti.models import default_device, load_pipeline

    device = default_device()
    out = {}
    for kind, rank in (("full", 0), ("lora", 4)):
        config = resolve_config("dreambooth", dict(model=a.model, instance_dir=str(photos), class_noun="toy", steps=a.expert_steps, lora_rank=rank,
                                                    resolution=a.resolution, num_class_images=a.class_images, prior_preservation=True,
                                                    class_sample_steps=a.sample_steps))
        if kind == "full":  # class images are cached on disk and shared by both experts: made once, untimed
            started = time.perf_counter()
            base = load_pipeline(a.model, device=device)
            ensure_class_images(base, a.model, fill_prompt(config.class_prompt, "", "toy"), a.class_images, a.resolution, config.seed, config.class_sample_steps)
            del base
            row("class images (untimed in the expert rows)", images=a.class_images, seconds=round(time.perf_counter() - started, 2))
        sync()
        started = time.perf_counter()
        info = train_expert(config, work / f"expert-{kind}", progress=False)
        sync()
        trained = time.perf_counter() - started
        pipe = load_expert(work / f"expert-{kind}", device=device, torch_dtype=torch.float16 if device == "cuda" else None)
        pipe.set_progress_bar_config(disable=True)
        prompt = info.prompt("a {V} {class} on the beach")
        first = time.perf_counter()
        pipe(prompt, height=a.resolution, width=a.resolution, num_inference_steps=a.sample_steps, generator=torch.Generator().manual_seed(0))
        sync()
        to_first = time.perf_counter() - started
        per_image = _time_images(lambda s: pipe(prompt, height=a.resolution, width=a.resolution, num_inference_steps=a.sample_steps, generator=torch.Generator().manual_seed(s)), a.timed_images)
        out[kind] = {"train_s": trained, "time_to_first_image_s": to_first, "sample_s": per_image, "load_and_first_s": time.perf_counter() - first}
        row(f"expert {kind} ({a.preset}, {a.resolution} px, {a.expert_steps} steps, prior preservation {a.class_images} class images)",
            train_s=round(trained, 2), steps_per_s=round(a.expert_steps / max(info.train_seconds, 1e-9), 3), time_to_first_image_s=round(to_first, 2))
        del pipe
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return out


def _time_images(fn, n: int) -> float:
    fn(10_000)  # warm-up
    sync()
    started = time.perf_counter()
    for i in range(n):
        fn(i)
    sync()
    return (time.perf_counter() - started) / n


def _time_interleaved(fns: dict, n: int) -> dict[str, list[float]]:
    """Seconds per call of each ``fns[name](seed)``, ``n`` rounds of one call each, the order
    rotating every round (after one warm-up each), so clock ramps and background load fall on
    every method alike; compare medians (a back-to-back block per method let the first block's
    warm-up decide the ratio: 0.76 to 1.69 between two H200 runs)."""
    for fn in fns.values():
        fn(10_000)
    sync()
    names, times = list(fns), {name: [] for name in fns}
    for i in range(n):
        for name in names[i % len(names):] + names[: i % len(names)]:
            started = time.perf_counter()
            fns[name](i)
            sync()
            times[name].append(time.perf_counter() - started)
    return times


def apprentice_rows(a, work: Path, photos: Path, experts: dict) -> None:
    """Rows 3-4: apprentice vs base time per image, and time to first image vs the experts."""
    from PIL import Image

    from apprentice import ApprenticePipeline
    from suti.models import default_device, load_pipeline

    device = default_device()
    dtype = torch.float16 if device == "cuda" else torch.float32
    folder = work / "apprentice"
    ApprenticePipeline.from_base(load_pipeline(a.model)).save_pretrained(str(folder), safe_serialization=True)
    res, steps = a.resolution, a.sample_steps
    prompt = "a toy on the beach"
    base = load_pipeline(a.model, device=device, torch_dtype=dtype)
    base.set_progress_bar_config(disable=True)
    base(prompt, height=res, width=res, num_inference_steps=steps, generator=torch.Generator().manual_seed(0))  # a warm process: the U-Net's kernels chosen
    from apprentice.sample import load_apprentice

    sync()
    started = time.perf_counter()
    app = load_apprentice(str(folder), device=device, dtype="fp16" if device == "cuda" else "fp32")
    demos = [Image.open(p).convert("RGB") for p in sorted(photos.glob("*.png"))[:3]]
    ctx = app.encode_demonstrations(demos)
    app(prompt, demo_context=ctx, num_inference_steps=steps, height=res, width=res, generator=torch.Generator().manual_seed(0))
    sync()
    app_first = time.perf_counter() - started
    fns = {"base": lambda s: base(prompt, height=res, width=res, num_inference_steps=steps, generator=torch.Generator().manual_seed(s))}
    for scale in (2.0, 1.0):  # 3 and 2 guidance branches (text + demos, or one scale for both)
        fns[scale] = lambda s, scale=scale: app(prompt, demo_context=ctx, num_inference_steps=steps, demo_guidance_scale=scale, height=res, width=res, generator=torch.Generator().manual_seed(s))
    times = _time_interleaved(fns, a.timed_images)
    t_base = statistics.median(times["base"])
    for scale, branches in ((2.0, 3), (1.0, 2)):
        t_app = statistics.median(times[scale])
        row(f"apprentice time per image vs base ({a.preset}, {branches} guidance branches, {steps} steps, {res} px, {str(dtype).split('.')[-1]}, median of {a.timed_images} interleaved)",
            apprentice_s=round(t_app, 3), base_s=round(t_base, 3), ratio=round(t_app / t_base, 3),
            apprentice_range_s=[round(min(times[scale]), 3), round(max(times[scale]), 3)], base_range_s=[round(min(times["base"]), 3), round(max(times["base"]), 3)])
    del base
    for kind, e in experts.items():
        row(f"time to first image, apprentice vs expert {kind} ({a.preset})", apprentice_s=round(app_first, 2), expert_s=round(e["time_to_first_image_s"], 2), speedup=round(e["time_to_first_image_s"] / app_first, 1))


def _shards(folder: Path, size: int, n: int) -> Path:
    import numpy as np

    from suti.shards import ShardPacker, jpeg_bytes, sample_members
    from suti.world import caption, make_world, render
    from suti.world.render import Pose
    from suti.world.spec import CONTEXTS

    world = make_world(4, seed=0)
    rng = np.random.default_rng(0)
    packer = ShardPacker(folder, max(1, n // 2))
    contexts = sorted(CONTEXTS)
    for i in range(n):
        s = world.subjects[i % len(world.subjects)]
        demos = [render(s, contexts[(i + j) % len(contexts)], pose=Pose.random(rng), size=size, rng=rng) for j in range(3)]
        ctx = contexts[(i + 5) % len(contexts)]
        key = f"{s.subject_id}_p{i:02d}_s00"
        meta = {"cluster_id": s.subject_id, "prompt": caption(s, ctx), "demo_captions": [caption(s, contexts[0])] * 3, "delta_clip": 0.1}
        packer.add(key, sample_members(key, jpeg_bytes(render(s, ctx, pose=Pose.random(rng), size=size, rng=rng)), [jpeg_bytes(d) for d in demos], meta))
    packer.flush()
    return folder


def model_folder(model: str, work: Path) -> str:
    """A diffusers folder for ``model`` (``bench_models.model_folder``; the build is a row)."""
    from bench_models import model_folder as build

    return build(model, work, log=lambda text: row(text), cached_as_folder=True)


def flops_per_image(folder: str, resolution: int, num_demos: int = 3) -> float:
    """Model FLOPs of one apprentice training example (demo pass + target pass + backward, frozen
    base), counted on the meta device with ``torch.utils.flop_counter.FlopCounterMode``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    from apprentice.adapter import DemoAttentionAdapter

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(Path(folder) / "unet")))
    unet.requires_grad_(False)
    adapter = DemoAttentionAdapter.for_unet(unet, init_from_self_attention=False)
    adapter.install(unet)
    latent = resolution // 2 ** (len(AutoencoderKL.load_config(str(Path(folder) / "vae"))["block_out_channels"]) - 1)
    dim = unet.config.cross_attention_dim
    demos = torch.empty(1, num_demos, 4, latent, latent, device="meta")
    emb = torch.empty(1, 77, dim, device="meta")

    def added(batch: int):  # SDXL's text_time add_embeds: pooled text embeddings + 6 time ids
        if unet.config.addition_embed_type != "text_time":
            return None
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        return {"text_embeds": torch.empty(batch, pooled, device="meta"), "time_ids": torch.empty(batch, 6, device="meta")}

    extra = {} if added(1) is None else {"added_cond_kwargs": added(1)}
    with FlopCounterMode(display=False) as counter:
        ctx = adapter.encode_demos(unet, demos, torch.empty(1, num_demos, 77, dim, device="meta"), added_cond_kwargs=added(num_demos))
        out = unet(torch.empty(1, 4, latent, latent, device="meta"), torch.tensor([500], device="meta"), emb, cross_attention_kwargs={"demo": ctx}, **extra).sample
        out.float().pow(2).mean().backward()
    return float(counter.get_total_flops())


def apprentice_training_row(a, work: Path) -> None:
    """Row 5: images/s of the real trainer (DeepSpeed, frozen base) and its MFU."""
    from apprentice.train import ApprenticeTrainConfig, train_apprentice

    shards = _shards(work / "shards", min(a.resolution, 256), max(8, a.train_batch * 2))
    steps = a.train_steps
    config = ApprenticeTrainConfig(shards=str(shards / "*.tar"), output=str(work / "app-train"), model=a.model, steps=steps, batch_size=a.train_batch,
                                   freeze_base=True, num_demos=3, save_steps=0, resolution=a.resolution)
    sync()
    started = time.perf_counter()
    train_apprentice(config, progress=False)
    sync()
    seconds = time.perf_counter() - started
    info = json.loads((work / "app-train" / "training.json").read_text())
    loop_s = float(info.get("seconds") or seconds)  # the training loop alone (train.py's clock)
    images_s = steps * a.train_batch / loop_s
    flops = flops_per_image(a.model, a.resolution)
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    if a.peak_tflops:
        peak = a.peak_tflops * 1e12
    mfu = images_s * flops / peak if peak else float("nan")
    row(f"apprentice training ({a.preset}, {a.resolution} px, frozen base, 3 demos, batch {a.train_batch}, {steps} steps)",
        images_per_s=round(images_s, 3), tflop_per_image=round(flops / 1e12, 4), mfu=round(mfu, 4) if peak else "n/a (unknown peak; pass --peak-tflops)",
        device=name, wall_s=round(seconds, 2))


def experts_per_hour_rows(a, experts: dict) -> None:
    """Row 6: experts per GPU-hour, one expert at a time, with ``--prompts-per-expert`` samples."""
    for kind, e in experts.items():
        per_expert = e["train_s"] + a.prompts_per_expert * e["sample_s"]
        row(f"experts per GPU-hour, {kind} ({a.preset}, {a.expert_steps} steps + {a.prompts_per_expert} samples each)", experts_per_hour=round(3600 / per_expert, 2), seconds_per_expert=round(per_expert, 2))


def _run_json(cmd: list[str]) -> dict:
    """Run a benchmark script, echo its output, and return the JSON of its last line.

    Raises:
        RuntimeError: the script failed (its exit status and the end of its stderr).
    """
    import subprocess

    print("$ " + " ".join(cmd), flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True)
    sys.stdout.write(done.stdout)
    if done.returncode != 0:
        raise RuntimeError(f"exit {done.returncode}: {done.stderr.strip()[-600:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def sweep_row(a) -> None:
    """Row 8: the stacked-expert K sweep (generation_throughput.py --expert-batch-size 1,2,...)."""
    world = a.preset in ("tiny", "toy", "tiny-sdxl")
    traces = (Path(a.json).parent if a.json else Path.cwd()) / "traces"
    cmd = [sys.executable, str(Path(__file__).with_name("generation_throughput.py")), "--model", a.preset if world else a.model, "--lora-rank", "4",
           "--clusters", "1", "--steps", str(a.sweep_steps), "--sample-steps", str(a.sweep_sample_steps),  # raised to --sweep-batches x largest K by the benchmark
           "--prompts", "2", "--device", "cuda" if torch.cuda.is_available() else "cpu", "--threads", "8" if torch.cuda.is_available() else "1",
           "--expert-batch-size", a.sweep, "--steady-batches", str(a.sweep_batches), "--trace", str(traces)]
    if not world:
        cmd.append("--random-clip")
    r = _run_json(cmd)
    for k, values in r["rows"].items():
        row(f"stacked experts K={k}, LoRA rank 4 ({a.preset}, {a.sweep_steps} steps, 2 prompts x {a.sweep_sample_steps} sample steps)", **values, traces=str(traces))


def throughput_row(a) -> None:
    """Row 7: resident worker vs per-task experts, in process (generation_throughput.py)."""
    world = a.preset in ("tiny", "toy", "tiny-sdxl")  # their own toy scorer; else the folder built once, and a random OpenAI CLIP
    cmd = [sys.executable, str(Path(__file__).with_name("generation_throughput.py")), "--in-process", "--model", a.preset if world else a.model, "--lora-rank", "4",
           "--clusters", str(a.throughput_clusters), "--steps", str(a.throughput_steps), "--sample-steps", str(a.sample_steps), "--prompts", "2",
           "--device", "cuda" if torch.cuda.is_available() else "cpu", "--threads", "8" if torch.cuda.is_available() else "1", "--expert-batch-size", str(a.throughput_batch)]
    if not world:
        cmd.append("--random-clip")
    r = _run_json(cmd)
    unit = "per_gpu_hour" if torch.cuda.is_available() else "per_hour"
    row(f"generation throughput, LoRA rank 4 ({a.preset}, {a.throughput_steps} steps, 2 prompts x {a.sample_steps} sample steps, in process)",
        **{f"resident_{unit}": round(r["resident_1"][0], 1), f"per_task_{unit}": round(r["per_task_1"][0], 1), "ratio_steady": round(r["resident_vs_per_task"], 3),
           "ratio_end_to_end": round(r["resident_vs_per_task_end_to_end"], 3), "resident_load_s": r["resident_load_s"], "resident_s": r["resident_s"],
           "per_task_s": r["per_task_s"], "identical_samples": r["identical_samples"], "resident_max_delta_clip_diff": r["resident_max_delta_clip_diff"],
           **({f"batched_{a.throughput_batch}_{unit}": round(r["resident_batched"][0], 1), "batched_ratio_steady": round(r["batched_vs_per_task"], 3), "batched_max_delta_clip_diff": r["batched_max_delta_clip_diff"]}
              if "resident_batched" in r else {})})


def flux_rows(a) -> None:
    """Row 9: memory.py's FLUX rows (analytic, then measured on this device), each guarded."""
    model, res, text = ("tiny-flux", 32, 8) if a.dry_run else ("flux-arch", a.flux_resolution, 512)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(1)  # as the other rows' CPU runs (--threads 1): tiny models, threads only contend
    try:
        _flux_rows(a, model, res, text, device)
    finally:
        torch.set_num_threads(threads)


def _flux_rows(a, model: str, res: int, text: int, device: str) -> None:
    from memory_flux import analytic_flux, measured_flux_apprentice, measured_flux_expert

    for r in guarded(f"flux memory, analytic ({model})", analytic_flux, res, 3, 4, a.flux_adapter_rank, text, model, default=[]):
        row(f"flux memory, analytic: {r['case']}", **{k: v for k, v in r.items() if k not in ("case", "note")})
    for name, fn, args in (("flux expert training step", measured_flux_expert, (device, model, res, 4, text, 1, a.flux_steps)),
                           ("flux apprentice training step", measured_flux_apprentice, (device, model, res, 3, a.flux_adapter_rank, text, a.flux_steps))):
        r = guarded(f"{name} ({model})", fn, *args)
        if r:
            row(r.pop("case"), **r)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="tiny preset and sizes on the CPU (every row, in seconds)")
    p.add_argument("--model", default="sd15-arch")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--expert-steps", type=int, default=500)
    p.add_argument("--class-images", type=int, default=20)
    p.add_argument("--sample-steps", type=int, default=25)
    p.add_argument("--timed-images", type=int, default=3)
    p.add_argument("--train-steps", type=int, default=20)
    p.add_argument("--train-batch", type=int, default=4)
    p.add_argument("--prompts-per-expert", type=int, default=4)
    p.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, when not in the built-in table")
    p.add_argument("--sdxl", action="store_true", help="also run every row for sdxl-arch at 1024 px (tiny-sdxl with --dry-run)")
    p.add_argument("--sdxl-expert-steps", type=int, default=100)
    p.add_argument("--throughput-clusters", type=int, default=3)
    p.add_argument("--throughput-steps", type=int, default=100)
    p.add_argument("--throughput-batch", type=int, default=4, help="row 7 also times a resident worker training this many LoRA experts together (1: not)")
    p.add_argument("--sweep", default="1,2,4,8", help="row 8: the K values of the stacked-expert sweep")
    p.add_argument("--sweep-batches", type=whole(1), default=4, help="row 8: timed batches at the largest K (after one warm-up batch per K)")
    p.add_argument("--sweep-steps", type=whole(1), default=16, help="row 8: training steps per expert (steps/s give the 500-step figures)")
    p.add_argument("--sweep-sample-steps", type=whole(1), default=10, help="row 8: sample steps per candidate")
    p.add_argument("--flux-resolution", type=whole(16, 4096), default=1024, help="row 9: resolution of the flux-arch rows (a multiple of 16)")
    p.add_argument("--flux-adapter-rank", type=whole(0, 3072), default=0, help="row 9: the FLUX apprentice's adapter, 0 full dim x dim projections, else rank-r factors")
    p.add_argument("--flux-steps", type=whole(1, 100), default=2, help="row 9: timed training steps (after one warm-up step)")
    p.add_argument("--rows", default="flux,experts,apprentice,training,resident,throughput",
                   help="comma-separated, run in this order (flux first, once): flux,experts,apprentice,training,resident,throughput")
    p.add_argument("--json", help="write the rows here (after every row)")
    a = p.parse_args(argv)
    global JSON_PATH
    JSON_PATH = Path(a.json) if a.json else None
    wanted = set(a.rows.split(","))
    known = {"flux", "experts", "apprentice", "training", "resident", "throughput"}
    if wanted - known:
        p.error(f"--rows: unknown {sorted(wanted - known)}")
    if a.flux_resolution % 16:
        p.error(f"--flux-resolution must be a multiple of 16 (2x2 patches of the 8x latent), got {a.flux_resolution}")
    if a.dry_run:
        a.model, a.resolution, a.expert_steps, a.class_images, a.sample_steps = "tiny", 32, 2, 2, 2
        a.timed_images, a.train_steps, a.train_batch, a.prompts_per_expert = 1, 2, 2, 1
        a.throughput_clusters, a.throughput_steps, a.sweep, a.sweep_batches, a.sweep_steps, a.sweep_sample_steps = 2, 2, "1,2", 1, 2, 2
        a.flux_steps = 1
    elif not torch.cuda.is_available():
        print("warning: no CUDA device; the rows measure the CPU (use --dry-run for a quick check)", flush=True)
    started = time.perf_counter()
    runs = [a]
    if a.sdxl:
        sdxl = argparse.Namespace(**vars(a))
        sdxl.model = "tiny-sdxl" if a.dry_run else "sdxl-arch"
        if not a.dry_run:
            sdxl.resolution, sdxl.expert_steps, sdxl.train_batch = 1024, a.sdxl_expert_steps, 1
        runs.append(sdxl)
    if "flux" in wanted:
        flux_rows(a)
    others = [name for name in a.rows.split(",") if name != "flux"]
    for run in runs if others else []:
        with tempfile.TemporaryDirectory(prefix="suti-gpu-suite-") as tmp:
            work = Path(tmp)
            photos = _photos(work / "photos", run.resolution)
            run.preset, run.model = run.model, model_folder(run.model, work)
            experts: dict = {}
            for name in others:  # in the order asked
                if name == "experts":
                    experts = guarded(f"experts ({run.preset})", expert_rows, run, work, photos, default={})
                    experts_per_hour_rows(run, experts)
                elif name == "apprentice":
                    guarded(f"apprentice sampling ({run.preset})", apprentice_rows, run, work, photos, experts)
                elif name == "training":
                    guarded(f"apprentice training ({run.preset})", apprentice_training_row, run, work)
                elif name == "resident":
                    guarded(f"generation throughput ({run.preset})", throughput_row, run)
                elif name == "throughput":
                    guarded(f"stacked experts ({run.preset})", sweep_row, run)
    print(f"suite finished in {time.perf_counter() - started:.1f} s")
    print(json.dumps(ROWS))
    return 1 if any("error" in r for r in ROWS) else 0


if __name__ == "__main__":
    raise SystemExit(main())
