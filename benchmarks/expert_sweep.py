"""Stacked multi-LoRA experts: a K sweep that reaches a steady state (issue 32).

One resident expert worker (``generation.resident.ResidentExpertWorker``, no Ray) trains the same
clusters in batches of K stacked LoRA experts (``run_batch``: train together, sample in shared
pipeline calls, score), for every K asked. For each K it reports:

* steady experts per hour: the batches after a warm-up batch per K (which warms caches and, for
  K = 1 and the largest K, runs under the profiler), ``3600 * experts / seconds``; and the ratio
  to K = 1.
  The steady batches run in rounds, every K once per round on the same clusters, so that a
  shared machine's drift in speed falls on every K alike;
* the seconds per expert in each phase: the training steps' data, forward, backward and
  optimizer (the device is synchronised between them), sampling, scoring, and setup (the rest:
  configs, adapters, cached latents, saving and restoring);
* training steps per second (per expert, and of the whole batch), and the experts per hour
  at the recipe's 500 steps that follow from them and the rest of each expert's time;
* the aten operators of one training step (``torch.profiler``; K = 1 and the largest K), and,
  with ``--trace DIR``, that step's Chrome trace.

The one worker gets every core the process may use (``--threads`` overrides), as a GPU worker
has its whole GPU. Run through ``benchmarks/generation_throughput.py --expert-batch-size 1,2,4,8``::

    python benchmarks/generation_throughput.py --model toy --lora-rank 4 --steps 60 --clusters 32 --expert-batch-size 1,2,4,8
"""

from __future__ import annotations

import json
import time
from pathlib import Path

PHASES = ("data", "forward", "backward", "optimizer", "sampling", "scoring", "setup")  # setup: the rest (configs, adapters, cached latents, saving, restoring)


def profiler_schedule(steps: int) -> dict | None:
    """``torch.profiler.schedule`` arguments that record exactly one training step of a batch of
    ``steps``: the third (one step skipped, one of warm-up), or the second of two (a recording
    that outlived the training steps would count sampling and scoring too). ``None`` for one
    step: a recording of the first step would start with the batch's set-up."""
    if steps < 2:
        return None
    return {"wait": 1 if steps >= 3 else 0, "warmup": 1, "active": 1, "repeat": 1}


def _profiled_ops(worker, group, demos, trace: Path | None, k: int, schedule_arguments: dict) -> int:
    """Run one batch with ``torch.profiler`` recording one of its training steps
    (``schedule_arguments``: :func:`profiler_schedule`); return the aten operators of that step,
    and write its trace to ``trace`` when given."""
    import torch

    schedule = torch.profiler.schedule(**schedule_arguments)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with torch.profiler.profile(activities=activities, schedule=schedule) as prof:
        _check(worker.run_batch(group, demos, on_step=prof.step))
    ops = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))
    if trace is not None:
        trace.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace / f"stacked_step_k{k}.json"))
    return ops


def _check(results: list) -> None:
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        raise SystemExit(f"an expert of the sweep failed: {errors[0]!r}")


def clusters_needed(sizes: list[int], steady_batches: int) -> int:
    """Clusters the sweep needs: ``steady_batches`` full batches at the largest K (the warm-up
    batches rerun the first of them)."""
    return steady_batches * max(sizes)


def sweep(worker, rows: list[dict], demos: dict, sizes: list[int], *, steps: int, steady_batches: int = 4, trace: Path | None = None, profile: bool = True) -> dict:
    """The K sweep on ``worker``: for each K, one warm-up batch (the first K clusters, not
    timed; profiled for the smallest and the largest K); then ``steady_batches`` rounds, each of
    which runs the round's ``max(sizes)`` clusters once per K, in as many whole batches of K as
    fit, timed per K. Every K whose multiples reach the largest (1, 2, 4, 8) trains and samples
    the same experts, the largest K runs ``steady_batches`` full batches, and
    the rounds interleave the K so that a shared machine's drift in speed falls on every K alike.
    ``steady_batches * max(sizes)`` clusters are needed (:func:`clusters_needed`). Returns
    ``{K: {...}}`` rows (see the module docstring)."""
    largest = max(sizes)
    steady = clusters_needed(sizes, steady_batches)
    if len(rows) < steady:
        raise SystemExit(f"the sweep needs {steady} clusters for {steady_batches} steady batches of {largest} (have {len(rows)})")
    ops: dict[int, int | None] = {}
    schedule = profiler_schedule(steps) if profile else None
    if profile and schedule is None:
        print("  (the aten operators of a training step need at least 2 steps: not counted)", flush=True)
    for k in sizes:  # warm-up (and the profiled step)
        first = rows[:k]
        if schedule is not None and k in (min(sizes), largest):
            ops[k] = _profiled_ops(worker, first, [demos[r["cluster_id"]] for r in first], trace, k, schedule)
        else:
            _check(worker.run_batch(first, [demos[r["cluster_id"]] for r in first], timings={}))
            ops[k] = None
    timings: dict[int, dict] = {k: {} for k in sizes}
    seconds = dict.fromkeys(sizes, 0.0)
    batches = dict.fromkeys(sizes, 0)
    for i in range(steady_batches):
        chunk = rows[i * largest : (i + 1) * largest]
        for k in sizes:
            started = time.perf_counter()
            for j in range(0, largest - k + 1, k):
                group = chunk[j : j + k]
                _check(worker.run_batch(group, [demos[r["cluster_id"]] for r in group], timings=timings[k]))
                batches[k] += 1
            seconds[k] += time.perf_counter() - started
    out = {}
    for k in sizes:
        n = k * batches[k]
        train = sum(timings[k].get(p, 0.0) for p in ("data", "forward", "backward", "optimizer"))
        per_step = train / n / steps  # training seconds per expert and step
        other = (seconds[k] - train) / n  # per expert: set-up, sampling, scoring
        out[k] = {"experts": n, "batches": batches[k], "seconds": round(seconds[k], 2), "experts_per_hour": 3600 * n / seconds[k],
                  "seconds_per_expert": _per_expert(timings[k], seconds[k], n), "aten_ops_per_step": ops[k],
                  "expert_steps_per_second": round(1 / per_step, 2), "batch_steps_per_second": round(1 / (per_step * k), 3),
                  "projected_500_step_experts_per_hour": round(3600 / (500 * per_step + other), 1)}
        print(f"  K={k:3d}: {out[k]['experts_per_hour']:8.0f} experts/hour over {n} experts ({batches[k]} steady batches)"
              + (f", {ops[k]} aten ops per training step" if ops[k] else ""), flush=True)
    base = out[min(sizes)]
    for k in sizes:
        out[k]["ratio_to_k1"] = out[k]["experts_per_hour"] / base["experts_per_hour"]  # to the smallest K (K = 1 in a sweep from 1)
    return out


def _per_expert(timings: dict, seconds: float, n: int) -> dict:
    """Seconds per expert of each of :data:`PHASES`; ``setup`` is the time the others leave."""
    timed = {p: timings.get(p, 0.0) for p in PHASES if p != "setup"}
    return {**{p: round(t / n, 4) for p, t in timed.items()}, "setup": round(max(seconds - sum(timed.values()), 0.0) / n, 4)}


def report(result: dict, sizes: list[int]) -> None:
    """Print the sweep's table: rates, ratios, seconds per expert by phase, operators."""
    print(f"{'K':>4s} {'experts/h':>10s} {'x K=' + str(min(sizes)):>6s} " + " ".join(f"{p:>9s}" for p in PHASES) + f" {'aten/step':>10s}")
    for k in sizes:
        row = result[k]
        ops = row["aten_ops_per_step"]
        print(f"{k:4d} {row['experts_per_hour']:10.0f} {row['ratio_to_k1']:6.2f} " + " ".join(f"{row['seconds_per_expert'][p]:9.3f}" for p in PHASES) + f" {ops if ops else '':>10}")
    lo, hi = min(sizes), max(sizes)
    if result[lo]["aten_ops_per_step"] and result[hi]["aten_ops_per_step"]:
        print(f"aten operators per training step, K={hi} / K={lo}: {result[hi]['aten_ops_per_step'] / result[lo]['aten_ops_per_step']:.2f}x")
    print(f"steady experts per hour, K={hi} / K={lo}: {result[hi]['ratio_to_k1']:.2f}x")
    print("with 500 training steps (the recipe's; from the steps per second and the rest per expert): "
          + ", ".join(f"K={k}: {result[k]['projected_500_step_experts_per_hour']:.0f}/h" for k in sizes))


def run(root: Path, args, sizes: list[int]) -> dict:
    """Build the job on the mined clusters under ``root`` and run the sweep (in process)."""
    from generation.job import GenerateConfig, load_demos
    from generation.resident import ResidentExpertWorker
    from mining.cluster import read_clusters

    overrides = {"lora_rank": args.lora_rank}
    config = GenerateConfig(clusters=str(root / "mined" / "clusters.jsonl"), crawl=str(root / "crawl"), output=str(root / "sweep"), model=args.model,
                            steps=args.steps, recipe_overrides=overrides, lambda_=-1.0, prompts_per_cluster=args.prompts, sample_steps=args.sample_steps,
                            threads_per_expert=args.threads, resident_workers=True, expert_batch_size=max(sizes), compile=args.compile).resolved()
    job = config.expert_job(args.device)
    rows = read_clusters(config.clusters, limit=args.clusters)
    demos = load_demos(config, rows)
    worker = ResidentExpertWorker(job)
    print(f"K sweep, model={args.model} device={args.device} lora_rank={args.lora_rank} clusters={len(rows)} expert steps={args.steps} "
          f"prompts={args.prompts} sample steps={args.sample_steps} compile={args.compile} torch threads={args.threads}", flush=True)
    result = sweep(worker, rows, demos, sizes, steps=args.steps, steady_batches=args.steady_batches, trace=Path(args.trace) if args.trace else None)
    report(result, sizes)
    summary = {"mode": "k-sweep", "model": args.model, "device": args.device, "lora_rank": args.lora_rank, "steps": args.steps, "clusters": len(rows),
               "compile": args.compile, "threads": args.threads, "rows": {str(k): v for k, v in result.items()}}
    print(json.dumps(summary))
    return summary
