"""Experts/hour of ``suti generate``: resident expert workers vs one task per expert, and scaling
from 1 to 2 resident workers, on the same clusters (one run).

Makes a small synthetic crawl, mines it, then runs ``suti generate`` three times on the same
clusters (fresh outputs): per-task experts with 1 worker, resident workers (``--resident-workers``)
with 1 and with 2 workers, on a local Ray instance. Two rates per run, both from the job summary:

* steady (the headline): experts per hour once every worker has finished its first expert
  (``steady_experts_per_hour``: imports, model loading and each worker's first expert are left
  out; a real job of thousands of clusters amortises them);
* end to end: experts over the whole expert phase (``expert_seconds``: mining left out, start-up in).

    python benchmarks/generation_throughput.py --model toy --clusters 8 --steps 60
On a GPU machine (experts per GPU-hour, 1 GPU per expert):
    python benchmarks/generation_throughput.py --device cuda --model sd15-arch --lora-rank 4 --clusters 4 --steps 100

``--expert-batch-size K`` (LoRA, with ``--lora-rank``) adds one resident worker that trains K
experts together, one U-Net pass per step (``suti generate --expert-batch-size``): samples equal
one-at-a-time experts' up to float rounding, not byte for byte.

    python benchmarks/generation_throughput.py --model toy --clusters 8 --steps 60 --lora-rank 4 --expert-batch-size 4

``--expert-batch-size 1,2,4,8,16`` (a list) runs the stacked-expert K sweep instead
(:mod:`expert_sweep`: one resident worker in process, steady experts per hour per K, the time per
expert by phase, aten operators per training step; ``--trace DIR`` writes the profiled step; it
runs at least 4 full batches at the largest K, raising ``--clusters`` when needed; its one worker
gets every core, ``--threads 1`` one)::

    python benchmarks/generation_throughput.py --model toy --lora-rank 4 --steps 60 --clusters 32 --expert-batch-size 1,2,4,8

``--in-process`` runs the same expert code without Ray, in this process, one expert at a time:
per-task experts (``generation.task.run_cluster``: load the base and the scorer, train, save,
load the expert back) against one resident worker (``ResidentExpertWorker``: load once, train in
place, sample from memory), on the same clusters. It needs no Ray (a GPU machine without it):

    python benchmarks/generation_throughput.py --in-process --device cuda --model sd15-arch --lora-rank 4 --random-clip

``--random-clip``: the real-model scorer (OpenAI CLIP ViT-B/32) with random weights in a temporary
hub cache (``bench_models.random_clip_hub_cache``), for machines without its weights: timing only.
A preset with random weights that is not cached on disk (``sd15-arch``) is built once and saved,
so that every expert loads it with ``from_pretrained``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from suti.checks import COUNT


def suti(argv: list[str]) -> int:
    from orchestration.cli import main

    return main(argv)


def _generate(root: Path, out: str, args, workers: int, extra: list[str]) -> tuple[float, float]:
    """(steady, end-to-end) experts per hour of one job (expert phase only)."""
    cmd = ["generate", "--clusters", str(root / "mined" / "clusters.jsonl"), "--crawl", str(root / "crawl"), "--output", str(root / out), "--model", args.model,
           "--steps", str(args.steps), "--max-clusters", str(args.clusters), "--max-workers", str(workers), "--prompts-per-cluster", str(args.prompts),
           "--sample-steps", str(args.sample_steps), "--lambda", "-1", "--gpus-per-expert", "1" if args.device == "cuda" else "0", *extra]
    if args.lora_rank:
        cmd += ["--lora-rank", str(args.lora_rank)]
    code = suti(cmd)
    if code != 0:
        raise SystemExit(code)
    summary = json.loads((root / out / "summary.json").read_text())
    return summary["steady_experts_per_hour"], summary["ran_now"] / summary["expert_seconds"] * 3600


def _max_delta_clip_diff(reference: list[dict], other: list[dict]) -> float:
    """The largest |difference| between two runs' delta-CLIP scores of the same candidates."""
    if [len(a["delta_clip"]) for a in reference] != [len(b["delta_clip"]) for b in other]:
        raise SystemExit("the two runs scored different numbers of candidates; their delta-CLIP scores cannot be compared")
    return max((abs(x - y) for a, b in zip(reference, other) for x, y in zip(a["delta_clip"], b["delta_clip"])), default=0.0)


def in_process(root: Path, args) -> dict:
    """Per-task experts vs one resident worker, without Ray, on the same clusters and seeds.

    Returns the seconds of each expert for both, the resident worker's load time, both rates
    (steady: the mean expert after the first; end to end: everything, loading included) and how
    many clusters gave byte-identical samples.
    """
    from generation.resident import ResidentExpertWorker
    from generation.task import run_cluster
    from generation.job import GenerateConfig, load_demos
    from mining.cluster import read_clusters

    overrides = {"lora_rank": args.lora_rank} if args.lora_rank else {}
    config = GenerateConfig(clusters=str(root / "mined" / "clusters.jsonl"), crawl=str(root / "crawl"), output=str(root / "in-process"), model=args.model,
                            steps=args.steps, recipe_overrides=overrides, lambda_=-1.0, prompts_per_cluster=args.prompts, sample_steps=args.sample_steps,
                            threads_per_expert=args.threads).resolved()
    job = config.expert_job(args.device)
    rows = read_clusters(config.clusters, limit=args.clusters)
    demos = load_demos(config, rows)

    def timed(fn):
        started = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - started

    task_out, task_s = zip(*[timed(lambda r=r: run_cluster(r, demos[r["cluster_id"]], job)) for r in rows])
    print(f"  per-task experts: {', '.join(f'{s:.1f}' for s in task_s)} s", flush=True)
    worker, load_s = timed(lambda: ResidentExpertWorker(job))
    res_out, res_s = zip(*[timed(lambda r=r: worker.run(r, demos[r["cluster_id"]])) for r in rows])
    print(f"  resident worker: load {load_s:.1f} s, experts {', '.join(f'{s:.1f}' for s in res_s)} s", flush=True)
    identical = sum(a["members"] == b["members"] for a, b in zip(task_out, res_out))
    resident_diff = _max_delta_clip_diff(task_out, res_out)  # the measure on GPUs, whose kernels are not bitwise deterministic
    steady = lambda s: 3600 / statistics.mean(s[1:] if len(s) > 1 else s)  # noqa: E731
    result = {"per_task_s": [round(s, 2) for s in task_s], "resident_load_s": round(load_s, 2), "resident_s": [round(s, 2) for s in res_s],
              "per_task_1": (steady(task_s), 3600 * len(task_s) / sum(task_s)), "resident_1": (steady(res_s), 3600 * len(res_s) / (load_s + sum(res_s))),
              "identical_samples": f"{identical}/{len(rows)}", "resident_max_delta_clip_diff": round(resident_diff, 5)}
    k = args.expert_batch_size
    if k > 1:  # the same worker, k experts per batch (its first batch left out of the steady rate)
        groups = [rows[i : i + k] for i in range(0, len(rows), k)]
        batch_out, batch_s = zip(*[timed(lambda g=g: worker.run_batch(g, [demos[r["cluster_id"]] for r in g])) for g in groups])
        per_expert = [s / len(g) for s, g in zip(batch_s, groups)]
        print(f"  resident worker, batches of {k}: {', '.join(f'{s:.1f}' for s in batch_s)} s per batch", flush=True)
        out = [o for group in batch_out for o in group]
        errors = [o for o in out if isinstance(o, BaseException)]
        if errors:
            raise SystemExit(f"a batched expert failed: {errors[0]!r}")
        # the same candidates up to float rounding: their delta-CLIP scores against the per-task experts'
        delta_diff = _max_delta_clip_diff(task_out, out)
        steady_s = batch_s[1:] if len(batch_s) > 1 else batch_s
        steady_n = sum(len(g) for g in groups[1:]) if len(groups) > 1 else len(rows)
        result.update({f"resident_batch_{k}_s": [round(s, 2) for s in per_expert], "resident_batched": (3600 * steady_n / sum(steady_s), 3600 * len(rows) / (load_s + sum(batch_s))),
                       "batched_max_delta_clip_diff": round(delta_diff, 5)})
    return result


def batch_sizes(text: str) -> list[int]:
    """``--expert-batch-size``: one K, or a comma-separated list of distinct Ks (the sweep), each at least 1."""
    try:
        sizes = [int(k) for k in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be whole numbers separated by commas, got {text!r}") from None
    if min(sizes) < 1 or len(set(sizes)) != len(sizes):
        raise argparse.ArgumentTypeError(f"each K must be at least 1, and each K once, got {text!r}")
    return sizes


def _check_model_and_device(parser, args) -> None:
    """Refuse, before any work, a ``--model`` no stage could load and ``--device cuda`` without
    a CUDA device (argparse's one line, exit 2)."""
    from suti.errors import SutiError
    from suti.models import check_model

    try:
        check_model(args.model)
    except SutiError as exc:
        parser.error(str(exc))
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device is visible here")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="toy")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: 1 GPU per expert, rates are per GPU-hour")
    parser.add_argument("--lora-rank", type=COUNT, help="LoRA experts of this rank (default: the recipe's full fine-tuning)")
    parser.add_argument("--clusters", type=COUNT, default=8)
    parser.add_argument("--steps", type=COUNT, default=60)
    parser.add_argument("--prompts", type=COUNT, default=2, help="prompts sampled per expert")
    parser.add_argument("--sample-steps", type=COUNT, default=25)
    parser.add_argument("--skip-scaling", action="store_true", help="leave out the 2-worker run (one GPU)")
    parser.add_argument("--in-process", action="store_true", help="no Ray: per-task experts vs one resident worker in this process (no scaling row)")
    parser.add_argument("--threads", type=COUNT, help="torch threads of the expert worker (--in-process: default 1; the K sweep's one worker: default every "
                        "core this process may use, as a GPU worker has its whole GPU; --threads 1 measures it on one core)")
    parser.add_argument("--expert-batch-size", type=batch_sizes, default=[1], help="also resident workers training this many LoRA experts together (needs --lora-rank); "
                        "a list (1,2,4,8): the stacked-expert K sweep (benchmarks/expert_sweep.py)")
    parser.add_argument("--trace", help="K sweep: write the profiled training step's Chrome trace here")
    parser.add_argument("--steady-batches", type=COUNT, default=4, help="K sweep: timed batches at the largest K (after a warm-up batch); the sweep runs at least this x largest K clusters")
    parser.add_argument("--compile", action="store_true", help="K sweep: train through torch.compile")
    parser.add_argument("--random-clip", action="store_true", help="random-weight OpenAI CLIP ViT-B/32 in a temporary hub cache (no weights on the machine; timing only)")
    args = parser.parse_args()
    sizes = args.expert_batch_size
    args.expert_batch_size = sizes[0]
    if len(sizes) > 1 and not args.lora_rank:
        parser.error("the K sweep trains LoRA experts: give --lora-rank")
    if len(sizes) > 1 and args.in_process:
        parser.error("--in-process takes one --expert-batch-size; a list runs the K sweep (in process already)")
    _check_model_and_device(parser, args)
    if len(sizes) > 1:
        from expert_sweep import clusters_needed

        args.threads = args.threads or len(os.sched_getaffinity(0))
        needed = clusters_needed(sizes, args.steady_batches)
        if args.clusters < needed:
            print(f"K sweep: {args.steady_batches} steady batches of {max(sizes)} need {needed} clusters; running {needed} (--clusters {args.clusters})", flush=True)
            args.clusters = needed
    args.threads = args.threads or 1
    if args.random_clip:
        from bench_models import random_clip_hub_cache

        random_clip_hub_cache()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        from bench_models import model_folder

        args.model = model_folder(args.model, root)
        for stage in (["world", "make", "--output", str(root / "crawl"), "--subjects", str(args.clusters * 2), "--noise-pages", "0.2", "--seed", "3", "--size", "32"],
                      ["mine", "--crawl", str(root / "crawl"), "--output", str(root / "mined")]):
            code = suti(stage)
            if code != 0:  # its own one-line error is printed
                raise SystemExit(code)
        args.clusters = min(args.clusters, len((root / "mined" / "clusters.jsonl").read_text().splitlines()))
        if len(sizes) > 1:
            from expert_sweep import run

            run(root, args, sizes)
            return
        if args.in_process:
            result = in_process(root, args)
            unit = "experts per GPU-hour" if args.device == "cuda" else "experts/hour"
            print(f"in process (no Ray), model={args.model} device={args.device} lora_rank={args.lora_rank} clusters={args.clusters} expert steps={args.steps} "
                  f"prompts={args.prompts} sample steps={args.sample_steps}")
            print(f"{'':30s} {'steady':>8s} {'end to end':>11s}  ({unit})")
            for name in ("per_task_1", "resident_1", "resident_batched"):
                if name in result:
                    print(f"  {name:28s} {result[name][0]:8.0f} {result[name][1]:11.0f}")
            result.update(resident_vs_per_task=result["resident_1"][0] / result["per_task_1"][0], resident_vs_per_task_end_to_end=result["resident_1"][1] / result["per_task_1"][1])
            print(f"resident / per-task: {result['resident_vs_per_task']:.2f}x steady, {result['resident_vs_per_task_end_to_end']:.2f}x end to end; "
                  f"identical samples {result['identical_samples']}, largest delta-CLIP difference {result['resident_max_delta_clip_diff']:.5f}")
            if "resident_batched" in result:
                result.update(batched_vs_per_task=result["resident_batched"][0] / result["per_task_1"][0], batched_vs_per_task_end_to_end=result["resident_batched"][1] / result["per_task_1"][1])
                print(f"resident, batches of {args.expert_batch_size} / per-task: {result['batched_vs_per_task']:.2f}x steady, {result['batched_vs_per_task_end_to_end']:.2f}x end to end; "
                      f"largest delta-CLIP difference from per-task experts {result['batched_max_delta_clip_diff']:.5f}")
            print(json.dumps({"mode": "in-process", "model": args.model, "device": args.device, "lora_rank": args.lora_rank, "steps": args.steps, **result}))
            return
        per_task = _generate(root, "task", args, 1, [])
        resident = _generate(root, "resident1", args, 1, ["--resident-workers"])
        resident2 = None if args.skip_scaling else _generate(root, "resident2", args, 2, ["--resident-workers"])
        k = args.expert_batch_size  # one worker holding k experts
        batched = _generate(root, f"batched{k}", args, k, ["--resident-workers", "--expert-batch-size", str(k)]) if k > 1 else None
    unit = "experts per GPU-hour" if args.device == "cuda" else "experts/hour"
    print(f"model={args.model} device={args.device} lora_rank={args.lora_rank} clusters={args.clusters} expert steps={args.steps} prompts={args.prompts} sample steps={args.sample_steps}")
    print(f"{'':30s} {'steady':>8s} {'end to end':>11s}  ({unit})")
    rows = [("per-task experts, 1 worker", per_task), ("resident workers, 1 worker", resident)] + ([("resident workers, 2 workers", resident2)] if resident2 else [])
    rows += [(f"resident, batches of {args.expert_batch_size}, 1 wkr", batched)] if batched else []
    for name, (steady, e2e) in rows:
        print(f"  {name:28s} {steady:8.0f} {e2e:11.0f}")
    print(f"resident / per-task: {resident[0] / per_task[0]:.2f}x steady, {resident[1] / per_task[1]:.2f}x end to end")
    result = {"model": args.model, "device": args.device, "lora_rank": args.lora_rank, "clusters": args.clusters, "steps": args.steps,
              "per_task_1": per_task, "resident_1": resident, "resident_vs_per_task": resident[0] / per_task[0], "resident_vs_per_task_end_to_end": resident[1] / per_task[1]}
    if batched is not None:
        print(f"resident workers training batches of {args.expert_batch_size} / per-task: {batched[0] / per_task[0]:.2f}x steady, {batched[1] / per_task[1]:.2f}x end to end")
        result.update(expert_batch_size=args.expert_batch_size, batched_1=batched, batched_vs_per_task=batched[0] / per_task[0], batched_vs_per_task_end_to_end=batched[1] / per_task[1])
    if resident2 is not None:
        print(f"scaling 1 -> 2 workers: {resident2[0] / resident[0]:.2f}x steady, {resident2[1] / resident[1]:.2f}x end to end" + (f" ({resident2[0] / 2:.0f} per GPU-hour steady)" if args.device == "cuda" else ""))
        result.update(resident_2=resident2, scaling_1_to_2=resident2[0] / resident[0], scaling_1_to_2_end_to_end=resident2[1] / resident[1])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
