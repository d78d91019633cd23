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
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from suti.cli import main as suti


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="toy")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: 1 GPU per expert, rates are per GPU-hour")
    parser.add_argument("--lora-rank", type=int, help="LoRA experts of this rank (default: the recipe's full fine-tuning)")
    parser.add_argument("--clusters", type=int, default=8)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--prompts", type=int, default=2, help="prompts sampled per expert")
    parser.add_argument("--sample-steps", type=int, default=25)
    parser.add_argument("--skip-scaling", action="store_true", help="leave out the 2-worker run (one GPU)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        suti(["world", "make", "--output", str(root / "crawl"), "--subjects", str(args.clusters * 2), "--noise-pages", "0.2", "--seed", "3", "--size", "32"])
        suti(["mine", "--crawl", str(root / "crawl"), "--output", str(root / "mined")])
        args.clusters = min(args.clusters, len((root / "mined" / "clusters.jsonl").read_text().splitlines()))
        per_task = _generate(root, "task", args, 1, [])
        resident = _generate(root, "resident1", args, 1, ["--resident-workers"])
        resident2 = None if args.skip_scaling else _generate(root, "resident2", args, 2, ["--resident-workers"])
    unit = "experts per GPU-hour" if args.device == "cuda" else "experts/hour"
    print(f"model={args.model} device={args.device} lora_rank={args.lora_rank} clusters={args.clusters} expert steps={args.steps} prompts={args.prompts} sample steps={args.sample_steps}")
    print(f"{'':30s} {'steady':>8s} {'end to end':>11s}  ({unit})")
    rows = [("per-task experts, 1 worker", per_task), ("resident workers, 1 worker", resident)] + ([("resident workers, 2 workers", resident2)] if resident2 else [])
    for name, (steady, e2e) in rows:
        print(f"  {name:28s} {steady:8.0f} {e2e:11.0f}")
    print(f"resident / per-task: {resident[0] / per_task[0]:.2f}x steady, {resident[1] / per_task[1]:.2f}x end to end")
    result = {"model": args.model, "device": args.device, "lora_rank": args.lora_rank, "clusters": args.clusters, "steps": args.steps,
              "per_task_1": per_task, "resident_1": resident, "resident_vs_per_task": resident[0] / per_task[0], "resident_vs_per_task_end_to_end": resident[1] / per_task[1]}
    if resident2 is not None:
        print(f"scaling 1 -> 2 workers: {resident2[0] / resident[0]:.2f}x steady, {resident2[1] / resident[1]:.2f}x end to end" + (f" ({resident2[0] / 2:.0f} per GPU-hour steady)" if args.device == "cuda" else ""))
        result.update(resident_2=resident2, scaling_1_to_2=resident2[0] / resident[0], scaling_1_to_2_end_to_end=resident2[1] / resident[1])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
